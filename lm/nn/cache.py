"""Decoding caches. Each mixer makes its own layer cache (``mixer.init_cache``); the model keeps
them in a ``DecodeCache`` together with the number of tokens already seen.

Legend: B batch, H kv heads, S cached slots, T new tokens, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DecodeCache:
    """Per-layer caches plus ``pos``: how many tokens the model has consumed so far."""

    layers: list[Any]
    pos: int = 0
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers if hasattr(c, "nbytes"))


class KVCache:
    """Preallocated key/value buffers for full causal attention: ``max_len`` slots."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k_BHSD = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v_BHSD = torch.zeros_like(self.k_BHSD)
        self.len = 0

    def update(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, start_pos: int):
        """Appends T keys/values; returns all cached ones and their absolute positions."""
        T = k_BHTD.shape[2]
        end = start_pos + T
        if end > self.k_BHSD.shape[2]:
            raise ValueError(f"generation: context {end} exceeds the cache length {self.k_BHSD.shape[2]}")
        self.k_BHSD[:, :, start_pos:end] = k_BHTD
        self.v_BHSD[:, :, start_pos:end] = v_BHTD
        self.len = end
        key_pos_S = torch.arange(end, device=k_BHTD.device)
        return self.k_BHSD[:, :, :end], self.v_BHSD[:, :, :end], key_pos_S

    def nbytes(self) -> int:
        return self.k_BHSD.nbytes + self.v_BHSD.nbytes


class RollingKVCache:
    """Ring buffer of the last ``window`` keys/values (Mistral's rolling buffer cache).

    Memory is bounded by the window whatever the context length. Keys are stored after RoPE, so
    their order in the ring does not matter to attention; ``slot_pos`` keeps each slot's absolute
    position (-1 when empty) for the window mask.
    """

    def __init__(self, batch: int, kv_heads: int, window: int, head_dim: int, device, dtype):
        self.window = window
        self.k_BHSD = torch.zeros(batch, kv_heads, window, head_dim, device=device, dtype=dtype)
        self.v_BHSD = torch.zeros_like(self.k_BHSD)
        self.slot_pos_S = torch.full((window,), -1, dtype=torch.long, device=device)

    def update(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, start_pos: int):
        T, W = k_BHTD.shape[2], self.window
        pos_T = torch.arange(start_pos, start_pos + T, device=k_BHTD.device)
        if T == 1:  # decode step: overwrite the oldest slot, attend to the whole ring
            slot = start_pos % W
            self.k_BHSD[:, :, slot] = k_BHTD[:, :, 0]
            self.v_BHSD[:, :, slot] = v_BHTD[:, :, 0]
            self.slot_pos_S[slot] = start_pos
            return self.k_BHSD, self.v_BHSD, self.slot_pos_S
        # prefill: attend to the old ring plus all new keys, then keep the newest W in the ring
        k_all = torch.cat([self.k_BHSD, k_BHTD], dim=2)
        v_all = torch.cat([self.v_BHSD, v_BHTD], dim=2)
        pos_all = torch.cat([self.slot_pos_S, pos_T])
        keep = pos_T[-W:]
        slots = keep % W
        self.k_BHSD[:, :, slots] = k_BHTD[:, :, -W:]
        self.v_BHSD[:, :, slots] = v_BHTD[:, :, -W:]
        self.slot_pos_S[slots] = keep
        return k_all, v_all, pos_all

    def nbytes(self) -> int:
        return self.k_BHSD.nbytes + self.v_BHSD.nbytes
