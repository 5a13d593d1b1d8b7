"""FlowGrad optimization: gradient descent on the controls, keeping the best controls per image."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .backprop import LossFn, Segments, backward_sweep, loss_and_adjoint
from .grid import DEFAULT_EPS, TimeGrid
from .segments import Segmentation, start_mask, straightness_segments
from .trajectory import Trajectory, check_controls, check_latents, integrate, resolve_grid
from .velocity import Velocity

__all__ = ["FlowGradConfig", "FlowGradResult", "InitialPass", "IterationInfo", "initial_pass", "optimize"]


@dataclass(frozen=True)
class FlowGradConfig:
    """Settings of one FlowGrad optimization (written into every artifact it produces).

    Attributes:
        n_steps: Euler steps N.
        iterations: gradient steps on the controls (the paper uses 10).
        lr: learning rate (paper: SGD with lr 10 for the CLIP loss on CelebA-HQ 256).
        threshold: straightness threshold of the non-uniform backward pass (paper 5e-3);
            None for exact backprop.
        optimizer: "sgd" (paper) or "adam".
        segmentation: "per-image" (each image segmented on its own path, so results do not depend on
            which images share a batch) or "shared" (one segmentation from the batch's maximum
            straightness: fewer, fuller VJP calls).
        eps: start time of the uniform grid.
        t_window: only controls at steps with t in [t_start, t_end] are optimized (others stay zero); it must
            hold at least one step.
        coarse_forward: evaluate the velocity only at the starts of the backward segments in the
            iterations between the first and the final forward pass (see :func:`optimize`); needs a
            threshold.
    """

    n_steps: int = 100
    iterations: int = 10
    lr: float = 10.0
    threshold: float | None = 5e-3
    optimizer: Literal["sgd", "adam"] = "sgd"
    segmentation: Literal["per-image", "shared"] = "per-image"
    eps: float = DEFAULT_EPS
    t_window: tuple[float, float] = (0.0, 1.0)
    coarse_forward: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {self.n_steps!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {self.iterations!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.threshold is not None and not (self.threshold >= 0):
            raise ValueError(f"threshold must be None or >= 0, got {self.threshold!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.segmentation not in ("per-image", "shared"):
            raise ValueError(f"segmentation must be 'per-image' or 'shared', got {self.segmentation!r}")
        t0, t1 = self.t_window
        if not (0.0 <= t0 <= t1 <= 1.0):
            raise ValueError(f"t_window must satisfy 0 <= t_start <= t_end <= 1, got {self.t_window}")
        object.__setattr__(self, "t_window", (float(t0), float(t1)))
        if self.first_window_step == self.n_steps:
            times = self.grid.times
            raise ValueError(f"the time window [{t0:g}, {t1:g}] holds none of the {self.n_steps} steps (evaluated "
                             f"at t = {times[0]:.3g} ... {times[-1]:.3g}); widen the window (--t-window) or use "
                             "more steps")
        if self.coarse_forward and self.threshold is None:
            raise ValueError("coarse_forward needs a straightness threshold (it evaluates the velocity once "
                             "per backward segment)")

    @property
    def grid(self) -> TimeGrid:
        return TimeGrid.uniform(self.n_steps, self.eps)

    @property
    def first_window_step(self) -> int:
        """Index of the first step whose time lies in ``t_window``."""
        return _window_start(self.grid, self)[1]


@dataclass(frozen=True)
class IterationInfo:
    """Progress report passed to ``optimize``'s callback after every forward pass.

    Attributes:
        iteration: 0-based index of the forward pass (``iterations`` is the final evaluation).
        losses: (B,) losses of this forward pass.
        best: (B,) best loss so far per image.
        n_segments: (B,) backward segments used in this iteration (those reaching the time window; 0 for
            the final evaluation).
        elapsed: seconds since the start.
    """

    iteration: int
    losses: Tensor
    best: Tensor
    n_segments: Tensor
    elapsed: float


@dataclass(frozen=True)
class FlowGradResult:
    """Outcome of :func:`optimize`.

    Attributes:
        controls: (N, B, C, H, W) best controls per image (those of the lowest loss seen).
        images: (B, C, H, W) final states x_N produced by the best controls (data space).
        best_loss: (B,) lowest loss per image.
        best_iteration: (B,) forward pass that produced it (0 = no control).
        loss_history: (iterations + 1, B) loss of every forward pass; row 0 is the uncontrolled loss.
        segment_counts: (iterations, B) backward segments per image and iteration.
        status: per image "ok", or "nonfinite@<iteration>" when its loss or gradient stopped being
            finite (its controls were then frozen at the best so far; other images are unaffected).
        timings: seconds spent per phase: "forward", "loss", "backward".
        config: the settings used.
    """

    controls: Tensor
    images: Tensor
    best_loss: Tensor
    best_iteration: Tensor
    loss_history: Tensor
    segment_counts: Tensor
    status: tuple[str, ...]
    timings: dict[str, float]
    config: FlowGradConfig

    @property
    def initial_loss(self) -> Tensor:
        return self.loss_history[0]


class _Clock:
    """Accumulates wall time per phase, synchronizing CUDA so the numbers mean something."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {"forward": 0.0, "loss": 0.0, "backward": 0.0}
        self.start = time.perf_counter()

    def measure(self, phase: str, fn: Callable[[], object]):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[phase] += time.perf_counter() - t0
        return out


@dataclass(frozen=True)
class InitialPass:
    """The uncontrolled trajectory of ``z0``, computed the way :func:`optimize` computes its first pass.

    Make it with :func:`initial_pass`. A caller that needs the unedited output before optimizing (the
    source image of an L1 term, or the reconstruction of an inverted image) passes it to
    :func:`optimize` as ``initial=``, which then uses it as its first forward pass instead of integrating
    the same trajectory again.

    Attributes:
        trajectory: the full uncontrolled trajectory (all states kept).
        prefix: its stretch before the time window, which :func:`optimize` reuses in later passes
            (None when the window starts at step 0).
    """

    trajectory: Trajectory
    prefix: Trajectory | None

    @property
    def final(self) -> Tensor:
        """(B, C, H, W) the unedited final state x_N (data space)."""
        return self.trajectory.final


def _window_start(grid: TimeGrid, cfg: FlowGradConfig) -> tuple[Tensor, int]:
    """The window's step mask (N,) and its first step (N when the window holds no step)."""
    in_window = grid.window_mask(*cfg.t_window)
    return in_window, int(in_window.nonzero()[0]) if in_window.any() else grid.n_steps


def _prefix(velocity: Velocity, z0: Tensor, grid: TimeGrid, first: int) -> Trajectory | None:
    return integrate(velocity, z0, grid.sub(0, first)) if 0 < first < grid.n_steps else None


def _grid_from(cfg: FlowGradConfig, start_step: int) -> TimeGrid:
    """The steps ``start_step .. N-1`` of the configuration's grid, checked against its time window."""
    grid = resolve_grid(cfg.n_steps, cfg.eps)
    if start_step == 0:
        return grid
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < grid.n_steps:
        raise ValueError(f"start_step must be an integer in [0, {grid.n_steps - 1}], got {start_step!r}")
    _, first = _window_start(grid, cfg)
    if first < start_step:
        raise ValueError(f"the time window {cfg.t_window} starts at step {first}, before start_step {start_step}")
    return grid.sub(start_step)


def initial_pass(velocity: Velocity, z0: Tensor, config: FlowGradConfig | None = None, *,
                 start_step: int = 0) -> InitialPass:
    """The uncontrolled trajectory of ``z0``: bit for bit the first forward pass of :func:`optimize` with
    the same settings and no initial controls.

    Args:
        velocity: v(x, t).
        z0: (B, C, H, W) latents at t = eps, or the states at ``start_step``.
        config: the settings the optimization will use (its grid and time window matter here; default
            settings when None).
        start_step: as in :func:`optimize`.
    """
    cfg = config if config is not None else FlowGradConfig()
    check_latents(z0)
    grid = _grid_from(cfg, start_step)
    _, first = _window_start(grid, cfg)
    with torch.no_grad():
        prefix = _prefix(velocity, z0, grid, first)
        return InitialPass(trajectory=integrate(velocity, z0, grid, prefix=prefix), prefix=prefix)


def _check_initial(initial: InitialPass, grid: TimeGrid, first: int, z0: Tensor, controls: Tensor | None) -> None:
    if not isinstance(initial, InitialPass):
        raise TypeError(f"initial must be an InitialPass (from initial_pass), got {type(initial).__name__}")
    traj = initial.trajectory
    if traj.grid != grid:
        raise ValueError("initial was integrated on another time grid; make it with initial_pass(velocity, z0, "
                         "config) and the optimization's config")
    expected = first if 0 < first < grid.n_steps else 0
    if (0 if initial.prefix is None else initial.prefix.n_steps) != expected:
        raise ValueError("initial was made for another time window; make it with the optimization's config")
    if traj.controls is not None or traj.states.shape[0] != grid.n_steps + 1:
        raise ValueError("initial must be an uncontrolled trajectory with all states kept (from initial_pass)")
    if tuple(traj.states.shape[1:]) != tuple(z0.shape) or not torch.equal(traj.states[0], z0):
        raise ValueError("initial starts from another z0")
    if controls is not None and bool(controls.any()):
        raise ValueError("initial is the uncontrolled pass; it cannot be combined with nonzero initial controls")


def _segments_from(segments: Segmentation, first: int) -> int:
    """How many of the segments reach step ``first`` or later (those the backward sweep runs)."""
    return sum(1 for s, n in zip(segments.starts, segments.lengths) if s + n > first)


def _segment_starts(segments: Segmentation | Sequence[Segmentation]) -> list[int] | Tensor:
    """Where the backward segments start: shared step indices, or an (N, B) mask for per-image ones."""
    return list(segments.starts) if isinstance(segments, Segmentation) else start_mask(segments)


def optimize(velocity: Velocity, z0: Tensor, loss_fn: LossFn, n_steps: int = 100, iterations: int = 10,
             lr: float = 10.0, threshold: float | None = 5e-3, *, optimizer: str = "sgd",
             segmentation: str = "per-image", eps: float = DEFAULT_EPS,
             t_window: tuple[float, float] = (0.0, 1.0), coarse_forward: bool = False,
             controls: Tensor | None = None,
             config: FlowGradConfig | None = None,
             initial: InitialPass | None = None,
             start_step: int = 0,
             callback: Callable[[IterationInfo], None] | None = None) -> FlowGradResult:
    """Optimize additive controls u_k so the final images minimize ``loss_fn`` (FlowGrad).

    Each iteration runs the controlled forward trajectory, evaluates the per-image losses, segments the
    path by straightness, back-propagates to every control and takes one optimizer step. A final forward
    pass evaluates the last update, and the best controls seen per image are returned (the original
    code tracked the best but returned the last).

    With ``coarse_forward`` the first pass is a full trajectory whose straightness segmentation is kept
    for the whole optimization: the passes in between evaluate the velocity only at segment starts
    (:func:`integrate`'s ``hold``; on a straight stretch one network call stands for the whole stretch)
    and back-propagate through the same segments, while the final pass, and a re-run of the best
    controls when a coarse pass produced them, are full trajectories, so the returned images and losses
    are always those of the full N-step ODE.

    Args:
        velocity: v(x, t), x (B, C, H, W), t (B,) in [0, 1].
        z0: (B, C, H, W) latents at t = eps (noise, or inverted images).
        loss_fn: ``loss_fn(x1) -> (B,)`` per-image losses of the final state (data space).
        n_steps, iterations, lr, threshold, optimizer, segmentation, eps, t_window, coarse_forward: see
            :class:`FlowGradConfig`; ignored when ``config`` is given.
        controls: (N, B, C, H, W) initial controls (default zeros).
        config: all settings at once.
        initial: the uncontrolled trajectory of ``z0`` from :func:`initial_pass` with the same settings, when
            the caller already has it (e.g. for the unedited image): used as the first forward pass (whose
            time is then not in the result's timings). Not with nonzero initial controls.
        start_step: ``z0`` is the state at this step of the N-step grid instead of the latents at t = eps
            (e.g. a real image inverted only down to the time window's start, which must not be earlier);
            the trajectories run from there, and the controls before it (inputs and results, still N rows)
            are zero. With exact backprop the result equals that of the latents whose trajectory passes
            through ``z0`` at that step.
        callback: called with an :class:`IterationInfo` after each forward pass.

    Returns:
        :class:`FlowGradResult`.
    """
    cfg = config if config is not None else FlowGradConfig(
        n_steps=n_steps, iterations=iterations, lr=lr, threshold=threshold, optimizer=optimizer,  # type: ignore[arg-type]
        segmentation=segmentation, eps=eps, t_window=t_window,  # type: ignore[arg-type]
        coarse_forward=coarse_forward)
    check_latents(z0)
    grid = _grid_from(cfg, start_step)
    check_controls(controls, cfg.grid, z0)
    if controls is not None and start_step:
        if bool(controls[:start_step].any()):
            raise ValueError(f"controls must be zero before start_step {start_step}")
        controls = controls[start_step:]
    b = z0.shape[0]
    in_window, first = _window_start(grid, cfg)
    window = in_window.to(z0.device).view(-1, *([1] * z0.dim()))
    if initial is not None:
        _check_initial(initial, grid, first, z0, controls)
    u = (torch.zeros((grid.n_steps, *z0.shape), dtype=z0.dtype, device=z0.device) if controls is None
         else controls.detach().clone()) * window
    u.requires_grad_(True)
    opt = (torch.optim.SGD([u], lr=cfg.lr) if cfg.optimizer == "sgd"
           else torch.optim.Adam([u], lr=cfg.lr))

    best_loss = torch.full((b,), math.inf, dtype=torch.float64)
    best_iter = torch.zeros(b, dtype=torch.long)
    best_u = u.detach().clone()
    history = torch.full((cfg.iterations + 1, b), math.nan, dtype=torch.float64)
    seg_counts = torch.zeros((cfg.iterations, b), dtype=torch.long)
    alive = torch.ones(b, dtype=torch.bool)           # images whose loss and gradients are finite
    status = ["ok"] * b
    clock = _Clock(z0.device)
    # Steps before the window keep zero controls: their stretch of trajectory is the same in every pass,
    # so it is integrated once, and the backward sweep ends where the window begins (exact either way).
    if initial is not None:
        prefix = initial.prefix
    else:
        with torch.no_grad():
            prefix = clock.measure("forward", lambda: _prefix(velocity, z0, grid, first))

    def freeze(bad: Tensor, it: int) -> None:
        for i in bad.nonzero().flatten().tolist():
            if alive[i]:
                status[i] = f"nonfinite@{it}"
        alive.logical_and_(~bad)

    held: list[int] | Tensor | None = None    # coarse forward: where the velocity is evaluated
    fixed: Segments = None            # ... and the backward segments of the first pass, reused
    for it in range(cfg.iterations + 1):
        coarse = held is not None and it < cfg.iterations
        if it == 0 and initial is not None:  # the caller's uncontrolled pass (controls are zero)
            traj, initial = initial.trajectory, None
        else:
            with torch.no_grad():
                traj = clock.measure("forward", lambda: integrate(velocity, z0, grid, u.detach(),
                                                                  hold=held if coarse else None, prefix=prefix))
        losses, lam = clock.measure("loss", lambda: loss_and_adjoint(loss_fn, traj.final))
        losses64 = losses.double().cpu()
        history[it] = losses64
        if it == 0:  # images that never get a finite loss keep their uncontrolled result
            best_images = traj.final.clone()
            if cfg.coarse_forward:  # the first full pass, to compare with after the coarse passes
                first_pass = (u.detach().clone(), traj.final.clone())
        lam_ok = torch.isfinite(lam).flatten(1).all(1).cpu()
        freeze(~torch.isfinite(losses64) | ~lam_ok, it)
        better = alive & (losses64 < best_loss)
        if better.any():
            sel = better.nonzero().flatten().to(z0.device)
            best_loss[better] = losses64[better]
            best_iter[better] = it
            best_u[:, sel] = u.detach()[:, sel]
            best_images[sel] = traj.final[sel]
        segs_this = torch.zeros(b, dtype=torch.long)
        if it < cfg.iterations and alive.any():
            if coarse:
                segments = fixed
            elif cfg.threshold is None:
                segments = None
            elif cfg.segmentation == "shared":  # over the images still optimized (a frozen one may be NaN)
                segments = straightness_segments(traj, cfg.threshold, among=alive)
            else:
                segments = straightness_segments(traj, cfg.threshold, per_image=True)
            if cfg.coarse_forward and held is None:
                fixed, held = segments, _segment_starts(segments)
            if segments is None:
                segs_this[:] = grid.n_steps - first
            elif isinstance(segments, Segmentation):
                segs_this[:] = _segments_from(segments, first)
            else:
                segs_this[:] = torch.tensor([_segments_from(s, first) for s in segments])
            lam = torch.where(alive.to(lam.device).view(-1, *([1] * (lam.dim() - 1))), lam,
                              torch.zeros_like(lam))
            grads, _ = clock.measure("backward", lambda: backward_sweep(velocity, traj, lam, segments,
                                                                                stop=first))
            freeze(~torch.isfinite(grads).flatten(2).all(2).all(0).cpu(), it)
            keep = alive.to(z0.device).view(1, -1, *([1] * (z0.dim() - 1)))
            u.grad = torch.where(keep, grads, torch.zeros_like(grads)) * window
            opt.step()
            with torch.no_grad():  # frozen images go back to their best controls
                u.copy_(torch.where(keep, u, best_u))
            seg_counts[it] = segs_this
        if callback is not None:
            callback(IterationInfo(iteration=it, losses=losses64, best=best_loss.clone(),
                                   n_segments=segs_this, elapsed=time.perf_counter() - clock.start))

    if held is not None:  # the best controls of a coarse pass: their images and losses from a full pass
        redo = (best_iter > 0) & (best_iter < cfg.iterations)
        if redo.any():
            with torch.no_grad():
                final = clock.measure("forward", lambda: integrate(velocity, z0, grid, best_u,
                                                                   keep_states=False).final)
                full_losses = clock.measure("loss", lambda: loss_fn(final)).double().cpu()
            best_images[redo.nonzero().flatten().to(z0.device)] = final[redo.to(z0.device)]
            best_loss[redo] = full_losses[redo]
            # a coarse pass was chosen on its surrogate loss; the first and the final pass are full ODE passes,
            # and where one of them is lower than the chosen controls' full loss, it is the result
            for it, (controls_it, images_it) in ((0, first_pass), (cfg.iterations, (u.detach(), traj.final))):
                lower = redo & (history[it] < best_loss)
                if lower.any():
                    sel = lower.nonzero().flatten().to(z0.device)
                    best_loss[lower], best_iter[lower] = history[it][lower], it
                    best_u[:, sel] = controls_it[:, sel]
                    best_images[sel] = images_it[sel]

    best_loss[torch.isinf(best_loss)] = math.nan
    if start_step:
        best_u = torch.cat([best_u.new_zeros((start_step, *best_u.shape[1:])), best_u])
    return FlowGradResult(controls=best_u, images=best_images, best_loss=best_loss, best_iteration=best_iter,
                          loss_history=history, segment_counts=seg_counts, status=tuple(status),
                          timings=dict(clock.totals), config=cfg)
