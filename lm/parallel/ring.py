"""Ring attention for sequence parallelism on GPUs, through PyTorch context parallel.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(arXiv:2310.01889): each rank keeps its T/p queries and the key/value blocks travel around the
group; partial softmax results are merged with their log-sum-exp, so the result is exact attention
without any rank holding the whole sequence's keys, and without splitting heads (unlike Ulysses,
any head count works). PyTorch implements it as ``torch.distributed.tensor.experimental.
context_parallel``: inside that region ``F.scaled_dot_product_attention`` on sequence-sharded
DTensors dispatches to the ring versions of the flash / memory-efficient / cuDNN kernels, forward
and backward. There is no such kernel for CPU tensors (``../shared/notes/platform.md``), so this
mode runs on CUDA only (``model.parallel.sequence_parallel_mode: ring``).

How ``lm.parallel.sequence`` uses it (same groups, data split and loss as Ulysses):

* ``ring_mesh``: a ``(world/p, p)`` device mesh; its ``sequence`` dimension is the SP group of
  ranks ``[g*p, (g+1)*p)``. Load balancing is switched off so rank r holds the contiguous tokens
  ``[r*T/p, (r+1)*T/p)`` -- the positions the mixers' ``start_pos`` offset (RoPE) assumes; the
  head-tail balancer would interleave chunks. The ring then skips the blocks a causal query never
  sees (compute is unbalanced across ranks, results are exact).
* ``enter_ring``: shards input_ids and labels with ``context_parallel`` and keeps the region open
  on the plan's step stack until after the backward (``_SequenceParallelLoss.backward``): the
  SDPA backward must dispatch to the ring kernels too.
* ``ring_attend``: the attention core inside the region: plain causal SDPA over the local blocks
  (key/value heads repeated to the query heads: the ring kernels take equal head counts). Masks
  other than causal (a sliding window shorter than the sequence) cannot go through the ring.

Legend: B batch, H query heads, K kv heads, L = T/p tokens on this rank, D head dim.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

MODE_KEY = "model.parallel.sequence_parallel_mode"


def _cp():
    """PyTorch's context-parallel module (its home moved between releases)."""
    try:
        from torch.distributed.tensor.experimental import _context_parallel as cp
    except ImportError:  # torch < 2.9
        from torch.distributed.tensor.experimental import _attention as cp
    return cp


def cuda_ring_available(min_gpus: int = 2) -> bool:
    """Whether this machine can run the ring mode over ``min_gpus`` processes (one GPU each)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < min_gpus:
        return False
    try:
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
    except ImportError:
        return False
    return True


def check_ring_device(device) -> None:
    """One-line error for the ring mode off CUDA (before any group is made)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{MODE_KEY}: ring runs on CUDA GPUs only (PyTorch context parallel has no "
                         f"{device.type} attention kernel); use ulysses on {device.type}")
    try:
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{MODE_KEY}: ring needs torch.distributed.tensor.experimental.context_parallel "
                         f"(torch >= 2.5), not found in torch {torch.__version__}") from e


def ring_mesh(world: int, size: int, device_type: str = "cuda"):
    """The SP dimension of a ``(world/size, size)`` mesh (a collective: every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh

    _cp()._cp_options.enable_load_balance = False  # contiguous shards (see the module docstring)
    mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=("sequence_data", "sequence"))
    return mesh["sequence"]


def enter_ring(stack: ExitStack, mesh, ids_BT: torch.Tensor, labels_BT: torch.Tensor):
    """Enters ``context_parallel`` on ``stack`` with copies of the batch as its buffers; returns this
    rank's shards ``[B, L]`` (sharded in place by PyTorch: ``Shard(1)`` of equal, contiguous chunks)."""
    from torch.distributed.tensor.experimental import context_parallel

    cp = _cp()
    if cp._cp_options.enable_load_balance:
        raise AssertionError("context-parallel load balancing must stay off (contiguous shards)")
    ids_BT, labels_BT = ids_BT.clone(), labels_BT.clone()  # sharded in place: never the loader's tensors
    stack.enter_context(context_parallel(mesh, buffers=[ids_BT, labels_BT], buffer_seq_dims=[1, 1],
                                         no_restore_buffers={ids_BT, labels_BT}))
    return ids_BT, labels_BT


def ring_attend(mixer, plan, q_BHLD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence, by the ring kernels that
    ``context_parallel`` patched into ``F.scaled_dot_product_attention``."""
    T = q_BHLD.shape[2] * plan.size
    if not mixer.plain_causal(T):
        raise ValueError(f"{MODE_KEY}: ring attention runs plain causal attention only; "
                         f"{type(mixer).__name__} masks more at length {T} (e.g. a window shorter than "
                         "the sequence): use ulysses")
    if q_BHLD.device.type != "cuda":
        raise ValueError(f"{MODE_KEY}: ring runs on CUDA GPUs only, got {q_BHLD.device.type} tensors")
    group = q_BHLD.shape[1] // k_BKLD.shape[1]
    if group > 1:  # GQA/MQA: the ring kernels take as many key/value heads as query heads
        k_BKLD, v_BKLD = k_BKLD.repeat_interleave(group, dim=1), v_BKLD.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q_BHLD, k_BKLD, v_BKLD, is_causal=True)
