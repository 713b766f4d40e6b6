"""Prefill and decode on the static cache, with multi-turn reuse of what the cache already holds.

A `Session` remembers which token ids sit in its cache. Each new prompt is the whole
conversation so far; only the part after the longest common prefix is prefilled, so a second
turn costs its new tokens, not the history. Images: the caller passes the crops of every image
in the conversation, in prompt order; the session feeds the model only the crops whose image
tokens fall in the part being prefilled.

Decode is built for a GPU even where it runs on the CPU: the token stays on the device from the
sampler to the next step, the expert dispatch needs no host round trip, and on CUDA the next
step is queued before the host reads the current token, so the device never idles while the
host streams text or checks for a stop id (only the newest token is checked). With
`compile=True` the decode step is one static-shape graph (torch.compile; CUDA graphs on a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .decode_kernels import linear
from .model import AriaForConditionalGeneration
from .moe import gather_experts_on_device
from .sampling import Sampler, SamplingParams


@dataclass
class StepStats:
    prompt_tokens: int = 0  # tokens in the prompt
    prefilled_tokens: int = 0  # of those, the ones actually run (the rest came from the cache)
    generated_tokens: int = 0


def decode_logits(model: AriaForConditionalGeneration, token: torch.Tensor, cache, where) -> torch.Tensor:
    """One decode step: token [1, 1] at `where` (int, or device positions [1]) -> logits [1, V] fp32.

    Text only: skips the image merge of `model.forward` (and its host-side count of image tokens).
    """
    lm = model.language_model
    hidden = lm.model(lm.model.embed_tokens(token), cache, where)
    logits = linear(lm.lm_head, hidden[:, -1])
    return logits if logits.dtype == torch.float32 else logits.float()


class _TokenReader:
    """Brings a device token to the host without waiting for the work queued after it.

    On CUDA the copy goes to pinned memory behind an event, so reading token n waits for the
    sampler of step n only, not for step n+1 already queued. On the CPU it is a plain read.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.empty(1, dtype=torch.long, pin_memory=True)
            self.event = torch.cuda.Event()
        self.token: torch.Tensor | None = None

    def start(self, token: torch.Tensor) -> None:
        self.token = token
        if self.cuda:
            self.host.copy_(token.view(1), non_blocking=True)
            # On the token's device's stream, where the copy runs: the current device may be
            # another GPU (a model on cuda:1), whose stream knows nothing of this copy.
            self.event.record(torch.cuda.current_stream(self.device))

    def result(self) -> int:
        if self.cuda:
            self.event.synchronize()
            return int(self.host[0])
        return int(self.token)


class Session:
    def __init__(self, model: AriaForConditionalGeneration, max_len: int, compile: bool | str = False,
                 cuda_graphs: bool = True):
        """`compile`: run decode as one compiled static-shape graph (CUDA graphs on a GPU, where the
        model allows and `cuda_graphs`: a placement without room for them says False), True for
        torch.compile's default backend or a backend name; the first step pays the compilation,
        reported in `compile_seconds`. Off by default: on the CPU it costs a C++ build."""
        self.model = model
        self.max_len = max_len
        self.cache = model.new_cache(max_len)
        self.cached: list[int] = []  # token ids whose keys/values are in the cache, positions 0..n-1
        self.stats = StepStats()
        self.compile_seconds = 0.0
        model.language_model.model.rotary.ensure(max_len)  # never grown inside a decode step
        # On CUDA the next step is queued before the host reads the current token (see generate).
        self._ahead = model.device.type == "cuda"
        self._compiled = None
        self.cuda_graphs = False  # whether compiled decode runs in CUDA graphs
        if compile:
            backend = "inductor" if compile is True else compile
            self._compiled, self.cuda_graphs = _compile_decode(model, self.cache, backend, cuda_graphs)
            self._position = torch.zeros(1, dtype=torch.long, device=model.device)

    def reset(self) -> None:
        self.cached = []

    def forget_from_picture(self, index: int) -> None:
        """Forget the cache from the tokens of its picture number `index` (0-based) on: the
        next prompt shows another picture there, behind the same image token ids."""
        image_id = self.model.config.image_token_index
        seen = 0
        for position, token in enumerate(self.cached):
            if token == image_id and (position == 0 or self.cached[position - 1] != image_id):
                if seen == index:
                    del self.cached[position:]
                    return
                seen += 1

    def _reuse_point(self, prompt: list[int]) -> int:
        n = 0
        limit = min(len(self.cached), len(prompt) - 1)  # always run >= 1 token to get logits
        while n < limit and self.cached[n] == prompt[n]:
            n += 1
        # Never start inside a run of image tokens: the crop's features are computed whole.
        image_id = self.model.config.image_token_index
        while n > 0 and prompt[n] == image_id and prompt[n - 1] == image_id:
            n -= 1
        return n

    @torch.inference_mode()
    def prefill(
        self,
        prompt: list[int],
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bring the cache to `prompt` and return the logits [1, V] of its last token."""
        start = self._reuse_point(prompt)
        new = prompt[start:]
        self.cache.check_room(start, len(new))
        # Forget what is about to be overwritten first: if this prefill is interrupted (Ctrl-C),
        # positions >= start may hold a mix of old and new keys and must not be reused.
        del self.cached[start:]
        image_id = self.model.config.image_token_index
        n_image_tokens = sum(1 for t in new if t == image_id)
        if pixel_values is not None and n_image_tokens:
            per_crop = self.model.config.tokens_per_crop(pixel_values.shape[-1])
            n_crops = n_image_tokens // per_crop
            pixel_values, pixel_mask = pixel_values[-n_crops:], pixel_mask[-n_crops:]
        elif not n_image_tokens:
            pixel_values = pixel_mask = None
        ids = torch.tensor([new], dtype=torch.long, device=self.model.device)
        logits = self.model(ids, self.cache, start, pixel_values, pixel_mask)
        self.cached = list(prompt)
        self.stats = StepStats(prompt_tokens=len(prompt), prefilled_tokens=len(new))
        return logits

    @torch.inference_mode()
    def _step(self, token: torch.Tensor) -> torch.Tensor:
        """Run `token` (device, one element) at the next free position; logits [1, V]. No host sync."""
        start = len(self.cached)
        if self._compiled is None:
            return decode_logits(self.model, token.view(1, 1), self.cache, start)
        self._position.fill_(start)
        if not self.compile_seconds:  # the first call compiles
            began = time.perf_counter()
            logits = self._compiled(self.model, token.view(1, 1), self.cache, self._position)
            self.compile_seconds = time.perf_counter() - began
            return logits
        return self._compiled(self.model, token.view(1, 1), self.cache, self._position)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token [1] and return the next logits [1, V]."""
        logits = self._step(token)
        self.cached.append(int(token))
        return logits

    def generate(
        self,
        prompt: list[int],
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop_ids: Iterable[int] = (),
    ) -> Iterator[int]:
        """Yield generated token ids until a stop id (not yielded), `max_new_tokens`, or the context end.

        The caller may stop early by closing the iterator; the cache then holds the tokens
        yielded so far (all of them, or all but the last), so the next turn reuses them.
        """
        stop = set(stop_ids)
        sampler = Sampler(sampling or SamplingParams(), device=self.model.device)
        logits = self.prefill(prompt, pixel_values, pixel_mask)
        limit = min(max_new_tokens, self.max_len - len(self.cached))
        reader = _TokenReader(self.model.device)
        token = sampler(logits)
        for n in range(1, limit + 1):
            more = n < limit  # the last token is never fed back: its logits would go unused
            reader.start(token)
            # Not before the compiled step exists: its first call compiles (seconds), which would
            # then land before the first token reaches the user.
            queued = more and self._ahead and (self._compiled is None or self.compile_seconds > 0)
            if queued:  # a stop id wastes this step, but the device never waits for the host
                logits = self._step(token)
            tid = reader.result()
            if tid in stop:
                return
            self.stats.generated_tokens += 1
            if queued:
                self.cached.append(tid)
            yield tid
            if more:
                if not queued:
                    logits = self._step(token)
                    self.cached.append(tid)
                token = sampler(logits)


def _compile_decode(model: AriaForConditionalGeneration, cache, backend: str, cuda_graphs: bool):
    """decode_logits as a static-shape graph: positions on the device, the whole cache attended.

    What reads the expert ids on the host (quantized or offloaded experts not switched to
    gathering, the offload engine's next-layer guess) runs inside the graph as one opaque op
    (runtime.host_calls), so the step is one graph for every token (tests check it). Not
    `fullgraph`, so that anything else a store might do still runs, if slower.
    """
    gpu = model.device.type == "cuda" and backend == "inductor"
    if gpu:
        # One-row products become fused reductions only with this on (inductor's mm decomposition):
        # a gathered expert's weights and int8's dequantized codes are then read in place, not
        # written out first (gpt-fast's setting; process-wide, as inductor's config is).
        torch._inductor.config.coordinate_descent_tuning = True
    graphs = gpu and cuda_graphs and prepare_for_cuda_graphs(model, cache)
    mode = "reduce-overhead" if graphs else None
    return torch.compile(decode_logits, dynamic=False, backend=backend, mode=mode), graphs


def prepare_for_cuda_graphs(model: AriaForConditionalGeneration, cache) -> bool:
    """Make a decode step something a CUDA graph can hold, if the model allows; returns whether.

    A graph cannot hold a host read, so resident experts switch to choosing on the device
    (gather_experts_on_device; offloaded ones cannot, and their model gets no graphs). A graph
    also replays on fixed addresses: every tensor the step reads but the token and its position
    must be static, or each replay copies it in first. Weights are (dynamo marks module tensors
    so); the cache, updated in place, is marked here.
    """
    if not gather_experts_on_device(model):
        return False
    for tensor in cache.keys + cache.values:
        torch._dynamo.mark_static_address(tensor)
    return True
