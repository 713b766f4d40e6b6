"""The device-side sampler against a hand computation of temperature, top-k and top-p filtering.

The hand version works on plain Python floats: sort the tokens by probability, keep the k best
(and any tied with the k-th), keep the most-likely-first prefix until its mass reaches top_p,
renormalise. Draws must follow that distribution, never pick a filtered token, and repeat
exactly for a given seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from runtime.errors import UsageError
from runtime.sampling import Sampler, SamplingParams, filtered_probs

LOGITS = [2.0, 0.5, 1.5, -1.0, 1.5, 0.0, 3.0, -0.5]


def by_hand(logits, temperature, top_k=0, top_p=1.0):
    scaled = [v / temperature for v in logits]
    if top_k:
        kth = sorted(scaled, reverse=True)[top_k - 1]
        scaled = [v if v >= kth else -math.inf for v in scaled]
    z = sum(math.exp(v) for v in scaled if v != -math.inf)
    probs = [math.exp(v) / z if v != -math.inf else 0.0 for v in scaled]
    if top_p < 1:
        kept, mass = set(), 0.0
        for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += probs[i]
        probs = [p if i in kept else 0.0 for i, p in enumerate(probs)]
    total = sum(probs)
    return [p / total for p in probs]


CASES = [
    {"temperature": 1.0},
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 3},  # 1.5 is tied at places 3 and 4: both stay
    {"temperature": 1.3, "top_k": 2},
    {"temperature": 1.0, "top_p": 0.6},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 1.0, "top_k": 5, "top_p": 0.7},
    {"temperature": 2.0, "top_p": 0.05},  # only the most likely token survives
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_filtered_distribution_matches_the_hand_computation(case):
    got = filtered_probs(torch.tensor([LOGITS]), SamplingParams(**case))[0].tolist()
    expected = by_hand(LOGITS, **case)
    assert got == pytest.approx(expected, abs=1e-6)


def test_top_k_keeps_ties_with_the_kth_token():
    probs = filtered_probs(torch.tensor([LOGITS]), SamplingParams(temperature=1.0, top_k=3))[0]
    assert (probs > 0).tolist() == [True, False, True, False, True, False, True, False]


@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[6]], ids=["top-k", "top-p", "both"])
def test_draws_follow_the_filtered_distribution(case):
    sampler = Sampler(SamplingParams(**case, seed=7))
    logits = torch.tensor([LOGITS] * 4000)  # one call, 4000 independent draws
    draws = sampler(logits)
    expected = by_hand(LOGITS, **case)
    freq = torch.bincount(draws, minlength=len(LOGITS)).double() / draws.numel()
    for token, p in enumerate(expected):
        if p == 0:
            assert freq[token] == 0, f"token {token} was filtered out but drawn"
        else:
            assert abs(freq[token] - p) < 4 * math.sqrt(p * (1 - p) / draws.numel()) + 1e-3


def test_a_seed_repeats_the_same_draws_and_another_seed_does_not():
    logits = torch.tensor([LOGITS] * 64)

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        return [sampler(logits).tolist() for _ in range(3)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_greedy_settings_take_the_argmax_and_sampling_stays_on_the_logits_device():
    logits = torch.tensor([LOGITS])
    assert Sampler(SamplingParams())(logits).tolist() == [6]
    assert Sampler(SamplingParams(temperature=0.9, top_k=1))(logits).tolist() == [6]
    token = Sampler(SamplingParams(temperature=1.0, seed=0))(logits)
    assert isinstance(token, torch.Tensor) and token.dtype == torch.long and token.device == logits.device


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_usage_errors(bad):
    with pytest.raises(UsageError):
        SamplingParams(**bad)


@pytest.mark.parametrize(("temperature", "top_p"), [(1e-40, 1.0), (1e-300, 1.0), (1.0, 1e-300), (1e-300, 1e-300)])
def test_extreme_settings_still_draw_the_most_likely_token(temperature, top_p):
    """The limit of T -> 0 (and of top-p -> 0) is greedy: such settings drew token 0 from NaN."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3)) * 5
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=1))
    for _ in range(5):
        assert sampler(logits).tolist() == logits.argmax(dim=-1).tolist()
