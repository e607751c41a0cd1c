"""Self-supervised training of the artifact-invariant U-Net (see ``export/models.py``).

    python -m export.train_ssl --data lucchi,isbi --out runs/ssl --minutes 15

Each training sample is a clean crop ``A`` of a real EM slice and a second view ``B``: the
same place under a small random affine (rotation, scale, shear, shift), taken from the same
slice or (with ``--neighbour-prob``) from the neighbouring section of the already-aligned
stack. Both views get *different* random synthetic artifacts
(``deepalign_fast.qc.artifacts.apply_artifacts``). Losses:

* restoration: L1 between the decoder's output and the clean (normalised) view, for A and B;
* agreement: InfoNCE over sampled positions: the encoder feature at a point of A must be
  closer to the feature at the same tissue point of B than to the features of every other
  sampled point in the batch. This is what alignment needs: features that stay the same under
  artifacts (and from section to section) yet differ between places.

The last ``--val-fraction`` of the slices of every stack is held out for validation (and for
the feature benchmark); training never sees them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from deepalign_fast import datasets
from deepalign_fast.onnx.normalise import NORMALISATION, normalise_slice
from deepalign_fast.qc.artifacts import ARTIFACT_KINDS, apply_artifacts

from .models import STRIDE, SslUNet, UNetConfig

STACK_LOADERS = {
    "lucchi": datasets.load_lucchi,
    "isbi": datasets.load_isbi2012,
    "drosophila": datasets.load_drosophila,
}


def load_stacks(spec: str) -> dict[str, np.ndarray]:
    """``spec``: comma-separated dataset names and/or paths (a 3-D TIFF or a folder of slices)."""
    stacks: dict[str, np.ndarray] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item in STACK_LOADERS:
            stacks[item] = np.asarray(STACK_LOADERS[item]())
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in {".tif", ".tiff", ".png"})
            stacks[path.name] = np.stack([cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files])
        elif path.is_file():
            import tifffile

            stacks[path.stem] = tifffile.imread(path)
        else:
            raise SystemExit(f"--data: {item!r} is neither a dataset name "
                             f"({', '.join(STACK_LOADERS)}) nor an existing path")
    return stacks


def split_slices(n: int, val_fraction: float) -> tuple[range, range]:
    """Training slices first, the last ``val_fraction`` (at least 2 slices) held out."""
    n_val = max(2, int(math.ceil(n * val_fraction)))
    return range(0, n - n_val), range(n - n_val, n)


def split_stacks(stacks: dict[str, np.ndarray], val_fraction: float
                 ) -> tuple[dict[str, range], dict[str, range]]:
    """Train and validation slice ranges of every stack (see :func:`split_slices`)."""
    train: dict[str, range] = {}
    val: dict[str, range] = {}
    for name, st in stacks.items():
        train[name], val[name] = split_slices(st.shape[0], val_fraction)
    return train, val


@dataclass
class Sample:
    a: np.ndarray  # corrupted view A, normalised (S, S)
    b: np.ndarray
    clean_a: np.ndarray
    clean_b: np.ndarray
    a_to_b: np.ndarray  # 2x3: A pixel coords -> B pixel coords


def _random_affine(rng: np.random.Generator, centre: float, max_rot: float, max_scale: float,
                   max_shift: float) -> np.ndarray:
    """2x3 pull map (B coords -> source coords) about ``centre``."""
    rot = np.deg2rad(rng.uniform(-max_rot, max_rot))
    s = math.exp(rng.uniform(-max_scale, max_scale))
    shear = rng.uniform(-0.05, 0.05)
    lin = s * np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    lin = lin @ np.array([[1.0, shear], [0.0, 1.0]])
    t = rng.uniform(-max_shift, max_shift, 2)
    c = np.array([centre, centre])
    off = c + t - lin @ c
    return np.hstack([lin, off[:, None]])


def make_sample(stack: np.ndarray, zs: range, rng: np.random.Generator, *, size: int,
                neighbour_prob: float, artifact_prob: float) -> Sample:
    margin = size // 4
    big = size + 2 * margin
    n, h, w = stack.shape
    z = int(rng.choice(list(zs)))
    zb = z
    if rng.random() < neighbour_prob and len(zs) > 1:
        cand = [q for q in (z - 1, z + 1) if q in zs]
        zb = int(rng.choice(cand))
    y0 = int(rng.integers(0, h - big + 1))
    x0 = int(rng.integers(0, w - big + 1))
    src_a = stack[z, y0:y0 + big, x0:x0 + big].astype(np.float32)
    src_b = stack[zb, y0:y0 + big, x0:x0 + big].astype(np.float32)
    k = int(rng.integers(0, 4))
    flip = bool(rng.random() < 0.5)
    src_a, src_b = (np.rot90(s, k) for s in (src_a, src_b))
    if flip:
        src_a, src_b = src_a[:, ::-1], src_b[:, ::-1]
    src_a, src_b = np.ascontiguousarray(src_a), np.ascontiguousarray(src_b)
    clean_a = src_a[margin:margin + size, margin:margin + size]
    # B pixel (u) samples source pixel pull(u); A pixel p is source pixel p + margin.
    pull = _random_affine(rng, (big - 1) / 2.0, 12.0, 0.1, margin / 3.0)
    pull_b = pull.copy()
    pull_b[:, 2] = pull[:, :2] @ np.array([margin, margin], float) + pull[:, 2] - 0.0
    # pull_b maps B coords (0..size) to source coords: B pixel u = big-frame pixel u + margin.
    clean_b = cv2.warpAffine(src_b, pull_b, (size, size),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)
    full = np.vstack([pull_b, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2]
    a_to_b = inv.copy()
    a_to_b[:, 2] = inv[:, :2] @ np.array([margin, margin], float) + inv[:, 2]

    def corrupt(img: np.ndarray) -> np.ndarray:
        if rng.random() > artifact_prob:
            return img
        kinds = ([k for k in ARTIFACT_KINDS if rng.random() < 0.6]
                 or [str(rng.choice(ARTIFACT_KINDS))])
        return apply_artifacts(img, rng, strength=float(rng.uniform(0.3, 1.3)), kinds=kinds)

    return Sample(normalise_slice(corrupt(clean_a)), normalise_slice(corrupt(clean_b)),
                  normalise_slice(clean_a), normalise_slice(clean_b), a_to_b)


def make_batch(stacks: dict[str, np.ndarray], splits: dict[str, range], rng: np.random.Generator,
               *, batch: int, size: int, neighbour_prob: float,
               artifact_prob: float) -> dict[str, torch.Tensor]:
    names = sorted(stacks)
    samples = [make_sample(stacks[nm], splits[nm], rng, size=size, neighbour_prob=neighbour_prob,
                           artifact_prob=artifact_prob)
               for nm in (names[int(rng.integers(len(names)))] for _ in range(batch))]

    def t(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(s, key) for s in samples])[:, None])

    return {"a": t("a"), "b": t("b"), "clean_a": t("clean_a"), "clean_b": t("clean_b"),
            "a_to_b": torch.from_numpy(np.stack([s.a_to_b for s in samples]))}


def sample_features(feats: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear features at pixel points ``pts`` (N, P, 2) (x, y) -> (N, P, C), renormalised."""
    _, _, hf, wf = feats.shape
    u = (pts[..., 0] - (STRIDE - 1) / 2.0) / STRIDE  # feature-grid coordinate of a pixel
    v = (pts[..., 1] - (STRIDE - 1) / 2.0) / STRIDE
    grid = torch.stack([(2 * u + 1) / wf - 1, (2 * v + 1) / hf - 1], dim=-1)[:, :, None]
    out = F.grid_sample(feats, grid.to(feats.dtype), mode="bilinear", align_corners=False)
    return F.normalize(out[..., 0].permute(0, 2, 1), dim=-1)


def correspondences(a_to_b: torch.Tensor, size: int, n_points: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random points of A, their images in B, and a mask of those that land inside B."""
    n = a_to_b.shape[0]
    border = 8.0
    u = torch.rand((n, n_points, 2), generator=gen, dtype=torch.float64)
    pa = border + u * (size - 1 - 2 * border)
    pb = pa @ a_to_b[:, :, :2].transpose(1, 2) + a_to_b[:, None, :, 2]
    ok = ((pb >= border) & (pb <= size - 1 - border)).all(dim=-1)
    return pa.float(), pb.float(), ok


def info_nce(fa: torch.Tensor, fb: torch.Tensor, ok: torch.Tensor,
             tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over all valid points of the batch; returns (loss, top-1 accuracy)."""
    a = fa[ok]
    b = fb[ok]
    logits = a @ b.t() / tau
    target = torch.arange(a.shape[0])
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    acc = (logits.argmax(dim=1) == target).float().mean()
    return loss, acc


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the clean crop's own min..max as data range, averaged over crops."""
    vals = []
    for xi, ri in zip(x, ref, strict=False):
        rng_ = float(ri.max() - ri.min()) or 1.0
        mse = float(((xi - ri) ** 2).mean())
        vals.append(10 * math.log10(rng_ * rng_ / max(mse, 1e-12)))
    return float(np.mean(vals))


@torch.no_grad()
def evaluate(model: SslUNet, val: list[dict[str, torch.Tensor]], *, size: int, n_points: int,
             tau: float) -> dict[str, float]:
    model.eval()
    gen = torch.Generator().manual_seed(99)
    ps, ps_in, cos_pos, cos_neg, accs, losses = [], [], [], [], [], []
    for b in val:
        ra, fa = model(b["a"])
        _, fb = model(b["b"])
        ps.append(psnr(ra, b["clean_a"]))
        ps_in.append(psnr(b["a"], b["clean_a"]))
        pa, pb, ok = correspondences(b["a_to_b"], size, n_points, gen)
        sa, sb = sample_features(fa, pa), sample_features(fb, pb)
        # Retrieval within one image: the hard case alignment faces (same-slice negatives).
        for i in range(sa.shape[0]):
            m = ok[i]
            if m.sum() < 2:
                continue
            sim = sa[i][m] @ sb[i][m].t()
            accs.append(float((sim.argmax(1) == torch.arange(sim.shape[0])).float().mean()))
            cos_pos.append(float(sim.diag().mean()))
            off = sim[~torch.eye(sim.shape[0], dtype=torch.bool)]
            cos_neg.append(float(off.mean()))
        loss, _ = info_nce(sa, sb, ok, tau)
        losses.append(loss.item())
    model.train()
    return {
        "val_psnr_restored_db": float(np.mean(ps)),
        "val_psnr_corrupted_db": float(np.mean(ps_in)),
        "val_cos_same_place": float(np.mean(cos_pos)),
        "val_cos_other_place": float(np.mean(cos_neg)),
        "val_top1_within_crop": float(np.mean(accs)),
        "val_nce": float(np.mean(losses)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.train_ssl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="lucchi,isbi",
                    help="comma-separated dataset names (lucchi, isbi, drosophila) or paths; "
                         "the default leaves out drosophila (CC BY-NC-SA: shipped weights must "
                         "not derive from it)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (checkpoint, log)")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="stop after this many steps (0 = none)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="crop side (multiple of 4)")
    ap.add_argument("--points", type=int, default=48, help="sampled positions per crop (InfoNCE)")
    ap.add_argument("--tau", type=float, default=0.1, help="InfoNCE temperature")
    ap.add_argument("--nce-weight", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--neighbour-prob", type=float, default=0.5,
                    help="probability that view B comes from the neighbouring section")
    ap.add_argument("--artifact-prob", type=float, default=0.9)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.crop % STRIDE or args.crop < 64:
        ap.error("--crop must be a multiple of 4 and >= 64")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    stacks = load_stacks(args.data)
    train_split, val_split = split_stacks(stacks, args.val_fraction)
    val_rng = np.random.default_rng(10_000 + args.seed)
    val = [make_batch(stacks, val_split, val_rng, batch=args.batch, size=args.crop,
                      neighbour_prob=args.neighbour_prob, artifact_prob=1.0)
           for _ in range(args.val_batches)]

    cfg = UNetConfig()
    model = SslUNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.jsonl"
    log = log_path.open("w")
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    t0 = time.perf_counter()
    step = 0
    history: list[dict[str, float]] = []
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed > budget or (args.max_steps and step >= args.max_steps):
            break
        # Cosine decay over the time budget (the number of steps is not known in advance).
        frac = min(1.0, elapsed / budget)
        for g in opt.param_groups:
            g["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        b = make_batch(stacks, train_split, rng, batch=args.batch, size=args.crop,
                       neighbour_prob=args.neighbour_prob, artifact_prob=args.artifact_prob)
        x = torch.cat([b["a"], b["b"]])
        restored, feats = model(x)
        n = b["a"].shape[0]
        rec = F.l1_loss(restored, torch.cat([b["clean_a"], b["clean_b"]]))
        pa, pb, ok = correspondences(b["a_to_b"], args.crop, args.points, gen)
        nce, acc = info_nce(sample_features(feats[:n], pa), sample_features(feats[n:], pb), ok,
                            args.tau)
        loss = rec + args.nce_weight * nce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            rec_ = {"step": step, "t_s": round(time.perf_counter() - t0, 1), "loss": loss.item(),
                    "rec": rec.item(), "nce": nce.item(), "acc": acc.item()}
            print(json.dumps(rec_), flush=True)
            log.write(json.dumps(rec_) + "\n")
        if step % args.eval_every == 0:
            m = {"step": step, "t_s": round(time.perf_counter() - t0, 1),
                 **evaluate(model, val, size=args.crop, n_points=args.points, tau=args.tau)}
            print(json.dumps(m), flush=True)
            log.write(json.dumps(m) + "\n")
            history.append(m)
    train_s = time.perf_counter() - t0
    final = {"step": step, "t_s": round(train_s, 1),
             **evaluate(model, val, size=args.crop, n_points=args.points, tau=args.tau)}
    print(json.dumps(final), flush=True)
    log.write(json.dumps(final) + "\n")
    log.close()
    meta = {
        "config": cfg.to_dict(),
        "normalisation": NORMALISATION,
        "stride": STRIDE,
        "data": {nm: {"shape": list(st.shape), "train_slices": [train_split[nm].start,
                                                              train_split[nm].stop],
                      "val_slices": [val_split[nm].start, val_split[nm].stop]}
                 for nm, st in stacks.items()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_seconds": round(train_s, 1),
        "steps": step,
        "final_metrics": final,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    torch.save({"state_dict": model.state_dict(), "meta": meta}, args.out / "ssl_unet.pt")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"saved {args.out / 'ssl_unet.pt'} after {step} steps in {train_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
