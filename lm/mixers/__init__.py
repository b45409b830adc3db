"""Token mixers. Importing this package registers every built-in mixer."""
from lm.mixers import attention, attention_variants, hyena, mamba, rwkv  # noqa: F401
from lm.mixers import sparse  # noqa: F401  (sliding_window_blocksparse, longformer, bigbird)
from lm.mixers import linear_attention  # noqa: F401  (linear_attention, performer)
from lm.mixers import knn_memory  # noqa: F401  (knn_memory: Memorizing Transformer)
