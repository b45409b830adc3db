"""HF exporter for Mixture-of-Experts decoders: ``MixtralForCausalLM``.

Importing this module appends it to ``lm.tools.export.HF_EXPORTERS`` (see that module for the
exporter interface: ``matches`` / ``hf_config`` / ``rename``).

HF's ``MixtralSparseMoeBlock`` routes as ``softmax(router logits) -> topk -> renormalise`` with no
capacity limit, over SwiGLU experts; that is our ``ffn: moe`` with ``top_k >= 2``,
``expert: swiglu`` and ``capacity_factor: null`` on every layer (top-1 differs: HF renormalises the
one weight to 1, Switch keeps the probability). Attention is Mistral's (``sliding_window`` null for
full attention).

Weights are written in the layout of the published Mixtral checkpoints, one tensor per expert
(``block_sparse_moe.gate.weight``, ``block_sparse_moe.experts.{j}.w1|w2|w3.weight`` = our
``router.weight``, ``experts.{j}.gate_proj|down_proj|up_proj.weight``); transformers 5 fuses them
on load into ``mlp.experts.gate_up_proj`` [E, 2F, D] (gate rows first) and ``down_proj`` [E, D, F]
(its ``conversion_mapping`` for ``mixtral``), older versions load them as they are.
"""
from __future__ import annotations

import inspect

from lm.nn.moe import MoE  # registers ffn "moe", so MoE checkpoints load for export
from lm.tools.export import HF_EXPORTERS, LlamaExporter, _rename

_DEFAULTS = {n: p.default for n, p in inspect.signature(MoE.__init__).parameters.items()
             if p.kind is p.KEYWORD_ONLY}

_MOE = r"^blocks\.(\d+)\.ffn\."
_MIXTRAL_NAMES = [
    (_MOE + r"router\.weight$", r"model.layers.\1.block_sparse_moe.gate.weight"),
    (_MOE + r"experts\.(\d+)\.gate_proj\.weight$", r"model.layers.\1.block_sparse_moe.experts.\2.w1.weight"),
    (_MOE + r"experts\.(\d+)\.down_proj\.weight$", r"model.layers.\1.block_sparse_moe.experts.\2.w2.weight"),
    (_MOE + r"experts\.(\d+)\.up_proj\.weight$", r"model.layers.\1.block_sparse_moe.experts.\2.w3.weight"),
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^blocks\.(\d+)\.mixer\.(q|k|v|o)_proj\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"^blocks\.(\d+)\.mixer_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blocks\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^head\.weight$", "lm_head.weight"),
]


def _moe_options(cfg) -> dict | None:
    """The (uniform) MoE options when every layer is a Mixtral layer, else None."""
    specs = [cfg.layer(i) for i in range(cfg.num_layers)]
    first = specs[0]
    if not all(s.mixer == first.mixer and s.mixer_options == first.mixer_options and s.ffn == "moe"
               and s.ffn_options == first.ffn_options for s in specs):
        return None
    if first.mixer not in ("attention", "sliding_window") or first.mixer_options.get("bias"):
        return None
    o = {**_DEFAULTS, **first.ffn_options}
    if o["top_k"] < 2 or o["expert"] != "swiglu" or o["capacity_factor"] is not None:
        return None
    return o


class MixtralExporter:
    arch, model_type = "MixtralForCausalLM", "mixtral"

    def matches(self, cfg) -> bool:
        return cfg.norm == "rmsnorm" and not getattr(cfg, "embed_norm", False) and _moe_options(cfg) is not None

    def hf_config(self, cfg, tokenizer_eos: int | None) -> dict:
        from lm.nn.mlp import default_hidden

        o, spec = _moe_options(cfg), cfg.layer(0)
        llama = LlamaExporter().hf_config(cfg, tokenizer_eos)
        keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "dtype")
        d = {"architectures": [self.arch], "model_type": self.model_type, **{k: llama[k] for k in keep}}
        d.update({
            "intermediate_size": o["hidden"] or cfg.ffn_hidden or default_hidden(cfg.dim, "swiglu"),
            "num_local_experts": o["num_experts"], "num_experts_per_tok": o["top_k"],
            "router_aux_loss_coef": o["balance_alpha"], "router_jitter_noise": o["jitter"],
            "output_router_logits": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
            "sliding_window": spec.mixer_options.get("window", 256) if spec.mixer == "sliding_window" else None,
        })
        return d

    def rename(self, key: str) -> str:
        return _rename(key, _MIXTRAL_NAMES)


if not any(e.arch == MixtralExporter.arch for e in HF_EXPORTERS):
    HF_EXPORTERS.append(MixtralExporter())
