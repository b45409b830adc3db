"""Sparse attention: one block-layout mechanism (``layout.py``), two backends (``backends.py``:
differentiable block-sparse PyTorch and FlexAttention), and the registered mixers (``mixers.py``):
``sliding_window_blocksparse``, ``longformer``, ``bigbird``."""
from lm.mixers.sparse import mixers  # noqa: F401  (registers the mixers)
