"""Our Aria against transformers' AriaForConditionalGeneration on tiny random checkpoints (float32).

Both load the same files written by runtime.tiny_checkpoint (hub layout c1, which transformers
reads natively). Prefill logits must agree to 1e-4 and 32 greedy tokens exactly.
"""

from __future__ import annotations

import pytest
import torch

from runtime.generate import Session
from runtime.loader import load_model
from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint
from tests.oracle import reference_greedy, reference_logits, reference_model

ATOL = 1e-4
N_TOKENS = 32


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request, tmp_path_factory):
    kv_heads = 4 if request.param == "mha" else 2
    config = tiny_config(num_key_value_heads=kv_heads)
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), layout="c1", seed=3, config=config)
    return load_model(path, dtype=torch.float32), reference_model(path)


def crops(sizes_and_valid, seed=0):
    """Preprocessed-looking crops: values in [-1, 1], padding -1, valid top-left (h, w) region."""
    gen = torch.Generator().manual_seed(seed)
    size = sizes_and_valid[0][0]
    pixels = torch.full((len(sizes_and_valid), 3, size, size), -1.0)
    mask = torch.zeros(len(sizes_and_valid), size, size, dtype=torch.bool)
    for i, (s, h, w) in enumerate(sizes_and_valid):
        assert s == size, "crops of one call share a size"
        pixels[i, :, :h, :w] = torch.rand(3, h, w, generator=gen) * 2 - 1
        mask[i, :h, :w] = True
    return pixels, mask


def prompt(model, pieces, seed=0):
    """pieces: ints = that many random text tokens; ("img", crop_size) = one crop's image tokens."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids += torch.randint(10, cfg.text.vocab_size, (piece,), generator=gen).tolist()
        else:
            ids += [cfg.image_token_index] * cfg.tokens_per_crop(piece[1])
    return ids


CASES = {
    "text-only": ([20], None),
    "image-980": ([5, ("img", 980), 12], [(980, 980, 980)]),
    "image-490": ([3, ("img", 490), 9], [(490, 490, 490)]),
    "non-square-padded": ([4, ("img", 980), 6], [(980, 612, 980)]),
    "two-images": ([2, ("img", 980), 5, ("img", 980), 7], [(980, 980, 700), (980, 500, 980)]),
}


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_and_greedy_tokens_match_reference(pair, case):
    ours, ref = pair
    pieces, crop_spec = CASES[case]
    ids = prompt(ours, pieces)
    pv, pm = crops(crop_spec) if crop_spec else (None, None)
    ids_t = torch.tensor([ids])

    with torch.inference_mode():
        logits = ours(ids_t, ours.new_cache(len(ids)), 0, pv, pm, all_logits=True)
    expected = reference_logits(ref, ids_t, pv, pm)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= ATOL
    with torch.inference_mode():  # the cache-free path (training, scoring) is the same function
        uncached = ours(ids_t, None, 0, pv, pm, all_logits=True)
    assert (uncached - expected).abs().max().item() <= ATOL

    session = Session(ours, max_len=len(ids) + N_TOKENS)
    tokens = list(session.generate(ids, pv, pm, max_new_tokens=N_TOKENS))
    assert tokens == reference_greedy(ref, ids_t, N_TOKENS, pv, pm)
    assert len(set(tokens)) > 3, "random weights should not collapse into a loop of one token"


def test_multi_turn_reuses_the_cache(pair):
    ours, ref = pair
    session = Session(ours, max_len=256)
    turn1 = prompt(ours, [4, ("img", 980), 6], seed=1)
    pv1, pm1 = crops([(980, 700, 980)], seed=1)
    answer1 = list(session.generate(turn1, pv1, pm1, max_new_tokens=8))
    assert session.stats.prefilled_tokens == len(turn1)

    # Turn 2 = the whole conversation so far + a new user message with a second image.
    new_part = prompt(ours, [3, ("img", 980), 5], seed=2)
    turn2 = turn1 + answer1 + new_part
    pv2, pm2 = crops([(980, 700, 980), (980, 980, 450)], seed=1)
    answer2 = list(session.generate(turn2, pv2, pm2, max_new_tokens=N_TOKENS))
    # Only what the cache did not hold was run: the last answer token (never fed back) + the new turn.
    assert session.stats.prefilled_tokens == len(new_part) + 1

    assert answer2 == reference_greedy(ref, torch.tensor([turn2]), N_TOKENS, pv2, pm2)


def test_second_turn_that_rewrites_history_reprefills_from_the_change(pair):
    ours, _ = pair
    session = Session(ours, max_len=128)
    first = prompt(ours, [30], seed=4)
    list(session.generate(first, max_new_tokens=4))
    edited = first[:10] + prompt(ours, [15], seed=5)
    list(session.generate(edited, max_new_tokens=4))
    assert session.stats.prefilled_tokens == len(edited) - 10

    fresh = Session(ours, max_len=128)
    with torch.inference_mode():
        reused = session.prefill(edited)
        expected = fresh.prefill(edited)
    torch.testing.assert_close(reused, expected, atol=1e-5, rtol=0)
