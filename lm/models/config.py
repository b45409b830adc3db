"""The model configuration a recipe writes under ``model.init_args.config``.

A plain dataclass, so LightningCLI type-checks every key and rejects unknown ones. Variants are
registry names (``mixer``, ``ffn``, ``norm``) with their own ``*_options``; ``layer_pattern``
repeats a list of per-layer overrides over the stack, which makes hybrids configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional


@dataclass
class LayerSpec:
    """Overrides for one position of ``layer_pattern``; unset fields inherit the model's."""

    mixer: Optional[str] = None
    mixer_options: Optional[dict[str, Any]] = None
    ffn: Optional[str] = None
    ffn_options: Optional[dict[str, Any]] = None


@dataclass
class DecoderConfig:
    """Decoder-only LM: embedding, ``num_layers`` Blocks, final norm, head."""

    vocab_size: int = 4096
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: = num_heads (MHA); 1: MQA; between: GQA
    head_dim: Optional[int] = None  # None: dim // num_heads
    ffn_hidden: Optional[int] = None  # None: 4*dim (gelu) or Llama's 8/3*dim rounded (swiglu)
    max_seq_len: int = 2048
    mixer: str = "attention"
    mixer_options: dict[str, Any] = field(default_factory=dict)
    ffn: str = "swiglu"
    ffn_options: dict[str, Any] = field(default_factory=dict)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    embed_norm: bool = False  # a norm on the embeddings before block 0 (RWKV's ln0 / HF pre_ln)
    init_std: float = 0.02
    layer_pattern: Optional[list[LayerSpec]] = None

    def __post_init__(self):
        if self.layer_pattern:  # from a plain dict (checkpoint) back to LayerSpecs
            self.layer_pattern = [s if isinstance(s, LayerSpec) else LayerSpec(**s) for s in self.layer_pattern]
        self.validate()

    # -- derived values -----------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    def layer(self, i: int) -> LayerSpec:
        """The resolved spec of layer ``i`` (pattern entry ``i % len(pattern)`` over the defaults)."""
        spec = self.layer_pattern[i % len(self.layer_pattern)] if self.layer_pattern else LayerSpec()
        mixer = spec.mixer or self.mixer
        ffn = spec.ffn or self.ffn
        mixer_opts = spec.mixer_options if spec.mixer_options is not None else (
            self.mixer_options if mixer == self.mixer else {})
        ffn_opts = spec.ffn_options if spec.ffn_options is not None else (self.ffn_options if ffn == self.ffn else {})
        return LayerSpec(mixer, dict(mixer_opts), ffn, dict(ffn_opts))

    def validate(self) -> None:
        k = "model.config."
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{k}{name}: must be positive, got {getattr(self, name)}")
        for name in ("head_dim", "ffn_hidden", "num_kv_heads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{k}{name}: must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"{k}dim: {self.dim} is not divisible by num_heads={self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{k}num_kv_heads: num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"{k}head_dim: RoPE needs an even head size, got {self.head_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model.config: unknown keys {unknown}")
        return cls(**d)
