"""``lm export --to hf``: a real Lightning checkpoint -> a folder ``transformers`` loads, with equal
logits, equal greedy generations and an equivalent tokenizer (Llama and Mistral)."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import lm
from lm.models import DecoderConfig, DecoderLM, LayerSpec
from lm.tools.export import export_hf
from lm.tools.generate import generate
from lm.training.module import LanguageModel

from hf_checkpoints import export_once  # tests/parity/hf_checkpoints.py

transformers = pytest.importorskip("transformers")

EOS = "<|endoftext|>"
VOCAB = 320  # >= the byte-level tokenizer's 257 + merges
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokens and tokenizers",
         "a tiny corpus for a tiny tokenizer; the dog sleeps"] * 3
BASE = dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=4, max_seq_len=64, ffn_hidden=64)
CASES = {
    "llama-mha": (dict(), "LlamaForCausalLM"),
    "llama-mha-tied": (dict(tie_embeddings=True), "LlamaForCausalLM"),
    "llama-gqa": (dict(num_kv_heads=2), "LlamaForCausalLM"),
    "llama-mqa-tied": (dict(num_kv_heads=1, tie_embeddings=True), "LlamaForCausalLM"),
    "mistral-gqa": (dict(mixer="sliding_window", mixer_options={"window": 8}, num_kv_heads=2), "MistralForCausalLM"),
    "mistral-mqa-tied": (dict(mixer="sliding_window", mixer_options={"window": 8}, num_kv_heads=1,
                              tie_embeddings=True), "MistralForCausalLM"),
}


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, special_tokens=[EOS], show_progress=False)
    tok = Tokenizer.from_str(bpe._tokenizer.to_str())
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() <= VOCAB
    return tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """``exported(case) -> (ckpt, out_dir, arch)``, built once per case (one training step)."""
    return export_once(tmp_path_factory, lambda case: DecoderConfig(**BASE, **CASES[case][0]), tokenizer.to_str())


@pytest.mark.parametrize("case", list(CASES))
def test_hf_logits_and_greedy_generation_match(exported, case):
    from transformers import AutoModelForCausalLM

    ckpt, out, arch = exported(case)
    assert arch == CASES[case][1]
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == arch and hf.dtype == torch.float32
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = lm.load_model(ckpt)
    ids = torch.randint(0, VOCAB, (2, 24))  # longer than Mistral's window of 8
    with torch.no_grad():
        theirs_BTV, ours_BTV = hf(ids).logits, ours(ids)
    assert ours_BTV.shape == (2, 24, VOCAB)
    assert_close(theirs_BTV, ours_BTV, atol=1e-4, rtol=1e-4)

    prompt = ids[:1, :10]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    mine = generate(ours, prompt, max_new_tokens=6, temperature=0.0, eos_id=0)
    assert torch.equal(theirs, mine)


def test_mistral_export_keeps_the_window(exported):
    """The Mistral case is not secretly full attention: its window changes the logits past it."""
    ckpt, out, _ = exported("mistral-gqa")
    assert transformers.AutoConfig.from_pretrained(out).sliding_window == 8
    ours = lm.load_model(ckpt)
    full = DecoderLM(DecoderConfig(**BASE, num_kv_heads=2)).eval()
    full.load_state_dict(ours.state_dict())
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        a, b = ours(ids), full(ids)
    assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)


def test_hf_tokenizer_encodes_like_ours(exported, tokenizer):
    from transformers import AutoTokenizer

    _, out, _ = exported("llama-gqa")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == EOS and hf_tok.eos_token_id == 0
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == 0
    for text in ["hello quick world", "the lazy dog sleeps, tokens!", f"hello world{EOS}the dog"]:
        ids = tokenizer.encode(text).ids
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False)


def test_cli_export_writes_the_same_folder(exported, tmp_path):
    ckpt, out, _ = exported("llama-gqa")
    dest = tmp_path / "cli_hf"
    proc = subprocess.run([sys.executable, "-m", "lm.cli", "export", ckpt, "--to", "hf", "--out", str(dest)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in dest.iterdir()}
    a, b = load_file(str(dest / "model.safetensors")), load_file(f"{out}/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _plain_checkpoint(path, cfg):
    """A checkpoint with the contents ``LanguageModel`` saves (no Trainer: only export reads it)."""
    module = LanguageModel(config=cfg)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("overrides", [
    dict(norm="layernorm"),
    dict(ffn="gelu"),
    dict(mixer_options={"bias": True}),
    dict(layer_pattern=[LayerSpec(), LayerSpec(mixer="sliding_window", mixer_options={"window": 4})]),
    # Mistral has one sliding_window for all layers: per-layer windows do not map onto it
    dict(mixer="sliding_window", layer_pattern=[LayerSpec(mixer_options={"window": 4}),
                                                LayerSpec(mixer_options={"window": 8})]),
], ids=["layernorm", "gelu", "attn-bias", "hybrid", "per-layer-windows"])
def test_export_without_matching_architecture_raises(tmp_path, overrides):
    ckpt = _plain_checkpoint(tmp_path / "m.ckpt", DecoderConfig(**{**BASE, "vocab_size": 64}, **overrides))
    with pytest.raises(ValueError, match="no transformers architecture"):
        export_hf(ckpt, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("overrides", [
    dict(ffn_options={"hidden": 96}),  # the option wins over ffn_hidden=64 in SwiGLU
    dict(head_dim=16),  # head_dim != dim // num_heads
    dict(rope_theta=500.0, norm_eps=1e-6, num_kv_heads=2),
], ids=["ffn-option-hidden", "head-dim", "theta-eps"])
def test_export_carries_sizes_from_options(tmp_path, overrides):
    from transformers import AutoModelForCausalLM

    ckpt = _plain_checkpoint(tmp_path / "m.ckpt", DecoderConfig(**BASE, **overrides))
    out, _ = export_hf(ckpt, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert_close(hf(ids).logits, lm.load_model(ckpt)(ids), atol=1e-4, rtol=1e-4)


def test_cli_export_error_is_one_line(tmp_path, capsys):
    from lm.cli import main

    ckpt = _plain_checkpoint(tmp_path / "m.ckpt", DecoderConfig(**{**BASE, "vocab_size": 64}, ffn="gelu"))
    assert main(["export", ckpt, "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm: error:") and "no transformers architecture" in err and "Traceback" not in err
