"""Sparse attention: layouts against hand-written masks, both backends against dense SDPA with the
same boolean mask (forward and grads), linear cost in T, the mixers inside the model (decode equals
the full forward; the block-sparse sliding window equals ``sliding_window``), one-line errors.

Legend: B batch, H query heads, K kv heads, T length, D head dim, N blocks.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from lm.bench.attention import PeakTensorMemory
from lm.mixers.sparse.backends import flex_sparse_attention
from lm.mixers.sparse.blocksparse import block_sparse_attention, gathered_keys
from lm.mixers.sparse.layout import BigBirdLayout, LongformerLayout, SlidingWindowLayout, dense_reference_mask
from lm.models import DecoderConfig, DecoderLM

from pattern_training import assert_loss_falls  # tests/unit/pattern_training.py

H = 4


def layouts(block_size=4, max_seq_len=64):
    """One of each pattern, with globals in the middle and past the test length."""
    b = block_size
    return {
        "sliding": SlidingWindowLayout(num_heads=H, window=2 * b + 3, block_size=b, max_seq_len=max_seq_len),
        "longformer": LongformerLayout(num_heads=H, window=b + 1, block_size=b, max_seq_len=max_seq_len,
                                       dilation=[1, 1, 2, 3], global_tokens=[0, 13, 40, max_seq_len - 1]),
        "bigbird": BigBirdLayout(num_heads=H, block_size=b, max_seq_len=max_seq_len, window_blocks=2,
                                 num_random_blocks=2, global_tokens=[*range(b), 2 * b + 1], seed=3),
    }


def qkv(T, D=8, K=2, B=2, grad=True):
    return [torch.randn(B, n, T, D, requires_grad=grad) for n in (H, K, K)]


def dense_sdpa(q, k, v, mask_HTT):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_HTT[None], enable_gqa=True)


def dense_masked(q, k, v, mask_HTT):
    """softmax(q k^T / sqrt(D) + mask) v, written out (so the FLOP counter sees its matmuls)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return s.masked_fill(~mask_HTT, float("-inf")).softmax(-1) @ v


# -- the layouts mean what they say -------------------------------------------------------------
def test_sliding_mask_is_the_band():
    lay = layouts()["sliding"]
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    band = (j <= i) & (i - j < lay.window)
    assert torch.equal(dense_reference_mask(lay, 40), band.expand(H, -1, -1))


def test_longformer_mask_dilation_and_globals():
    lay = layouts()["longformer"]
    T, G = 44, {0, 13, 40}
    ref = torch.zeros(H, T, T, dtype=torch.bool)
    for h, d in enumerate([1, 1, 2, 3]):
        for i in range(T):
            for j in range(i + 1):
                ref[h, i, j] = ((i - j) % d == 0 and (i - j) // d < lay.window) or i in G or j in G
    assert torch.equal(dense_reference_mask(lay, T), ref)


def test_bigbird_table_window_random_global():
    lay = layouts()["bigbird"]
    b, N = lay.block_size, 12
    m = dense_reference_mask(lay, N * b)
    g = torch.tensor(lay.global_tokens)
    non_global = ~torch.isin(torch.arange(N * b), g)
    for h in range(H):
        for i in range(2, N):
            rows = slice(i * b, (i + 1) * b)
            seen = m[h, rows][:, non_global].view(b, -1)
            blocks = {int(p) // b for p in torch.arange(N * b)[non_global][seen.any(0)]}
            window = {i - 1, i}
            rand = blocks - window
            assert window <= blocks and all(r < i - 1 for r in rand)
            assert len(rand) == min(2, len([c for c in range(i - 1) if c != 0])), (h, i, blocks)
    # global rows see everything before them; everything sees global columns
    assert m[:, 2 * b + 1, : 2 * b + 2].all() and m[:, 2 * b + 1:, 0].all()
    # seeded and prefix-stable: a shorter sequence has the same pattern
    assert torch.equal(lay.build_table(N)[:, :5], lay.build_table(5))
    other = BigBirdLayout(num_heads=H, block_size=b, max_seq_len=64, window_blocks=2, num_random_blocks=2,
                          global_tokens=lay.global_tokens, seed=4)
    assert not torch.equal(other.build_table(N), lay.build_table(N))


# -- both backends equal dense SDPA with the same mask -------------------------------------------
@pytest.mark.parametrize("name", ["sliding", "longformer", "bigbird"])
@pytest.mark.parametrize("T, chunk", [(37, 0), (48, 0), (37, 8)])  # ragged last block, exact, recomputed chunks
def test_blocksparse_equals_masked_sdpa(name, T, chunk):
    lay = layouts()[name]
    q, k, v = qkv(T)
    out = block_sparse_attention(q, k, v, lay, chunk_size=chunk)
    ref = dense_sdpa(q, k, v, dense_reference_mask(lay, T))
    assert_close(out, ref)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v])
    ref_grads = torch.autograd.grad((ref * w).sum(), [q, k, v])
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


@pytest.mark.parametrize("name", ["sliding", "longformer", "bigbird"])
def test_blocksparse_bf16_tracks_fp32(name):
    """bf16 inputs (CPU autocast training): output and gradients stay within bf16 rounding of the
    fp32 path; key/value gradients accumulate over chunks in fp32."""
    lay = layouts()[name]
    q, k, v = qkv(48)
    out = block_sparse_attention(q, k, v, lay, chunk_size=8)
    w = torch.randn_like(out)
    ref = torch.autograd.grad((out * w).sum(), [q, k, v])
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out16 = block_sparse_attention(*lo, lay, chunk_size=8)
    assert out16.dtype == torch.bfloat16
    assert_close(out16.float(), out.detach(), atol=3e-2, rtol=3e-2)
    for g, r in zip(torch.autograd.grad((out16.float() * w).sum(), lo), ref):
        assert g.dtype == torch.bfloat16
        assert_close(g.float(), r, atol=6e-2, rtol=5e-2)


@pytest.mark.slow  # one FlexAttention compile (~15-20 s on CPU), shared by the three layouts
def test_flex_equals_masked_sdpa_forward():
    T = 100  # one shape for all: same compiled kernel, only the mask tensors differ
    for name, lay in layouts(block_size=16, max_seq_len=128).items():
        q, k, v = qkv(T, D=16, grad=False)
        with torch.no_grad():
            out = flex_sparse_attention(q, k, v, lay)
            assert_close(out, dense_sdpa(q, k, v, dense_reference_mask(lay, T)), msg=name)
            assert_close(out, block_sparse_attention(q, k, v, lay), msg=name)


def test_flex_refuses_cpu_backward():
    q, k, v = qkv(16)
    with pytest.raises(ValueError, match="backend: 'flex' has no backward on CPU"):
        flex_sparse_attention(q, k, v, layouts()["sliding"])


# -- linear cost at a fixed window ----------------------------------------------------------------
def _fwd_bwd_flops(fn, T):
    q, k, v = qkv(T, D=16, K=H, B=1)
    with FlopCounterMode(display=False) as fc:
        fn(q, k, v).sum().backward()
    return fc.get_total_flops()


def test_recomputed_chunks_bound_peak_memory():
    lay = layouts(block_size=16, max_seq_len=2048)["bigbird"]
    fn = [lambda q, k, v, c=c: block_sparse_attention(q, k, v, lay, chunk_size=c) for c in (0, 128)]
    whole, chunked = (_fwd_bwd_peak_bytes(f, 1024) for f in fn)
    assert chunked < 0.6 * whole, (chunked, whole)


def _fwd_bwd_peak_bytes(fn, T):
    q, k, v = qkv(T, D=16, K=H, B=1)
    fn(q, k, v)  # layout tables and masks are cached per length: build them outside the probe
    with PeakTensorMemory() as pm:
        fn(q, k, v).sum().backward()
    return pm.peak


@pytest.mark.parametrize("name", ["sliding", "longformer", "bigbird"])
def test_blocksparse_work_is_linear_in_length(name):
    lay = layouts(block_size=16, max_seq_len=4096)[name]
    sparse = [_fwd_bwd_flops(lambda q, k, v: block_sparse_attention(q, k, v, lay), T) for T in (256, 512, 1024)]
    entries = [gathered_keys(lay, T) for T in (256, 512, 1024)]
    for a, b in zip(sparse, sparse[1:]):
        assert 1.8 < b / a < 2.2, sparse
    for a, b in zip(entries, entries[1:]):
        assert 1.8 < b / a < 2.2, entries
    dense = [_fwd_bwd_flops(lambda q, k, v: dense_masked(q, k, v, dense_reference_mask(lay, q.shape[2])), T)
             for T in (256, 512)]
    assert dense[1] / dense[0] > 3.5  # the same counter sees dense attention's T^2
    peaks = [_fwd_bwd_peak_bytes(lambda q, k, v: block_sparse_attention(q, k, v, lay), T) for T in (256, 512, 1024)]
    for a, b in zip(peaks, peaks[1:]):
        assert 1.7 < b / a < 2.2, peaks
    dense_peaks = [_fwd_bwd_peak_bytes(lambda q, k, v: dense_masked(q, k, v, dense_reference_mask(lay, q.shape[2])), T)
                   for T in (256, 512)]
    assert dense_peaks[1] / dense_peaks[0] > 3.5, dense_peaks


# -- the mixers in the model ---------------------------------------------------------------------
MIXERS = {
    "sliding_window_blocksparse": {"window": 6, "block_size": 4},
    "longformer": {"window": 5, "block_size": 4, "dilation": [1, 2, 1, 3], "global_tokens": [0, 9]},
    "bigbird": {"block_size": 4, "window_blocks": 2, "num_random_blocks": 1},
}


def tiny(mixer, **kw):
    return DecoderLM(DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=H, num_kv_heads=2,
                                   max_seq_len=48, ffn_hidden=64, mixer=mixer, mixer_options=kw)).eval()


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mixer_decode_equals_full_forward(mixer):
    model = tiny(mixer, **MIXERS[mixer])
    ids = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2, 30)
        steps = [model(ids[:, :11], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(11, 30)]
    assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mixer_trains(mixer):
    torch.manual_seed(0)
    model = tiny(mixer, **MIXERS[mixer]).train()
    assert_loss_falls(model, steps=12)


def test_blocksparse_sliding_equals_sliding_window_mixer():
    ref = tiny("sliding_window", window=6)
    model = tiny("sliding_window_blocksparse", window=6, block_size=4)
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 41))
    out, out_ref = model(ids), ref(ids)
    assert_close(out, out_ref)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (n, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, msg=n)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer, opts, match", [
    ("sliding_window_blocksparse", {"window": 0}, r"mixer_options\.window: must be a positive integer, got 0"),
    ("longformer", {"window": -2}, r"mixer_options\.window: must be a positive integer"),
    ("longformer", {"global_tokens": [0, 48]}, r"mixer_options\.global_tokens: index 48 is outside the sequence"),
    ("longformer", {"global_tokens": [-1]}, r"mixer_options\.global_tokens: index -1 is outside"),
    ("longformer", {"dilation": [1, 2]}, r"mixer_options\.dilation: needs one value per head"),
    ("bigbird", {"block_size": 8, "num_random_blocks": 4}, r"mixer_options\.num_random_blocks: 4 is larger than the 3"),
    ("bigbird", {"window_blocks": 0}, r"mixer_options\.window_blocks: must be a positive integer"),
    ("bigbird", {"block_size": 4, "backend": "dense"}, r"mixer_options\.backend: unknown backend 'dense'"),
    ("longformer", {"chunk_size": -1}, r"mixer_options\.chunk_size: must be an integer >= 0"),
    ("longformer", {"windw": 3}, r"windw: unknown option"),
])
def test_bad_options_fail_with_the_key(mixer, opts, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny(mixer, **opts)
    assert "\n" not in str(e.value)
