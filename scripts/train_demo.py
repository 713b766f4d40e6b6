"""Train the demo model, a tiny Aria, on the shapes task and write it to runtime/demo_model/.

    python scripts/train_demo.py                      # the shipped model
    python scripts/train_demo.py --out /tmp/demo      # somewhere else

Time on the development machine (2 shared CPU cores, torch 2.13): 16 minutes (about 3 to turn
9000 pictures into patch features, 13 for 3000 steps), 1.6 GB peak memory. Seeds are fixed: the
tokenizer, the pictures, the questions, the initial weights and the batch order do not depend on
the machine; the weights after training match only up to floating-point summation order
(thread count, CPU kernels).

What is trained: every weight of Aria's architecture (text MoE decoder with routed and shared
experts, vision tower, projector) EXCEPT the vision patch embedding. That Conv2d (70x70x3 ->
vision width) is the largest tensor and, at 980-pixel crops, most of the arithmetic; it is set
to a fixed bank of low-frequency 2-D cosine (DCT) filters per colour channel, which keeps each
patch's colours and coarse outline. Because it is fixed, every picture's patch features are
computed once (cheaply, since the filters are separable) and training runs the rest of the model
on them, through the model's own forward: the patch Conv2d's forward is temporarily replaced by
"add the bias" (the bias stays trainable). Each filter is scaled to unit spread over the
training patches (folded into the Conv2d weight). Before saving, the real Conv2d path is checked
to give the same image features.

Besides the answer loss, a linear "scene probe" reads shape, colour and count straight from the
projector's image tokens during training (and is thrown away): it makes the vision tower learn
from the first step instead of after the language model has learned the answers' priors.

The pictures go through runtime.image_processing exactly as in `aria ask` (980-pixel crops, the
CLI default); prompts are built by runtime.chat_template from conversations of 1-4 questions
about one picture (so follow-up questions in `aria chat` work too); the loss is on the answer
tokens and the `<|im_end|>` that ends each answer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime import shapes_task
from runtime.chat_template import encode_prompt
from runtime.checkpoint_writer import write_checkpoint
from runtime.config import AriaConfig
from runtime.demo import DEMO_MODEL_DIR, DEMO_QUESTION
from runtime.image_processing import preprocess_crop
from runtime.model import build_model, init_random_weights
from runtime.shapes_task import (
    COLORS,
    MAX_COUNT,
    QUESTION_KINDS,
    SHAPES,
    corpus,
    describe,
    draw_scene,
    example,
    make_question,
)
from runtime.tiny_checkpoint import tiny_config
from runtime.tiny_tokenizer import train_tiny_tokenizer
from runtime.tokenizer import Tokenizer
from runtime.vision import patch_mask_from_pixel_mask

CROP = 980
VOCAB = 400  # whole words for every task word (see corpus())
VISION_WIDTH = 96
DCT_PER_CHANNEL = VISION_WIDTH // 3
SEED = 0


def demo_config(vocab_size: int) -> AriaConfig:
    return tiny_config(
        vocab_size=vocab_size,
        hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        moe_intermediate_size=128, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=2,
        max_position_embeddings=4096,
        vision_hidden_size=VISION_WIDTH, vision_intermediate_size=192, vision_num_hidden_layers=2,
        vision_num_attention_heads=3, vision_image_size=980, vision_patch_size=70,
        patch_to_query={49: 8, 196: 16},
    )


# ---------------------------------------------------------------- the fixed patch embedding

def _dct_pairs() -> list[tuple[int, int]]:
    """The DCT_PER_CHANNEL lowest-frequency (row, column) frequency pairs."""
    pairs = sorted(((u, v) for u in range(8) for v in range(8)), key=lambda p: (p[0] + p[1], p[0]))
    return pairs[:DCT_PER_CHANNEL]


def _cosines(patch: int) -> torch.Tensor:
    """[8, patch] 1-D DCT-II basis (float64)."""
    i = torch.arange(patch, dtype=torch.float64)
    return torch.stack([torch.cos(math.pi * (2 * i + 1) * u / (2 * patch)) for u in range(8)])


def dct_patch_weight(patch: int) -> torch.Tensor:
    """Conv2d weight [3 * DCT_PER_CHANNEL, 3, patch, patch]: per channel, low-frequency cosines
    scaled so a patch of value 1 gives 1 on the constant filter and matching cosines about 1."""
    cos = _cosines(patch)
    weight = torch.zeros(3 * DCT_PER_CHANNEL, 3, patch, patch, dtype=torch.float64)
    for k, (u, v) in enumerate(_dct_pairs()):
        scale = (1.0 if u == 0 else 2.0) * (1.0 if v == 0 else 2.0) / patch**2
        for c in range(3):
            weight[c * DCT_PER_CHANNEL + k, c] = scale * torch.outer(cos[u], cos[v])
    return weight.float()


def dct_features(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """What the Conv2d with dct_patch_weight (no bias) computes, done separably: [N, D, g, g]."""
    n, c, s, _ = pixel_values.shape
    g = s // patch
    cos = _cosines(patch).float()
    x = pixel_values.reshape(n, c, g, patch, g, patch)
    x = torch.einsum("ncpiqj,vj->ncpiqv", x, cos)
    x = torch.einsum("ncpiqv,ui->ncpquv", x, cos)  # [n, c, g, g, 8, 8]
    pairs = _dct_pairs()
    u = torch.tensor([p[0] for p in pairs])
    v = torch.tensor([p[1] for p in pairs])
    scale = torch.tensor([(1.0 if a == 0 else 2.0) * (1.0 if b == 0 else 2.0) / patch**2 for a, b in pairs])
    x = x[..., u, v] * scale  # [n, c, g, g, K]
    return x.permute(0, 1, 4, 2, 3).reshape(n, c * len(pairs), g, g).contiguous()


BLOCK = 500  # pictures per work item and per cache file


def picture_block(split: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features [n, D, g, g] (the DCT conv without bias) and patch masks [n, g, g] of
    pictures start..stop-1 of `split`, through the runtime's own preprocessing."""
    torch.set_num_threads(1)  # one block per worker process
    features, masks = [], []
    for first in range(start, stop, 16):
        crops = [preprocess_crop(example(split, i).image(), CROP) for i in range(first, min(first + 16, stop))]
        features.append(dct_features(torch.stack([c[0] for c in crops]), 70))
        masks.append(patch_mask_from_pixel_mask(torch.stack([c[1] for c in crops]), 70))
    return torch.cat(features), torch.cat(masks)


class Pictures:
    """Patch features and patch masks of the first `count` pictures of a split, computed once
    (by `workers` processes, in blocks that are cached on disk when `cache` is given)."""

    def __init__(self, split: str, count: int, cache: Path | None, workers: int = 2):
        self.split, self.count = split, count
        self.scenes = [example(split, i).scene for i in range(count)]
        blocks = [(start, min(start + BLOCK, count)) for start in range(0, count, BLOCK)]
        # The file names carry a hash of the task's source, so a changed task never reads stale pictures.
        task = hashlib.sha1(Path(shapes_task.__file__).read_bytes()).hexdigest()[:10]
        files = [cache / f"{split}-{a}-{b}-{CROP}-{VISION_WIDTH}-{task}.pt" if cache else None for a, b in blocks]
        todo = [(split, a, b) for (a, b), f in zip(blocks, files) if not (f and f.is_file())]
        started = time.perf_counter()
        done: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        if todo:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for (_, a, b), result in zip(todo, pool.imap(_picture_block_args, todo)):
                    done[(a, b)] = result
                    print(f"  {split}: pictures {a}..{b - 1} ready at {time.perf_counter() - started:.0f}s",
                          flush=True)
        features, masks = [], []
        for (a, b), file in zip(blocks, files):
            if (a, b) in done:
                block = done[(a, b)]
                if file:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(block, file)
            else:
                block = torch.load(file)
            features.append(block[0])
            masks.append(block[1])
        self.features, self.patch_mask = torch.cat(features), torch.cat(masks)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features standing in for pixel_values, a pixel mask with the same patch mask)."""
        mask = self.patch_mask[indices]
        return self.features[indices], mask.repeat_interleave(70, 1).repeat_interleave(70, 2)


def _picture_block_args(args: tuple[str, int, int]):
    return picture_block(*args)


# ---------------------------------------------------------------- conversations -> token ids

def user(text: str, image: bool) -> dict:
    content = [{"type": "image"}] if image else []
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def encode_conversation(tokenizer: Tokenizer, qa: list[tuple[str, str]], image_tokens: int):
    """(ids, target mask): mask[t] says ids[t] is part of an answer (or its <|im_end|>).

    The ids are what the chat template gives for the whole conversation; each answer starts right
    where the template's generation prompt for that turn ends, exactly as at inference."""
    messages: list[dict] = []
    spans = []
    for turn, (question, answer) in enumerate(qa):
        messages.append(user(question, image=turn == 0))
        start = len(encode_prompt(tokenizer, messages, [image_tokens], add_generation_prompt=True))
        spans.append((start, start + len(tokenizer.encode(answer)) + 1))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    ids = encode_prompt(tokenizer, messages, [image_tokens], add_generation_prompt=False)
    mask = [False] * len(ids)
    for start, end in spans:
        if ids[end - 1] != tokenizer.im_end_id:  # the template and tokenizer disagree with our spans
            raise RuntimeError("answer span does not end with <|im_end|>; the tokenizer merges across turns")
        mask[start:end] = [True] * (end - start)
    return ids, mask


def pad_batch(rows: list[tuple[list[int], list[bool]]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (row_ids, row_mask) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        mask[r, : len(row_mask)] = torch.tensor(row_mask)
    return ids, mask


def loss_and_hits(model, ids, target_mask, features, pixel_mask):
    """Cross-entropy on answer tokens, and per row whether every answer token is the argmax."""
    logits = model(ids, None, 0, features, pixel_mask, all_logits=True)[:, :-1]
    targets, mask = ids[:, 1:], target_mask[:, 1:]
    loss = F.cross_entropy(logits[mask], targets[mask])
    right = (logits.argmax(-1) == targets) | ~mask
    return loss, right.all(dim=1)


# ---------------------------------------------------------------- training

def conversation(scene, rng: random.Random) -> list[tuple[str, str]]:
    # Mostly several questions per picture: each answer is supervision for the one vision pass.
    turns = rng.choices((1, 2, 3, 4), weights=(1, 2, 3, 3))[0]
    first = make_question(scene, rng, rng.choice(QUESTION_KINDS))
    return [first[1:]] + [make_question(scene, rng)[1:] for _ in range(turns - 1)]


@torch.no_grad()
def whiten(model, train_pics: Pictures, *others: Pictures) -> None:
    """Scale each fixed filter to unit spread over the training patches. The cosines' raw outputs
    span two orders of magnitude (a picture's plain background puts most energy in the constant
    filters); without this the vision tower barely learns shapes or counts in the time we have.
    The scale is folded into the Conv2d weight, so the saved model needs nothing extra."""
    spread = train_pics.features.transpose(0, 1).flatten(1).std(dim=1).clamp_min(1e-3)
    model.vision_tower.embeddings.patch_embedding.weight.div_(spread[:, None, None, None])
    for pictures in (train_pics, *others):
        pictures.features /= spread[None, :, None, None]


class SceneProbe(torch.nn.Module):
    """Training aid, not saved: reads the shape, colour and count of the picture straight from
    the image tokens the projector hands the language model. Its loss reaches the vision tower
    and projector from the first step, where the answer loss alone first teaches the language
    model the answers' priors and leaves the picture unread for hundreds of steps."""

    def __init__(self, model, image_tokens: int, hidden: int):
        super().__init__()
        self.head = torch.nn.Linear(image_tokens * hidden, len(SHAPES) + len(COLORS) + MAX_COUNT)
        self.tokens = None
        model.multi_modal_projector.register_forward_hook(lambda _m, _in, out: setattr(self, "tokens", out))

    def loss(self, scenes) -> torch.Tensor:
        logits = self.head(self.tokens.flatten(1)).split([len(SHAPES), len(COLORS), MAX_COUNT], dim=1)
        labels = (
            [SHAPES.index(s.shape) for s in scenes], [list(COLORS).index(s.color) for s in scenes],
            [s.count - 1 for s in scenes],
        )
        return sum(F.cross_entropy(lg, torch.tensor(lb)) for lg, lb in zip(logits, labels))


def patch_embedding_from_features(model) -> None:
    """Training mode: the patch Conv2d receives precomputed DCT features and adds its bias."""
    conv = model.vision_tower.embeddings.patch_embedding
    conv.weight.requires_grad_(False)
    conv.forward = lambda features: features + conv.bias[:, None, None]


def restore_patch_embedding(model) -> None:
    del model.vision_tower.embeddings.patch_embedding.forward


@torch.no_grad()
def heldout_exact(model, tokenizer, pictures: Pictures, image_tokens: int) -> str:
    """Teacher-forced exact match of first answers on held-out pictures (= greedy exact match
    whenever every answer token is the argmax), overall and per question kind."""
    model.eval()
    hits: dict[str, list[bool]] = {kind: [] for kind in QUESTION_KINDS}
    for start in range(0, pictures.count, 64):
        examples = [example(pictures.split, i) for i in range(start, min(start + 64, pictures.count))]
        rows = [encode_conversation(tokenizer, [(ex.question, ex.answer)], image_tokens) for ex in examples]
        ids, mask = pad_batch(rows, tokenizer.pad_id)
        _, ok = loss_and_hits(model, ids, mask, *pictures.batch(list(range(start, start + len(examples)))))
        for ex, right in zip(examples, ok.tolist()):
            hits[ex.kind].append(right)
    model.train()
    overall = sum(map(sum, hits.values())) / pictures.count
    return f"{overall:.3f} (" + " ".join(f"{k} {sum(v) / max(1, len(v)):.2f}" for k, v in hits.items()) + ")"


def train(args) -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    # As the loss falls, gradients and Adam's moments reach subnormal floats, which x86 CPUs
    # handle in slow microcode: without this, steps get twice as slow over a run.
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    stage = Path(args.out).with_name(Path(args.out).name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)

    tokenizer_file = train_tiny_tokenizer(stage / "tokenizer.model", corpus=corpus() + ["user", "assistant", "system"],
                                          vocab_size=VOCAB)
    tokenizer = Tokenizer(tokenizer_file)
    config = demo_config(tokenizer.vocab_size)
    image_tokens = config.tokens_per_crop(CROP)

    model = init_random_weights(build_model(config, device="cpu"), seed=SEED)
    with torch.no_grad():
        conv = model.vision_tower.embeddings.patch_embedding
        conv.weight.copy_(dct_patch_weight(config.vision.patch_size))
        conv.bias.zero_()
        model.vision_tower.embeddings.position_embedding.weight.mul_(0.1)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {tokenizer.vocab_size}")

    cache = Path(args.cache) if args.cache else None
    print("pictures -> patch features (once)", flush=True)
    train_pics = Pictures("train", args.pictures, cache)
    held_pics = Pictures("heldout", args.monitor, cache)
    print(f"  done at {time.perf_counter() - started:.0f}s", flush=True)

    whiten(model, train_pics, held_pics)
    model.requires_grad_(True)
    patch_embedding_from_features(model)
    model.train()
    probe = SceneProbe(model, image_tokens, config.text.hidden_size)
    trained = [*model.named_parameters(), *probe.named_parameters()]
    decay = [p for n, p in trained if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in trained if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(SEED)
    order: list[int] = []
    smoothed = None
    for step in range(args.steps):
        if len(order) < args.batch:
            more = list(range(train_pics.count))
            rng.shuffle(more)
            order += more
        idx, order = order[: args.batch], order[args.batch:]
        rows = [encode_conversation(tokenizer, conversation(train_pics.scenes[i], rng), image_tokens) for i in idx]
        ids, mask = pad_batch(rows, tokenizer.pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        answer_loss, _ = loss_and_hits(model, ids, mask, *train_pics.batch(idx))
        loss = answer_loss + args.probe_weight * probe.loss([train_pics.scenes[i] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        optimizer.step()
        smoothed = answer_loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * answer_loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            line = f"step {step + 1}/{args.steps}  loss {smoothed:.4f}  lr {lr_at(step):.2e}  {time.perf_counter() - started:.0f}s"
            if (step + 1) % (args.log_every * 5) == 0 or step + 1 == args.steps:
                line += f"  held-out exact (teacher-forced) {heldout_exact(model, tokenizer, held_pics, image_tokens)}"
            print(line, flush=True)

    restore_patch_embedding(model)
    model.eval().requires_grad_(False)
    check_real_patch_path(model, held_pics)
    save(model, config, stage, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f}s total", flush=True)


@torch.no_grad()
def check_real_patch_path(model, pictures: Pictures) -> None:
    """The saved Conv2d on real pixels must give the features training used."""
    for i in range(4):
        pixels, mask = preprocess_crop(example(pictures.split, i).image(), CROP)
        real = model.image_features(pixels[None], mask[None])
        patch_embedding_from_features(model)
        try:
            trained = model.image_features(*pictures.batch([i]))
        finally:
            restore_patch_embedding(model)
        # Relative: whitening makes the conv weights large, so float32 rounding grows with them;
        # a wrong layout or normalisation would be off by the size of the features themselves.
        gap = ((real - trained).abs().max() / trained.abs().max()).item()
        if gap > 1e-2:
            raise RuntimeError(f"the real patch embedding differs from the training path by {gap:.1%}")


# ---------------------------------------------------------------- writing the package files

TOKENIZER_CONFIG = {
    # As rhymes-ai/Aria ships it (ARIA_SPEC §5.1): the slow Llama tokenizer, nothing added.
    "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": False, "add_eos_token": False,
    "bos_token": None, "eos_token": None, "unk_token": "<unk>", "pad_token": "<unk>",
    "add_prefix_space": False, "spaces_between_special_tokens": False, "clean_up_tokenization_spaces": False,
}
CHAT_TEMPLATE = (  # the template string of ARIA_SPEC §5.2
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% elif message['content'] is iterable %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}"
    "<fim_prefix><|img|><fim_suffix>{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def preprocessor_config(config: AriaConfig) -> dict:
    return {
        "image_processor_type": "AriaImageProcessor", "processor_class": "AriaProcessor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "max_image_size": CROP, "min_image_size": 336, "split_image": False, "resample": 3,
        "do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    }


def processor_config(config: AriaConfig) -> dict:
    sizes = {str(round(p**0.5) * config.vision.patch_size): q for p, q in config.patch_to_query.items()}
    return {"processor_class": "AriaProcessor", "size_conversion": sizes}


def example_indices(count: int = 6) -> list[int]:
    """Example pictures for the package, from the "examples" split: first a red circle (the
    picture the README asks about), then one for each other count, with shapes not yet shown."""
    wanted = [(1, "circle", "red"), (3, None, None), (2, None, None), (5, None, None), (4, None, None),
              (1, None, None)]  # (count, shape, colour); None: any
    chosen: list[int] = []
    seen_shapes: set[str] = set()
    i = 0
    while len(chosen) < count:
        scene = example("examples", i).scene
        want_count, want_shape, want_colour = wanted[len(chosen)]
        fresh = scene.shape not in seen_shapes or len(seen_shapes) == len(SHAPES)
        if (scene.count == want_count and scene.shape == (want_shape or scene.shape)
                and scene.color == (want_colour or scene.color) and fresh):
            chosen.append(i)
            seen_shapes.add(scene.shape)
        i += 1
    return chosen


def save(model, config: AriaConfig, stage: Path, out: str) -> None:
    # bfloat16 as on the Hub; scripts/eval_demo.py reports float32 and bfloat16 compute on it.
    write_checkpoint(stage, model.state_dict(), config, layout="c1", dtype=torch.bfloat16, overwrite=True)
    (stage / "tokenizer_config.json").write_text(
        json.dumps({**TOKENIZER_CONFIG, "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (stage / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(config), indent=2) + "\n")
    (stage / "processor_config.json").write_text(json.dumps(processor_config(config), indent=2) + "\n")
    write_examples(stage / "examples")
    out_path = Path(out)
    shutil.rmtree(out_path, ignore_errors=True)
    stage.rename(out_path)


def write_examples(examples: Path) -> None:
    examples.mkdir()
    for i in example_indices():
        scene = example("examples", i).scene
        # Named by what they show, e.g. red-circle.png, 3-blue-squares.png
        name = describe(scene.shape, scene.color, scene.count).removeprefix("a ").replace(" ", "-")
        draw_scene(scene).save(examples / f"{name}.png", optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEMO_MODEL_DIR), help="checkpoint directory to write")
    parser.add_argument("--pictures", type=int, default=9000, help="distinct training pictures")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32, help="conversations (one picture each) per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--monitor", type=int, default=256, help="held-out pictures for the progress lines")
    parser.add_argument("--probe-weight", type=float, default=0.3, help="weight of the scene probe's loss")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--cache", default=None, help="directory to keep patch features in between runs")
    args = parser.parse_args(argv)
    print(f"training the demo model -> {args.out} (question for the demo: {DEMO_QUESTION!r})", flush=True)
    train(args)


if __name__ == "__main__":
    sys.exit(main())
