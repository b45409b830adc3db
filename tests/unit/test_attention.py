"""Norms, RoPE, attention (MHA/GQA/MQA, sliding window) and the KV caches against direct references.

Legend: B batch, T queries, S keys, H query heads, K kv heads, D head dim, M model dim.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lm.mixers.attention import Attention, SlidingWindowAttention
from lm.models import DecoderLM
from lm.nn.cache import KVCache, RollingKVCache
from lm.nn.norm import LayerNorm, RMSNorm
from lm.nn.rope import RotaryEmbedding


# -- references -------------------------------------------------------------------------------
def rope_reference(x_BHTD: torch.Tensor, start_pos: int = 0, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half layout: the pair (i, i + D/2) is the complex number x_i + j x_{i+D/2}, rotated
    by pos * theta^(-2i/D)."""
    T, D = x_BHTD.shape[-2], x_BHTD.shape[-1]
    half = D // 2
    pos_T = torch.arange(start_pos, start_pos + T, dtype=torch.float64)
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    rot_TD2 = torch.polar(torch.ones(T, half, dtype=torch.float64), torch.outer(pos_T, freq))
    z = torch.complex(x_BHTD[..., :half].double(), x_BHTD[..., half:].double()) * rot_TD2
    return torch.cat([z.real, z.imag], dim=-1).to(x_BHTD.dtype)


def attention_reference(attn: Attention, x_BTM: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """softmax(QK^T/sqrt(d) + mask) V with kv heads explicitly repeated; band mask if ``window``."""
    B, T, _ = x_BTM.shape
    H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = F.linear(x_BTM, attn.q_proj.weight).view(B, T, H, D).transpose(1, 2)
    k = F.linear(x_BTM, attn.k_proj.weight).view(B, T, K, D).transpose(1, 2)
    v = F.linear(x_BTM, attn.v_proj.weight).view(B, T, K, D).transpose(1, 2)
    q, k = rope_reference(q), rope_reference(k)
    k = k.repeat_interleave(H // K, dim=1)  # query head h reads kv head h // (H/K)
    v = v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return F.linear(out.transpose(1, 2).reshape(B, T, H * D), attn.o_proj.weight)


def _grads(fn, x, params):
    torch.manual_seed(1)
    out = fn(x)
    w = torch.randn_like(out)
    return torch.autograd.grad((out * w).sum(), [x, *params])


# -- norms ------------------------------------------------------------------------------------
def test_rmsnorm_matches_formula():
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = torch.randn(3, 5, 32) * 3
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert_close(norm(x), ref)


def test_layernorm_matches_formula():
    norm = LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
        norm.bias.copy_(torch.randn(32))
    x = torch.randn(3, 5, 32) * 2 + 1
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    assert_close(norm(x), (x - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias)


# -- RoPE -------------------------------------------------------------------------------------
@pytest.mark.parametrize("start_pos", [0, 7])
def test_rope_matches_complex_rotation(start_pos):
    rope = RotaryEmbedding(16, max_seq_len=8)  # shorter than start_pos + T: must extend itself
    q, k = torch.randn(2, 3, 6, 16), torch.randn(2, 1, 6, 16)
    q_rot, k_rot = rope(q, k, start_pos)
    assert_close(q_rot, rope_reference(q, start_pos))
    assert_close(k_rot, rope_reference(k, start_pos))


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, max_seq_len=64)
    T = 12
    q = torch.randn(16).expand(1, 1, T, 16)  # the same vector at every position
    k = torch.randn(16).expand(1, 1, T, 16)
    q0, k0 = rope(q, k, 0)
    s0 = (q0 @ k0.transpose(-1, -2))[0, 0]
    for t in range(T - 1):  # S[t, t'] == S[t+1, t'+1]
        assert_close(s0[t + 1, 1:], s0[t, :-1])
    q5, k5 = rope(q, k, 5)  # shifting both positions changes nothing
    assert_close((q5 @ k5.transpose(-1, -2))[0, 0], s0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s0[0, 0], s0[5, 0])  # but the scores do depend on the offset


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(7)


# -- attention --------------------------------------------------------------------------------
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


@pytest.mark.parametrize("kind", list(HEADS))
def test_attention_matches_reference_forward_and_grads(tiny_cfg, kind):
    attn = Attention(tiny_cfg(num_kv_heads=HEADS[kind]))
    assert attn.num_kv_heads == HEADS[kind] and attn.k_proj.out_features == HEADS[kind] * 8
    x = torch.randn(2, 10, 32, requires_grad=True)
    assert_close(attn(x), attention_reference(attn, x), atol=1e-5, rtol=1e-5)
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
    got = _grads(lambda x: attn(x), x, params)
    ref = _grads(lambda x: attention_reference(attn, x), x, params)
    for g, r in zip(got, ref):
        assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_sliding_window_matches_band_reference(tiny_cfg, kind):
    window, T = 4, 11
    attn = SlidingWindowAttention(tiny_cfg(num_kv_heads=HEADS[kind]), window=window)
    x = torch.randn(2, T, 32, requires_grad=True)
    out = attn(x)
    assert_close(out, attention_reference(attn, x, window=window), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, attention_reference(attn, x), atol=1e-3)  # the window matters
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
    got = _grads(lambda x: attn(x), x, params)
    ref = _grads(lambda x: attention_reference(attn, x, window=window), x, params)
    for g, r in zip(got, ref):
        assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [5, 8])
def test_sliding_window_within_window_equals_full_attention(tiny_cfg, T):
    cfg = tiny_cfg(num_kv_heads=2)
    full, swa = Attention(cfg), SlidingWindowAttention(cfg, window=8)
    swa.load_state_dict(full.state_dict())
    x = torch.randn(2, T, 32)
    assert_close(swa(x), full(x))


def test_sliding_window_rejects_non_positive_window(tiny_cfg):
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(tiny_cfg(), window=0)


# -- KV cache: prefill + decode == full forward -----------------------------------------------
CACHE_CASES = {
    "mha": dict(),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "mha-tied": dict(tie_embeddings=True),
    "gqa-tied": dict(num_kv_heads=2, tie_embeddings=True),
    "swa": dict(mixer="sliding_window", mixer_options={"window": 4}),
    "swa-mqa-tied": dict(mixer="sliding_window", mixer_options={"window": 4}, num_kv_heads=1,
                         tie_embeddings=True),
}


def _incremental_logits(model, ids_BT, chunks, max_len=None):
    cache = model.init_cache(ids_BT.shape[0], max_len or ids_BT.shape[1])
    out, pos = [], 0
    for n in chunks:
        out.append(model(ids_BT[:, pos:pos + n], cache=cache))
        pos += n
    assert pos == ids_BT.shape[1] and cache.pos == pos
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("prompt", [2, 6])  # shorter and longer than the window of 4
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_prefill_then_decode_equals_full_forward(tiny_model, case, prompt):
    model = tiny_model(**CACHE_CASES[case])
    ids = torch.randint(0, 96, (2, 12))  # decodes to 3x the window
    with torch.no_grad():
        full = model(ids)
        inc = _incremental_logits(model, ids, [prompt] + [1] * (12 - prompt))
    assert_close(inc, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["gqa", "swa"])
def test_chunked_prefill_equals_full_forward(tiny_model, case):
    """Multi-token updates after the cache holds tokens (the ring is already full for swa)."""
    model = tiny_model(**CACHE_CASES[case])
    ids = torch.randint(0, 96, (1, 17))
    with torch.no_grad():
        full = model(ids)
        inc = _incremental_logits(model, ids, [5, 3, 1, 6, 1, 1], max_len=24)
    assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_bytes_proportional_to_kv_heads(tiny_model):
    B, S = 2, 40
    sizes = {}
    for kv in (4, 2, 1):
        cache = tiny_model(num_kv_heads=kv).init_cache(B, S)
        assert all(isinstance(c, KVCache) for c in cache.layers)
        sizes[kv] = cache.nbytes()
        # k and v, per layer: B * kv * S * head_dim fp32 values
        assert sizes[kv] == 2 * 2 * B * kv * S * 8 * 4
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


def test_kv_cache_overflow_raises(tiny_model):
    model = tiny_model()
    cache = model.init_cache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="cache length"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_rolling_cache_bounded_by_window(tiny_model):
    window = 4
    model = tiny_model(mixer="sliding_window", mixer_options={"window": window})
    cache = model.init_cache(1, 1000)
    assert all(isinstance(c, RollingKVCache) for c in cache.layers)
    shapes = [tuple(c.k_BHSD.shape) for c in cache.layers]
    assert all(s[2] == window for s in shapes)
    nbytes = cache.nbytes()
    assert nbytes == 2 * 2 * 1 * 4 * window * 8 * 4
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 3)), cache=cache)
        for _ in range(3 * window):
            model(torch.randint(0, 96, (1, 1)), cache=cache)
    assert cache.pos == 3 + 3 * window
    assert cache.nbytes() == nbytes and [tuple(c.k_BHSD.shape) for c in cache.layers] == shapes
    ring_pos = sorted(cache.layers[0].slot_pos_S.tolist())
    assert ring_pos == list(range(cache.pos - window, cache.pos))  # holds exactly the last window


def test_rolling_cache_shorter_than_window_is_never_silently_wrong(tiny_model):
    """``init_cache(max_len < window)`` sizes the ring to max_len. Decoding past max_len must either
    fail like ``KVCache`` does ("exceeds the cache length") or stay exact, never overwrite keys the
    window still sees."""
    model = tiny_model(mixer="sliding_window", mixer_options={"window": 8})
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(1, 5)
        try:
            inc = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(10)], dim=1)
        except ValueError as e:
            assert "cache length" in str(e)
            return
    assert_close(inc, full, atol=1e-5, rtol=1e-5)
