"""RWKV-4 time-mix / channel-mix: parallel WKV vs the sequential recurrence, decoding, training."""
import inspect

import pytest
import torch

import lm.mixers.rwkv  # noqa: F401  (registers "rwkv" and "rwkv_channel_mix")
from lm.mixers.rwkv import RwkvCache, RwkvChannelMix, RwkvTimeMix, wkv_parallel, wkv_step
from lm.models.block import Block
from lm.models.config import DecoderConfig
from lm.models.decoder import DecoderLM

BLOCK_PASSES_FFN_CACHE = "needs_cache" in inspect.getsource(Block.forward)




def naive_wkv(w_raw, u, k, v, state=None):
    """The RWKV-4 recurrence in plain (not max-normalised) form: a, b are the num/den sums."""
    w = torch.exp(w_raw)
    B, T, C = k.shape
    a, b = (torch.zeros(B, C), torch.zeros(B, C)) if state is None else state
    out = []
    for t in range(T):
        e = torch.exp(u + k[:, t])
        out.append((a + e * v[:, t]) / (b + e))
        a = torch.exp(-w) * a + torch.exp(k[:, t]) * v[:, t]
        b = torch.exp(-w) * b + torch.exp(k[:, t])
    return torch.stack(out, 1), (a, b)


def cfg(**kw):
    base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, mixer="rwkv",
                ffn="rwkv_channel_mix", norm="layernorm")
    base.update(kw)
    return DecoderConfig(**base)


@pytest.mark.parametrize("T,chunk", [(50, 16), (64, 32), (7, 32), (33, 1)])
def test_parallel_wkv_matches_recurrence_forward_and_grads(T, chunk):
    torch.manual_seed(0)
    B, C = 2, 8
    w = torch.randn(C, requires_grad=True)
    u = torch.randn(C, requires_grad=True)
    k = torch.randn(B, T, C, requires_grad=True)
    v = torch.randn(B, T, C, requires_grad=True)
    out, (n, d, m) = wkv_parallel(w, u, k, v, chunk_size=chunk)
    ref, (a, b) = naive_wkv(w, u, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n * torch.exp(m), a, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d * torch.exp(m), b, atol=1e-4, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [w, u, k, v])
    grads_ref = torch.autograd.grad((ref * g).sum(), [w, u, k, v])
    for x, y in zip(grads, grads_ref):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_wkv_state_continuation_and_steps_match_one_pass():
    torch.manual_seed(0)
    w, u, k, v = torch.randn(8), torch.randn(8), torch.randn(2, 40, 8), torch.randn(2, 40, 8)
    full, _ = wkv_parallel(w, u, k, v, chunk_size=8)
    a, st = wkv_parallel(w, u, k[:, :17], v[:, :17], chunk_size=8)
    b, st = wkv_parallel(w, u, k[:, 17:30], v[:, 17:30], st, chunk_size=8)
    outs = [a, b]
    for t in range(30, 40):
        o, st = wkv_step(w, u, k[:, t], v[:, t], st)
        outs.append(o[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_wkv_is_stable_for_large_keys():
    """Keys of size 100 (e^100 overflows fp32) stay finite thanks to the max-normalised states."""
    torch.manual_seed(0)
    w, u, v = torch.randn(8), torch.randn(8), torch.randn(1, 40, 8)
    k = torch.randn(1, 40, 8) * 100
    out, _ = wkv_parallel(w, u, k, v, chunk_size=16)
    assert torch.isfinite(out).all()
    ref, _ = wkv_parallel(w, u, k, v, chunk_size=1)  # chunk 1 = the sequential merge
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # |k| ~ 100: exponents carry ~1e-5 rounding


def test_mixer_level_decoding_matches_full_forward():
    torch.manual_seed(0)
    c = cfg()
    tm, cm = RwkvTimeMix(c, 1, chunk_size=8), RwkvChannelMix(c, 1)
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        full_t, full_c = tm(x), cm(x)
        cache = tm.init_cache(2, 64, x.device, x.dtype)
        assert isinstance(cache, RwkvCache)
        nbytes = cache.nbytes()
        ts, cs = [tm(x[:, :9], cache=cache)], [cm(x[:, :9], cache=cache)]
        for t in range(9, 20):
            ts.append(tm(x[:, t:t + 1], cache=cache, start_pos=t))
            cs.append(cm(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(ts, 1), full_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(cs, 1), full_c, atol=1e-5, rtol=1e-4)
    assert cache.nbytes() == nbytes


@pytest.mark.skipif(not BLOCK_PASSES_FFN_CACHE, reason="needs Block to pass `cache` to ffns with needs_cache=True")
def test_model_level_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = DecoderLM(cfg()).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2)
        outs = [model(ids[:, :6], cache=cache)]
        for t in range(6, 16):
            outs.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)


def test_channel_mix_works_as_ffn_of_an_attention_hybrid():
    """The channel-mix keeps its shift in whatever layer cache it is handed (here a KVCache)."""
    if not BLOCK_PASSES_FFN_CACHE:
        pytest.skip("needs Block to pass `cache` to ffns with needs_cache=True")
    torch.manual_seed(0)
    model = DecoderLM(cfg(mixer="attention", norm="rmsnorm")).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(1)
        outs = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match=r"mixer_options\.chunk_size"):
        RwkvTimeMix(cfg(), chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_sizes"):
        DecoderLM(cfg(mixer_options={"chunk_sizes": 8}))
