"""MoE ffn: dispatch equals a naive per-token loop (forward and grads), routing and capacity equal
DeepSpeed's gating functions and its MoE layer (ep_size=1), the aux/z-loss formulas, the training
loss wiring, ExpertLoad's logs and heatmap, and the bad-input errors."""
import copy
import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lm.nn.moe  # noqa: F401  (registers ffn "moe" until lm.models.block imports it)
from lm.models import DecoderConfig, DecoderLM, LayerSpec
from lm.nn.moe import MoE, expert_capacity, route
from lm.training.module import LanguageModel

CFG = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, ffn_hidden=48)


def moe(top_k=2, capacity_factor=None, **kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(DecoderConfig(**CFG), 0, num_experts=kw.pop("num_experts", 8), top_k=top_k,
            capacity_factor=capacity_factor, **kw)
    for p in m.parameters():  # distinct experts, routing far from ties
        torch.nn.init.normal_(p, std=0.3)
    return m


def naive(m: MoE, x_BTD: torch.Tensor, r) -> torch.Tensor:
    """Reference: token by token, route by route, out[s] = Σ_j keep·w·expert_e(x[s])."""
    x_SD = x_BTD.reshape(-1, x_BTD.shape[-1])
    rows = []
    for s in range(x_SD.shape[0]):
        acc = torch.zeros(x_SD.shape[1])
        for j in range(m.top_k):
            if r.keep_SK[s, j]:
                acc = acc + r.weight_SK[s, j] * m.experts[int(r.expert_SK[s, j])](x_SD[s])
        rows.append(acc)
    return torch.stack(rows).view_as(x_BTD)


def _close_to_scale(a, b):
    """fp32 sums taken in another order: tolerance relative to the tensor's largest entry."""
    assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


# -- dispatch == naive loop --------------------------------------------------------------------
@pytest.mark.parametrize("top_k, cf, expect_drops", [(1, None, False), (1, 0.5, True), (2, None, False),
                                                     (2, 0.5, True), (3, 0.75, True)],
                         ids=["top1", "top1-drops", "top2", "top2-drops", "top3-drops"])
def test_dispatch_equals_naive_loop_forward_and_grads(top_k, cf, expect_drops):
    m = moe(top_k, cf, min_capacity=0).train()
    x = torch.randn(2, 12, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    ya = m(xa)
    drop = float(m.last_stats["dropped"])
    assert (drop > 0) == expect_drops
    torch.manual_seed(7)  # same RTS draw
    r = route(m.router(xb.reshape(-1, 32)), top_k, cf, m.min_capacity, m.rts)
    yb = naive(m, xb, r)
    assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    if expect_drops:  # dropped tokens get no ffn output at all: they pass through the residual
        dropped_S = ~r.keep_SK.any(1)
        assert torch.all(ya.reshape(-1, 32)[dropped_S] == 0)
        assert dropped_S.any() or top_k > 2  # top-3 at 0.75: some routes, not whole tokens, dropped
    grads = []
    for y, xx in ((ya, xa), (yb, xb)):
        m.zero_grad()
        (y * torch.linspace(-1, 1, 32)).square().sum().backward()
        grads.append([xx.grad] + [p.grad.clone() for p in m.parameters()])
    for ga, gb in zip(*grads):
        _close_to_scale(ga, gb)
    assert m.router.weight.grad.abs().sum() > 0  # the router learns through the combine weights


def test_every_expert_gets_a_gradient_even_without_tokens():
    m = moe(1, None).train()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[3] = 10.0  # everything to expert 3
    x = torch.randn(1, 8, 32).abs()
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())  # DDP needs no find_unused_parameters
    assert float(m.last_stats["load"][3]) == 1.0
    assert math.isclose(float(m.last_stats["cv"]), math.sqrt(7), rel_tol=1e-5)


# -- routing == DeepSpeed's gating functions -----------------------------------------------------
def _ds_gate(logits, k, cf, min_capacity, rts):
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

    drop = cf is not None
    if k == 1:
        return top1gating(logits.clone(), cf or 1.0, min_capacity, drop_tokens=drop, use_rts=rts)
    if k == 2:
        return top2gating(logits.clone(), cf or 1.0, min_capacity, drop_tokens=drop, top2_2nd_expert_sampling=False)
    return topkgating(logits.clone(), k, cf or 1.0, min_capacity, drop_tokens=drop)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("S", [64, 37])
def test_routing_equals_deepspeed_gating(k, cf, S):
    pytest.importorskip("deepspeed")
    E = 8
    g = torch.Generator().manual_seed(S * 10 + k)
    logits = torch.randn(S, E, generator=g) * 2
    logits[:, 0] += 1.5  # an overloaded expert: drops at every capacity factor < 2
    torch.manual_seed(3)
    r = route(logits, k, cf, 4, rts=True)
    torch.manual_seed(3)  # DeepSpeed's RTS draws the same torch.rand(S, E)
    l_aux, combine_SEC, dispatch_SEC, counts_E = _ds_gate(logits, k, cf, 4, rts=True)
    ours_SE = torch.zeros(S, E).scatter_add_(1, r.expert_SK, r.weight_SK)
    keep_SE = torch.zeros(S, E, dtype=torch.bool).scatter_(1, r.expert_SK, r.keep_SK)
    assert torch.equal(keep_SE, dispatch_SEC.any(-1))
    assert_close(ours_SE, combine_SEC.sum(-1), atol=1e-6, rtol=1e-6)
    assert_close(r.aux_loss, l_aux)
    assert torch.equal(r.counts_E, counts_E)
    if cf is not None:
        assert r.capacity == combine_SEC.shape[-1]  # DeepSpeed's buffer size is its capacity
        assert torch.equal(r.kept_E, dispatch_SEC.any(-1).sum(0))


def test_top1_without_rts_keeps_deepspeeds_counts():
    """Without RTS DeepSpeed keeps an implementation-defined subset (torch.topk over ties); we keep
    the earliest tokens (Switch). The number kept per expert, hence the drop fraction, is equal."""
    pytest.importorskip("deepspeed")
    logits = torch.randn(64, 8)
    logits[:, 2] += 2.0
    r = route(logits, 1, 1.0, 4, rts=False)
    _, _, dispatch_SEC, _ = _ds_gate(logits, 1, 1.0, 4, rts=False)
    assert torch.equal(r.kept_E, dispatch_SEC.any(-1).sum(0))
    first = r.expert_SK[:, 0]
    for e in range(8):  # position priority: the kept tokens of an expert are its first ones
        mine = torch.nonzero(first == e).flatten()
        kept = torch.nonzero((first == e) & r.keep_SK[:, 0]).flatten()
        assert torch.equal(kept, mine[: len(kept)])


def test_top2_first_choices_have_priority():
    """GShard: every first choice is placed before any second choice of the same expert."""
    logits = torch.full((16, 4), -5.0)
    logits[:8, 0], logits[:8, 1] = 5.0, 4.0  # tokens 0-7: first 0, second 1
    logits[8:, 1], logits[8:, 0] = 5.0, 4.0  # tokens 8-15: first 1, second 0
    r = route(logits, 2, 1.0, 0)  # capacity ceil(16/4 * 2) = 8: exactly the first choices fit
    assert r.capacity == 8
    assert r.keep_SK[:, 0].all() and not r.keep_SK[:, 1].any()
    assert_close(r.weight_SK[:, 0], torch.ones(16))  # renormalised over the kept route


def test_capacity_formula_is_deepspeeds():
    assert expert_capacity(64, 8, 1, 1.25, 4) == 10
    assert expert_capacity(64, 8, 2, 1.0, 4) == 16
    assert expert_capacity(8, 8, 1, 1.0, 4) == 4  # min_capacity
    assert expert_capacity(80, 8, 1, 1.1, 0) == 11  # float32 product, as DeepSpeed (float64 would give 12)


@pytest.mark.parametrize("k, cf", [(1, 1.0), (1, None), (2, 1.0), (2, None), (3, 1.25)])
def test_layer_equals_deepspeed_moe_layer(k, cf):
    """Same weights (``deepspeed_key``), ``deepspeed_moe_kwargs()``, same RNG state: the outputs,
    ``l_aux`` and every gradient of ``deepspeed.moe.layer.MoE(ep_size=1)`` equal ours."""
    pytest.importorskip("deepspeed")
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    ours = moe(k, cf).train()
    ds = DeepSpeedMoE(expert=copy.deepcopy(ours.experts[0]), **ours.deepspeed_moe_kwargs()).train()
    ds.load_state_dict({ours.deepspeed_key(n): p for n, p in ours.state_dict().items()}, strict=True)
    x = torch.randn(4, 16, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    ya = ours(xa)
    aux = ours.pop_aux_losses()[lm.nn.moe.AUX_LOSS]
    torch.manual_seed(5)
    yb, l_aux, _ = ds(xb)
    assert_close(ya, yb)
    assert_close(aux, ours.balance_alpha * l_aux)
    (ya.square().sum() + aux).backward()
    (yb.square().sum() + ours.balance_alpha * l_aux).backward()
    close = _close_to_scale
    close(xa.grad, xb.grad)
    ga = {ours.deepspeed_key(n): p.grad for n, p in ours.named_parameters()}
    for n, p in ds.named_parameters():
        close(ga[n], p.grad)


# -- losses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_aux_and_z_loss_formulas(k):
    m = moe(k, None, balance_alpha=0.5, z_loss_coef=0.25)
    x = torch.randn(3, 10, 32)
    m(x)
    aux = m.pop_aux_losses()
    assert m.pop_aux_losses() == {}  # popped once
    logits = F.linear(x.reshape(-1, 32), m.router.weight)
    probs = logits.softmax(-1)
    P = probs.mean(0)
    topk = probs.topk(k, -1).indices
    if k <= 2:  # Switch / GShard: fraction of tokens whose first choice is expert i
        f = torch.bincount(topk[:, 0], minlength=8).float() / 30
    else:  # DeepSpeed topkgating: fraction of all routes
        f = torch.bincount(topk.flatten(), minlength=8).float() / (30 * k)
    assert_close(aux["moe_aux_loss"], 0.5 * 8 * (f * P).sum())
    z = torch.logsumexp(logits, -1).square().mean()
    assert_close(aux["moe_z_loss"], 0.25 * z)
    assert_close(m.last_stats["aux_loss"], 8 * (f * P).sum())
    assert_close(m.last_stats["z_loss"], z)


def test_uniform_router_gives_aux_loss_one():
    """N·Σ fᵢPᵢ is 1 at perfect balance (the Switch paper's minimum)."""
    logits = torch.zeros(16, 8)
    logits[torch.arange(16), torch.arange(16) % 8] = 1e-3  # near-uniform probs, exactly balanced choices
    assert_close(route(logits, 1).aux_loss, torch.tensor(1.0), atol=1e-3, rtol=0)


def test_zero_coefficients_leave_the_loss_out():
    m = moe(1, None, balance_alpha=0.0, z_loss_coef=0.0)
    m(torch.randn(1, 4, 32))
    assert m.pop_aux_losses() == {}
    assert float(m.last_stats["aux_loss"]) > 0  # still observable


def test_training_loss_includes_aux_losses_summed_over_layers():
    cfg = DecoderConfig(**{**CFG, "num_layers": 4}, ffn="moe", ffn_options={"num_experts": 4, "top_k": 1},
                        layer_pattern=[LayerSpec(ffn="swiglu"), LayerSpec()])
    module = LanguageModel(config=cfg)
    layers = [b.ffn for b in module.model.blocks if isinstance(b.ffn, MoE)]
    assert [m.layer_idx for m in layers] == [1, 3]  # Switch: every other layer
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
    lm_loss = module.loss(batch)
    expect = {k: sum(m._aux[k] for m in layers) for k in ("moe_aux_loss", "moe_z_loss")}
    aux = module.aux_losses()
    assert set(aux) == {"moe_aux_loss", "moe_z_loss"}
    for k in aux:
        assert_close(aux[k], expect[k])
    assert_close(aux["moe_aux_loss"], 1e-2 * sum(m.last_stats["aux_loss"] for m in layers))


def test_jitter_only_in_training_and_deterministic_eval():
    m = moe(2, None, jitter=0.1)
    x = torch.randn(1, 16, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m.router(x.reshape(-1, 32))
    assert not torch.allclose(a, F.linear(x.reshape(-1, 32), m.router.weight))
    torch.manual_seed(1)
    xj = x.reshape(-1, 32) * (0.9 + torch.rand(16, 32) * 0.2)
    assert_close(a, F.linear(xj, m.router.weight))


def test_eval_capacity_factor_is_used_in_eval():
    m = moe(1, 0.25, eval_capacity_factor=8.0, min_capacity=0)
    x = torch.randn(2, 16, 32)
    m.train()(x)
    assert float(m.last_stats["dropped"]) > 0
    m.eval()(x)
    assert float(m.last_stats["dropped"]) == 0


def test_decoder_with_moe_and_gelu_experts_and_bf16():
    model = DecoderLM(DecoderConfig(**CFG, ffn="moe", ffn_options={"expert": "gelu", "top_k": 1,
                                                                    "capacity_factor": 1.25, "hidden": 40}))
    ffn = model.blocks[0].ffn
    assert ffn.experts[0].up_proj.out_features == 40 and ffn.experts[0].up_proj.bias is None
    ids = torch.randint(0, 64, (2, 16))
    assert model(ids).shape == (2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(ids).float()).all()
    names = {n for n, _ in model.named_parameters() if n.startswith("blocks.0.ffn.")}
    assert "blocks.0.ffn.router.weight" in names and "blocks.0.ffn.experts.7.down_proj.weight" in names
    assert MoE.deepspeed_key("experts.7.down_proj.weight") == "deepspeed_moe.experts.deepspeed_experts.7.down_proj.weight"


# -- ExpertLoad ----------------------------------------------------------------------------------
def test_expert_load_logs_the_keys_and_writes_the_heatmap(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lm.callbacks.moe import ExpertLoad

    cfg = DecoderConfig(**{**CFG, "num_layers": 2}, ffn="moe",
                        ffn_options={"num_experts": 4, "top_k": 1, "capacity_factor": 1.0},
                        layer_pattern=[LayerSpec(ffn="swiglu"), LayerSpec()])
    module = LanguageModel(config=cfg)
    ids = torch.randint(0, 64, (8, 16))
    loader = torch.utils.data.DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=2)
    cb = ExpertLoad()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
                        callbacks=[cb], default_root_dir=str(tmp_path), enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, loader)
    png, table = tmp_path / "expert_load.png", tmp_path / "expert_load.csv"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 and {r["layer"] for r in rows} == {"1"}
    assert all(math.isclose(sum(float(r[f"e{j}"]) for j in range(4)), 1.0, abs_tol=1e-3) for r in rows)
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ["moe/layer1/load_e0", "moe/layer1/load_e3", "moe/layer1/cv", "moe/layer1/dropped",
                "moe/layer1/aux_loss", "moe/layer1/z_loss", "moe/cv", "moe/dropped", "moe/max_load",
                "train/moe_aux_loss", "train/moe_z_loss", "train/loss"]:
        assert key in metrics, key
    assert 0 <= cb.last_metrics["moe/layer1/dropped"] < 1 and cb.last_metrics["moe/layer1/cv"] >= 0


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("options, key", [
    ({"top_k": 9}, "model.config.ffn_options.top_k"),
    ({"top_k": 0}, "model.config.ffn_options.top_k"),
    ({"capacity_factor": 0.0}, "model.config.ffn_options.capacity_factor"),
    ({"capacity_factor": -1.25}, "model.config.ffn_options.capacity_factor"),
    ({"capacity_factor": 1.0, "eval_capacity_factor": 0}, "model.config.ffn_options.eval_capacity_factor"),
    ({"eval_capacity_factor": 2.0}, "model.config.ffn_options.eval_capacity_factor"),
    ({"num_experts": 0}, "model.config.ffn_options.num_experts"),
    ({"num_experts": 6, "ep_size": 4}, "model.config.ffn_options.ep_size"),
    ({"ep_size": 0}, "model.config.ffn_options.ep_size"),
    ({"expert": "relu"}, "model.config.ffn_options.expert"),
    ({"balance_alpha": -1.0}, "model.config.ffn_options.balance_alpha"),
    ({"z_loss_coef": -1.0}, "model.config.ffn_options.z_loss_coef"),
    ({"jitter": 1.5}, "model.config.ffn_options.jitter"),
    ({"min_capacity": -1}, "model.config.ffn_options.min_capacity"),
    ({"hidden": 0}, "model.config.ffn_options.hidden"),
    ({"num_expert": 8}, "num_expert"),  # unknown option: the registry names it and the accepted ones
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ValueError) as e:
        DecoderLM(DecoderConfig(**CFG, ffn="moe", ffn_options=options))
    assert key in str(e.value)


def test_bad_option_in_layer_pattern_names_the_pattern_entry():
    cfg = DecoderConfig(**CFG, layer_pattern=[LayerSpec(), LayerSpec(ffn="moe", ffn_options={"top_k": 12})])
    with pytest.raises(ValueError, match=r"model\.config\.layer_pattern\[1\]\.ffn_options\.top_k"):
        DecoderLM(cfg)


def test_ep_size_dividing_is_accepted():
    m = MoE(DecoderConfig(**CFG), 0, num_experts=8, ep_size=4)
    assert m.deepspeed_moe_kwargs()["ep_size"] == 4
