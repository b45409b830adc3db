"""Parity with transformers: MambaForCausalLM and RwkvForCausalLM load our exported weights and
give our logits (pure-torch paths on CPU: no mamba-ssm / causal-conv1d / RWKV CUDA kernel)."""
import dataclasses
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import lm.mixers.mamba  # noqa: E402,F401
import lm.mixers.rwkv  # noqa: E402,F401
import lm.tools.export_ssm  # noqa: E402,F401  (appends the exporters)
from lm.models.config import DecoderConfig  # noqa: E402
from lm.models.decoder import DecoderLM  # noqa: E402
from lm.tools.export import export_hf, pick_exporter  # noqa: E402
from lm.tools.export_ssm import MambaExporter, RwkvExporter  # noqa: E402

HAS_EMBED_NORM = "embed_norm" in {f.name for f in dataclasses.fields(DecoderConfig)}




def _perturb(model):
    """Random norms / skips / time params, so parity does not hinge on ones and zeros."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", ".D", "conv1d.bias", "time_first")) or ".time_mix" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("proj.bias"):
                p.normal_(0, 0.1)


def _export(model, tmp_path):
    """``lm export CKPT --to hf``: a minimal lm checkpoint through ``export_hf``, loaded back by HF."""
    ckpt = tmp_path / "model.ckpt"
    torch.save({"lm": {"config": model.cfg.to_dict(), "tokenizer": None},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out, arch = export_hf(str(ckpt), str(tmp_path / "hf"))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == arch
    return pick_exporter(model.cfg), hf.eval()


@pytest.mark.parametrize("tie,options", [
    (True, {}),
    (False, {"d_state": 8, "d_conv": 3, "dt_rank": 5, "bias": True, "chunk_size": 8}),
])
def test_mamba_logits_match_hf(tmp_path, tie, options):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, mixer="mamba",
                        ffn="none", norm="rmsnorm", tie_embeddings=tie, mixer_options=options)
    model = DecoderLM(cfg).eval()
    _perturb(model)
    ex, hf = _export(model, tmp_path)
    assert isinstance(ex, MambaExporter) and type(hf).__name__ == "MambaForCausalLM"
    assert not hf.config.use_mambapy
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_rwkv_mixer_and_ffn_match_hf_modules():
    """Layer-level parity with HF's RwkvSelfAttention / RwkvFeedForward (same parameter names)."""
    from transformers import RwkvConfig
    from transformers.models.rwkv.modeling_rwkv import RwkvFeedForward, RwkvSelfAttention

    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, norm="layernorm")
    hf_cfg = RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, context_length=64,
                        attention_hidden_size=48, intermediate_size=80)
    tm = lm.mixers.rwkv.RwkvTimeMix(cfg, 1, attention_hidden=48, chunk_size=8)
    cm = lm.mixers.rwkv.RwkvChannelMix(cfg, 1, hidden=80)
    hf_tm, hf_cm = RwkvSelfAttention(hf_cfg, 1), RwkvFeedForward(hf_cfg, 1)
    with torch.no_grad():
        tm.time_decay.normal_(0, 1)
        tm.time_first.normal_(0, 1)
    hf_tm.load_state_dict(tm.state_dict())  # strict: the names and shapes are HF's
    hf_cm.load_state_dict(cm.state_dict())
    x = torch.randn(2, 29, 32)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), hf_tm(x)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cm(x), hf_cm(x)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_EMBED_NORM, reason="needs DecoderConfig.embed_norm (HF RWKV's pre_ln on the embeddings)")
@pytest.mark.parametrize("tie", [False, True])
def test_rwkv_logits_match_hf(tmp_path, tie):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, mixer="rwkv",
                        ffn="rwkv_channel_mix", norm="layernorm", embed_norm=True, tie_embeddings=tie,
                        mixer_options={"chunk_size": 8})
    model = DecoderLM(cfg).eval()
    _perturb(model)
    ex, hf = _export(model, tmp_path)
    assert isinstance(ex, RwkvExporter) and type(hf).__name__ == "RwkvForCausalLM"
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_exporters_only_match_their_architecture():
    base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64)
    assert not MambaExporter().matches(DecoderConfig(mixer="mamba", ffn="swiglu", **base))
    assert not MambaExporter().matches(DecoderConfig(mixer="mamba", ffn="none", norm="layernorm", **base))
    assert not RwkvExporter().matches(DecoderConfig(mixer="rwkv", ffn="rwkv_channel_mix", norm="rmsnorm", **base))
    with pytest.raises(ValueError, match="no transformers architecture"):
        pick_exporter(DecoderConfig(mixer="mamba", ffn="swiglu", **base))
