"""HF exporters for the recurrent mixers: ``MambaForCausalLM`` and ``RwkvForCausalLM``.

Importing this module appends them to ``lm.tools.export.HF_EXPORTERS`` (see that module for the
exporter interface: ``matches`` / ``hf_config`` / ``rename``).

- Mamba: HF's ``MambaBlock`` is ``x + mixer(norm(x))`` with an RMSNorm and no FFN, then ``norm_f``;
  that is our ``DecoderLM(mixer="mamba", ffn="none", norm="rmsnorm")``.
- RWKV-4: HF's ``RwkvBlock`` is ``x + attention(ln1(x)); x + feed_forward(ln2(x))`` with
  LayerNorms, block 0 first applies ``pre_ln`` to the embeddings, then ``ln_out`` (eps fixed at
  1e-5); that is ``DecoderLM(mixer="rwkv", ffn="rwkv_channel_mix", norm="layernorm",
  embed_norm=True, norm_eps=1e-5)``. ``rescale_every=0``: HF's inference-time halving of the
  residual stream is only equal to our model up to the LayerNorm eps, so it is switched off.
"""
from __future__ import annotations

import math

from lm.tools.export import HF_EXPORTERS, _rename

_MAMBA_NAMES = [
    (r"^embed\.weight$", "backbone.embeddings.weight"),
    (r"^blocks\.(\d+)\.mixer_norm\.weight$", r"backbone.layers.\1.norm.weight"),
    (r"^blocks\.(\d+)\.mixer\.(in_proj|conv1d|x_proj|dt_proj|out_proj)\.(weight|bias)$",
     r"backbone.layers.\1.mixer.\2.\3"),
    (r"^blocks\.(\d+)\.mixer\.(A_log|D)$", r"backbone.layers.\1.mixer.\2"),
    (r"^norm\.weight$", "backbone.norm_f.weight"),
    (r"^head\.weight$", "lm_head.weight"),
]

_RWKV_NAMES = [
    (r"^embed\.weight$", "rwkv.embeddings.weight"),
    (r"^embed_norm\.(weight|bias)$", r"rwkv.blocks.0.pre_ln.\1"),
    (r"^blocks\.(\d+)\.mixer_norm\.(weight|bias)$", r"rwkv.blocks.\1.ln1.\2"),
    (r"^blocks\.(\d+)\.ffn_norm\.(weight|bias)$", r"rwkv.blocks.\1.ln2.\2"),
    (r"^blocks\.(\d+)\.mixer\.(time_decay|time_first|time_mix_key|time_mix_value|time_mix_receptance)$",
     r"rwkv.blocks.\1.attention.\2"),
    (r"^blocks\.(\d+)\.mixer\.(key|value|receptance|output)\.weight$", r"rwkv.blocks.\1.attention.\2.weight"),
    (r"^blocks\.(\d+)\.ffn\.(time_mix_key|time_mix_receptance)$", r"rwkv.blocks.\1.feed_forward.\2"),
    (r"^blocks\.(\d+)\.ffn\.(key|value|receptance)\.weight$", r"rwkv.blocks.\1.feed_forward.\2.weight"),
    (r"^norm\.(weight|bias)$", r"rwkv.ln_out.\1"),
    (r"^head\.weight$", "head.weight"),
]


def _layers(cfg):
    return [cfg.layer(i) for i in range(cfg.num_layers)]


def _uniform(cfg, mixer: str, ffn: str) -> bool:
    """Every layer has this mixer and ffn with the same options (HF configs hold one set)."""
    specs = _layers(cfg)
    return all(s.mixer == mixer and s.ffn == ffn and s.mixer_options == specs[0].mixer_options
               and s.ffn_options == specs[0].ffn_options for s in specs)


def _common(cfg, arch: str, model_type: str, eos) -> dict:
    return {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None, "dtype": "float32"}


class MambaExporter:
    arch, model_type = "MambaForCausalLM", "mamba"

    def matches(self, cfg) -> bool:
        return cfg.norm == "rmsnorm" and not getattr(cfg, "embed_norm", False) and _uniform(cfg, "mamba", "none")

    def hf_config(self, cfg, tokenizer_eos: int | None) -> dict:
        o = cfg.layer(0).mixer_options
        rank = o.get("dt_rank", "auto")
        d = _common(cfg, self.arch, self.model_type, tokenizer_eos)
        d.update({
            "state_size": o.get("d_state", 16), "expand": o.get("expand", 2), "conv_kernel": o.get("d_conv", 4),
            "time_step_rank": math.ceil(cfg.dim / 16) if rank == "auto" else rank,
            "use_conv_bias": o.get("conv_bias", True), "use_bias": o.get("bias", False),
            "layer_norm_epsilon": cfg.norm_eps, "hidden_act": "silu",
            "residual_in_fp32": False,  # our Block adds residuals in the model dtype
            "use_mambapy": False, "time_step_min": o.get("dt_min", 0.001), "time_step_max": o.get("dt_max", 0.1),
            "time_step_floor": o.get("dt_init_floor", 1e-4), "initializer_range": cfg.init_std,
        })
        return d

    def rename(self, key: str) -> str:
        return _rename(key, _MAMBA_NAMES)


class RwkvExporter:
    arch, model_type = "RwkvForCausalLM", "rwkv"

    def matches(self, cfg) -> bool:
        return (cfg.norm == "layernorm" and bool(getattr(cfg, "embed_norm", False)) and cfg.norm_eps == 1e-5
                and _uniform(cfg, "rwkv", "rwkv_channel_mix"))

    def hf_config(self, cfg, tokenizer_eos: int | None) -> dict:
        spec = cfg.layer(0)
        d = _common(cfg, self.arch, self.model_type, tokenizer_eos)
        d.update({
            "context_length": cfg.max_seq_len,
            "attention_hidden_size": spec.mixer_options.get("attention_hidden") or cfg.dim,
            "intermediate_size": spec.ffn_options.get("hidden") or cfg.ffn_hidden or 4 * cfg.dim,
            "layer_norm_epsilon": cfg.norm_eps, "rescale_every": 0,
        })
        return d

    def rename(self, key: str) -> str:
        return _rename(key, _RWKV_NAMES)


for _ex in (MambaExporter(), RwkvExporter()):
    if not any(e.arch == _ex.arch for e in HF_EXPORTERS):
        HF_EXPORTERS.append(_ex)
