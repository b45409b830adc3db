"""Linear attention (elu+1) and Performer FAVOR+: chunked prefix sums equal the quadratic form of
the same kernel, FAVOR+ approaches softmax attention as features grow, recurrent decode equals the
full forward, the redraw schedule, one-line errors.

Legend: B batch, K kv heads, G query heads per kv head, T length, F features, D head dim.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lm.mixers.linear_attention import (
    Performer, causal_linear_attention, favor_features, orthogonal_gaussian, quadratic_linear_attention,
)
from lm.models import DecoderConfig, DecoderLM

from pattern_training import assert_loss_falls  # tests/unit/pattern_training.py


def phis(kind, B=2, K=2, G=2, T=23, D=8, Fn=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, K, G, T, D, generator=g) * 0.7
    k = torch.randn(B, K, T, D, generator=g) * 0.7
    v = torch.randn(B, K, T, D, generator=g)
    if kind == "elu":
        return F.elu(q) + 1, F.elu(k) + 1, v
    w = orthogonal_gaussian(Fn, D, g)
    return favor_features(q, w, True), favor_features(k, w, False), v


@pytest.mark.parametrize("kind", ["elu", "favor"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_prefix_sum_form_equals_quadratic_form(kind, chunk):
    pq, pk, v = phis(kind)
    out, _ = causal_linear_attention(pq, pk, v, chunk_size=chunk)
    assert_close(out, quadratic_linear_attention(pq, pk, v))


@pytest.mark.parametrize("kind", ["elu", "favor"])
def test_state_continues_a_sequence(kind):
    pq, pk, v = phis(kind, T=30)
    full, (S, z) = causal_linear_attention(pq, pk, v, chunk_size=8)
    a, state = causal_linear_attention(pq[..., :11, :], pk[..., :11, :], v[..., :11, :], chunk_size=4)
    b, (S2, z2) = causal_linear_attention(pq[..., 11:, :], pk[..., 11:, :], v[..., 11:, :], state, chunk_size=8)
    assert_close(torch.cat([a, b], dim=3), full)
    assert_close((S2, z2), (S, z))


def test_favor_features_positive_and_orthogonal():
    w = orthogonal_gaussian(40, 16, torch.Generator().manual_seed(0))
    unit = w / w.norm(dim=1, keepdim=True)
    gram = unit[:16] @ unit[:16].T  # one block: orthogonal directions
    assert_close(gram, torch.eye(16), atol=1e-5, rtol=0)
    x = torch.randn(3, 50, 16) * 3
    assert (favor_features(x, w, True) > 0).all() and (favor_features(x, w, False) > 0).all()


def test_favor_approaches_softmax_attention_as_features_grow():
    """Mean |FAVOR+ - softmax| attention output over seeds, for F = 16 .. 4096 (measured: falls
    roughly like 1/sqrt(F))."""
    B, K, T, D = 1, 2, 24, 16
    errors = []
    for Fn in (16, 64, 256, 1024, 4096):
        err = 0.0
        for seed in range(4):
            g = torch.Generator().manual_seed(100 + seed)
            q = torch.randn(B, K, 1, T, D, generator=g) * 0.5
            k = torch.randn(B, K, T, D, generator=g) * 0.5
            v = torch.randn(B, K, T, D, generator=g)
            ref = F.scaled_dot_product_attention(q[:, :, 0], k, v, is_causal=True)
            w = orthogonal_gaussian(Fn, D, torch.Generator().manual_seed(seed))
            out, _ = causal_linear_attention(favor_features(q, w, True), favor_features(k, w, False), v)
            err += (out[:, :, 0] - ref).abs().mean().item() / 4
        errors.append(err)
    print("FAVOR+ mean abs error vs softmax by features:", dict(zip((16, 64, 256, 1024, 4096), errors)))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 5, errors  # 256x the features (1/sqrt(F) would be 16x); measured 8x


# -- the mixers in the model ---------------------------------------------------------------------
MIXERS = {"linear_attention": {"chunk_size": 4}, "performer": {"num_features": 24, "chunk_size": 4}}


def tiny(mixer, **kw):
    return DecoderLM(DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   max_seq_len=64, ffn_hidden=64, mixer=mixer, mixer_options=kw)).eval()


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_recurrent_decode_equals_full_forward(mixer):
    model = tiny(mixer, **MIXERS[mixer])
    ids = torch.randint(0, 64, (2, 25))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2, 25)
        size = cache.nbytes()
        steps = [model(ids[:, :7], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 25)]
    assert_close(torch.cat(steps, dim=1), full)
    n_feat, head_dim = MIXERS[mixer].get("num_features", 8), 8
    # constant state per layer: S [B, K, F, D] and z [B, K, F] in fp32, whatever the length
    assert cache.nbytes() == size == model.cfg.num_layers * 2 * 2 * n_feat * (head_dim + 1) * 4


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mixer_trains(mixer):
    torch.manual_seed(0)
    model = tiny(mixer, **MIXERS[mixer]).train()
    assert_loss_falls(model, steps=15)


def test_performer_redraw_schedule_and_checkpoint():
    cfg = DecoderConfig(vocab_size=64, dim=32, num_layers=1, num_heads=4, max_seq_len=32)
    a, b = Performer(cfg, 0, num_features=16, feature_redraw_interval=3), Performer(cfg, 0, num_features=16,
                                                                                   feature_redraw_interval=3)
    x = torch.randn(1, 8, 32)
    assert torch.equal(a.proj_FD, b.proj_FD)  # seeded by (seed, layer, draw), not the global RNG
    w0 = a.proj_FD.clone()
    a.train()
    for _ in range(3):
        a(x)
    assert torch.equal(a.proj_FD, w0) and a.draws == 0
    a(x)  # the 4th training forward redraws (every 3)
    assert not torch.equal(a.proj_FD, w0) and a.draws == 1
    w1 = a.proj_FD.clone()
    a.eval()
    for _ in range(5):
        a(x)
    assert torch.equal(a.proj_FD, w1)  # fixed in eval
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.proj_FD, w1) and (b.calls, b.draws) == (4, 1)
    with torch.no_grad():
        assert_close(a(x), b(x))


def test_performer_default_features_is_d_log_d():
    cfg = DecoderConfig(vocab_size=64, dim=64, num_layers=1, num_heads=2, max_seq_len=32)
    assert Performer(cfg, 0).num_features == int(32 * math.log(32))


@pytest.mark.parametrize("mixer, opts, match", [
    ("performer", {"num_features": 0}, r"mixer_options\.num_features: must be a positive integer, got 0"),
    ("performer", {"feature_redraw_interval": -1}, r"mixer_options\.feature_redraw_interval: must be an integer >= 0"),
    ("linear_attention", {"chunk_size": 0}, r"mixer_options\.chunk_size: must be a positive integer"),
    ("performer", {"num_feature": 8}, r"num_feature: unknown option"),
])
def test_bad_options_fail_with_the_key(mixer, opts, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny(mixer, **opts)
    assert "\n" not in str(e.value)
