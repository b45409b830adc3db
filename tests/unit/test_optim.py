"""AdamW param groups, the warmup + cosine schedule, OptimConfig validation."""
import math

import pytest
import torch

from lm.models import DecoderLM
from lm.training.optim import OptimConfig, build_optimizer, param_groups, warmup_cosine


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_decay_matrices_only_and_count_tied_once(tiny_cfg, tied):
    model = DecoderLM(tiny_cfg(tie_embeddings=tied, norm="layernorm", ffn="gelu", mixer_options={"bias": True}))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids))  # every tensor once, the tied table included
    assert set(ids) == {id(p) for p in model.parameters()}
    n_matrices = 1 + (0 if tied else 1) + 2 * (4 + 2)  # embed, head, per layer q/k/v/o + up/down
    assert len(decay["params"]) == n_matrices
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    opt, _ = build_optimizer(model, OptimConfig(), 10)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(ids)


def test_param_groups_skip_frozen(tiny_model):
    model = tiny_model()
    model.embed.weight.requires_grad_(False)
    decay, _ = param_groups(model, 0.1)
    assert all(p is not model.embed.weight for p in decay["params"])


def _formula(step, warmup, total, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_cosine_values():
    warmup, total, r = 10, 110, 0.1
    f = lambda s: warmup_cosine(s, warmup, total, r)  # noqa: E731
    assert f(0) == pytest.approx(1 / warmup)
    assert f(warmup - 1) == pytest.approx(1.0)  # warmup reaches the peak on its last step
    assert f(warmup) == pytest.approx(1.0)
    assert f(warmup + 50) == pytest.approx(r + (1 - r) * 0.5)  # halfway through the decay
    assert f(total) == pytest.approx(r)
    assert f(total + 100) == pytest.approx(r)  # stays at the floor
    for s in range(0, total + 5, 7):
        assert f(s) == pytest.approx(_formula(s, warmup, total, r))
    values = [f(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_warmup_cosine_edge_cases():
    assert warmup_cosine(0, 0, 100, 0.1) == pytest.approx(1.0)  # no warmup: starts at the peak
    assert warmup_cosine(100, 0, 100, 0.0) == pytest.approx(0.0)
    assert warmup_cosine(5, 10, 10, 0.1) == pytest.approx(0.6)  # total <= warmup: warmup only
    assert warmup_cosine(50, 10, 10, 0.1) == pytest.approx(1.0)


def test_build_optimizer_schedule_drives_lr(tiny_model):
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1, betas=(0.8, 0.9), weight_decay=0.05)
    opt, sched = build_optimizer(tiny_model(), cfg, total_steps=20)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    lrs = []
    for _ in range(22):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * _formula(s, 4, 20, 0.1) for s in range(22)]
    assert lrs == pytest.approx(expected)
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0


def test_decay_steps_overrides_trainer_total(tiny_model):
    opt, sched = build_optimizer(tiny_model(), OptimConfig(lr=1.0, warmup_steps=0, decay_steps=10), 1000)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("overrides, key", [
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=0.0), "eps"),
    (dict(decay_steps=-5), "decay_steps"),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_optim_config_rejects_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"model\.optim\.{key}"):
        OptimConfig(**overrides)
