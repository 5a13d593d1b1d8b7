"""Shared CLI plumbing: one-line errors, device choice, progress bars, logging."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator

import click

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import open_clip / huggingface_hub

log = logging.getLogger("flowgrad")


class CliError(click.ClickException):
    """A user-facing error: printed as one line, exit status 1."""

    def show(self, file=None) -> None:  # one line, no "Usage" block
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def _one_line(exc: click.UsageError) -> CliError:
    return CliError(f"{exc.format_message()} (see --help)")


class _OneLineUsage:
    """Click's usage errors (a bad option value, an unknown option) as one line, as every other error."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except click.UsageError as exc:
            raise _one_line(exc) from None


class Command(_OneLineUsage, click.Command):
    """A command with one-line usage errors."""


class Group(_OneLineUsage, click.Group):
    """A command group with one-line usage errors, also for an unknown subcommand."""

    command_class = Command

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc) from None


Group.group_class = Group


def console(message: str) -> None:
    """User-facing output of a command (stdout)."""
    click.echo(message)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)


def pick_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CliError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
    return dev


def warm_cuda(device, velocity=None, batch: int = 1):
    """Pay CUDA's one-time costs on a helper thread while the main thread does host work.

    The first calls of a process on a GPU load cuDNN and cuBLAS, create their handles, pick convolution
    algorithms and load every kernel the network uses; importing open_clip for the CLIP takes seconds and
    needs no GPU, so the two overlap. With ``velocity``, the thread runs its forward once on random inputs
    of ``batch`` images and its VJP at every batch bucket up to that (the subset sizes per-image segments
    use); a :class:`~flowgrad.cuda_graphs.GraphedVelocity` captures its graphs for those calls there, so
    the job replays them from its first step. Returns the thread, or None off CUDA. Until it is joined,
    the main thread must not use the GPU (a graph capture may be running). Errors are left for the main
    thread to meet with its own message.
    """
    import threading

    import torch

    if device.type != "cuda":
        return None

    def run() -> None:
        try:
            with torch.cuda.device(device):
                if velocity is None:
                    x = torch.randn(2, 8, 16, 16, device=device, requires_grad=True)
                    w = torch.randn(8, 8, 3, 3, device=device)
                    torch.nn.functional.conv2d(x, w, padding=1).square().sum().backward()
                    return
                x = torch.randn((batch, *velocity.sample_shape), device=device)
                t = torch.full((batch,), 0.5, device=device)
                with torch.no_grad():
                    velocity(x, t)
                lam = torch.ones_like(x)
                # per-image segments run VJPs over subsets, in power-of-two buckets (flowgrad.cuda_graphs)
                for n in sorted({min(1 << k, batch) for k in range(batch.bit_length() + 1)}, reverse=True):
                    if hasattr(velocity, "vjp"):
                        velocity.vjp(x[:n], t[:n], lam[:n])
                    else:
                        leaf = x[:n].clone().requires_grad_(True)
                        torch.autograd.grad(velocity(leaf, t[:n]), leaf, grad_outputs=lam[:n])
                torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - the main thread reports CUDA problems itself
            pass

    thread = threading.Thread(target=run, name="flowgrad-cuda-warmup", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def progress_callback(total: int, desc: str, unit: str = "step") -> Iterator[Callable]:
    """A tqdm bar driven by ``callback(step, metrics)`` calls from the library."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
               disable=None if sys.stderr.isatty() else True)

    def callback(step: int, metrics: dict) -> None:
        bar.n = step + 1
        if metrics:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        bar.refresh()

    try:
        yield callback
    finally:
        bar.close()


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", disable: bool = False):
    """A tqdm bar on stderr (hidden when stderr is not a terminal or ``disable``)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
               disable=True if disable else (None if sys.stderr.isatty() else True))
    try:
        yield bar
    finally:
        bar.close()


def friendly_errors(fn: Callable) -> Callable:
    """Turn the library's validation errors into one-line CLI errors (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, TypeError, FileNotFoundError, PermissionError, ImportError, KeyError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CliError(message) from None
        except OSError as exc:
            raise CliError(f"{exc.strerror or exc}: {exc.filename or ''}".strip(": ")) from None
        except KeyboardInterrupt:
            raise CliError("interrupted") from None
        except Exception as exc:  # noqa: BLE001 - never a traceback for the user; -v shows it
            if kwargs.get("verbose"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CliError(f"{type(exc).__name__}: {message} (rerun with -v for details)") from None

    return wrapper


bf16_option = click.option(
    "--bf16", is_flag=True,
    help="Run the NCSN++ network under bf16 autocast (about half the GPU memory per image; control "
         "gradients within cosine 0.99998 of float32).")


compile_option = click.option(
    "--compile", "compile_model", is_flag=True,
    help="Run the NCSN++ network through torch.compile (GPU: about 1.6x faster edits at 256x256 on an H100; "
         "the first batch of each size compiles for three to four minutes at 256x256).")


graphs_option = click.option(
    "--cuda-graphs/--no-cuda-graphs", "cuda_graphs", default=True, show_default=True,
    help="On a GPU, replay the velocity's forward and VJP as CUDA graphs (same results, less launch "
         "overhead; ignored on the CPU).")

coarse_option = click.option(
    "--coarse-forward", is_flag=True,
    help="Between the first and last forward pass, evaluate the velocity once per straight segment "
         "(fewer network calls; final images still come from the full N-step ODE).")


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration (``torch.use_deterministic_algorithms``); restored after.

    Sets ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS needs it for repeatable results; kept if already set) and
    turns cuDNN's benchmark mode off. The library's own ops follow the setting (the augmentations' and the
    CLIP input's bilinear resampling run as matrix products then).
    """
    if not enabled:
        yield
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def deterministic_option(fn: Callable) -> Callable:
    """``--deterministic``: run the command under :func:`deterministic_mode`."""

    @functools.wraps(fn)
    def wrapper(*args, deterministic: bool = False, **kwargs):
        with deterministic_mode(deterministic):
            return fn(*args, **kwargs)

    return click.option(
        "--deterministic", is_flag=True,
        help="Deterministic GPU kernels: the same result on every run, and under torchrun or after --resume "
             "the same as one uninterrupted process (slower; the CPU is deterministic anyway).")(wrapper)


def maybe_graphed(velocity, device, enabled: bool):
    """``velocity`` wrapped in CUDA graphs when ``enabled`` and ``device`` is a CUDA device."""
    from flowgrad.cuda_graphs import GraphedVelocity, graphs_available

    return GraphedVelocity(velocity) if enabled and graphs_available(device) else velocity


def model_kwargs(bf16: bool, compile_model: bool = False) -> dict:
    """Loader keyword arguments for the --bf16 and --compile flags."""
    import torch

    kwargs: dict = {"autocast_dtype": torch.bfloat16} if bf16 else {}
    if compile_model:
        kwargs["compile_backend"] = "inductor"
        _RUN["compiled"] = True  # its compile workers shut down in atexit: no quick exit (run_program)
    return kwargs


def precision_name(velocity) -> str:
    """How the loaded model runs (read from the model, not the flag), for metrics and direction settings."""
    dtype = str(getattr(velocity, "autocast_dtype", None)).removeprefix("torch.")
    return {"None": "float32", "bfloat16": "bf16-autocast", "float16": "fp16-autocast"}.get(dtype, dtype)


_RUN: dict[str, bool] = {"compiled": False}
"""What this process's command did that matters at exit."""

ORDERLY_EXIT_ENV = "FLOWGRAD_ORDERLY_EXIT"
"""Set to 1 to keep the interpreter's full teardown after a successful GPU run (see :func:`run_program`)."""


def _quick_exit_allowed() -> bool:
    """A finished one-process run that initialized CUDA, without torch.compile's worker pool."""
    torch = sys.modules.get("torch")
    return (torch is not None and torch.cuda.is_initialized() and os.environ.get(ORDERLY_EXIT_ENV, "") in ("", "0")
            and int(os.environ.get("WORLD_SIZE", "1") or 1) == 1 and not _RUN["compiled"])


def run_program(command: click.Command) -> None:
    """Run a click command as the process's program (console scripts, ``python -m cli.X``).

    After a successful run that used CUDA, the process leaves with ``os._exit(0)`` once logging and
    the standard streams are flushed: the interpreter's teardown (CUDA context, graph pools, module
    cleanup) took 0.9-1.35 s of a 9-10 s `discover-directions --attr old` on an H100, against 0.16-0.18 s.
    Every file a command writes is closed (and renamed into place) before it returns, so nothing is
    lost. Errors, CPU runs, torchrun workers and --compile runs exit the usual way; so does any run with
    FLOWGRAD_ORDERLY_EXIT=1. Tests call the commands through click's runner, which never gets here.
    """
    try:
        command.main(standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code in (0, None) and _quick_exit_allowed():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)
    sys.exit(code)
