"""Every mixer trains inside the one Block: the loss of a repeated pattern falls quickly."""
import pytest
import torch
import torch.nn.functional as F

from lm.models.config import DecoderConfig
from lm.models.decoder import DecoderLM

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
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]).repeat(2, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
