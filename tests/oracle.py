"""The test oracle: transformers' reference Aria, loaded from the checkpoints our writer produces.

Only tests import this module; transformers is never a runtime dependency.
"""

from __future__ import annotations

import torch


def reference_model(checkpoint_dir):
    from transformers import AriaForConditionalGeneration

    model = AriaForConditionalGeneration.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate exactly the asked number of tokens
    return model.eval()


def _image_kwargs(pixel_values, pixel_mask) -> dict:
    # The reference runs its vision tower whenever the keys are present, even as None.
    return {} if pixel_values is None else {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


@torch.no_grad()
def reference_logits(model, ids, pixel_values=None, pixel_mask=None):
    return model(input_ids=ids, **_image_kwargs(pixel_values, pixel_mask)).logits.float()


@torch.no_grad()
def reference_greedy(model, ids, n, pixel_values=None, pixel_mask=None) -> list[int]:
    out = model.generate(
        input_ids=ids, **_image_kwargs(pixel_values, pixel_mask), max_new_tokens=n, do_sample=False, pad_token_id=0,
    )
    return out[0, ids.shape[1]:].tolist()


# The slow-tokenizer settings rhymes-ai/Aria ships in tokenizer_config.json (no BOS/EOS added).
REFERENCE_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": False, "add_eos_token": False,
    "bos_token": None, "eos_token": None, "unk_token": "<unk>", "pad_token": "<unk>",
}


def reference_tokenizer(model_dir):
    """transformers' tokenizer for the tokenizer.model in `model_dir`, as AriaProcessor uses it.

    add_prefix_space=False makes its fast tokenizer equal the slow one the official code forced
    (tests/test_tokenizer.py pins both facts).
    """
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    config = Path(model_dir) / "tokenizer_config.json"
    if not config.exists():
        config.write_text(json.dumps(REFERENCE_TOKENIZER_CONFIG))
    return AutoTokenizer.from_pretrained(str(model_dir), add_prefix_space=False,
                                         extra_special_tokens={"image_token": "<|img|>"})
