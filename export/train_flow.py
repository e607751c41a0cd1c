"""Unsupervised training of the deformable registration network (``export/flow_models.py``).

    python -m export.train_flow --loss deepsim --encoder runs/ssl/ssl_unet.pt \\
        --data lucchi,isbi --out runs/flow_deepsim --minutes 11
    python -m export.train_flow --loss ncc --data lucchi,isbi --out runs/flow_ncc --minutes 11

Samples are neighbouring-slice pairs ``(z, z + 1)`` of real, already aligned stacks (random
crops, the same random rot90/flip for both), the moving crop further deformed by a small
random smooth field (a coarse random grid, cubic-upsampled) plus a small shift, for variety.
With ``--same-prob`` (default 0.3) the moving crop is instead the fixed slice itself under the
synthetic deformation: without such pairs the first models (neighbours only) predicted a
0.2 px field for two identical slices and recovered only about 60 % of a known deformation.
With ``--artifact-prob`` each crop independently gets synthetic EM artifacts
(``deepalign_fast.qc.artifacts``), so that the network learns to register through them. The last
``--val-fraction`` (20 %) of the slices of every stack is held out: no training pair touches
them (they are the benchmark's slices).

Loss = similarity + ``--smooth`` * mean squared forward difference of the displacement.

* ``deepsim`` (Czolbe et al. 2020, "DeepSim: semantic similarity metrics for learned image
  registration"): the frozen self-supervised encoder (``export/models.py``, checkpoint given
  by ``--encoder``) maps the fixed image and the *warped* moving image to feature maps at three
  levels (stride 1, 2 and the L2-normalised stride-4 descriptors); the similarity is minus the
  mean over levels of the mean per-pixel cosine similarity. Gradients flow through the frozen
  encoder into the warp.
* ``ncc``: minus the local (9 x 9) squared normalised cross-correlation of raw (normalised)
  intensities, VoxelMorph's loss: the seed's baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from deepalign_fast.onnx.normalise import NORMALISATION, normalise_slice
from deepalign_fast.qc.artifacts import ARTIFACT_KINDS, apply_artifacts

from .flow_data import random_smooth_field, remap
from .flow_models import MULTIPLE, FlowConfig, FlowUNet, smoothness, warp
from .models import SslUNet, UNetConfig
from .train_ssl import load_stacks, split_stacks

LOSSES = ("deepsim", "ncc")


# --------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------
def make_pair(stack: np.ndarray, zs: range, rng: np.random.Generator, *, size: int,
              max_amp: float, max_shift: float, artifact_prob: float, same_prob: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """One (fixed, moving) pair of normalised ``(size, size)`` crops from slices z, z + 1.

    With probability ``same_prob`` the moving crop comes from slice z itself (then only the
    synthetic deformation and independent artifacts separate the two).
    """
    margin = 16
    big = size + 2 * margin
    _, h, w = stack.shape
    z = int(rng.integers(zs.start, zs.stop - 1))
    y0 = int(rng.integers(0, h - big + 1))
    x0 = int(rng.integers(0, w - big + 1))
    a = stack[z, y0:y0 + big, x0:x0 + big].astype(np.float32)
    zb = z if rng.random() < same_prob else z + 1
    b = stack[zb, y0:y0 + big, x0:x0 + big].astype(np.float32)
    k = int(rng.integers(0, 4))
    a, b = np.rot90(a, k), np.rot90(b, k)
    if rng.random() < 0.5:
        a, b = a[:, ::-1], b[:, ::-1]
    if rng.random() < 0.5:
        a, b = b, a  # either slice may be the fixed one
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if rng.random() < 0.8:
        field = random_smooth_field(rng, (big, big), amplitude=float(rng.uniform(0.5, max_amp)),
                                    spacing=float(rng.uniform(24, 64)))
        field += rng.uniform(-max_shift, max_shift, size=(2, 1, 1)).astype(np.float32)
        b = remap(b, field)
    a = a[margin:margin + size, margin:margin + size]
    b = b[margin:margin + size, margin:margin + size]

    def corrupt(img: np.ndarray) -> np.ndarray:
        if rng.random() >= artifact_prob:
            return img
        kinds = ([q for q in ARTIFACT_KINDS if rng.random() < 0.5]
                 or [str(rng.choice(ARTIFACT_KINDS))])
        return apply_artifacts(img, rng, strength=float(rng.uniform(0.3, 1.0)), kinds=kinds)

    return normalise_slice(corrupt(a)), normalise_slice(corrupt(b))


def make_batch(stacks: dict[str, np.ndarray], splits: dict[str, range],
               rng: np.random.Generator, *, batch: int, size: int, max_amp: float,
               max_shift: float, artifact_prob: float, same_prob: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    names = sorted(stacks)
    pairs = [make_pair(stacks[nm], splits[nm], rng, size=size, max_amp=max_amp,
                       max_shift=max_shift, artifact_prob=artifact_prob, same_prob=same_prob)
             for nm in (names[int(rng.integers(len(names)))] for _ in range(batch))]
    fixed = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
    moving = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None])
    return fixed, moving


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def load_frozen_encoder(ckpt: Path) -> torch.nn.Module:
    """The SSL encoder of a ``export.train_ssl`` checkpoint, in eval mode, no gradients."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = SslUNet(UNetConfig.from_dict(state["meta"]["config"]))
    model.load_state_dict(state["state_dict"])
    enc = model.encoder.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def encoder_levels(enc: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps at stride 1, 2 and the unit-norm stride-4 descriptors."""
    e1, e2, e3 = enc.trunk(x)
    return [e1, e2, F.normalize(enc.head(e3), dim=1)]


def deepsim_similarity(enc: torch.nn.Module, fixed: torch.Tensor, warped: torch.Tensor,
                       *, border: int = 8) -> torch.Tensor:
    """Mean over levels of the mean per-pixel cosine similarity of encoder features."""
    with torch.no_grad():
        ff = encoder_levels(enc, fixed)
    fw = encoder_levels(enc, warped)
    sims = []
    for a, b in zip(ff, fw, strict=True):
        s = max(1, fixed.shape[-1] // a.shape[-1])
        m = border // s
        cos = F.cosine_similarity(a, b, dim=1, eps=1e-6)
        sims.append(cos[:, m:cos.shape[1] - m, m:cos.shape[2] - m].mean())
    return torch.stack(sims).mean()


def local_ncc(a: torch.Tensor, b: torch.Tensor, *, win: int = 9, eps: float = 1e-5
              ) -> torch.Tensor:
    """Mean local squared NCC over ``win x win`` windows (VoxelMorph ``NCC``), in [0, 1]."""
    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, win, stride=1)

    ma, mb = box(a), box(b)
    cross = box(a * b) - ma * mb
    va = (box(a * a) - ma * ma).clamp_min(0)
    vb = (box(b * b) - mb * mb).clamp_min(0)
    return (cross * cross / (va * vb + eps)).mean()


def similarity(kind: str, enc: torch.nn.Module | None, fixed: torch.Tensor,
               warped: torch.Tensor) -> torch.Tensor:
    if kind == "deepsim":
        assert enc is not None
        return deepsim_similarity(enc, fixed, warped)
    return local_ncc(fixed[..., 8:-8, 8:-8], warped[..., 8:-8, 8:-8])


def train_step(model: FlowUNet, enc: torch.nn.Module | None, fixed: torch.Tensor,
               moving: torch.Tensor, *, loss: str, smooth: float
               ) -> tuple[torch.Tensor, dict[str, float]]:
    flow = model(torch.cat([fixed, moving], dim=1))
    warped = warp(moving, flow, padding="border")
    sim = similarity(loss, enc, fixed, warped)
    reg = smoothness(flow)
    total = -sim + smooth * reg
    return total, {"sim": sim.item(), "smooth": reg.item(),
                   "flow_mean_px": flow.norm(dim=1).mean().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.train_flow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=LOSSES, required=True)
    ap.add_argument("--encoder", type=Path, default=None,
                    help="export.train_ssl checkpoint (ssl_unet.pt); required for deepsim")
    ap.add_argument("--data", default="lucchi,isbi",
                    help="comma-separated dataset names or paths (do not train shipped weights "
                         "on drosophila: CC BY-NC-SA)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--minutes", type=float, default=11.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="crop side (multiple of 16)")
    ap.add_argument("--smooth", type=float, default=1.0, help="smoothness weight lambda")
    ap.add_argument("--int-steps", type=int, default=FlowConfig().int_steps,
                    help="scaling-and-squaring steps (0 = plain displacement)")
    ap.add_argument("--max-amp", type=float, default=4.0,
                    help="largest synthetic deformation (px)")
    ap.add_argument("--max-shift", type=float, default=2.0, help="largest synthetic shift (px)")
    ap.add_argument("--artifact-prob", type=float, default=0.3)
    ap.add_argument("--same-prob", type=float, default=0.3,
                    help="probability that the moving crop is the fixed slice itself (plus the "
                         "synthetic deformation): teaches exact recovery and a zero field on "
                         "identical content")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.crop % MULTIPLE or args.crop < 32:
        ap.error(f"--crop must be a multiple of {MULTIPLE} and >= 32")
    if args.loss == "deepsim" and args.encoder is None:
        ap.error("--loss deepsim needs --encoder CKPT")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    stacks = load_stacks(args.data)
    train_split, val_split = split_stacks(stacks, args.val_fraction)
    val_rng = np.random.default_rng(10_000 + args.seed)
    val = [make_batch(stacks, val_split, val_rng, batch=args.batch, size=args.crop,
                      max_amp=args.max_amp, max_shift=args.max_shift, artifact_prob=0.0)
           for _ in range(args.val_batches)]
    enc = load_frozen_encoder(args.encoder) if args.encoder is not None else None
    # The NCC model may log the deepsim similarity too (when an encoder is given), for reference.

    cfg = FlowConfig(int_steps=args.int_steps)
    model = FlowUNet(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "log.jsonl").open("w")

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        out: dict[str, list[float]] = {"val_ncc": [], "val_ncc_identity": [], "val_smooth": []}
        if enc is not None:
            out.update({"val_deepsim": [], "val_deepsim_identity": []})
        for fixed, moving in val:
            flow = model(torch.cat([fixed, moving], dim=1))
            warped = warp(moving, flow, padding="border")
            out["val_ncc"].append(similarity("ncc", None, fixed, warped).item())
            out["val_ncc_identity"].append(similarity("ncc", None, fixed, moving).item())
            out["val_smooth"].append(smoothness(flow).item())
            if enc is not None:
                out["val_deepsim"].append(similarity("deepsim", enc, fixed, warped).item())
                out["val_deepsim_identity"].append(
                    similarity("deepsim", enc, fixed, moving).item())
        model.train()
        return {k: float(np.mean(v)) for k, v in out.items()}

    budget = args.minutes * 60.0
    t0 = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed > budget or (args.max_steps and step >= args.max_steps):
            break
        frac = min(1.0, elapsed / budget)
        for g in opt.param_groups:
            g["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        fixed, moving = make_batch(stacks, train_split, rng, batch=args.batch, size=args.crop,
                                   max_amp=args.max_amp, max_shift=args.max_shift,
                                   artifact_prob=args.artifact_prob,
                                   same_prob=args.same_prob)
        loss, parts = train_step(model, enc if args.loss == "deepsim" else None, fixed, moving,
                                 loss=args.loss, smooth=args.smooth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            rec = {"step": step, "t_s": round(time.perf_counter() - t0, 1),
                   "loss": loss.item(), **parts}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
        if step % args.eval_every == 0:
            rec = {"step": step, "t_s": round(time.perf_counter() - t0, 1), **evaluate()}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
    train_s = time.perf_counter() - t0
    final = {"step": step, "t_s": round(train_s, 1), **evaluate()}
    print(json.dumps(final), flush=True)
    log.write(json.dumps(final) + "\n")
    log.close()
    meta = {
        "config": cfg.to_dict(),
        "loss": args.loss,
        "smooth": args.smooth,
        "normalisation": NORMALISATION,
        "data": {nm: {"slices": int(st.shape[0]),
                      "train_slices": [train_split[nm].start, train_split[nm].stop],
                      "held_out_slices": [val_split[nm].start, val_split[nm].stop]}
                 for nm, st in stacks.items()},
        "encoder": args.encoder.name if args.encoder is not None else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("out", "encoder")},
        "steps": step,
        "train_seconds": round(train_s, 1),
        "date": time.strftime("%Y-%m-%d"),
        "final": final,
    }
    torch.save({"state_dict": model.state_dict(), "meta": meta}, args.out / "flow.pt")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {args.out / 'flow.pt'} after {step} steps in {train_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
