"""Hyena operator: FFT convolution, causality, cached decoding, option errors, training."""
import pytest
import torch
import torch.nn.functional as F

import lm.mixers.hyena  # noqa: F401  (registers "hyena")
from lm.mixers.hyena import Hyena, HyenaCache, fft_conv
from lm.models.config import DecoderConfig
from lm.models.decoder import DecoderLM




def cfg(**kw):
    base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, mixer="hyena", ffn="swiglu",
                mixer_options={"filter_order": 16})
    base.update(kw)
    return DecoderConfig(**base)


@pytest.mark.parametrize("L", [1, 17, 64])
def test_fft_conv_equals_direct_causal_conv(L):
    torch.manual_seed(0)
    u, k, bias = torch.randn(2, 4, L), torch.randn(4, L), torch.randn(4)
    direct = F.conv1d(F.pad(u, (L - 1, 0)), k.flip(-1)[:, None], groups=4) + u * bias[:, None]
    torch.testing.assert_close(fft_conv(u, k, bias), direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_operator_is_causal(order):
    torch.manual_seed(0)
    m = Hyena(cfg(), order=order, filter_order=16)
    x = torch.randn(2, 40, 32)
    x2 = x.clone()
    x2[:, 25:] = torch.randn(2, 15, 32)  # change the future
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :25], y2[:, :25], atol=1e-6, rtol=1e-6)
    assert (y[:, 25:] - y2[:, 25:]).abs().max() > 1e-3


def test_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = DecoderLM(cfg(mixer_options={"filter_order": 16, "order": 3})).eval()
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2)
        assert all(isinstance(c, HyenaCache) for c in cache.layers)
        outs = [model(ids[:, :7], cache=cache), model(ids[:, 7:9], cache=cache)]  # prefills
        outs += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 20)]  # token steps
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)


def test_bad_options_and_lengths_name_the_key():
    with pytest.raises(ValueError, match=r"model\.config\.mixer_options\.order"):
        Hyena(cfg(), order=1)
    with pytest.raises(ValueError, match=r"model\.config\.mixer_options\.emb_dim"):
        Hyena(cfg(), emb_dim=32)
    with pytest.raises(ValueError, match=r"model\.config\.mixer_options\.filter_order"):
        Hyena(cfg(), filter_order=0)
    m = Hyena(cfg(), max_len=16, filter_order=8)
    with pytest.raises(ValueError, match=r"model\.config\.mixer_options\.max_len"):
        m(torch.randn(1, 17, 32))
    cache = m.init_cache(1, 64, "cpu", torch.float32)
    m(torch.randn(1, 16, 32), cache=cache)
    with pytest.raises(ValueError, match=r"model\.config\.mixer_options\.max_len"):
        m(torch.randn(1, 1, 32), cache=cache, start_pos=16)


def test_filters_survive_model_init():
    """DecoderLM's N(0, 0.02) Linear init must not flatten the implicit filter MLP."""
    model = DecoderLM(cfg())
    k = model.blocks[0].mixer.filter(64)
    assert k.abs().max() > 0.05
