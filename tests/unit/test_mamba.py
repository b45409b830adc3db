"""Mamba mixer: chunked scan vs the sequential recurrence, recurrent decoding, training."""
import pytest
import torch

import lm.mixers.mamba  # noqa: F401  (registers "mamba")
from lm.mixers.mamba import Mamba, MambaCache, selective_scan
from lm.models.config import DecoderConfig
from lm.models.decoder import DecoderLM




def naive_scan(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t, one step at a time."""
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def cfg(**kw):
    base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, mixer="mamba", ffn="none")
    base.update(kw)
    return DecoderConfig(**base)


@pytest.mark.parametrize("T,chunk", [(50, 16), (64, 64), (37, 8), (5, 64)])
def test_chunked_scan_matches_sequential_forward_and_grads(T, chunk):
    torch.manual_seed(0)
    Bsz, E, N = 2, 8, 4
    x = torch.randn(Bsz, T, E, requires_grad=True)
    dt = (torch.rand(Bsz, T, E) * 2).requires_grad_()
    A = (-torch.rand(E, N) * 4 - 0.1).requires_grad_()
    B = torch.randn(Bsz, T, N, requires_grad=True)
    C = torch.randn(Bsz, T, N, requires_grad=True)
    h0 = torch.randn(Bsz, E, N, requires_grad=True)
    leaves = [x, dt, A, B, C, h0]
    y, h = selective_scan(x, dt, A, B, C, h0, chunk_size=chunk)
    y_ref, h_ref = naive_scan(x, dt, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum() + h.sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * g).sum() + h_ref.sum(), leaves)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,chunk,block_elems", [(200, 8, 64 * 32 * 2), (131, 7, 70 * 32 * 2), (64, 16, 64 * 32 * 2)])
def test_blockwise_scan_matches_sequential_across_blocks(T, chunk, block_elems):
    """Several blocks (the backward recomputes each from its saved start state and carries the
    adjoint across block ends), a last block shorter than the others, chunks that do not divide."""
    torch.manual_seed(1)
    Bsz, E, N = 2, 8, 4
    leaves = [torch.randn(Bsz, T, E), torch.rand(Bsz, T, E) * 2, -torch.rand(E, N) * 4 - 0.1,
              torch.randn(Bsz, T, N), torch.randn(Bsz, T, N), torch.randn(Bsz, E, N)]
    leaves = [t.double().requires_grad_() for t in leaves]
    y, h = selective_scan(*leaves, chunk_size=chunk, block_elems=block_elems)
    y_ref, h_ref = naive_scan(*leaves)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum() + (h * h).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * g).sum() + (h_ref * h_ref).sum(), leaves)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_scan_gradcheck():
    torch.manual_seed(2)
    leaves = [torch.randn(1, 19, 3), torch.rand(1, 19, 3), -torch.rand(3, 2) - 0.1,
              torch.randn(1, 19, 2), torch.randn(1, 19, 2), torch.randn(1, 3, 2)]
    leaves = [t.double().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk_size=4, block_elems=1), leaves)


def test_scan_is_stable_for_long_strong_decay():
    """Cumulative log-decays far below -88 (exp underflow/overflow range) stay finite and exact."""
    torch.manual_seed(0)
    x, dt = torch.randn(1, 64, 4), torch.full((1, 64, 4), 5.0)
    A, B, C = -torch.arange(1.0, 5.0).repeat(4, 1), torch.randn(1, 64, 4), torch.randn(1, 64, 4)
    y, h = selective_scan(x, dt, A, B, C, chunk_size=64)
    y_ref, h_ref = naive_scan(x, dt, A, B, C)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_mixer_output_independent_of_chunk_size():
    torch.manual_seed(0)
    m = Mamba(cfg(), chunk_size=64)
    x = torch.randn(2, 37, 32)
    y = m(x)
    m.chunk_size = 8
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


def test_recurrent_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = DecoderLM(cfg()).eval()
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2)
        assert all(isinstance(c, MambaCache) for c in cache.layers)
        nbytes = cache.nbytes()
        outs = [model(ids[:, :7], cache=cache)]  # prefill (parallel form, then the states)
        outs += [model(ids[:, 7:10], cache=cache)]  # a second prefill continues from the states
        for t in range(10, 20):  # token steps (recurrence)
            outs.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.nbytes() == nbytes  # constant-size state


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match=r"mixer_options\.d_state"):
        Mamba(cfg(), d_state=0)
    with pytest.raises(ValueError, match=r"mixer_options\.dt_rank"):
        Mamba(cfg(), dt_rank="big")
    with pytest.raises(ValueError, match=r"d_states"):
        DecoderLM(cfg(mixer_options={"d_states": 8}))
