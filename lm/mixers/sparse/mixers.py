"""Sparse-attention mixers: sliding window (block-sparse), Longformer and BigBird, in the one Block.

Beltagy et al. 2020, "Longformer: The Long-Document Transformer" (arXiv:2004.05150); Zaheer et al.
2020, "Big Bird: Transformers for Longer Sequences" (arXiv:2007.14062); Jiang et al. 2023 (Mistral's
sliding window). Each mixer is the ``attention`` mixer (GQA, RoPE, projections) with a
``BlockLayout`` (``layout.py``) deciding which keys a query sees, and a backend computing it:

* ``blocksparse``: gathered key blocks in plain PyTorch, differentiable, O(T * window) (CPU training);
* ``flex``: compiled FlexAttention with the layout's ``BlockMask`` (GPU; CPU inference only);
* ``auto`` (default): ``flex`` on CUDA, ``blocksparse`` elsewhere.

``chunk_size`` (block-sparse backend): query tokens per chunk recomputed in backward (default 512;
0: no chunking). Peak memory then holds one chunk's scores instead of all T * W * b of them, for
~15% more time (measured on CPU at 4k tokens, window 256: 121 -> 43 MiB).

Causal LM semantics of global tokens: a global position attends to every earlier position and is
attended to by every later one. Decoding keeps a full KV cache (global and random keys can be
anywhere behind) and masks each step with the same layout; the block-sparse sliding window keeps
Mistral's rolling buffer of ``window`` keys.

Legend: B batch, T sequence, M model dim, H query heads, K kv heads, D head dim, S cached keys.
"""
from __future__ import annotations

import torch

from lm.mixers.attention import Attention, project_qkv
from lm.mixers.sparse.backends import flex_sparse_attention
from lm.mixers.sparse.blocksparse import block_sparse_attention
from lm.mixers.sparse.layout import BigBirdLayout, BlockLayout, LongformerLayout, SlidingWindowLayout
from lm.nn.cache import RollingKVCache
from lm.registry import MIXERS

_KEY = "model.config.mixer_options"
BACKENDS = ("auto", "blocksparse", "flex")


class SparseAttention(Attention):
    """Attention restricted to a block layout (base of the registered sparse mixers)."""

    def __init__(self, cfg, layer_idx: int, *, layout: BlockLayout, backend: str, chunk_size: int, bias: bool):
        if backend not in BACKENDS:
            raise ValueError(f"{_KEY}.backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"{_KEY}.chunk_size: must be an integer >= 0 (0: no chunking), got {chunk_size!r}")
        super().__init__(cfg, layer_idx, bias=bias)
        self.layout, self.backend, self.chunk_size = layout, backend, chunk_size

    def allowed(self, q_pos_T: torch.Tensor, k_pos_S: torch.Tensor) -> torch.Tensor:
        """Per-head ``[H, T, S]`` mask over cached keys (decode steps, chunked prefill)."""
        return self.layout.mask(q_pos_T, k_pos_S)

    def plain_causal(self, T: int) -> bool:
        return False

    def sparse_attend(self, q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend == "auto":
            backend = "flex" if q_BHTD.is_cuda else "blocksparse"
        if backend == "flex":
            return flex_sparse_attention(q_BHTD, k_BKTD, v_BKTD, self.layout)
        return block_sparse_attention(q_BHTD, k_BKTD, v_BKTD, self.layout, chunk_size=self.chunk_size)

    def forward(self, x_BTM: torch.Tensor, *, cache=None, start_pos: int = 0, **ctx) -> torch.Tensor:
        if cache is not None and start_pos > 0:  # continuing from a cache: masked SDPA over it
            return super().forward(x_BTM, cache=cache, start_pos=start_pos, **ctx)
        B, T, _ = x_BTM.shape
        q, k, v = project_qkv(self, x_BTM)
        q, k = self.rope(q, k, 0)
        if cache is not None:  # a prefill: the sparse kernel attends, the cache just stores
            cache.update(k, v, 0)
        out = self.sparse_attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


@MIXERS.register("sliding_window_blocksparse")
class SlidingWindowBlockSparse(SparseAttention):
    """Mistral sliding window (a token sees itself and the ``window - 1`` before it) computed
    block-sparse: O(T * window) in training on CPU, where ``sliding_window``'s masked SDPA is
    O(T^2). Decodes with the same rolling buffer of ``window`` keys."""

    def __init__(self, cfg, layer_idx: int = 0, *, window: int = 256, block_size: int = 64,
                 backend: str = "auto", chunk_size: int = 512, bias: bool = False):
        layout = SlidingWindowLayout(num_heads=cfg.num_heads, window=window, block_size=block_size,
                                     max_seq_len=cfg.max_seq_len)
        super().__init__(cfg, layer_idx, layout=layout, backend=backend, chunk_size=chunk_size, bias=bias)
        self.window = window

    def init_cache(self, batch: int, max_len: int, device, dtype) -> RollingKVCache:
        return RollingKVCache(batch, self.num_kv_heads, self.window, self.head_dim, device, dtype)


@MIXERS.register("longformer")
class LongformerAttention(SparseAttention):
    """Longformer attention for a causal LM (Beltagy et al. 2020): a sliding window of ``window``
    keys, dilated per head by ``dilation`` (an int, or one value per head: e.g. ``[1, 1, 2, 4]``
    gives the upper heads a receptive field of ``(window - 1) * d + 1``), plus ``global_tokens``
    (absolute positions; default ``[0]``, the first token of every sequence) that attend to all
    earlier tokens and are seen by all later ones."""

    def __init__(self, cfg, layer_idx: int = 0, *, window: int = 256, dilation: int | list[int] = 1,
                 global_tokens: list[int] = (0,), block_size: int = 64, backend: str = "auto",
                 chunk_size: int = 512, bias: bool = False):
        layout = LongformerLayout(num_heads=cfg.num_heads, window=window, block_size=block_size,
                                  max_seq_len=cfg.max_seq_len, dilation=dilation,
                                  global_tokens=list(global_tokens))
        super().__init__(cfg, layer_idx, layout=layout, backend=backend, chunk_size=chunk_size, bias=bias)
        self.window = window  # keys a query reads (DecoderLM.flops_per_token)


@MIXERS.register("bigbird")
class BigBirdAttention(SparseAttention):
    """BigBird block-sparse attention for a causal LM (Zaheer et al. 2020): per query block of
    ``block_size``, ``window_blocks`` blocks ending at its own (causal inside it),
    ``num_random_blocks`` random earlier blocks per head and layer (fixed by ``seed`` and the
    layer index), and ``global_tokens`` (default: the first block, BigBird-ITC's global block)."""

    def __init__(self, cfg, layer_idx: int = 0, *, block_size: int = 64, window_blocks: int = 3,
                 num_random_blocks: int = 2, global_tokens: list[int] | None = None, seed: int = 0,
                 backend: str = "auto", chunk_size: int = 512, bias: bool = False):
        layout = BigBirdLayout(num_heads=cfg.num_heads, block_size=block_size, max_seq_len=cfg.max_seq_len,
                               window_blocks=window_blocks, num_random_blocks=num_random_blocks,
                               global_tokens=None if global_tokens is None else list(global_tokens),
                               seed=seed * 1009 + layer_idx)
        super().__init__(cfg, layer_idx, layout=layout, backend=backend, chunk_size=chunk_size, bias=bias)
        self.window = layout.keys_per_query()  # keys a query reads (DecoderLM.flops_per_token)
