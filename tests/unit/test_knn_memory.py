"""Memorizing-Transformer kNN memory: exact top-k retrieval, FIFO and clearing, the layer against a
written-out reference (local causal attention gated with softmax over the retrieved pairs),
segment-by-segment gradients, decode parity, one-line errors.

Legend: B batch, K kv heads, G query heads per kv head, T length, M memory slots, D head dim.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lm.mixers.attention import Attention
from lm.mixers.knn_memory import KNNMemory, KNNMemoryAttention, reset_memories
from lm.models import DecoderConfig, DecoderLM


def filled(B=2, K=2, M=40, D=8, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = KNNMemory(size)
    for _ in range(2):
        mem.add(torch.randn(B, K, M // 2, D, generator=g), torch.randn(B, K, M // 2, D, generator=g))
    return mem


def test_search_returns_the_exact_top_k():
    mem = filled()
    q = torch.randn(2, 2, 3, 5, 8)  # [B, K, G, T, D]
    keys, values, valid = mem.search(q, 7)
    scores = torch.einsum("bkgtd,bkmd->bkgtm", q, mem.keys_BKMD)
    ref = scores.sort(dim=-1, descending=True)
    got = torch.einsum("bkgtd,bkgtnd->bkgtn", q, keys)
    assert_close(got, ref.values[..., :7])
    idx = ref.indices[..., :7]
    assert_close(values, torch.stack([mem.values_BKMD[b, h][idx[b, h]] for b in range(2) for h in range(2)]
                                     ).view(2, 2, 3, 5, 7, 8))
    assert valid.all()
    _, _, few = mem.search(q, 100)  # more than stored: everything, all valid
    assert few.shape[-1] == 40 and few.all()


def test_fifo_and_clearing_rows():
    mem = filled(M=40, size=32)
    assert len(mem) == 32
    newest = mem.keys_BKMD.clone()
    mem.add(torch.ones(2, 2, 4, 8), torch.ones(2, 2, 4, 8))
    assert torch.equal(mem.keys_BKMD[:, :, :28], newest[:, :, 4:]) and (mem.keys_BKMD[:, :, 28:] == 1).all()
    mem.clear(torch.tensor([True, False]))
    _, _, valid = mem.search(torch.randn(2, 2, 1, 3, 8), 5)
    assert not valid[0].any() and valid[1].all()
    mem.add(torch.zeros(2, 2, 2, 8), torch.zeros(2, 2, 2, 8))  # row 0 starts a new stream
    _, _, valid = mem.search(torch.randn(2, 2, 1, 3, 8), 5)
    assert valid[0].sum(-1).eq(2).all()
    mem.clear()
    assert len(mem) == 0


def cfg(num_layers=1, **kw):
    return DecoderConfig(vocab_size=64, dim=32, num_layers=num_layers, num_heads=4, num_kv_heads=2, max_seq_len=64,
                         mixer="knn_memory", mixer_options=kw)


def reference(layer, x_BTC, mem_k_BKMD, mem_v_BKMD, top_k):
    """Causal SDPA on the segment gated per head with softmax over each query's top-k memories."""
    B, T, _ = x_BTC.shape
    H, K, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q0 = layer.q_proj(x_BTC).view(B, T, H, D).transpose(1, 2)
    k0 = layer.k_proj(x_BTC).view(B, T, K, D).transpose(1, 2)
    v = layer.v_proj(x_BTC).view(B, T, K, D).transpose(1, 2)
    q, k = layer.rope(q0, k0)
    local = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mk, mv = (m.repeat_interleave(H // K, dim=1) for m in (mem_k_BKMD, mem_v_BKMD))
    s = q0 @ mk.transpose(-1, -2) * D ** -0.5  # [B, H, T, M]
    top = s.topk(top_k, dim=-1)
    keep = torch.full_like(s, float("-inf")).scatter(-1, top.indices, top.values)
    mem = keep.softmax(-1) @ mv
    g = torch.sigmoid(layer.gate_H).view(1, H, 1, 1)
    out = g * mem + (1 - g) * local
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


def test_layer_equals_reference_segment_by_segment():
    torch.manual_seed(0)
    layer = KNNMemoryAttention(cfg(), 0, memory_size=16, top_k=3)
    with torch.no_grad():
        layer.gate_H.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    plain = Attention(cfg(), 0)
    plain.load_state_dict(layer.state_dict(), strict=False)  # all but the gate
    segs = [torch.randn(2, 10, 32, requires_grad=True) for _ in range(3)]
    assert_close(layer(segs[0]), plain(segs[0]))  # empty memory: exactly the attention mixer
    for x in segs[1:]:
        mk, mv = layer.memory.keys_BKMD.clone(), layer.memory.values_BKMD.clone()
        out = layer(x)
        assert_close(out, reference(layer, x, mk, mv, 3))
    assert len(layer.memory) == 16 and not layer.memory.keys_BKMD.requires_grad
    out.sum().backward()
    assert layer.gate_H.grad.abs().sum() > 0 and layer.q_proj.weight.grad.abs().sum() > 0
    assert segs[0].grad is None  # memory is detached: no gradient into earlier segments


def test_decode_reads_memory_and_equals_full_forward():
    model = DecoderLM(cfg(num_layers=2, memory_size=32, top_k=4)).eval()
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 20)))  # an earlier segment fills the memories
        ids = torch.randint(0, 64, (2, 12))
        snapshot = [b.mixer.memory.keys_BKMD.clone() for b in model.blocks]
        cache = model.init_cache(2, 12)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
        assert all(torch.equal(s, b.mixer.memory.keys_BKMD) for s, b in zip(snapshot, model.blocks))
        full = model(ids)  # the full pass reads the same memory (then appends the segment)
    assert_close(torch.cat(steps, dim=1), full)
    assert reset_memories(model) == 2 and all(len(b.mixer.memory) == 0 for b in model.blocks)


def test_memory_is_cleared_on_train_eval_switch_and_batch_change():
    layer = KNNMemoryAttention(cfg(), 0, memory_size=16, top_k=2)
    layer(torch.randn(2, 4, 32))
    assert len(layer.memory) == 4
    layer.eval()
    assert len(layer.memory) == 0
    layer(torch.randn(2, 4, 32))
    layer(torch.randn(3, 4, 32))  # another batch size: another set of streams
    assert layer.memory.keys_BKMD.shape[0] == 3 and len(layer.memory) == 4


@pytest.mark.parametrize("opts, match", [
    ({"top_k": 64, "memory_size": 32}, r"mixer_options\.top_k: 64 is larger than the memory \(memory_size=32\)"),
    ({"top_k": 0}, r"mixer_options\.top_k: must be a positive integer"),
    ({"memory_size": -1}, r"mixer_options\.memory_size: must be a positive integer"),
    ({"index": "hnsw"}, r"mixer_options\.index: unknown index 'hnsw'"),
])
def test_bad_options_fail_with_the_key(opts, match):
    with pytest.raises(ValueError, match=match) as e:
        DecoderLM(cfg(**opts))
    assert "\n" not in str(e.value)


def test_faiss_index_matches_exact():
    pytest.importorskip("faiss")
    exact, fa = filled(), filled()
    fa.index = "faiss"
    exact.clear(torch.tensor([False, True]))
    fa.clear(torch.tensor([False, True]))
    q = torch.randn(2, 2, 1, 6, 8)
    (ka, va, ok_a), (kb, vb, ok_b) = exact.search(q, 5), fa.search(q, 5)
    assert torch.equal(ok_a, ok_b) and ok_a[0].all() and not ok_a[1].any()  # row 1 was cleared
    assert_close(ka[ok_a], kb[ok_b])
    assert_close(va[ok_a], vb[ok_b])
