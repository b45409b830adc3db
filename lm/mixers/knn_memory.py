"""Memorizing Transformer: attention that also reads the top-k (key, value) pairs of earlier segments.

Wu et al. 2022, "Memorizing Transformers" (arXiv:2203.08913, ICLR). A kNN-augmented layer keeps an
external, non-differentiable memory of the (key, value) pairs of the segments it has already
processed; each query of the current segment retrieves its top-k keys by inner product, attends
over them (softmax over the k), and a learned per-head gate ``g = sigmoid(gate_h)`` mixes that with
ordinary causal attention over the segment: ``out = g * mem + (1 - g) * local``. Training runs
segment by segment: a forward pass over a segment first retrieves (memory of earlier segments
only), then appends the segment's keys/values (detached; FIFO beyond ``memory_size`` per row).

Position: local attention uses RoPE; memory keys and the queries that search them are taken before
RoPE (the paper's memory has no positions either). The memory lives in the module (one per
layer and batch row), is not saved in checkpoints, and is cleared by ``reset_memory`` (call it at
document boundaries, ``reset_memories(model, rows)`` for all layers), when the batch size changes,
and on every train/eval switch. Two data modules feed it segment by segment and clear it at
document starts: ``lm.data.segments`` (cross-segment recall) and ``lm.data.document_stream`` (text:
every batch row reads one document after another). With a decoding cache the memory is read but
not written.

Index: ``exact`` (torch top-k over all entries), ``faiss`` (an exact inner-product faiss index when
``faiss`` is installed), ``auto`` (faiss if importable, else exact).

Legend: B batch, T segment length, H query heads, K kv heads, G = H/K, M memory slots, k top-k,
D head dim, C model dim.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from lm.mixers.attention import Attention, project_qkv
from lm.registry import MIXERS

_KEY = "model.config.mixer_options"
INDEXES = ("auto", "exact", "faiss")


class KNNMemory:
    """FIFO memory of (key, value) pairs per batch row and kv head: ``keys_BKMD``, ``values_BKMD``."""

    def __init__(self, memory_size: int, index: str = "exact"):
        self.memory_size, self.index = memory_size, index
        self.keys_BKMD: torch.Tensor | None = None
        self.values_BKMD: torch.Tensor | None = None
        self.valid_BM: torch.Tensor | None = None  # False: a slot of a cleared row

    def __len__(self) -> int:
        return 0 if self.keys_BKMD is None else self.keys_BKMD.shape[2]

    def clear(self, rows: torch.Tensor | None = None) -> None:
        """Forget everything, or only batch ``rows`` (bool ``[B]`` or indices): their slots are
        marked invalid (the other rows' streams go on) and age out of the FIFO."""
        if rows is None or self.keys_BKMD is None:
            self.keys_BKMD = self.values_BKMD = None
            self.valid_BM = None
            return
        self.valid_BM[rows] = False

    def add(self, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> None:
        k, v = k_BKTD.detach(), v_BKTD.detach()
        valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        if self.keys_BKMD is not None and self.keys_BKMD.shape[0] != k.shape[0]:
            self.clear()  # a new batch size: a new set of streams
        if self.keys_BKMD is not None:
            k = torch.cat([self.keys_BKMD, k], dim=2)
            v = torch.cat([self.values_BKMD, v], dim=2)
            valid = torch.cat([self.valid_BM, valid], dim=1)
        M = self.memory_size
        self.keys_BKMD, self.values_BKMD, self.valid_BM = k[:, :, -M:], v[:, :, -M:], valid[:, -M:]

    def search(self, q_BKGTD: torch.Tensor, top_k: int):
        """Top-k memory entries per query by inner product: ``(keys, values [B,K,G,T,k,D], valid
        [B,K,G,T,k])``; fewer stored entries than k (or cleared rows) come back invalid."""
        B, K, G, T, D = q_BKGTD.shape
        M = len(self)
        k = min(top_k, M)
        if self.index == "faiss":
            idx, found = self._faiss_search(q_BKGTD, k)
        else:
            scores = torch.einsum("bkgtd,bkmd->bkgtm", q_BKGTD.float(), self.keys_BKMD.float())
            scores = scores.masked_fill(~self.valid_BM[:, None, None, None, :], float("-inf"))
            idx, found = scores.topk(k, dim=-1).indices, None  # [B, K, G, T, k]
        flat = idx.reshape(B, K, G * T * k)

        def gather(mem_BKMD):
            return torch.gather(mem_BKMD, 2, flat[..., None].expand(-1, -1, -1, D)).view(B, K, G, T, k, D)

        valid = torch.gather(self.valid_BM[:, None].expand(B, K, M), 2, flat).view(B, K, G, T, k)
        if found is not None:
            valid &= found
        return gather(self.keys_BKMD), gather(self.values_BKMD), valid

    def _faiss_search(self, q_BKGTD: torch.Tensor, k: int) -> torch.Tensor:
        import faiss  # optional

        B, K, G, T, D = q_BKGTD.shape
        idx = torch.zeros(B, K, G * T, k, dtype=torch.long)
        found = torch.zeros(B, K, G * T, k, dtype=torch.bool)
        keys = self.keys_BKMD.detach().float().cpu().numpy()
        qs = q_BKGTD.detach().float().cpu().reshape(B, K, G * T, D).contiguous().numpy()
        valid = self.valid_BM.cpu()
        for b in range(B):
            slots = torch.nonzero(valid[b]).squeeze(1)  # faiss ids -> memory slots
            if not len(slots):
                continue
            for h in range(K):
                index = faiss.IndexFlatIP(D)
                index.add(keys[b, h][slots.numpy()])
                _, ids = index.search(qs[b, h], k)  # -1 where fewer than k entries
                ids = torch.from_numpy(ids)
                found[b, h] = ids >= 0
                idx[b, h] = slots[ids.clamp(min=0)]
        shape = (B, K, G, T, k)
        return idx.view(shape).to(q_BKGTD.device), found.view(shape).to(q_BKGTD.device)


@MIXERS.register("knn_memory")
class KNNMemoryAttention(Attention):
    """Memorizing-Transformer layer (Wu et al. 2022): causal attention over the segment, gated with
    attention over the ``top_k`` (key, value) pairs retrieved from a memory of ``memory_size``
    earlier ones per batch row (``index``: exact top-k, or faiss). Put it in one or a few layers
    with ``layer_pattern`` (the paper: one layer, near the top)."""

    def __init__(self, cfg, layer_idx: int = 0, *, memory_size: int = 4096, top_k: int = 32,
                 index: str = "auto", bias: bool = False):
        for name, val in (("memory_size", memory_size), ("top_k", top_k)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{_KEY}.{name}: must be a positive integer, got {val!r}")
        if top_k > memory_size:
            raise ValueError(f"{_KEY}.top_k: {top_k} is larger than the memory (memory_size={memory_size})")
        if index not in INDEXES:
            raise ValueError(f"{_KEY}.index: unknown index {index!r} (choose from {', '.join(INDEXES)})")
        has_faiss = importlib.util.find_spec("faiss") is not None
        if index == "faiss" and not has_faiss:
            raise ValueError(f"{_KEY}.index: 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        super().__init__(cfg, layer_idx, bias=bias)
        self.top_k = top_k
        self.memory = KNNMemory(memory_size, "faiss" if index == "faiss" or (index == "auto" and has_faiss) else "exact")
        self.gate_H = nn.Parameter(torch.zeros(self.num_heads))  # g = 0.5 at the start

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        self.memory.clear(rows)

    def train(self, mode: bool = True):
        if mode != self.training:
            self.reset_memory()  # training and evaluation streams never share a memory
        return super().train(mode)

    def forward(self, x_BTM: torch.Tensor, *, cache=None, start_pos: int = 0, **ctx) -> torch.Tensor:
        B, T, _ = x_BTM.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q0, k0, v = project_qkv(self, x_BTM)
        q, k = self.rope(q0, k0, start_pos)
        if cache is None:
            local = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
        else:
            k_all, v_all, k_pos_S = cache.update(k, v, start_pos)
            q_pos_T = torch.arange(start_pos, start_pos + T, device=x_BTM.device)
            local = self.attend(q, k_all, v_all, q_pos_T, k_pos_S, full_causal=False)
        out = local
        if len(self.memory) and self.memory.keys_BKMD.shape[0] == B:
            mem, has = self.memory_attention(q0.view(B, K, H // K, T, D))
            g = torch.sigmoid(self.gate_H).view(1, H, 1, 1).to(local.dtype)
            gated = g * mem.reshape(B, H, T, D).to(local.dtype) + (1 - g) * local
            out = torch.where(has.reshape(B, H, T, 1), gated, local)  # nothing retrieved: local only
        if cache is None:  # a segment: later segments retrieve from it
            self.memory.add(k0, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))

    def memory_attention(self, q_BKGTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention of each query over its top-k retrieved pairs (memory detached), and
        whether anything valid was retrieved ``[B, K, G, T]``."""
        keys, values, valid = self.memory.search(q_BKGTD.detach(), self.top_k)
        has = valid.any(-1)
        scores = torch.einsum("bkgtd,bkgtnd->bkgtn", q_BKGTD, keys) * self.head_dim ** -0.5
        # rows with nothing valid (a cleared stream) get finite dummy scores; the caller drops them
        scores = scores.masked_fill(~valid & has[..., None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        return torch.einsum("bkgtn,bkgtnd->bkgtd", p, values), has


def reset_memories(model: nn.Module, rows: torch.Tensor | None = None) -> int:
    """Clears the kNN memory of every ``knn_memory`` layer (all rows, or ``rows``); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, KNNMemoryAttention)]
    for m in layers:
        m.reset_memory(rows)
    return len(layers)
