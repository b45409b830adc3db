"""``lm export CKPT --to hf --out DIR``: a folder ``transformers.AutoModelForCausalLM`` loads.

Each HF architecture is an exporter: ``matches(cfg)`` says whether our config maps onto it,
``hf_config(cfg)`` builds its config dict, ``rename(key)`` maps our parameter names onto its.
Full attention -> LlamaForCausalLM; sliding window -> MistralForCausalLM. Later families add
exporters (Mixtral, Mamba, RWKV) to ``HF_EXPORTERS``.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

_LLAMA_NAMES = [
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^blocks\.(\d+)\.mixer\.(q|k|v|o)_proj\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"^blocks\.(\d+)\.ffn\.(gate|up|down)_proj\.weight$", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"^blocks\.(\d+)\.mixer_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blocks\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^head\.weight$", "lm_head.weight"),
]


def _rename(key: str, table) -> str:
    for pat, repl in table:
        if re.match(pat, key):
            return re.sub(pat, repl, key)
    raise ValueError(f"export: no HF name for parameter {key!r}")


def _uniform(cfg, mixer: str) -> bool:
    """Every layer has the same mixer, options and SwiGLU ffn (HF configs are per model)."""
    specs = [cfg.layer(i) for i in range(cfg.num_layers)]
    same = all(s.mixer_options == specs[0].mixer_options and s.ffn_options == specs[0].ffn_options for s in specs)
    return same and all(s.mixer == mixer and s.ffn == "swiglu" and not s.mixer_options.get("bias") for s in specs)


class LlamaExporter:
    arch, model_type = "LlamaForCausalLM", "llama"

    def matches(self, cfg) -> bool:
        return cfg.norm == "rmsnorm" and _uniform(cfg, "attention")

    def hf_config(self, cfg, tokenizer_eos: int | None) -> dict:
        from lm.nn.mlp import default_hidden

        hidden = cfg.layer(0).ffn_options.get("hidden") or cfg.ffn_hidden or default_hidden(cfg.dim, "swiglu")
        return {
            "architectures": [self.arch], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": hidden, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_size, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": tokenizer_eos, "eos_token_id": tokenizer_eos,
            "pad_token_id": None, "dtype": "float32",
        }

    def rename(self, key: str) -> str:
        return _rename(key, _LLAMA_NAMES)


class MistralExporter(LlamaExporter):
    arch, model_type = "MistralForCausalLM", "mistral"

    def matches(self, cfg) -> bool:
        return cfg.norm == "rmsnorm" and _uniform(cfg, "sliding_window")

    def hf_config(self, cfg, tokenizer_eos):
        d = super().hf_config(cfg, tokenizer_eos)
        d["sliding_window"] = cfg.layer(0).mixer_options.get("window", 256)
        return d


HF_EXPORTERS = [LlamaExporter(), MistralExporter()]

import lm.tools.export_ssm  # noqa: E402,F401  (appends the Mamba and RWKV exporters)
import lm.tools.export_moe  # noqa: E402,F401  (appends the Mixtral exporter)


def pick_exporter(cfg):
    for ex in HF_EXPORTERS:
        if ex.matches(cfg):
            return ex
    raise ValueError(
        "export --to hf: no transformers architecture matches this model "
        f"(mixer={cfg.mixer!r}, ffn={cfg.ffn!r}, norm={cfg.norm!r}, layer_pattern set={bool(cfg.layer_pattern)}); "
        f"supported: {', '.join(e.arch for e in HF_EXPORTERS)}")


def export_hf(ckpt_path: str, out_dir: str, dtype: str = "float32") -> tuple[Path, str]:
    """Returns (folder, HF architecture). Writes ``config.json``, ``model.safetensors`` and the tokenizer files to ``out_dir``."""
    from safetensors.torch import save_file

    from lm.checkpoint import load_model

    model = load_model(ckpt_path)
    cfg, out = model.cfg, Path(out_dir)
    ex = pick_exporter(cfg)
    tok_json = getattr(model, "tokenizer_json", None)
    eos = None
    if tok_json:
        from tokenizers import Tokenizer

        eos = Tokenizer.from_str(tok_json).token_to_id("<|endoftext|>")
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if cfg.tie_embeddings:
        sd.pop("head.weight")
    tensors = {ex.rename(k): v.to(getattr(torch, dtype)).contiguous() for k, v in sd.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = ex.hf_config(cfg, eos)
    hf_cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}, indent=2))
    if tok_json:
        _save_tokenizer(tok_json, out)
    return out, ex.arch


def _save_tokenizer(tok_json: str, out: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token=None)
    fast.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm export", description="Export a checkpoint to another format.")
    p.add_argument("ckpt")
    p.add_argument("--to", choices=["hf"], default="hf")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = p.parse_args(argv)
    out, arch = export_hf(args.ckpt, args.out, args.dtype)
    print(f"[lm] exported {arch} to {out}")
    return 0
