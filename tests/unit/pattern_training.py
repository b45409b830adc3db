"""Shared by the "every mixer trains" tests: a few AdamW steps on a repeated 8-token pattern."""
import torch
import torch.nn.functional as F

PATTERN = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])


def assert_loss_falls(model: torch.nn.Module, steps: int, repeats: int = 5, lr: float = 1e-2) -> list[float]:
    """Trains ``model`` on ``PATTERN`` repeated ``repeats`` times (batch 2); its next-token loss
    must at least halve within ``steps`` steps. Returns the losses."""
    ids = PATTERN.repeat(2, repeats)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    return losses
