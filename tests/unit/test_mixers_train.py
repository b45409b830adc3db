"""Every mixer trains inside the one Block: the loss of a repeated pattern falls quickly."""
import pytest
import torch

from lm.models.config import DecoderConfig
from lm.models.decoder import DecoderLM

from pattern_training import assert_loss_falls  # tests/unit/pattern_training.py

MIXERS = {
    "attention": {},
    "sliding_window": {"window": 8},
    "mamba": {"d_state": 8, "chunk_size": 8},
    "rwkv": {},
    "hyena": {},
}


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mixer_trains(mixer):
    torch.manual_seed(0)
    ffn = "rwkv_channel_mix" if mixer == "rwkv" else "swiglu"
    model = DecoderLM(DecoderConfig(vocab_size=16, dim=32, num_layers=2, num_heads=4, max_seq_len=64,
                                    mixer=mixer, mixer_options=MIXERS[mixer], ffn=ffn))
    assert_loss_falls(model, steps=12, repeats=4)
