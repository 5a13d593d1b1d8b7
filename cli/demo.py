"""`flowgrad demo ...`: train, evaluate and look at the embedded demo world."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch

from .common import CliError, Group, console, friendly_errors, pick_device, progress_callback

if TYPE_CHECKING:
    from flowgrad.demo.train import Callback, TrainConfig, TrainResult

JUDGE_BLUR = 0.8
"""Default --blur of the judge (the committed judge's training setting)."""


@click.group("demo", cls=Group)
def demo() -> None:
    """The embedded demo world: synthetic portraits, a small rectified flow, a tiny CLIP, a judge."""


def _card(world: int = 1) -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{world}x {name}" if world > 1 else name


@demo.command("train")
@click.option("--part", type=click.Choice(["flow", "clip", "judge", "all"]), default="all", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data/demo"),
              show_default=True, help="Folder for the weights (and the manifest).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default per part: 30000/6000/16000).")
@click.option("--max-seconds", type=float, default=None, help="Stop a part early after this long.")
@click.option("--batch-size", type=int, default=None, help="Default per part: 256/512/256.")
@click.option("--lr", type=float, default=None, help="Default per part: 3e-4/5e-4/1e-3.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Caption/tokenizer worker processes (clip).")
@click.option("--pool", type=int, default=0, show_default=True,
              help="Pre-render this many images for the flow (0: render every batch).")
@click.option("--t-sampling", type=click.Choice(["uniform", "late"]), default="uniform", show_default=True,
              help="Flow: how t is drawn ('late': half the batch with density 2t, for fine detail).")
@click.option("--blur", type=click.FloatRange(min=0.0), default=JUDGE_BLUR, show_default=True,
              help="Judge: blur a random half of each batch with a Gaussian of sigma ~ U(0, BLUR) px.")
@click.option("--init", "init_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Continue training from these weights (the part's file: a flow.pt or a tiny_clip.pt).")
@friendly_errors
def train(part: str, out_dir: Path, steps: int | None, max_seconds: float | None, batch_size: int | None,
          lr: float | None, seed: int, device: str, workers: int, pool: int, t_sampling: str, blur: float,
          init_path: Path | None) -> None:
    """Train the demo models from streamed renders and write fp16 weights + a manifest entry.

    The flow also trains data-parallel under torchrun (`torchrun --nproc-per-node K --no-python flowgrad
    demo train --part flow ...`): --batch-size and --pool are per process; rank 0 writes the weights.
    """
    from directions import distributed as dist
    from flowgrad.demo import train as tr
    from flowgrad.demo.world import sha256_file

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and part != "flow":
        raise CliError("only --part flow trains data-parallel")
    if init_path is not None and part not in ("flow", "clip"):
        raise CliError("--init continues one part: use it with --part flow or --part clip")
    dev = pick_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    init_sha = sha256_file(init_path) if init_path is not None else None  # before the file may be overwritten
    group = dist.process_group(dev.type) if launched > 1 else contextlib.nullcontext(dev)
    with group as dev:
        rank, world = dist.rank_and_world()
        for name in ["flow", "clip", "judge"] if part == "all" else [part]:
            d_steps, d_bs, d_lr = TRAIN_DEFAULTS[name]
            n_steps = d_steps if steps is None else steps  # an explicit 0 is refused by TrainConfig, not replaced
            cfg = tr.TrainConfig(steps=n_steps, batch_size=d_bs if batch_size is None else batch_size,
                                 lr=d_lr if lr is None else lr, seed=seed,
                                 max_seconds=max_seconds, warmup=min(500, n_steps // 10),
                                 t_sampling=t_sampling if name == "flow" else "uniform")
            bar = progress_callback(total=cfg.steps, desc=f"train {name}") if rank == 0 else contextlib.nullcontext()
            with bar as cb:
                res, config = _train_part(name, cfg, dev, out_dir, workers, pool, init_path, blur, cb)
            if rank == 0:
                _write_part(name, res, config, cfg, out_dir, pool, (init_path, init_sha), world, blur)


TRAIN_DEFAULTS = {"flow": (30_000, 256, 3e-4), "clip": (6_000, 512, 5e-4), "judge": (16_000, 256, 1e-3)}
"""(steps, batch size, learning rate) of each part when the options leave them out."""


def _train_part(name: str, cfg: TrainConfig, dev: torch.device, out_dir: Path, workers: int, pool: int,
                init_path: Path | None, blur: float, callback: Callback | None) -> tuple[TrainResult, dict | None]:
    """Train one part; returns the library's TrainResult and the architecture dict for the payload."""
    from flowgrad.demo import train as tr
    from flowgrad.demo.world import CLIP_CONFIG

    if name == "flow":
        init = None
        if init_path is not None:
            payload = torch.load(init_path, map_location="cpu", weights_only=True)
            if not (isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict)):
                raise CliError(f"--init {init_path} is not a demo flow payload (a flow.pt)")
            init = payload["state_dict"]
        res = tr.train_flow(cfg, device=dev, pool=pool, init=init, callback=callback)
        return res, res.model.config.to_dict()
    if name == "clip":
        config_json = Path(__file__).resolve().parents[1] / "data" / "demo" / CLIP_CONFIG
        if (out_dir / CLIP_CONFIG).is_file():
            config_json = out_dir / CLIP_CONFIG
        init = torch.load(init_path, map_location="cpu", weights_only=True) if init_path is not None else None
        if init is not None and not (isinstance(init, dict) and "visual.conv1.weight" in init):
            raise CliError(f"--init {init_path} is not a tiny CLIP state dict (a tiny_clip.pt)")
        res = tr.train_clip(cfg, str(config_json), device=dev, workers=workers, callback=callback, init=init)
        if not (out_dir / CLIP_CONFIG).is_file():  # the weights load with their architecture, from this folder too
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config_json, out_dir / CLIP_CONFIG)
        return res, None
    res = tr.train_judge(cfg, device=dev, blur=blur, callback=callback)
    return res, res.model.config.to_dict()


def _write_part(name: str, res: TrainResult, config: dict | None, cfg: TrainConfig, out_dir: Path, pool: int,
                init: tuple[Path | None, str | None], world: int, blur: float) -> None:
    """Write a part's weights and its train_<part>.json record (a command that reproduces it) and say so.

    ``init`` is the flow's --init file and its sha256 (taken before training), or (None, None).
    """
    from flowgrad.demo.world import WEIGHT_FILES, save_payload

    init_path, init_sha = init if name in ("flow", "clip") else (None, None)
    entry = save_payload(res.model, config, out_dir / WEIGHT_FILES[name])
    launcher = ["torchrun", "--nproc-per-node", str(world), "--no-python"] if world > 1 else []
    command = [*launcher, "flowgrad", "demo", "train", "--part", name, "--steps", str(res.steps),
               "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--seed", str(cfg.seed)]
    if name == "flow" and pool:
        command += ["--pool", str(pool)]
    if name == "flow" and cfg.t_sampling != "uniform":
        command += ["--t-sampling", cfg.t_sampling]
    if name == "judge":
        command += ["--blur", str(blur)]
    if init_sha is not None:
        command += ["--init", f"<{WEIGHT_FILES[name]} sha256 {init_sha}>"]
    entry.update(part=name, steps=res.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                 wall_time_s=round(res.seconds, 1), card=_card(world), torch=torch.__version__,
                 command=shlex.join(command), invoked_as=shlex.join(sys.argv), world_size=world,
                 global_batch_size=cfg.batch_size * world)
    if init_sha is not None:  # keep the provenance of the stage it continued
        previous = init_path.with_name("manifest.json")
        if previous.is_file():
            prev = json.loads(previous.read_text()).get("files", {}).get(init_path.name)
            if prev is not None and prev.get("sha256") == init_sha:
                entry["previous_stage"] = prev
    (out_dir / f"train_{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
    console(f"{name}: {res.steps} steps in {res.seconds:.0f}s -> {out_dir / WEIGHT_FILES[name]} "
            f"({entry['parameters']:,} parameters, sha256 {entry['sha256'][:12]}…)")


@demo.command("manifest")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("data/demo"),
              show_default=True)
@friendly_errors
def manifest(directory: Path) -> None:
    """Merge the train_*.json records of a weights folder into manifest.json (checksums verified).

    Parts without a new train_*.json keep their entry from an existing manifest.json.
    """
    from flowgrad.demo.world import WEIGHT_FILES, sha256_file

    path = directory / "manifest.json"
    files = json.loads(path.read_text())["files"] if path.is_file() else {}
    for name, filename in WEIGHT_FILES.items():
        record_path = directory / f"train_{name}.json"
        if record_path.is_file():
            files[filename] = json.loads(record_path.read_text())
        if filename not in files:
            raise CliError(f"{record_path} is missing; run `flowgrad demo train --part {name}` first")
        actual = sha256_file(directory / filename)
        if actual != files[filename]["sha256"]:
            raise CliError(f"{directory / filename} does not match its record (sha256 {actual[:12]}…)")
    path.write_text(json.dumps({"files": files}, indent=2) + "\n")
    console(f"wrote {path} ({len(files)} files)")


@demo.command("evaluate")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Weights folder (default: the committed data/demo).")
@click.option("--n", "n_images", type=int, default=2000, show_default=True)
@click.option("--steps", "n_steps", type=int, default=100, show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report as JSON here.")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save an 8x8 grid of flow samples here (PNG).")
@click.option("--device", default="auto", show_default=True)
@friendly_errors
def evaluate(directory: Path | None, n_images: int, n_steps: int, out_path: Path | None,
             grid_path: Path | None, device: str) -> None:
    """Measure the quality gates (judge R²/accuracy, CLIP zero-shot, flow statistics)."""
    from flowgrad.clip_guidance import load_clip
    from flowgrad.demo import evaluate as ev
    from flowgrad.demo.registry import load_registry
    from flowgrad.demo.render import render
    from flowgrad.demo.world import demo_clip_spec, load_demo_flow, load_judge

    dev = pick_device(device)
    t0 = time.perf_counter()
    judge_net = load_judge(dev, directory)
    flow = load_demo_flow(dev, directory)
    clip = load_clip(demo_clip_spec(directory), device=dev)
    registry = load_registry()
    attrs = [registry[a] for a in ev.ZERO_SHOT_ATTRIBUTES]
    report: dict = {"judge": ev.judge_quality(judge_net, n_images, dev),
                    "judge_blur_shift": ev.judge_blur_shift(judge_net, n_images, device=dev)}
    images, factors = render(n_images, seed=ev.EVAL_SEED + 3, device=dev)
    report["clip_zero_shot_renders"] = ev.zero_shot_accuracy(clip, images, factors, attrs)
    report["flow"], samples = ev.flow_quality(flow, judge_net, n_images, n_steps, dev)
    judged = dict(zip(judge_net.config.factors, ev.predict(judge_net, samples).cpu().T))
    report["clip_zero_shot_flow_samples"] = ev.zero_shot_accuracy(clip, samples, judged, attrs)
    report["card"] = _card()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    if out_path:
        out_path.write_text(text + "\n")
    if grid_path:
        from .images import save_grid

        save_grid(samples[:64], grid_path, nrow=8, scale=2)
    console(text)
