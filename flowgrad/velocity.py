"""What the ODE is: a frozen velocity field v(x, t).

Time convention (everywhere in flowgrad): ``t`` has shape (B,), ``t = 0`` is noise and
``t = 1`` is data. ``x`` lives in the model's *data space* (both bundled model families use
[-1, 1]); images outside the engine are float tensors in [0, 1], and the only place that
converts between the two is a :class:`VelocityField`'s ``to_image`` / ``from_image``.

The engine accepts any callable ``v(x, t) -> (B, C, H, W)``. :class:`VelocityField` is the richer
object that model loaders return: it also knows its sample shape, its image conversion and a
fingerprint of its weights (which direction stores use to refuse a mismatched model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["Velocity", "VelocityField", "check_velocity", "state_dict_fingerprint", "strict_float32"]

Velocity = Callable[[Tensor, Tensor], Tensor]
"""Any callable ``v(x, t)``: x (B, C, H, W) in data space, t (B,) in [0, 1] -> (B, C, H, W)."""


def state_dict_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in order.

    Tensors are hashed as float32 on the CPU (float16 weights on disk and float32 weights in
    memory give the same fingerprint), so the value does not depend on device or load dtype.
    """
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


class VelocityField(nn.Module):
    """A frozen velocity network with the conventions of flowgrad.

    Subclasses wrap a network once (``.eval().requires_grad_(False)``) and implement
    :meth:`forward` with flowgrad's time convention; any checkpoint-specific time scaling
    (e.g. Rectified Flow's ``t * 999``) lives only in the subclass.

    Attributes:
        sample_shape: (C, H, W) of one sample in data space.
        name: a short human-readable model spec, e.g. ``"demo"`` or ``"ncsnpp:/path/ckpt.pth"``.
    """

    sample_shape: tuple[int, int, int]
    name: str

    def __init__(self, net: nn.Module, sample_shape: tuple[int, int, int], name: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.sample_shape = tuple(int(s) for s in sample_shape)  # type: ignore[assignment]
        self.name = name
        self._fingerprint: str | None = None

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Velocity dx/dt. x: (B, C, H, W) in data space; t: (B,) in [0, 1]."""
        raise NotImplementedError

    def to_image(self, x: Tensor) -> Tensor:
        """Data space [-1, 1] -> image space [0, 1] (differentiable, not clamped)."""
        return (x + 1.0) * 0.5

    def from_image(self, image: Tensor) -> Tensor:
        """Image space [0, 1] -> data space [-1, 1]."""
        return image * 2.0 - 1.0

    def fingerprint(self) -> str:
        """sha256 of the wrapped network's weights (see :func:`state_dict_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = state_dict_fingerprint(self.net.state_dict())
        return self._fingerprint

    def sample_noise(self, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        """Standard normal latents z0 of shape (n, C, H, W), drawn on the CPU for reproducibility."""
        z = torch.randn((n, *self.sample_shape), generator=generator)
        return z.to(device) if device is not None else z

    @property
    def device(self) -> torch.device:
        for p in self.net.parameters():
            return p.device
        for b in self.net.buffers():
            return b.device
        return torch.device("cpu")


def check_velocity(velocity: Velocity, x: Tensor, t: Tensor) -> Tensor:
    """Call ``velocity`` once and validate its output; returns the output.

    Raises:
        TypeError: if the velocity does not return a tensor.
        ValueError: if the output shape differs from ``x``'s.
    """
    out = velocity(x, t)
    if not isinstance(out, Tensor):
        raise TypeError(f"velocity(x, t) must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(
            f"velocity(x, t) returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; "
            "a velocity field must return dx/dt with the same shape as x")
    return out


@contextmanager
def strict_float32(device: str | torch.device, precision: str = "float32") -> Iterator[None]:
    """Run a "float32" job on a CUDA device in float32 proper: cuDNN convolutions and matmuls without TF32.

    torch lets cuDNN use TF32 (10-bit mantissas) by default, and an optimization amplifies its rounding: on the
    demo world two runs of the same discovery gave directions 2-17% apart and batch sizes ~20% (scale up to 16%
    off), and two runs of one edit (8 faces, 100 steps, 10 iterations) up to 0.54 apart in a pixel; in float32
    they agree to 5e-5 / 3e-3 (discovery) and 4e-4 to 2e-3 in a pixel (edit) (tests/benchmarks/RESULTS.md 4.1).
    Other precisions ("bf16-autocast") and the CPU are left as they are; the previous flags come back afterwards.
    """
    if torch.device(device).type != "cuda" or precision != "float32":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
