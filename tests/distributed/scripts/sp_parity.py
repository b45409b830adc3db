"""Sequence-parallel parity: ``lm.parallel.sequence`` on N processes against one process.

``python -m torch.distributed.run --standalone --nproc_per_node=N sp_parity.py OUT --size P
[--mode ulysses|ring] [--backend gloo|nccl] [--cases a,b]``

For every case (MHA, GQA, sliding window across the shard boundary, absolute/no positions, and
activation checkpointing on top) each rank builds the same ``LanguageModel`` twice from one seed:
the reference runs in this process alone, the other one gets the real sequence-parallel swaps
(``apply_sequence_parallel``) over SP groups of P ranks, with N/P groups data parallel. The global
batch has labels masked (-100) unevenly, so the ranks hold different numbers of scored tokens:
that is what the loss's token-count weighting must get right. Each rank saves, per case:

* ``loss``: the SP loss value and the reference loss of this rank's data-parallel batch;
* ``logits``: the SP logits gathered over the group, and the reference logits;
* ``grads``: SP gradients summed over the world / N (what DDP does) and the reference gradient of
  the mean over data-parallel groups of their single-process losses;
* ``eval``: (loss, accuracy) of ``loss(batch, with_accuracy=True)`` without grad, both ways;
* ``plain_logits``: a negative control, the shards through the plain attention (no plan): each
  shard then attends only to itself, which must not match the reference.

The test (tests/distributed/test_sequence_parallel.py) compares them with ``assert_close``.
"""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist

B, T, VOCAB = 2, 16, 96
CASES = {
    "mha": dict(num_heads=4),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "sliding": dict(num_heads=4, num_kv_heads=2, mixer="sliding_window", mixer_options={"window": 6}),
    "abs_nope": dict(num_heads=4, layer_pattern=[{"mixer": "attention_abs"}, {"mixer": "attention_nope"}]),
    "checkpointed": dict(num_heads=4, num_kv_heads=2),
}
RING_CASES = ("mha", "gqa", "checkpointed")  # plain causal only


def _batch(rows: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows, T), generator=g)
    labels = ids.roll(-1, 1).clone()
    labels[torch.rand(rows, T, generator=g) < 0.3] = -100  # uneven scored-token counts per shard
    labels[0, : T // 2 + 2] = -100  # row 0: the first shard(s) score almost nothing
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _gather_seq(x_BLV: torch.Tensor, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(x_BLV) for _ in range(size)]
    dist.all_gather(parts, x_BLV.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _sp_logits(sp, plan, batch: dict) -> torch.Tensor:
    """This rank's shard through the SP model (ring: inside the context-parallel region), gathered."""
    ids_BL, _ = plan.begin_step(batch["input_ids"], batch["labels"])
    try:
        return _gather_seq(sp.model(ids_BL, sequence_parallel=plan), plan.group, plan.size)
    finally:
        plan.end_step()


def run_case(name: str, plan, device, world: int) -> dict:
    import lm.mixers.attention_variants  # noqa: F401  (registers attention_abs / attention_nope)
    from lm.models import DecoderConfig
    from lm.parallel.fsdp import apply_activation_checkpointing
    from lm.parallel.sequence import apply_sequence_parallel
    from lm.training.module import LanguageModel

    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=VOCAB, dim=32, num_layers=2, ffn_hidden=64, max_seq_len=64, **CASES[name])
    ref = LanguageModel(config=cfg).to(device)
    sp = copy.deepcopy(ref)
    apply_sequence_parallel(sp, plan)
    if name == "checkpointed":  # the recomputation in the backward must see the plan too
        apply_activation_checkpointing(sp.model.blocks)
        apply_activation_checkpointing(ref.model.blocks)
    dp, g = world // plan.size, dist.get_rank() // plan.size
    full = _batch(dp * B, device)
    batches = [{k: v[i * B:(i + 1) * B] for k, v in full.items()} for i in range(dp)]
    mine = batches[g]

    ref_losses = [ref.loss(b) for b in batches]
    torch.stack(ref_losses).mean().backward()  # DDP's target: the mean of the groups' losses
    loss = sp.loss(mine)
    sp.backward(loss)
    grads = {}
    for n, p in sp.named_parameters():
        dist.all_reduce(p.grad)
        grads[n] = [p.grad.cpu() / world, dict(ref.named_parameters())[n].grad.cpu()]

    with torch.no_grad():
        logits = _sp_logits(sp, plan, mine)
        ref_logits = ref.model(mine["input_ids"])
        # negative control: the same shards through the plain single-device attention
        plain = _gather_seq(sp.model(plan.local(mine["input_ids"])), plan.group, plan.size)
        sp.eval(), ref.eval()
        ev, ev_ref = sp.loss(mine, with_accuracy=True), ref.loss(mine, with_accuracy=True)
    return {"loss": [loss.detach().cpu(), ref_losses[g].detach().cpu()], "logits": [logits.cpu(), ref_logits.cpu()],
            "plain_logits": plain.cpu(),
            "grads": grads, "eval": [torch.stack(ev).cpu(), torch.stack(ev_ref).cpu()]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=2)
    ap.add_argument("--mode", default="ulysses")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    args = ap.parse_args()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    from lm.parallel.sequence import make_plan

    plan = make_plan(args.size, args.mode)
    cases = args.cases.split(",") if args.cases else RING_CASES if args.mode == "ring" else tuple(CASES)
    out = {name: run_case(name, plan, device, dist.get_world_size()) for name in cases}
    torch.save(out, Path(args.out) / f"rank{dist.get_rank()}.pt")
    return 0


if __name__ == "__main__":
    from lm.parallel.worker import exit_worker, start_worker

    start_worker()
    exit_worker(main())
