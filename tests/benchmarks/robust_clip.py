"""How well the guidance CLIP's pixel gradient points along a true attribute change, and an adversarially
fine-tuned (robust) tiny CLIP to raise it (RESULTS.md §4.3, round 16).

``check``: on held-out renders, for old/young and smiling/serious, the zero-shot accuracy on clear cases, how
far the CLIP's margin moves when the renderer raises the factor by 0.3, and the mean cosine between the
margin's pixel gradient and the renderer's true image change for +0.1 of the factor.

``train``: fine-tunes the tiny CLIP of a data directory contrastively (as ``flowgrad demo train --part
clip``), with a share of each batch replaced by PGD adversarial examples inside an L2 ball of radius ``--eps``
in pixel units (images in [0, 1], 3 x 64 x 64), then writes a copy of the data directory with the new
weights (fp16, manifest updated) and checks it. Point ``FLOWGRAD_DATA`` at that copy to discover and judge
directions with it (``eval_directions.py``).

    python tests/benchmarks/robust_clip.py check [--data DIR]
    python tests/benchmarks/robust_clip.py train --eps 1 --steps 2400 --out /tmp/data_robust [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flowgrad.augment import diff_augment  # noqa: E402
from flowgrad.clip_guidance import load_clip  # noqa: E402
from flowgrad.demo.captions import caption  # noqa: E402
from flowgrad.demo.render import render_factors, sample_factors  # noqa: E402
from flowgrad.demo.train import _caption_targets  # noqa: E402
from flowgrad.demo.world import demo_clip_spec, save_payload  # noqa: E402

PAIRS = (("old", "a photo of an old person", "a photo of a young person", "age"),
         ("smiling", "a photo of a smiling person", "a photo of a serious person", "smile"))
CHECK_SEED = 999 + 10**9  # held-out renders (training uses seeds < 1e9)


def check(data: Path | None, n: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy, margin response to +0.3 of the factor, gradient cosine to +0.1 of it."""
    clip = load_clip(demo_clip_spec(data / "demo" if data else None), device=device)
    f0 = {k: v.to(device) for k, v in sample_factors(n, CHECK_SEED).items()}
    images = render_factors(f0, CHECK_SEED, device=device).requires_grad_(True)
    out = {}
    for name, prompt, negative, factor in PAIRS:
        text = clip.encode_text([prompt, negative]).detach()

        def margin(x: torch.Tensor) -> torch.Tensor:
            s = clip.encode_image(x) @ text.T
            return s[:, 0] - s[:, 1]

        m = margin(images)
        grad, = torch.autograd.grad(m.sum(), images)
        clear = (f0[factor] - 0.5).abs() >= 0.2
        raised = {d: dict(f0, **{factor: (f0[factor] + d).clamp(max=1)}) for d in (0.1, 0.3)}
        change = render_factors(raised[0.1], CHECK_SEED, device=device) - images.detach()
        moved = change.flatten(1).norm(dim=1) > 0  # images already at the top of the range do not change
        with torch.no_grad():
            m3 = margin(render_factors(raised[0.3], CHECK_SEED, device=device))
        out[name] = {
            "zero_shot": float(((m > 0) == (f0[factor] > 0.5))[clear].float().mean()),
            "margin_response": float((m3 - m.detach()).mean()),
            "gradient_cosine": float(F.cosine_similarity(grad.flatten(1)[moved], change.flatten(1)[moved]).mean()),
        }
    return out


def _l2_clip(d: torch.Tensor, eps: float) -> torch.Tensor:
    norm = d.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return d * (eps / norm).clamp(max=1)


def train(args: argparse.Namespace, device: torch.device) -> None:
    src = Path(args.data) if args.data else Path(__file__).resolve().parents[2] / "data"
    clip = load_clip(demo_clip_spec(src / "demo"), device=device)
    model = clip.model.float().train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    warmup = min(50, args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def contrastive(images: torch.Tensor, text: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast:
            img = F.normalize(model.encode_image(clip.preprocess(images)).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ text.T
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    n_adv = int(args.batch_size * args.adv_share)
    start = time.perf_counter()
    for step in range(args.steps):
        seed = (args.seed * 1_000_003 + step) * 8 + 5
        factors = sample_factors(args.batch_size, seed)
        texts = caption(factors, seed=seed)
        images = render_factors({k: v.to(device) for k, v in factors.items()}, seed, device=device)
        augmented = diff_augment(images, ("color", "translation", "resize", "cutout"), gen)
        pick = (torch.rand(args.batch_size, generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
        images = torch.where(pick, augmented, images).detach()
        targets = _caption_targets(list(texts), device)
        with autocast:
            text = F.normalize(model.encode_text(clip.tokenizer(texts).to(device)).float(), dim=-1)
        if args.eps > 0 and n_adv > 0:  # PGD (L2, normalized gradient steps) against the text as it is now
            clean, rest = images[:n_adv], images[n_adv:]
            delta = _l2_clip(torch.randn(clean.shape, generator=gen).to(device), args.eps / 2)
            for _ in range(args.pgd_steps):
                delta.requires_grad_(True)
                loss = contrastive(torch.cat([(clean + delta).clamp(0, 1), rest]), text.detach(), targets)
                g, = torch.autograd.grad(loss, delta)
                g = g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
                delta = _l2_clip(delta.detach() + 2.5 * args.eps / args.pgd_steps * g, args.eps)
            images = torch.cat([(clean + delta).clamp(0, 1), rest]).detach()
        loss = contrastive(images, text, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}, {time.perf_counter() - start:.1f}s", flush=True)
    model.eval().requires_grad_(False)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    entry = save_payload(model, None, out / "demo" / "tiny_clip.pt")
    manifest_path = out / "demo" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    before = manifest["files"]["tiny_clip.pt"]
    manifest["files"]["tiny_clip.pt"] = entry | {
        "part": "clip", "fine_tuned_from": before["sha256"], "steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "robust_eps": args.eps, "pgd_steps": args.pgd_steps,
        "adv_share": args.adv_share, "command": "python tests/benchmarks/robust_clip.py " + " ".join(sys.argv[1:])}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out} ({args.steps} steps, {time.perf_counter() - start:.1f}s)", flush=True)


def _print_check(result: dict[str, dict[str, float]]) -> None:
    for name, r in result.items():
        print(f"{name}: zero-shot {r['zero_shot']:.3f}, margin response to +0.3 {r['margin_response']:+.3f}, "
              f"gradient cosine {r['gradient_cosine']:.4f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["check", "train"])
    p.add_argument("--data", default=None, help="data directory to read (default: the repository's data/)")
    p.add_argument("--out", default="/tmp/data_robust", help="train: the data directory copy to write")
    p.add_argument("--eps", type=float, default=1.0, help="L2 radius of the adversarial perturbation")
    p.add_argument("--pgd-steps", type=int, default=3)
    p.add_argument("--adv-share", type=float, default=0.5, help="share of each batch made adversarial")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=91)
    p.add_argument("--n", type=int, default=512, help="check: held-out renders")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    if args.mode == "train":
        train(args, device)
        _print_check(check(Path(args.out), args.n, device))
    else:
        _print_check(check(Path(args.data) if args.data else None, args.n, device))


if __name__ == "__main__":
    main()
