"""Expert parallelism on 2 processes, one torchrun launch: a gradient-step check, then ``lm fit`` jobs.

``python -m torch.distributed.run --standalone --nproc_per_node=2 moe_ep.py OUT.json [JOBS.json]``

1. Gradient step. Both ranks build the same seeded MoE decoder; each swaps in DeepSpeed's
   expert-parallel layer (``lm.parallel.moe.apply_expert_parallel``, ep_size=2) and takes one SGD
   step (lr 1, so the update *is* the gradient) under a ZeRO-2 engine on its half of a batch. The
   reference is the single-device model on the whole batch with the data-parallel loss
   ``mean over halves of (lm loss + aux losses)`` (the aux losses are per rank's tokens, as under
   DDP). Written to OUT.json per rank: the largest difference of every updated weight from the
   reference's (expert weights against the global experts this rank holds), of the layer
   outputs before the step, and fingerprints of the expert and non-expert weights, so the test
   can check that experts differ across ranks and everything else is identical.
2. JOBS.json (optional): ``lm fit`` command lines, run as ``fit_many.py`` runs them.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from lm.models import DecoderConfig, DecoderLM  # noqa: E402
from lm.nn.moe import MoE  # noqa: E402

CFG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=32, ffn="moe",
           ffn_options={"num_experts": 4, "top_k": 2, "hidden": 24, "capacity_factor": 1.0, "min_capacity": 0})
B, T = 4, 16  # per rank


class Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        logits = self.model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        for m in self.model.modules():
            if hasattr(m, "pop_aux_losses"):
                loss = loss + sum(m.pop_aux_losses().values())
        return loss


def gradient_step(out_path: str) -> None:
    import deepspeed

    from lm.parallel.moe import apply_expert_parallel, split_moe_param_groups

    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ref = DecoderLM(DecoderConfig(**CFG))
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 64, (2 * B, T + 1), generator=torch.Generator().manual_seed(1))
    halves = ids.split(B)

    ref_w = Wrapper(ref).train()
    ref_loss = sum(ref_w(h) for h in halves) / 2
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= p.grad
    ref_sd = ref.state_dict()

    swapped = apply_expert_parallel(model, 2)
    wrapper = Wrapper(model).train()
    opt = torch.optim.SGD([{"params": list(wrapper.parameters())}], lr=1.0)
    split_moe_param_groups(opt)
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=opt, dist_init_required=False, config={
        "train_micro_batch_size_per_gpu": B, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True})
    loss = engine(halves[rank])
    engine.backward(loss)
    engine.step()

    from lm.parallel.consolidate import lm_name

    n_local = swapped[0].num_local_experts
    diffs, expert_fp, shared_fp = {}, [], []
    for name, p in model.named_parameters():
        key = lm_name(name)
        if ".experts." in key:  # local index -> global
            head, _, tail = key.partition(".experts.")
            j, rest = tail.split(".", 1)
            key = f"{head}.experts.{rank * n_local + int(j)}.{rest}"
            expert_fp.append(float(p.detach().double().sum()))
        else:
            shared_fp.append(float(p.detach().double().sum()))
        diffs[key] = float((p.detach() - ref_sd[key]).abs().max())
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach().float())
    result = {"rank": rank, "diffs": diffs, "expert_fingerprint": expert_fp, "shared_fingerprint": shared_fp,
              "loss_diff": abs(float(sum(losses) / 2) - float(ref_loss)),
              "dropped": min(float(m.last_stats["dropped"]) for m in swapped),
              "grad_scale": float(sum(p.grad.abs().sum() for p in ref.parameters()))}
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(result, f)
    assert not any(isinstance(m, MoE) for m in model.modules())


if __name__ == "__main__":
    from lm.parallel.worker import exit_worker, start_worker

    start_worker()
    gradient_step(sys.argv[1])
    if len(sys.argv) > 2:
        from tests.distributed.scripts.fit_many import run

        exit_worker(run(sys.argv[2]))
    exit_worker(0)
