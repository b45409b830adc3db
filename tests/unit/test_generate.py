"""Sampling (greedy, temperature, top-k, top-p) and cached generation against full forwards."""
import pytest
import torch

from lm.tools.generate import generate, sample_next

# probabilities placed at shuffled vocabulary ids, so the sort/scatter back is exercised too
ORDER = [2, 0, 3, 1]


def _logits(probs, rows=1):
    logits = torch.full((len(probs),), 0.0)
    logits[ORDER[: len(probs)]] = torch.tensor(probs).log()
    return logits.expand(rows, -1).clone()


def _support(logits, n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    out = sample_next(logits.expand(n, -1), generator=g, **kw)
    counts = torch.bincount(out, minlength=logits.shape[-1]).float() / n
    return {i for i, c in enumerate(counts.tolist()) if c > 0}, counts


def test_temperature_zero_is_greedy():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=-1.0), logits.argmax(-1))


def test_top_k_one_is_greedy():
    logits = torch.randn(64, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.3, top_k=1, generator=g), logits.argmax(-1))


def test_top_k_keeps_the_k_most_likely():
    kept, _ = _support(_logits([0.4, 0.3, 0.2, 0.1]), temperature=1.0, top_k=2)
    assert kept == {ORDER[0], ORDER[1]}
    kept, _ = _support(_logits([0.4, 0.3, 0.2, 0.1]), temperature=1.0, top_k=100)  # k > V: all
    assert kept == set(ORDER)


@pytest.mark.parametrize("probs, top_p, n_kept", [
    ([0.5, 0.3, 0.15, 0.05], 0.7, 2),  # 0.5 < 0.7 <= 0.8
    ([0.5, 0.3, 0.15, 0.05], 0.85, 3),
    ([0.5, 0.3, 0.15, 0.05], 0.2, 1),  # the most likely token always stays
    ([0.5, 0.3, 0.15, 0.05], 1.0, 4),
])
def test_top_p_keeps_smallest_prefix_reaching_the_mass(probs, top_p, n_kept):
    kept, counts = _support(_logits(probs), temperature=1.0, top_p=top_p)
    assert kept == set(ORDER[:n_kept])
    expect = torch.tensor(probs[:n_kept]) / sum(probs[:n_kept])  # renormalised over the nucleus
    torch.testing.assert_close(counts[ORDER[:n_kept]], expect, atol=0.04, rtol=0)


@pytest.mark.parametrize("top_p, n_kept", [(0.5, 1), (0.75, 2)])
def test_top_p_prefix_exactly_reaching_the_mass_is_enough(top_p, n_kept):
    """Dyadic probabilities, so the cumulative sums are exact: {0.5} already has mass 0.5, so
    top_p=0.5 keeps one token (as HF's TopPLogitsWarper does), not two."""
    kept, _ = _support(_logits([0.5, 0.25, 0.125, 0.125]), temperature=1.0, top_p=top_p)
    assert kept == set(ORDER[:n_kept])


def test_temperature_sharpens_and_seed_reproduces():
    logits = _logits([0.4, 0.3, 0.2, 0.1])
    _, hot = _support(logits, temperature=2.0)
    _, cold = _support(logits, temperature=0.25)
    # p^(1/T) renormalised: 0.72 at T=0.25, 0.33 at T=2 (0.4 at T=1)
    assert cold[ORDER[0]] > 0.6 and hot[ORDER[0]] < 0.37
    logits = torch.randn(64, 30)
    a = sample_next(logits, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, logits.argmax(-1))


def _greedy_full_forward(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_kv_heads=2, tie_embeddings=True),
    dict(mixer="sliding_window", mixer_options={"window": 4}, num_kv_heads=1),
], ids=["mha", "gqa-tied", "swa-mqa"])
def test_greedy_generate_equals_full_forward_loop(tiny_model, overrides):
    model = tiny_model(**overrides)
    with torch.no_grad():  # sharpen the head so argmax is not decided by float noise
        model.head.weight.mul_(20.0)
    prompt = torch.randint(0, 96, (2, 5))
    out = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, _greedy_full_forward(model, prompt, 12))


def test_generate_stops_at_eos_and_sampling_is_seeded(tiny_model):
    model = tiny_model()
    prompt = torch.randint(0, 96, (1, 4))
    first = generate(model, prompt, max_new_tokens=1, temperature=0.0)[0, -1].item()
    out = generate(model, prompt, max_new_tokens=10, temperature=0.0, eos_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first
    a = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    b = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    assert torch.equal(a, b) and a.shape == (1, 12)
