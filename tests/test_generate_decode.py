"""What the fast generation loop adds, checked against the plain computation it replaces.

- chunked prefill equals one pass (logits, cache contents, greedy continuation);
- the static-shape decode step (device positions, whole cache attended) equals the eager one,
  traces into one graph without host synchronisation, and compiled decode gives the same tokens;
- stop handling: only the newest token is checked, the stop id is not yielded, the cache keeps
  exactly the tokens that were fed back, whether the next step is queued before the read (CUDA
  ordering, forced here) or after it (CPU ordering).
"""

from __future__ import annotations

import pytest
import torch

from runtime.generate import Session, decode_logits
from runtime.model import build_model, init_random_weights
from runtime.tiny_checkpoint import tiny_config


@pytest.fixture(scope="module")
def model():
    return init_random_weights(build_model(tiny_config(), device="cpu"), seed=5)


def image_prompt(model, before=5, after=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(10, cfg.text.vocab_size, (before,), generator=gen).tolist()
    ids += [cfg.image_token_index] * cfg.tokens_per_crop(980)
    ids += torch.randint(10, cfg.text.vocab_size, (after,), generator=gen).tolist()
    pixels = torch.rand(1, 3, 980, 980, generator=gen) * 2 - 1
    mask = torch.zeros(1, 980, 980, dtype=torch.bool)
    mask[:, :700, :] = True
    return ids, pixels, mask


def text_prompt(model, n=20, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, model.config.text.vocab_size, (n,), generator=gen).tolist()


def greedy(model, ids, n, pixels=None, mask=None, **session_options):
    session = Session(model, len(ids) + n, **session_options)
    return list(session.generate(ids, pixels, mask, max_new_tokens=n)), session


# ----- chunked prefill -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_equals_one_pass(model, chunk):
    ids, pixels, mask = image_prompt(model)
    text = model.language_model.model
    ids_t = torch.tensor([ids])
    whole_cache, chunked_cache = model.new_cache(len(ids)), model.new_cache(len(ids))
    with torch.inference_mode():
        whole = model(ids_t, whole_cache, 0, pixels, mask, all_logits=True)
        text.prefill_chunk = chunk  # chunk 7 and 16 split the run of image tokens
        try:
            chunked = model(ids_t, chunked_cache, 0, pixels, mask, all_logits=True)
            # A prompt's own prefill keeps only each chunk's last position: the same last logits.
            last = model(ids_t, model.new_cache(len(ids)), 0, pixels, mask)
        finally:
            text.prefill_chunk = 1024
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, whole[:, -1], atol=1e-5, rtol=0)
    for layer in range(model.config.text.num_hidden_layers):
        torch.testing.assert_close(chunked_cache.keys[layer], whole_cache.keys[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked_cache.values[layer], whole_cache.values[layer], atol=1e-5, rtol=0)


def test_chunked_prefill_after_cached_history_continues_identically(model):
    """A second turn prefilled in chunks on top of the cache, against a fresh one-pass prefill."""
    ids, pixels, mask = image_prompt(model)
    turn1 = text_prompt(model, 9)
    expected, _ = greedy(model, turn1 + ids, 12, pixels, mask)
    session = Session(model, 128)
    list(session.generate(turn1, max_new_tokens=1))
    session.model.language_model.model.prefill_chunk = 5
    try:
        tokens = list(session.generate(turn1 + ids, pixels, mask, max_new_tokens=12))
    finally:
        session.model.language_model.model.prefill_chunk = 1024
    assert session.stats.prefilled_tokens == len(ids)
    assert tokens == expected


# ----- static-shape / compiled decode ----------------------------------------------------------


def test_static_shape_step_equals_the_eager_step(model):
    ids = text_prompt(model)
    caches = [model.new_cache(40), model.new_cache(40)]
    with torch.inference_mode():
        for cache in caches:
            model(torch.tensor([ids]), cache, 0)
        token = torch.tensor([[77]])
        eager = decode_logits(model, token, caches[0], len(ids))
        static = decode_logits(model, token, caches[1], torch.tensor([len(ids)]))
    torch.testing.assert_close(static, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[1].keys[0][:, :, : len(ids) + 1], caches[0].keys[0][:, :, : len(ids) + 1])


def test_decode_step_traces_into_one_graph(model):
    """fullgraph refuses .item()/.tolist() and data-dependent shapes: the step never waits for the host."""
    ids = text_prompt(model)
    cache = model.new_cache(40)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache, 0)
        step = torch.compile(decode_logits, fullgraph=True, dynamic=False, backend="eager")
        traced = step(model, torch.tensor([[77]]), cache, torch.tensor([len(ids)]))
        reference = decode_logits(model, torch.tensor([[77]]), model.new_cache(40), torch.tensor([0]))
    assert traced.shape == reference.shape == (1, model.config.text.vocab_size)
    assert not torch.allclose(traced, reference)  # the cached prompt mattered


def test_compiled_decode_gives_the_eager_tokens(model):
    ids, pixels, mask = image_prompt(model)
    expected, _ = greedy(model, ids, 16, pixels, mask)
    tokens, session = greedy(model, ids, 16, pixels, mask, compile="aot_eager")
    assert tokens == expected
    assert session.compile_seconds > 0


def test_the_first_token_reaches_the_user_before_the_decode_step_compiles(model):
    """With the next step queued before each read (CUDA ordering, forced here), the first call,
    which compiles, would come before the first token; it waits until that token is out."""
    ids, pixels, mask = image_prompt(model)
    expected, _ = greedy(model, ids, 8, pixels, mask)
    session = Session(model, len(ids) + 8, compile="aot_eager")
    session._ahead = True
    tokens = session.generate(ids, pixels, mask, max_new_tokens=8)
    first = next(tokens)
    assert session.compile_seconds == 0
    assert [first, *tokens] == expected and session.compile_seconds > 0


# ----- stop handling and the cache behind it ---------------------------------------------------


@pytest.fixture(scope="module")
def free_run(model):
    ids = text_prompt(model)
    tokens, _ = greedy(model, ids, 24)
    assert len(set(tokens)) > 4
    return ids, tokens


def first_new(tokens):
    """Index of a token whose id did not occur before it (so stopping on it stops right there)."""
    return next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("ahead", [False, True], ids=["read-then-queue", "queue-then-read"])
def test_stop_id_ends_generation_and_is_not_yielded(model, free_run, ahead):
    ids, tokens = free_run
    cut = first_new(tokens)
    session = Session(model, 64)
    session._ahead = ahead
    got = list(session.generate(ids, max_new_tokens=24, stop_ids=[tokens[cut], 511]))
    assert got == tokens[:cut]
    assert session.cached == ids + tokens[:cut]  # every yielded token was fed back, the stop id was not
    assert session.stats.generated_tokens == cut


@pytest.mark.parametrize("ahead", [False, True], ids=["read-then-queue", "queue-then-read"])
def test_only_the_newest_token_is_checked(model, free_run, ahead):
    """A stop id already in the prompt does not stop the answer."""
    ids, tokens = free_run
    stop = next(t for t in ids if t not in tokens)
    session = Session(model, 64)
    session._ahead = ahead
    assert list(session.generate(ids, max_new_tokens=24, stop_ids=[stop])) == tokens


@pytest.mark.parametrize("ahead", [False, True], ids=["read-then-queue", "queue-then-read"])
def test_max_new_tokens_and_context_end(model, free_run, ahead):
    ids, tokens = free_run
    session = Session(model, 64)
    session._ahead = ahead
    assert list(session.generate(ids, max_new_tokens=5)) == tokens[:5]
    assert session.cached == ids + tokens[:4]  # the last token is never fed back
    tight = Session(model, len(ids) + 3)
    tight._ahead = ahead
    assert list(tight.generate(ids, max_new_tokens=10)) == tokens[:3]
    assert tight.cached == ids + tokens[:2]


@pytest.mark.parametrize("ahead", [False, True], ids=["read-then-queue", "queue-then-read"])
def test_closing_early_leaves_a_cache_the_next_turn_can_trust(model, free_run, ahead):
    ids, tokens = free_run
    session = Session(model, 96)
    session._ahead = ahead
    stream = session.generate(ids, max_new_tokens=24)
    taken = [next(stream) for _ in range(6)]
    stream.close()
    assert taken == tokens[:6]
    assert session.cached == ids + tokens[: len(session.cached) - len(ids)]
    assert len(session.cached) - len(ids) in (5, 6)  # all yielded tokens, or all but the last
    turn2 = ids + taken + text_prompt(model, 7, seed=9)
    resumed = list(session.generate(turn2, max_new_tokens=10))
    assert session.stats.prefilled_tokens == len(turn2) - (len(ids) + (6 if ahead else 5))
    expected, _ = greedy(model, turn2, 10)
    assert resumed == expected


def test_long_prompt_attention_never_sees_more_than_a_chunk_of_queries(model, monkeypatch):
    """The point of chunking: no step builds a T x T mask or score matrix for a long prompt."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    text = model.language_model.model
    ids = torch.tensor([text_prompt(model, 300, seed=4)])
    cache = model.new_cache(300)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(text, "prefill_chunk", 64)
    with torch.inference_mode():
        model(ids, cache, 0)
    assert len(seen) == 5 * model.config.text.num_hidden_layers  # ceil(300 / 64) chunks per layer (no image)
    for queries, keys, mask in seen:
        assert queries <= 64
        assert mask is None or mask == (queries, keys)
    assert {keys for _, keys, _ in seen} == {64, 128, 192, 256, 300}


def test_host_pictures_follow_the_vision_tower_to_its_device():
    """Preprocessing makes host tensors; on a GPU the tower's weights are elsewhere. The meta
    device stands in for the GPU here: computing on it needs every input moved there."""
    model = build_model(tiny_config(), device="meta")
    _, pixels, mask = image_prompt(model)
    features = model.image_features(pixels, mask)
    assert features.device.type == "meta"
    assert features.shape == (1, model.config.tokens_per_crop(980), model.config.text.hidden_size)
