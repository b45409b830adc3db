"""Token mixers. Importing this package registers every built-in mixer."""
from lm.mixers import attention  # noqa: F401
