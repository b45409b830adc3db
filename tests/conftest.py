"""Shared test fixtures: hermetic caches, seeding, tiny model configs.

Caches (``LM_CACHE``, ``HF_HOME``, ``WANDB_DIR``) point at one temporary folder per test session.
They are set in ``pytest_configure`` — before collection imports ``transformers``, which reads
``HF_HOME`` at import time — and inherited by the subprocesses tests start.

Torch runs single-threaded (``OMP_NUM_THREADS=1`` unless set): the tests' tensors are tiny and the
CI machine's 2 cores are shared, where OpenMP's thread barriers make small ops 10-30x slower.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

_SESSION_DIR: str | None = None


def pytest_configure(config):
    global _SESSION_DIR
    _SESSION_DIR = tempfile.mkdtemp(prefix="lm-tests-")
    for var, sub in (("LM_CACHE", "lm"), ("HF_HOME", "hf"), ("WANDB_DIR", "wandb")):
        path = os.path.join(_SESSION_DIR, sub)
        os.makedirs(path, exist_ok=True)
        os.environ[var] = path
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for subprocesses
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_unconfigure(config):
    if _SESSION_DIR:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg():
    """Factory of tiny ``DecoderConfig``s: ``tiny_cfg(num_kv_heads=1, mixer="sliding_window")``."""
    from lm.models import DecoderConfig

    def make(**overrides) -> DecoderConfig:
        kw = dict(vocab_size=96, dim=32, num_layers=2, num_heads=4, max_seq_len=64, ffn_hidden=64)
        kw.update(overrides)
        return DecoderConfig(**kw)

    return make


@pytest.fixture
def tiny_model(tiny_cfg):
    """Factory of tiny ``DecoderLM``s in eval mode, fp32."""
    from lm.models import DecoderLM

    def make(**overrides):
        return DecoderLM(tiny_cfg(**overrides)).eval()

    return make
