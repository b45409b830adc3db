"""DecoderConfig validation and layer_pattern, DecoderLM structure/init/counts, checkpoint checks."""
import math

import pytest
import torch

from lm.checkpoint import check_compatible, load_model
from lm.errors import CheckpointMismatchError
from lm.mixers.attention import Attention, SlidingWindowAttention
from lm.models import DecoderConfig, DecoderLM, LayerSpec
from lm.nn.mlp import GeluMLP, SwiGLU


# -- config validation --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (dict(dim=30, num_heads=4), "dim"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_kv_heads=-2), "num_kv_heads"),
    (dict(dim=36, num_heads=4), "head_dim"),  # head size 9: RoPE needs it even
    (dict(head_dim=6, num_heads=4, dim=32), None),  # explicit head_dim may differ from dim/heads: ok
    (dict(head_dim=7), "head_dim"),
    (dict(head_dim=-4), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dim=-32), "dim"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_heads=0), "num_heads"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(ffn_hidden=-8), "ffn_hidden"),
], ids=lambda v: v if isinstance(v, str) or v is None else ",".join(f"{k}={x}" for k, x in v.items()))
def test_config_validation_names_the_key(tiny_cfg, overrides, key):
    if key is None:
        cfg = tiny_cfg(**overrides)
        assert cfg.head_size == 6
        DecoderLM(cfg)
        return
    with pytest.raises(ValueError, match=key):
        tiny_cfg(**overrides)


@pytest.mark.parametrize("overrides, words", [
    (dict(mixer="atention"), ["mixer", "atention", "known"]),
    (dict(ffn="swigloo"), ["ffn", "swigloo"]),
    (dict(norm="batchnorm"), ["norm", "batchnorm"]),
    (dict(mixer="sliding_window", mixer_options={"windw": 4}), ["windw", "window"]),
    (dict(ffn_options={"hiden": 4}), ["hiden", "hidden"]),
    (dict(layer_pattern=[LayerSpec(mixer="nope")]), ["mixer", "nope"]),
    (dict(mixer_options={"layer_idx": 1}), ["layer_idx"]),  # positional: not an option
], ids=["mixer", "ffn", "norm", "mixer-option", "ffn-option", "pattern-mixer", "positional-as-option"])
def test_unknown_names_and_options_fail_at_build_naming_the_key(tiny_cfg, overrides, words):
    with pytest.raises(ValueError) as e:
        DecoderLM(tiny_cfg(**overrides))
    for w in words:
        assert w in str(e.value)


def test_from_dict_rejects_unknown_keys(tiny_cfg):
    d = tiny_cfg().to_dict()
    d["num_head"] = 4
    with pytest.raises(ValueError, match="num_head"):
        DecoderConfig.from_dict(d)


def test_layer_pattern_alternates_and_resolves_options(tiny_cfg):
    cfg = tiny_cfg(
        num_layers=4, mixer_options={}, ffn_hidden=None,
        layer_pattern=[LayerSpec(), LayerSpec(mixer="sliding_window", mixer_options={"window": 3},
                                              ffn="gelu", ffn_options={"hidden": 48})])
    specs = [cfg.layer(i) for i in range(4)]
    assert [s.mixer for s in specs] == ["attention", "sliding_window"] * 2
    assert [s.ffn for s in specs] == ["swiglu", "gelu"] * 2
    assert specs[1].mixer_options == {"window": 3} and specs[0].mixer_options == {}
    model = DecoderLM(cfg)
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [Attention, SlidingWindowAttention] * 2
    assert [b.mixer.window for b in model.blocks[1::2]] == [3, 3]
    assert [type(b.ffn) for b in model.blocks] == [SwiGLU, GeluMLP] * 2
    assert model.blocks[1].ffn.up_proj.out_features == 48
    # round trip through the plain dict a checkpoint stores
    again = DecoderConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.layer_pattern[1], LayerSpec)


def test_layer_pattern_inherits_model_options_only_for_the_model_mixer(tiny_cfg):
    cfg = tiny_cfg(mixer="sliding_window", mixer_options={"window": 5},
                   layer_pattern=[LayerSpec(), LayerSpec(mixer="attention")])
    assert cfg.layer(0).mixer_options == {"window": 5}
    assert cfg.layer(1).mixer_options == {}  # "window" would be an unknown option for attention
    model = DecoderLM(cfg)
    assert model.blocks[0].mixer.window == 5 and type(model.blocks[1].mixer) is Attention


def test_ffn_none_skips_ffn_and_its_norm(tiny_cfg):
    model = DecoderLM(tiny_cfg(ffn="none"))
    assert all(b.ffn is None and not hasattr(b, "ffn_norm") for b in model.blocks)
    assert model(torch.randint(0, 96, (1, 4))).shape == (1, 4, 96)


# -- DecoderLM ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_decoder_shapes_and_tying(tiny_cfg, tied):
    model = DecoderLM(tiny_cfg(tie_embeddings=tied))
    ids = torch.randint(0, 96, (3, 7))
    logits = model(ids)
    assert logits.shape == (3, 7, 96) and logits.dtype == torch.float32
    assert (model.head.weight is model.embed.weight) == tied
    assert ("head.weight" in dict(model.named_parameters())) != tied  # a shared tensor is listed once
    if tied:  # the gradient of both uses lands in the one tensor
        logits.sum().backward()
        assert model.embed.weight.grad is not None


def test_decoder_is_causal(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 96, (1, 10))
    ids2 = ids.clone()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % 96
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :6], model(ids2)[:, :6])


def test_init_scales_residual_out_projections(tiny_cfg):
    std, L = 0.02, 4
    model = DecoderLM(tiny_cfg(num_layers=L, init_std=std, ffn_hidden=128))
    cat = lambda ws: torch.cat([w.flatten() for w in ws])  # noqa: E731
    resid = cat([b.mixer.o_proj.weight for b in model.blocks] + [b.ffn.down_proj.weight for b in model.blocks])
    plain = cat([b.mixer.q_proj.weight for b in model.blocks] + [b.ffn.up_proj.weight for b in model.blocks])
    assert resid.std().item() == pytest.approx(std / math.sqrt(2 * L), rel=0.05)
    assert plain.std().item() == pytest.approx(std, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.1)
    assert abs(resid.mean().item()) < 1e-3
    for b in model.blocks:
        assert torch.equal(b.mixer_norm.weight, torch.ones(32))


def test_init_zeroes_biases(tiny_cfg):
    model = DecoderLM(tiny_cfg(norm="layernorm", ffn="gelu", mixer_options={"bias": True}))
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and "norm" not in n]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def _expected_params(V, D, L, H, K, hd, F, tied):
    attn = D * H * hd + 2 * D * K * hd + H * hd * D
    layer = attn + 3 * D * F + 2 * D  # swiglu + 2 rmsnorms
    total = V * D + L * layer + D + (0 if tied else V * D)
    return total


@pytest.mark.parametrize("kv, tied", [(4, False), (1, False), (2, True)])
def test_num_params_and_flops(tiny_cfg, kv, tied):
    cfg = tiny_cfg(num_kv_heads=kv, tie_embeddings=tied)
    model = DecoderLM(cfg)
    total = _expected_params(96, 32, 2, 4, kv, 8, 64, tied)
    assert model.num_params(exclude_embedding=False) == total
    assert sum(p.numel() for p in model.parameters()) == total
    non_emb = total if tied else total - 96 * 32  # a tied table is also the head: it stays counted
    assert model.num_params() == non_emb
    T = 16
    assert model.flops_per_token(T) == 6 * non_emb + 12 * 2 * 4 * 8 * T
    assert model.flops_per_token(2 * T) > model.flops_per_token(T)


# -- checkpoint compatibility -------------------------------------------------------------------
def test_check_compatible_accepts_own_state_dict(tiny_model):
    model = tiny_model()
    check_compatible(model, model.state_dict())
    check_compatible(model, {"model." + k: v for k, v in model.state_dict().items()}, prefix="model.")


def test_check_compatible_reports_unexpected_keys(tiny_model):
    small, big = tiny_model(num_layers=2), tiny_model(num_layers=3)
    with pytest.raises(CheckpointMismatchError) as e:
        check_compatible(small, big.state_dict())
    msg = str(e.value)
    assert "unexpected: blocks.2.ffn.down_proj.weight" in msg and "missing" not in msg
    assert "blocks.0" not in msg and msg.endswith("...)")  # long lists are cut after 6 keys


def test_check_compatible_reports_missing_keys(tiny_model):
    small, big = tiny_model(num_layers=2), tiny_model(num_layers=3)
    with pytest.raises(CheckpointMismatchError) as e:
        check_compatible(big, {"model." + k: v for k, v in small.state_dict().items()}, prefix="model.")
    msg = str(e.value)
    assert "missing" in msg and "model.blocks.2." in msg and "unexpected" not in msg


def test_check_compatible_reports_shape_mismatch(tiny_model):
    a, b = tiny_model(num_kv_heads=4), tiny_model(num_kv_heads=1)
    with pytest.raises(CheckpointMismatchError) as e:
        check_compatible(a, b.state_dict())
    msg = str(e.value)
    assert "shape mismatch" in msg and "blocks.0.mixer.k_proj.weight (8, 32) vs (32, 32)" in msg
    assert "q_proj" not in msg
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.0\.ffn\.down_proj\.weight \(48, 64\) vs \(32, 64\)"):
        check_compatible(a, tiny_model(dim=48).state_dict())


def test_load_model_rejects_state_dict_of_another_architecture(tiny_model, tmp_path):
    cfg_model, other = tiny_model(num_layers=2), tiny_model(num_layers=3)
    path = tmp_path / "bad.ckpt"
    torch.save({"lm": {"config": cfg_model.cfg.to_dict(), "tokenizer": None},
                "state_dict": {"model." + k: v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(CheckpointMismatchError, match="blocks.2"):
        load_model(path)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointMismatchError, match="not written by lm"):
        load_model(tmp_path / "foreign.ckpt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.ckpt")


def test_load_model_round_trip(tiny_model, tmp_path):
    model = tiny_model(mixer="sliding_window", mixer_options={"window": 3}, tie_embeddings=True)
    path = tmp_path / "ok.ckpt"
    torch.save({"lm": {"config": model.cfg.to_dict(), "tokenizer": "TOK"},
                "state_dict": {"model." + k: v for k, v in model.state_dict().items()}}, path)
    loaded = load_model(path)
    assert not loaded.training and loaded.tokenizer_json == "TOK"
    assert loaded.head.weight is loaded.embed.weight
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
