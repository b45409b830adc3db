"""Block layouts of causal sparse attention: which key blocks every query block may see.

One mechanism for every sparse pattern (Child et al. 2019, "Generating Long Sequences with Sparse
Transformers"; Beltagy et al. 2020, "Longformer: The Long-Document Transformer"; Zaheer et al. 2020,
"Big Bird: Transformers for Longer Sequences"). A layout is

* a **key-block table** ``[H, N, W]``: for query block i and head h, the W key blocks it may read
  (-1 pads rows with fewer), and
* a **token rule** shared by all layouts, with per-head parameters ``span`` and ``dilation``:
  ``0 <= q - k < span[h]`` and ``(q - k) % dilation[h] == 0``, and
* **global tokens** (absolute positions G). In a causal LM a global position attends to every
  earlier position (and itself) and is seen by every later position; nothing sees the future.

The token-level mask is therefore::

    mask(q, k, h) = k <= q  and  ( [k//b in table[h, q//b]] and rule(q, k, h)  or  q in G  or  k in G )

Both backends (``backends.py``) read the same layout: the block-sparse one gathers the table's key
blocks (plus the global columns and rows), the flex one turns the table into a FlexAttention
``BlockMask`` whose ``mask_mod`` is the expression above. ``mask`` evaluates it densely for given positions (decode
steps over a cache, and the references of the tests; never at long prefill lengths).

Legend: H heads, N blocks, W table width (key blocks per query block), b block size, T queries,
S keys, G global positions.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Sequence

import torch

_KEY = "model.config.mixer_options"
_FAR = 2 ** 62  # span of "no distance limit" (BigBird: the table alone decides)


def _positive(name: str, value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}.{name}: must be a positive integer, got {value!r}")
    return value


class BlockLayout(ABC):
    """The generic causal block layout; subclasses choose the table, the rule's span/dilation and
    the global positions. Tables are cached per number of blocks (they only grow with the length:
    the rows of a prefix never depend on the total length, so decoding sees the same pattern as
    the full forward pass)."""

    def __init__(self, *, num_heads: int, block_size: int, max_seq_len: int, span: Sequence[int],
                 dilation: Sequence[int], global_tokens: Sequence[int] = (), key: str = _KEY):
        self.num_heads = num_heads
        self.block_size = _positive("block_size", block_size, key)
        self.max_seq_len = max_seq_len
        assert len(span) == len(dilation) == num_heads
        self.span, self.dilation = list(span), list(dilation)
        for g in global_tokens:
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < max_seq_len:
                raise ValueError(f"{key}.global_tokens: index {g!r} is outside the sequence "
                                 f"(positions 0..{max_seq_len - 1}, max_seq_len={max_seq_len})")
        self.global_tokens = sorted(set(global_tokens))
        self._cache: OrderedDict = OrderedDict()

    # -- subclass hook ----------------------------------------------------------------------------
    @abstractmethod
    def build_table(self, num_blocks: int) -> torch.Tensor:
        """Key-block table ``[H, N, W]`` (long, -1 = no block), on the CPU."""

    # -- derived, cached ------------------------------------------------------------------------
    def _cached(self, name: str, n: int, device, make):
        """Small LRU of derived tensors keyed by (what, length or blocks, device)."""
        k = (name, n, str(device))
        if k in self._cache:
            self._cache.move_to_end(k)
        else:
            self._cache[k] = make()
            if len(self._cache) > 64:
                self._cache.popitem(last=False)
        return self._cache[k]

    def table(self, num_blocks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx_HNW, valid_HNW)``: the table with padding replaced by block 0, and its validity."""
        def make():
            t = self.build_table(num_blocks)
            assert t.shape[:2] == (self.num_heads, num_blocks)
            return t.clamp(min=0).to(device), (t >= 0).to(device)
        return self._cached("table", num_blocks, device, make)

    def block_mask_dense(self, num_blocks: int, device) -> torch.Tensor:
        """Block-level ``[H, N, N]`` bool: key block j is in query block i's table (N^2, not T^2)."""
        def make():
            idx, valid = self.table(num_blocks, device)
            dense = torch.zeros(self.num_heads, num_blocks, num_blocks + 1, dtype=torch.bool, device=device)
            dense.scatter_(2, torch.where(valid, idx, num_blocks), True)  # padding lands in column N
            return dense[..., :num_blocks]
        return self._cached("dense", num_blocks, device, make)

    def rule_params(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head ``(span_H, dilation_H)`` as long tensors."""
        return self._cached("rule", 0, device, lambda: (torch.tensor(self.span, device=device),
                                                        torch.tensor(self.dilation, device=device)))

    def globals_below(self, length: int, device) -> torch.Tensor:
        """Global positions that exist in a sequence of ``length`` tokens (long ``[G]``)."""
        return self._cached("glob", length, device, lambda: torch.tensor(
            [g for g in self.global_tokens if g < length], dtype=torch.long, device=device))

    def is_global(self, pos: torch.Tensor) -> torch.Tensor:
        g = self.globals_below(self.max_seq_len, pos.device)
        return torch.isin(pos, g) if g.numel() else torch.zeros_like(pos, dtype=torch.bool)

    def num_blocks(self, length: int) -> int:
        return -(-length // self.block_size)

    # -- the token-level mask -------------------------------------------------------------------
    def rule(self, diff: torch.Tensor, span_H: torch.Tensor, dil_H: torch.Tensor) -> torch.Tensor:
        """The token rule on ``diff = q - k`` whose leading dim is the head (causality included)."""
        extra = (1,) * (diff.dim() - 1)
        return (diff >= 0) & (diff < span_H.view(-1, *extra)) & (diff % dil_H.view(-1, *extra) == 0)

    def mask(self, q_pos_T: torch.Tensor, k_pos_S: torch.Tensor) -> torch.Tensor:
        """Dense ``[H, T, S]`` bool for absolute positions (k < 0 marks an empty cache slot)."""
        device = q_pos_T.device
        n = self.num_blocks(int(max(q_pos_T.max(), k_pos_S.max())) + 1)
        b = self.block_size
        in_table_HTS = self.block_mask_dense(n, device)[:, (q_pos_T // b)[:, None], (k_pos_S.clamp(min=0) // b)[None, :]]
        span_H, dil_H = self.rule_params(device)
        diff_TS = q_pos_T[:, None] - k_pos_S[None, :]
        causal_TS = (diff_TS >= 0) & (k_pos_S[None, :] >= 0)
        glob_TS = self.is_global(q_pos_T)[:, None] | self.is_global(k_pos_S)[None, :]
        local_HTS = in_table_HTS & self.rule(diff_TS.expand(self.num_heads, -1, -1), span_H, dil_H)
        return causal_TS & (local_HTS | glob_TS)

    def keys_per_query(self) -> int:
        """Keys a query reads from the table (for FLOP estimates), plus the global columns."""
        return self.build_table(1).shape[-1] * self.block_size + len(self.global_tokens)


def _band_table(num_heads: int, num_blocks: int, width: int) -> torch.Tensor:
    """Blocks ``i - width + 1 .. i`` for every query block i (-1 before the sequence start)."""
    i_N1 = torch.arange(num_blocks)[:, None]
    t_NW = i_N1 - torch.arange(width - 1, -1, -1)[None, :]
    return torch.where(t_NW >= 0, t_NW, -1).expand(num_heads, -1, -1).contiguous()


class SlidingWindowLayout(BlockLayout):
    """Mistral/Longformer sliding window: a query sees itself and the ``window - 1`` before it."""

    def __init__(self, *, num_heads: int, window: int, block_size: int, max_seq_len: int, key: str = _KEY):
        self.window = _positive("window", window, key)
        super().__init__(num_heads=num_heads, block_size=block_size, max_seq_len=max_seq_len,
                         span=[window] * num_heads, dilation=[1] * num_heads, key=key)

    def build_table(self, num_blocks):
        # a query at the end of block i reaches back window - 1: that many blocks and its own
        width = -(-(self.window - 1) // self.block_size) + 1
        return _band_table(self.num_heads, num_blocks, width)


class LongformerLayout(BlockLayout):
    """Longformer, causal: per head h a dilated window of ``window`` keys ``q, q - d_h, q - 2 d_h ...``
    (receptive field ``(window - 1) d_h + 1``) plus global tokens (attend to and seen by all,
    causally). Longformer uses small dilations on a few heads of the upper layers (Sec. 3.1)."""

    def __init__(self, *, num_heads: int, window: int, block_size: int, max_seq_len: int,
                 dilation: int | Sequence[int] = 1, global_tokens: Sequence[int] = (0,), key: str = _KEY):
        self.window = _positive("window", window, key)
        dil = [dilation] * num_heads if isinstance(dilation, int) else list(dilation)
        if len(dil) != num_heads:
            raise ValueError(f"{key}.dilation: needs one value per head ({num_heads}), got {len(dil)}")
        for d in dil:
            _positive("dilation", d, key)
        super().__init__(num_heads=num_heads, block_size=block_size, max_seq_len=max_seq_len,
                         span=[(window - 1) * d + 1 for d in dil], dilation=dil,
                         global_tokens=global_tokens, key=key)

    def build_table(self, num_blocks):
        width = -(-(max(self.span) - 1) // self.block_size) + 1
        return _band_table(self.num_heads, num_blocks, width)


class BigBirdLayout(BlockLayout):
    """BigBird, causal (block-sparse "ITC" form): query block i sees key blocks
    ``i - window_blocks + 1 .. i`` (causal inside its own block), ``num_random_blocks`` random earlier
    blocks per head (seeded; drawn per query block so a prefix's pattern never depends on the
    total length), and the global tokens (default: the first block, as BigBird's first global block).
    """

    def __init__(self, *, num_heads: int, block_size: int, max_seq_len: int, window_blocks: int = 3,
                 num_random_blocks: int = 2, global_tokens: Sequence[int] | None = None, seed: int = 0,
                 key: str = _KEY):
        self.window_blocks = _positive("window_blocks", window_blocks, key)
        _positive("block_size", block_size, key)
        blocks = -(-max_seq_len // block_size)
        if isinstance(num_random_blocks, bool) or not isinstance(num_random_blocks, int) or num_random_blocks < 0:
            raise ValueError(f"{key}.num_random_blocks: must be a non-negative integer, got {num_random_blocks!r}")
        if num_random_blocks > max(0, blocks - window_blocks):
            raise ValueError(f"{key}.num_random_blocks: {num_random_blocks} is larger than the {max(0, blocks - window_blocks)} "
                             f"blocks outside the window ({blocks} blocks of {block_size} in max_seq_len={max_seq_len}, "
                             f"window_blocks={window_blocks})")
        self.num_random_blocks, self.seed = num_random_blocks, seed
        glob = range(min(block_size, max_seq_len)) if global_tokens is None else global_tokens
        super().__init__(num_heads=num_heads, block_size=block_size, max_seq_len=max_seq_len,
                         span=[_FAR] * num_heads, dilation=[1] * num_heads, global_tokens=list(glob), key=key)

    def build_table(self, num_blocks):
        band_HNW = _band_table(self.num_heads, num_blocks, self.window_blocks)
        r = self.num_random_blocks
        rand_HNR = torch.full((self.num_heads, num_blocks, r), -1, dtype=torch.long)
        b, g = self.block_size, set(self.global_tokens)
        # blocks made only of global tokens are read through the global columns already
        skip = {j for j in range(num_blocks) if all(p in g for p in range(j * b, (j + 1) * b))}
        for i in range(self.window_blocks, num_blocks):
            cand = torch.tensor([j for j in range(i - self.window_blocks + 1) if j not in skip], dtype=torch.long)
            if not len(cand) or not r:
                continue
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)  # per block: prefix-stable
            for h in range(self.num_heads):
                pick = cand[torch.randperm(len(cand), generator=gen)[:r]]
                rand_HNR[h, i, : len(pick)] = pick
        return torch.cat([band_HNW, rand_HNR], dim=-1)

    def keys_per_query(self) -> int:
        return (self.window_blocks + self.num_random_blocks) * self.block_size + len(self.global_tokens)


def dense_reference_mask(layout: BlockLayout, length: int) -> torch.Tensor:
    """``[H, T, T]`` mask of a whole sequence (tests and small lengths only: T^2 memory)."""
    pos = torch.arange(length)
    if length > 8192:
        raise ValueError(f"dense_reference_mask: {length} tokens would need a {length}x{length} mask")
    return layout.mask(pos, pos)


def expected_density(layout: BlockLayout, length: int) -> float:
    """Fraction of the causal triangle a layout keeps (for reports)."""
    m = dense_reference_mask(layout, length)
    return float(m.sum()) / (layout.num_heads * length * (length + 1) / 2)


__all__ = ["BlockLayout", "SlidingWindowLayout", "LongformerLayout", "BigBirdLayout", "dense_reference_mask",
           "expected_density"]
