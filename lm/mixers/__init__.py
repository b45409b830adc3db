"""Token mixers. Importing this package registers every built-in mixer."""
from lm.mixers import attention, hyena, mamba, rwkv  # noqa: F401
