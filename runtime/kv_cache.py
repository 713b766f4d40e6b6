"""Static, preallocated key/value cache indexed by absolute position (gpt-fast's shape).

One tensor pair per layer, [batch, kv_heads, max_len, head_dim], allocated once. Writing a
chunk at positions [start, start + T) overwrites whatever was there, which is what multi-turn
reuse needs: a new turn re-prefills from the first position where the conversation changed.
"""

from __future__ import annotations

import torch

from .config import TextConfig
from .errors import InputError, PlacementError
from .sizes import human_size


class KVCache:
    def __init__(
        self,
        config: TextConfig,
        max_len: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.max_len = max_len
        self.model_max_len = config.max_position_embeddings
        try:
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        except (RuntimeError, MemoryError) as exc:  # CUDA's OutOfMemoryError is a RuntimeError
            # The CPU allocator raises a plain RuntimeError ("can't allocate memory: you tried to ...").
            if not isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) and "allocate" not in str(exc):
                raise
            need = human_size(self.bytes_needed(config, max_len, dtype, batch_size))
            where = "the CPU" if torch.device(device).type == "cpu" else str(device)
            raise PlacementError(f"the KV cache for {max_len} tokens of context needs {need}, more than {where} "
                                 "can allocate; lower --max-context") from None

    @staticmethod
    def bytes_needed(config: TextConfig, max_len: int, dtype: torch.dtype, batch_size: int = 1) -> int:
        """Exact size of a cache of `max_len` positions (the planner budgets with this)."""
        per_layer = 2 * batch_size * config.num_key_value_heads * max_len * config.head_dim
        return per_layer * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()

    @property
    def at_model_max(self) -> bool:
        """Whether it holds all the model takes: a larger --max-context would be capped back to it."""
        return self.max_len >= self.model_max_len

    def check_room(self, start: int, length: int) -> None:
        if start + length > self.max_len:
            at_most = self.at_model_max
            holds = f"{self.max_len} (the most this model takes)" if at_most else str(self.max_len)
            todo = "shorten the prompt" if at_most else "raise --max-context, shorten the prompt"
            raise InputError(f"the conversation needs {start + length} tokens but the context holds {holds}; "
                             f"{todo}, or (in a chat) /clear")

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kvh, T, d] at [start, start+T); return the valid prefix [0, start+T)."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_at(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [B, kvh, T, d] at device `positions` [T]; return the whole cache (static shapes)."""
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        return self.keys[layer], self.values[layer]
