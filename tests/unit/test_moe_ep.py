"""Expert-parallel MoE (lm.parallel.moe) in one process: with ep_size=1 and the same weights
DeepSpeed's layer with lm's gate gives the local layer's outputs, losses, statistics and gradients;
ep_rank picks the global experts; the MoE optimizer groups keep their schedule; checkpoint names
map back; bad expert-parallel settings fail with one line naming the key. The 2-process behaviour
is tests/distributed/test_moe_ep.py."""
import copy
import types

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("deepspeed")

import lm.nn.moe  # noqa: E402,F401  (registers ffn "moe")
from lm.models import DecoderConfig  # noqa: E402
from lm.nn.moe import AUX_LOSS, Z_LOSS, MoE  # noqa: E402
from lm.parallel.moe import ExpertParallelMoE, split_moe_param_groups  # noqa: E402

CFG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, ffn_hidden=48)


def local_moe(top_k, capacity_factor, **kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(DecoderConfig(**CFG), 0, num_experts=8, top_k=top_k, capacity_factor=capacity_factor, **kw)
    for p in m.parameters():  # distinct experts, routing far from ties
        torch.nn.init.normal_(p, std=0.3)
    return m


def _close_to_scale(a, b):
    """fp32 sums in another order (expert buffers padded to capacity): relative to the largest entry."""
    assert_close(a, b, atol=1e-5 * float(b.detach().abs().max()), rtol=1e-4)


@pytest.mark.parametrize("k, cf, kw", [
    (1, 1.0, {}), (1, 0.5, {"rts": False}), (1, None, {}), (2, None, {}), (2, 0.5, {}), (3, 1.25, {}),
    (2, 1.0, {"jitter": 0.1, "expert": "gelu"}),
], ids=["top1-rts", "top1-drops-no-rts", "top1", "top2", "top2-drops", "top3", "top2-jitter-gelu"])
def test_ep1_equals_local_layer(k, cf, kw):
    """Same weights, same RNG state (RTS and jitter draws): outputs, both aux losses, the routing
    statistics and every gradient equal the local layer's."""
    local = local_moe(k, cf, **kw).train()
    ep = ExpertParallelMoE(copy.deepcopy(local), ep_size=1).train()
    x = torch.randn(4, 16, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    ya = local(xa)
    aux_a = local.pop_aux_losses()
    torch.manual_seed(5)
    yb = ep(xb)
    aux_b = ep.pop_aux_losses()
    assert ep.pop_aux_losses() == {}
    _close_to_scale(yb, ya)
    assert set(aux_a) == set(aux_b) == {AUX_LOSS, Z_LOSS}
    for name in aux_a:
        assert_close(aux_b[name], aux_a[name])
    for name in ("load", "cv", "dropped", "aux_loss", "z_loss"):
        assert_close(ep.last_stats[name], local.last_stats[name])
    if cf is not None and cf <= 0.5:
        assert float(ep.last_stats["dropped"]) > 0  # the capacity path is exercised
    (ya.square().sum() + sum(aux_a.values())).backward()
    (yb.square().sum() + sum(aux_b.values())).backward()
    _close_to_scale(xb.grad, xa.grad)
    mapped = {MoE.deepspeed_key(n): p.grad for n, p in local.named_parameters()}
    for n, p in ep.named_parameters():
        _close_to_scale(p.grad, mapped[n])


def test_eval_uses_eval_capacity_factor():
    local = local_moe(1, 0.25, eval_capacity_factor=8.0, min_capacity=0)
    ep = ExpertParallelMoE(copy.deepcopy(local), ep_size=1)
    x = torch.randn(2, 16, 32)
    ep.train()(x)
    assert float(ep.last_stats["dropped"]) > 0
    ep.eval()
    _close_to_scale(ep(x), local.eval()(x))
    assert float(ep.last_stats["dropped"]) == 0


def test_ep_rank_holds_its_global_experts():
    local = local_moe(2, None)
    for rank in (0, 1):
        ep = ExpertParallelMoE(copy.deepcopy(local), ep_size=2, ep_rank=rank)
        experts = ep.deepspeed_moe.experts.deepspeed_experts
        assert ep.num_local_experts == len(experts) == 4
        for j, e in enumerate(experts):
            assert torch.equal(e.down_proj.weight, local.experts[4 * rank + j].down_proj.weight)
            assert all(p.allreduce is False and p.group_name == "ep_size_2" for p in e.parameters())
        assert torch.equal(ep.router.weight, local.router.weight) and not hasattr(ep.router.weight, "allreduce")
    with pytest.raises(ValueError, match="expert_parallel_size=3 does not divide num_experts=8"):
        ExpertParallelMoE(local, ep_size=3)


def test_moe_param_groups_keep_the_schedule():
    from lm.training.optim import OptimConfig, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    ep = ExpertParallelMoE(local_moe(2, None), ep_size=1)
    model.append(ep)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=4, weight_decay=0.1), 20)
    before = {id(p): (g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    split_moe_param_groups(opt, sched)
    experts = {id(p) for p in ep.deepspeed_moe.experts.parameters()}
    moe_groups = [g for g in opt.param_groups if g.get("moe")]
    assert moe_groups and {id(p) for g in moe_groups for p in g["params"]} == experts
    assert all(id(p) not in experts for g in opt.param_groups if not g.get("moe") for p in g["params"])
    after = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert after == before  # every parameter kept its group's weight decay
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups)
    for _ in range(3):
        opt.step()
        sched.step()
    assert len({g["lr"] for g in opt.param_groups}) == 1 and opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    n = len(opt.param_groups)
    split_moe_param_groups(opt, sched)  # idempotent
    assert len(opt.param_groups) == n


def test_checkpoint_names_map_back():
    from lm.parallel.consolidate import lm_name

    assert lm_name("model.blocks.1.ffn.deepspeed_moe.gate.wg.weight") == "model.blocks.1.ffn.router.weight"
    assert (lm_name("model.blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.7.up_proj.weight")
            == "model.blocks.1.ffn.experts.7.up_proj.weight")
    assert lm_name("_forward_module.model.embed.weight") == "model.embed.weight"


# -- bad input -----------------------------------------------------------------------------------
def _module(ep, **moe):
    from lm.training.module import LanguageModel

    cfg = DecoderConfig(**CFG, ffn="moe", ffn_options={"num_experts": 4, "top_k": 2, **moe})
    return LanguageModel(config=cfg, parallel={"expert_parallel_size": ep})


def _with_strategy(module, strategy):
    module._trainer = types.SimpleNamespace(strategy=strategy, precision="32-true")
    return module


def _deepspeed(stage, world):
    from lm.parallel import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage, parallel_devices=[torch.device("cpu")] * world)


@pytest.mark.parametrize("make, match", [
    (lambda: _with_strategy(_module(2), None), r"expert parallelism \(size 2\) runs under DeepSpeed: set "
                                                r"--trainer.strategy=deepspeed_stage_1 or deepspeed_stage_2 \(got no trainer\)"),
    (lambda: _with_strategy(_module(2), __import__("lightning").pytorch.strategies.DDPStrategy()),
     r"runs under DeepSpeed.*\(got DDPStrategy\)"),
    (lambda: _with_strategy(_module(2), _deepspeed(3, 2)), "does not support ZeRO stage 3"),
    (lambda: _with_strategy(_module(4), _deepspeed(2, 2)), r"4 is larger than the world size 2"),
    (lambda: _with_strategy(_module(2), _deepspeed(2, 3)), r"2 does not divide the world size 3"),
    (lambda: _with_strategy(_module(8), _deepspeed(2, 8)), r"num_experts=4 \(layer 0\) is not divisible by 8"),
    (lambda: _with_strategy(_module(2, ep_size=4), _deepspeed(2, 4)), "contradicts layer 0's ffn_options.ep_size=4"),
])
def test_bad_expert_parallel_settings_name_the_key(make, match):
    from lm.parallel import parallelize

    module = make()
    with pytest.raises(ValueError, match=match) as e:
        parallelize(module)
    msg = str(e.value)
    assert msg.startswith("model.parallel.expert_parallel_size: ") and "\n" not in msg


def test_expert_parallel_size_without_moe_and_bad_values():
    from lm.parallel import ParallelConfig, parallelize
    from lm.training.module import LanguageModel

    module = LanguageModel(config=DecoderConfig(**CFG), parallel={"expert_parallel_size": 2})
    with pytest.raises(ValueError, match=r"model.parallel.expert_parallel_size: 2 but the model has no MoE layer"):
        parallelize(module)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="model.parallel.expert_parallel_size: must be an integer >= 1"):
            ParallelConfig(expert_parallel_size=bad)
    parallelize(_module(1))  # size 1: the local layer stays, with or without a trainer
    parallelize(_with_strategy(_module(1), _deepspeed(2, 2)))
