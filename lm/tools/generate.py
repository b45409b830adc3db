"""Sampling with the decoding cache: temperature, top-k and nucleus (top-p) sampling.

Legend: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import argparse

import torch


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row; temperature 0 is greedy."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, idx_BV = torch.sort(logits_BV, descending=True, dim=-1)
        cum = sorted_BV.softmax(-1).cumsum(-1)
        drop = cum - sorted_BV.softmax(-1) >= top_p  # keep the smallest prefix with mass >= top_p
        sorted_BV = sorted_BV.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, idx_BV, sorted_BV)
    probs = logits_BV.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, input_ids_BT: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    """Prefills the prompt once, then decodes one token at a time through the cache."""
    B, T = input_ids_BT.shape
    cache = model.init_cache(B, T + max_new_tokens)
    gen = torch.Generator(device=input_ids_BT.device).manual_seed(seed) if seed is not None else None
    logits_BTV = model(input_ids_BT, cache=cache)
    out = [input_ids_BT]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids_BT.device)
    for _ in range(max_new_tokens):
        nxt_B = sample_next(logits_BTV[:, -1], temperature, top_k, top_p, gen)
        out.append(nxt_B[:, None])
        if eos_id is not None:
            done |= nxt_B == eos_id
            if bool(done.all()):
                break
        logits_BTV = model(nxt_B[:, None], cache=cache)
    return torch.cat(out, dim=1)


def generate_text(model, tokenizer, prompt: str, eos_id: int | None = None, **kw) -> str:
    ids = tokenizer.encode(prompt).ids or [eos_id or 0]
    device = next(model.parameters()).device
    out = generate(model, torch.tensor([ids], device=device), eos_id=eos_id, **kw)
    return tokenizer.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm generate", description="Sample text from a checkpoint (KV cache).")
    p.add_argument("ckpt", help="checkpoint file (or run folder with checkpoints/last.ckpt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    from lm.checkpoint import load_model, load_tokenizer

    model, tok = load_model(args.ckpt), load_tokenizer(args.ckpt)
    eos = tok.token_to_id("<|endoftext|>")
    print(generate_text(model, tok, args.prompt, eos_id=eos, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    return 0
