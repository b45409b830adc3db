"""``lm export --to hf`` of a Mixtral-style model (every layer MoE, top-k >= 2, SwiGLU experts, no
capacity): a real Lightning checkpoint -> a folder ``transformers`` loads as ``MixtralForCausalLM``
with the same logits (fp32, atol 1e-4) and the same greedy generations."""
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import lm
import lm.tools.export_moe  # noqa: F401  (appends the Mixtral exporter until lm.tools.export imports it)
from lm.models import DecoderConfig, LayerSpec
from lm.tools.export import pick_exporter
from lm.tools.generate import generate

from hf_checkpoints import export_once  # tests/parity/hf_checkpoints.py

transformers = pytest.importorskip("transformers")

VOCAB = 96
BASE = dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=4, max_seq_len=64, ffn="moe")
MIXTRAL = {"num_experts": 8, "top_k": 2, "hidden": 48}
CASES = {
    "top2-gqa": dict(num_kv_heads=2, ffn_options=MIXTRAL),
    "top2-mqa-tied": dict(num_kv_heads=1, tie_embeddings=True, ffn_options={**MIXTRAL, "hidden": None},
                          ffn_hidden=40),
    "top3-of-4-sliding": dict(mixer="sliding_window", mixer_options={"window": 8}, num_kv_heads=2,
                              ffn_options={"num_experts": 4, "top_k": 3, "hidden": 24, "jitter": 0.01}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two training steps, so router and experts are trained away from their initialisation."""
    return export_once(tmp_path_factory, lambda case: DecoderConfig(**BASE, **CASES[case]), steps=2)


@pytest.mark.parametrize("case", list(CASES))
def test_mixtral_logits_and_greedy_generation_match(exported, case):
    from transformers import AutoModelForCausalLM

    ckpt, out, arch = exported(case)
    assert arch == "MixtralForCausalLM"
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.dtype == torch.float32
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = lm.load_model(ckpt)
    ids = torch.randint(0, VOCAB, (2, 24))  # longer than the sliding window of 8
    with torch.no_grad():
        theirs_BTV, ours_BTV = hf(ids).logits, ours(ids)
    assert_close(theirs_BTV, ours_BTV, atol=1e-4, rtol=1e-4)
    assert ours_BTV.std() > 0.05  # not a trivially flat model
    prompt = ids[:1, :10]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(theirs, generate(ours, prompt, max_new_tokens=6, temperature=0.0))


def test_hf_config_and_fused_expert_tensors(exported):
    """transformers 5 stores the experts fused: gate_up_proj [E, 2F, D] (gate rows first), down_proj
    [E, D, F]; the router is mlp.gate.weight [E, D]."""
    from transformers import AutoModelForCausalLM

    ckpt, out, _ = exported("top2-gqa")
    c = transformers.AutoConfig.from_pretrained(out)
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size, c.sliding_window) == (8, 2, 48, None)
    hf_sd = AutoModelForCausalLM.from_pretrained(out).state_dict()
    ffn = lm.load_model(ckpt).blocks[1].ffn
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in ffn.experts])
    down = torch.stack([e.down_proj.weight for e in ffn.experts])
    assert torch.equal(hf_sd["model.layers.1.mlp.experts.gate_up_proj"], gate_up)
    assert torch.equal(hf_sd["model.layers.1.mlp.experts.down_proj"], down)
    assert torch.equal(hf_sd["model.layers.1.mlp.gate.weight"], ffn.router.weight)


def _wired() -> bool:
    """Whether a fresh process registers ffn "moe" and the Mixtral exporter (import lines in
    lm/models/block.py and lm/tools/export.py)."""
    import inspect

    import lm.models.block
    import lm.tools.export

    return "lm.nn.moe" in inspect.getsource(lm.models.block) and "export_moe" in inspect.getsource(lm.tools.export)


@pytest.mark.skipif(not _wired(), reason="needs `import lm.nn.moe` in block.py and `import lm.tools.export_moe` in export.py")
def test_cli_export_mixtral(exported, tmp_path):
    ckpt, _, _ = exported("top2-gqa")
    proc = subprocess.run([sys.executable, "-m", "lm.cli", "export", ckpt, "--to", "hf", "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "MixtralForCausalLM" in proc.stdout


@pytest.mark.parametrize("overrides", [
    dict(ffn_options={"top_k": 1}),  # Switch keeps the probability, HF renormalises it to 1
    dict(ffn_options={"capacity_factor": 1.25}),  # HF has no capacity: drops would differ
    dict(ffn_options={"expert": "gelu"}),
    dict(layer_pattern=[LayerSpec(ffn="swiglu"), LayerSpec()]),  # Switch-style every other layer
    dict(norm="layernorm"),
], ids=["top1", "capacity", "gelu-experts", "every-other-layer", "layernorm"])
def test_non_mixtral_moe_does_not_match(overrides):
    cfg = DecoderConfig(**{**BASE, **overrides})
    with pytest.raises(ValueError, match="no transformers architecture"):
        pick_exporter(cfg)
