"""Small random velocity fields for engine tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvField(nn.Module):
    """A tiny time-conditioned conv net: v(x, t) = conv(tanh(conv(x) + t·b))."""

    def __init__(self, channels: int = 3, hidden: int = 8, dtype: torch.dtype = torch.float64,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.tb = nn.Parameter(torch.randn(hidden, generator=g))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.4
        self.to(dtype).requires_grad_(False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x) + t.view(-1, 1, 1, 1) * self.tb.view(1, -1, 1, 1))
        return self.c2(h)


class MLPField(nn.Module):
    """An MLP on the flattened state with time as an extra input."""

    def __init__(self, shape: tuple[int, int, int] = (2, 3, 3), hidden: int = 16,
                 dtype: torch.dtype = torch.float64, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = shape[0] * shape[1] * shape[2]
        self.shape = shape
        self.l1 = nn.Linear(d + 1, hidden)
        self.l2 = nn.Linear(hidden, d)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        self.to(dtype).requires_grad_(False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1), t[:, None]], 1)
        return self.l2(torch.tanh(self.l1(h))).view(x.shape)


class Linear(nn.Module):
    """v(x, t) = a·x: the Euler map has a closed form."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.a * x


class CountingField(nn.Module):
    """Wraps a field and counts calls that build an autograd graph (VJPs) and plain calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.vjp_calls = 0
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if torch.is_grad_enabled() and x.requires_grad:
            self.vjp_calls += 1
        return self.inner(x, t)


def unrolled_gradients(velocity, z0: Tensor, controls: Tensor, loss_fn, grid) -> tuple[Tensor, Tensor]:
    """Reference: autograd through the whole unrolled Euler loop. Returns (losses, d sum(L)/d u)."""
    u = controls.detach().clone().requires_grad_(True)
    x = z0
    for k in range(grid.n_steps):
        y = x + u[k]
        t = torch.full((z0.shape[0],), grid.times[k], dtype=z0.dtype)
        x = y + grid.steps[k] * velocity(y, t)
    losses = loss_fn(x)
    (g,) = torch.autograd.grad(losses.sum(), u)
    return losses.detach(), g
