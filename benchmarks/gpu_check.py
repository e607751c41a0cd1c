"""One-shot GPU check: the learned encoder, the flow network and ``align`` on onnxruntime's
CUDA and TensorRT providers, against the CPU provider.

On a GPU machine run it through ``benchmarks/gpu_check.sh``, which installs onnxruntime-gpu in
a venv of its own (never beside the CPU ``onnxruntime``), runs
``tests/python/onnx/test_gpu_parity.py`` and then this module. On a CPU machine the same
code runs as a dry run of every step:

    PYTHONPATH=python:. python -m benchmarks.gpu_check --providers cpu --quick --out OUT_DIR

Steps, in order of importance (a failing step is recorded and the next one runs; steps that
would start after ``--budget-s`` seconds are listed as skipped):

1. ``device``: GPU name, driver and CUDA version (nvidia-smi), onnxruntime version, file,
   installed distributions and providers, TensorRT version.
2. ``providers``: each requested provider opens the encoder through the package
   (``onnx_session.create_session``) and runs it once; it counts as active only if onnxruntime
   then reports it first. onnxruntime silently falls back to the CPU when the CUDA, cuDNN or
   TensorRT libraries do not load, so "listed" is not "used". Later steps use active ones only.
3. ``parity``: ``LearnedExtractor.feature_map`` and ``FlowPredictor.predict`` on a real
   FIB-SEM pair (bundled sample, mirrored up to ``--parity-size``; tiled code paths) on each
   provider against the CPU provider, judged by :data:`TOLERANCES` (fp32).
4. ``encoder``: encoder throughput alone (Mpx/s of input, batches of ``--batch`` tiles of
   ``--tile`` px): host I/O (numpy in, numpy out, as the package runs it) and device I/O
   (onnxruntime I/O binding: inputs and outputs stay on the GPU, the compute ceiling); fp32,
   and fp16 (CUDA: the model converted to fp16 inside, fp32 I/O; TensorRT: ``trt_fp16_enable``),
   each with its parity against the CPU output (fp16 tolerances).
5. ``bench``: ``deepalign-fast bench`` (``deepalign_fast.qc.bench.run_bench``) for
   ``--features blocks learned`` x the active providers on one synthetic ``--slices`` x
   ``--size``^2 stack: slices/s, Mpx/s, seconds per stage, peak host memory, plus peak device
   memory sampled with nvidia-smi.
6. ``elastic``: ``align --mode elastic`` (flow network on the provider) per active provider on
   an ``--elastic-slices`` stack: slices/s, Mpx/s, stages, host and device memory.

Writes ``gpu_check.json`` (after every step, so a run cut short keeps what it measured) and
``gpu_check.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tifffile
from deepalign_fast.datasets import sample_stack_path
from deepalign_fast.match.learned import LearnedExtractor, default_model_path, normalise_slice
from deepalign_fast.onnx.session import PROVIDERS, create_session
from deepalign_fast.qc.bench import make_synthetic_stack, run_bench
from deepalign_fast.refine.flow import FlowPredictor

from benchmarks._timing import markdown_table, measure, metadata

#: Parity of a GPU run against the CPU provider (fp32 reference). ``feat_*``: the encoder's
#: unit-length 64-dim feature vectors (largest absolute difference of one component, smallest
#: cosine of one vector pair); ``flow_*``: the flow field in pixels (largest and mean absolute
#: difference). fp32 allows for TF32 convolutions (CUDA and TensorRT use them by default on
#: Ampere and later: 10-bit mantissa products); the 1 px alignment target is 20x the flow bound.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"feat_max_abs": 1e-2, "feat_min_cos": 0.999, "flow_max_px": 0.05,
             "flow_mean_px": 0.005},
    "fp16": {"feat_max_abs": 5e-2, "feat_min_cos": 0.99, "flow_max_px": 0.25,
             "flow_mean_px": 0.02},
}

#: What issue 16 aims for on an H100: the encoder alone, and end-to-end learned alignment.
AIMS_MPX_S = {"encoder": 1000.0, "align_learned": 100.0}

_CHECK_ORDER = ("cuda", "tensorrt", "cpu")


# -- parity -----------------------------------------------------------------------------------
def feature_parity(ref: np.ndarray, got: np.ndarray, axis: int = -1) -> dict[str, float]:
    """Largest absolute difference and smallest cosine between feature vectors along ``axis``."""
    a = np.asarray(ref, np.float64)
    b = np.asarray(got, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"feature maps differ in shape: {a.shape} vs {b.shape}")
    cos = (a * b).sum(axis) / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
                               + 1e-12)
    return {"feat_max_abs": float(np.abs(a - b).max()), "feat_min_cos": float(cos.min())}


def flow_parity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Largest and mean absolute difference (pixels) of two displacement fields."""
    a = np.asarray(ref, np.float64)
    b = np.asarray(got, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"flow fields differ in shape: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    return {"flow_max_px": float(d.max()), "flow_mean_px": float(d.mean())}


def within(measured: dict[str, float], precision: str = "fp32") -> bool:
    """Whether every measured parity figure is inside :data:`TOLERANCES` (``*_min_*`` are
    lower bounds, the rest upper bounds)."""
    tol = TOLERANCES[precision]
    return all((v >= tol[k]) if "_min_" in k else (v <= tol[k])
               for k, v in measured.items() if k in tol)


def sample_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two neighbouring real FIB-SEM slices (the bundled sample), mirrored up to size x size."""
    stack = tifffile.imread(sample_stack_path())
    h, w = stack.shape[1:]

    def grow(s: np.ndarray) -> np.ndarray:
        return np.pad(s, ((0, max(0, size - h)), (0, max(0, size - w))), mode="symmetric")[
            :size, :size]

    return grow(stack[0]), grow(stack[1])


def active_providers(provider: str) -> list[str]:
    """onnxruntime's providers in use after opening the encoder for ``provider`` through the
    package and running it once (the first must be the one asked for)."""
    sess = create_session(default_model_path(), provider=provider)
    sess.run(None, {"image": np.zeros((1, 1, 64, 64), np.float32)})
    return list(sess.get_providers())


# -- device -----------------------------------------------------------------------------------
def _smi(*args: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else None


def device_info() -> dict[str, Any]:
    """GPU, driver, CUDA, onnxruntime and TensorRT versions as this process sees them."""
    info: dict[str, Any] = {"onnxruntime": ort.__version__,
                            "onnxruntime_file": ort.__file__,
                            "onnxruntime_device": ort.get_device(),
                            "available_providers": ort.get_available_providers()}
    dists = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            dists[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["onnxruntime_distributions"] = dists
    query = _smi("-i", "0", "--query-gpu=name,driver_version,memory.total",
                 "--format=csv,noheader")
    if query:
        name, driver, mem = (s.strip() for s in query.splitlines()[0].split(","))
        info.update(gpu=name, driver=driver, gpu_memory=mem)
    header = _smi() or ""
    m = re.search(r"CUDA Version:\s*([\d.]+)", header)
    info["cuda_driver_api"] = m.group(1) if m else None
    try:
        import tensorrt

        info["tensorrt"] = str(tensorrt.__version__)
    except ImportError:
        info["tensorrt"] = None
    return info


class GpuMemory:
    """Peak device memory in use (MiB, GPU 0, nvidia-smi every 100 ms) above the level at
    entry while the ``with`` block runs; ``peak_mb`` is None without nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._samples: list[float] = []
        self._base = 0.0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemory:
        base = _smi("-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits")
        if base is None:
            return self
        self._base = float(base.splitlines()[0])
        self._proc = subprocess.Popen(
            ["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
             "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self._samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._samples:
            self.peak_mb = max(self._samples) - self._base


# -- encoder throughput -----------------------------------------------------------------------
def _ort_session(model: Path, provider: str, precision: str, cache: Path,
                 threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    chain: list[Any] = list(PROVIDERS[provider])
    if provider == "tensorrt":
        chain[0] = ("TensorrtExecutionProvider",
                    {"trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
                     "trt_engine_cache_path": str(cache)})
    return ort.InferenceSession(str(model), sess_options=opts, providers=chain)


def fp16_model(src: Path, dst: Path) -> Path:
    """The ONNX model with fp16 weights and arithmetic inside, fp32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def encoder_tiles(batch: int, tile: int) -> np.ndarray:
    """``(batch, 1, tile, tile)`` normalised real EM tiles (the encoder's input)."""
    a, b = sample_pair(tile + 8 * batch)
    tiles = [normalise_slice(a if i % 2 == 0 else b)[8 * i:8 * i + tile, 8 * i:8 * i + tile]
             for i in range(batch)]
    return np.ascontiguousarray(np.stack(tiles)[:, None], np.float32)


def encoder_throughput(provider: str, precision: str, io: str, x: np.ndarray, ref: np.ndarray,
                       tmp: Path, *, threads: int, repeats: int) -> dict[str, Any]:
    """Time the encoder on ``x``; ``io="host"``: numpy in/out, ``"device"``: I/O binding on
    the provider's device. Returns Mpx/s of input and parity against ``ref`` (CPU fp32)."""
    model = default_model_path()
    if precision == "fp16" and provider != "tensorrt":
        model = fp16_model(model, tmp / "ssl_encoder_fp16.onnx")
    t0 = time.perf_counter()
    sess = _ort_session(model, provider, precision, tmp / "trt_cache", threads)
    out_name = sess.get_outputs()[0].name
    if io == "host":
        def step() -> Any:
            return sess.run([out_name], {"image": x})[0]
        first = step()
    else:
        dev = "cpu" if provider == "cpu" else "cuda"
        binding = sess.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(x, dev, 0))
        binding.bind_output(out_name, dev)

        def step() -> Any:
            sess.run_with_iobinding(binding)

        step()
        first = binding.copy_outputs_to_cpu()[0]
    setup_s = time.perf_counter() - t0
    used = sess.get_providers()
    if used[0] != PROVIDERS[provider][0]:
        raise RuntimeError(f"{provider}: onnxruntime fell back to {used}")
    t = measure(step, repeats=repeats, warmup=2)
    mpx = x.shape[0] * x.shape[2] * x.shape[3] / 1e6
    par = feature_parity(ref, first, axis=1)
    return {"provider": provider, "precision": precision, "io": io,
            "input": "x".join(map(str, x.shape)), "setup_s": setup_s,
            "median_ms": t.median_s * 1e3, "iqr_ms": t.iqr_s * 1e3, "repeats": t.repeats,
            "mpx_per_s": mpx / t.median_s, **par, "parity_ok": within(par, precision)}


# -- align runs -------------------------------------------------------------------------------
def elastic_run(stack: Path, provider: str, tmp: Path, threads: int) -> dict[str, Any]:
    """``align --mode elastic`` in a fresh process; slices/s, Mpx/s, stages, memory."""
    out = tmp / f"elastic-{provider}.tif"
    cmd = [sys.executable, "-m", "deepalign_fast", "align", str(stack), "-o", str(out),
           "--mode", "elastic", "--features", "blocks", "--provider", provider,
           "--threads", str(threads), "--json", "--quiet"]
    with GpuMemory() as mem:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"elastic align on {provider} failed: {proc.stderr.strip()[-2000:]}")
    s = json.loads(proc.stdout)
    with tifffile.TiffFile(stack) as tf:
        n = len(tf.pages)
        h, w = tf.pages[0].shape[:2]
    for p in out.parent.glob(out.stem + "*"):  # the output and its transforms file
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return {"mode": "elastic", "features": "blocks", "provider": provider, "slices": n,
            "shape": f"{h}x{w}",
            "time_s": s["time_s"], "slices_per_s": n / s["time_s"],
            "mpx_per_s": n * h * w / 1e6 / s["time_s"],
            "peak_memory_mb": s.get("peak_memory_mb"), "gpu_mem_peak_mb": mem.peak_mb,
            **{f"{k}_s": v for k, v in s["timings_s"].items() if k != "total"}}


# -- driver -----------------------------------------------------------------------------------
class Check:
    """Runs the steps in order within a time budget; saves the JSON after every step."""

    def __init__(self, out: Path, budget_s: float, argv: list[str]) -> None:
        self.out = out
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "command": "python -m benchmarks.gpu_check " + " ".join(argv),
            "meta": metadata(), "tolerances": TOLERANCES, "aims_mpx_per_s": AIMS_MPX_S,
            "device": {}, "providers": {}, "parity": [], "encoder": [], "bench": [],
            "elastic": [], "errors": {}, "skipped": [], "step_s": {}}

    def step(self, name: str, fn: Callable[[], Any], into: str | None = None) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.budget_s:
            self.data["skipped"].append(name)
            print(f"[gpu_check] skip {name}: {elapsed:.0f} s > budget {self.budget_s:.0f} s",
                  flush=True)
            return
        print(f"[gpu_check] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            result = fn()
            if into is not None:
                self.data[into].append(result)
        except Exception as exc:  # a failed step is a result; the next step still runs
            self.data["errors"][name] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            print(f"[gpu_check] {name} FAILED: {self.data['errors'][name]}", flush=True)
        self.data["step_s"][name] = round(time.perf_counter() - t, 2)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(report_markdown(self.data))


def report_markdown(d: dict[str, Any]) -> str:
    """The JSON's numbers as markdown tables."""
    dev = d["device"]
    lines = ["# GPU check", "", f"Command: `{d['command']}`", "",
             f"Device: {dev.get('gpu', 'no GPU (nvidia-smi absent)')}, driver "
             f"{dev.get('driver')}, CUDA {dev.get('cuda_driver_api')}; onnxruntime "
             f"{dev.get('onnxruntime')} ({dev.get('onnxruntime_distributions')}), TensorRT "
             f"{dev.get('tensorrt')}; {d['meta'].get('cpu_count')} CPU cores.", ""]
    prov = d["providers"]
    if prov:
        lines += ["| provider | active | onnxruntime providers in use |", "|---|---|---|"]
        lines += [f"| {p} | {v['active']} | {v.get('used') or v.get('error')} |"
                  for p, v in prov.items()]
        lines.append("")
    if d["parity"]:
        lines += ["Parity against the CPU provider (fp32 tolerances: features max |d| <= "
                  f"{TOLERANCES['fp32']['feat_max_abs']}, min cos >= "
                  f"{TOLERANCES['fp32']['feat_min_cos']}; flow max |d| <= "
                  f"{TOLERANCES['fp32']['flow_max_px']} px, mean <= "
                  f"{TOLERANCES['fp32']['flow_mean_px']} px):", "",
                  markdown_table(d["parity"], ["model", "provider", "size", "feat_max_abs",
                                               "feat_min_cos", "flow_max_px", "flow_mean_px",
                                               "ok"]), ""]
    if d["encoder"]:
        lines += ["Encoder alone (Mpx/s of input; device I/O = inputs/outputs kept on the GPU):",
                  "", markdown_table(d["encoder"], ["provider", "precision", "io", "input",
                                                    "median_ms", "mpx_per_s", "setup_s",
                                                    "feat_max_abs", "feat_min_cos",
                                                    "parity_ok"]), ""]
    runs = d["bench"] + d["elastic"]
    if runs:
        lines += ["`align` throughput (per-stage seconds are summed over the threads that ran "
                  "them, so they overlap):", "",
                  markdown_table(runs, ["mode", "features", "provider", "slices", "shape",
                                        "slices_per_s", "mpx_per_s", "features_s", "match_s",
                                        "solve_s", "render_s", "write_s", "peak_memory_mb",
                                        "gpu_mem_peak_mb"]), ""]
    enc = [r["mpx_per_s"] for r in d["encoder"] if r["provider"] != "cpu" and r["parity_ok"]]
    aln = [r["mpx_per_s"] for r in d["bench"]
           if r.get("features") == "learned" and r["provider"] != "cpu"]
    lines.append(f"Aims: encoder >= {AIMS_MPX_S['encoder']:.0f} Mpx/s (best GPU: "
                 f"{max(enc) if enc else float('nan'):.0f}); align --features learned >= "
                 f"{AIMS_MPX_S['align_learned']:.0f} Mpx/s (best GPU: "
                 f"{max(aln) if aln else float('nan'):.1f}).")
    if d["errors"]:
        lines += ["", "Errors:", ""] + [f"- {k}: {v.splitlines()[0][:300]}"
                                        for k, v in d["errors"].items()]
    if d["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(d['skipped'])}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--providers", nargs="+", choices=("cpu", "cuda", "tensorrt"),
                    default=["cpu", "cuda", "tensorrt"])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (dry run on a CPU machine)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="start no step after this many seconds")
    ap.add_argument("--size", type=int, default=2048, help="bench/elastic slice size")
    ap.add_argument("--slices", type=int, default=8, help="bench stack depth")
    ap.add_argument("--elastic-slices", type=int, default=6)
    ap.add_argument("--parity-size", type=int, default=1280)
    ap.add_argument("--tile", type=int, default=1024, help="encoder throughput tile")
    ap.add_argument("--batch", type=int, default=4, help="encoder throughput batch")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all cores")
    args = ap.parse_args(args_list)
    if args.quick:
        args.size, args.slices, args.elastic_slices = 256, 3, 3
        args.parity_size, args.tile, args.batch, args.repeats = 320, 256, 2, 3

    chk = Check(args.out, args.budget_s, args_list)
    d = chk.data
    chk.step("device", lambda: d["device"].update(device_info()))
    requested = [p for p in _CHECK_ORDER if p in args.providers]

    def check_provider(p: str) -> None:
        try:
            used = active_providers(p)
            d["providers"][p] = {"active": used[0] == PROVIDERS[p][0], "used": used}
        except Exception as exc:
            d["providers"][p] = {"active": False, "error": f"{type(exc).__name__}: {exc}"}

    for p in requested:
        chk.step(f"providers/{p}", partial(check_provider, p))
    active = [p for p in requested if d["providers"].get(p, {}).get("active")]
    # The reference is the CPU provider; a CPU-only dry run compares it with itself.
    gpus = [p for p in active if p != "cpu"] or (["cpu"] if "cpu" in active else [])

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_s:
        tmp = Path(tmp_s)
        fixed, moving = sample_pair(args.parity_size)
        ref: dict[str, np.ndarray] = {}

        def parity(model: str, p: str) -> dict[str, Any]:
            if model == "encoder":
                if "encoder" not in ref:
                    ref["encoder"] = LearnedExtractor(provider="cpu").feature_map(fixed)
                m = feature_parity(ref["encoder"], LearnedExtractor(provider=p)
                                   .feature_map(fixed))
            else:
                if "flow" not in ref:
                    ref["flow"] = FlowPredictor(provider="cpu").predict(fixed, moving)
                m = flow_parity(ref["flow"], FlowPredictor(provider=p).predict(fixed, moving))
            return {"model": model, "provider": p, "size": f"{args.parity_size}^2", **m,
                    "ok": within(m, "fp32")}

        for p in gpus:
            for model in ("encoder", "flow"):
                chk.step(f"parity/{model}/{p}", partial(parity, model, p), "parity")

        x = encoder_tiles(args.batch, args.tile)
        enc_ref: dict[str, np.ndarray] = {}

        def enc(p: str, precision: str, io: str) -> dict[str, Any]:
            if "ref" not in enc_ref:
                s = create_session(default_model_path(), provider="cpu")
                enc_ref["ref"] = s.run(None, {"image": x})[0]
            return encoder_throughput(p, precision, io, x, enc_ref["ref"], tmp,
                                      threads=args.threads, repeats=args.repeats)

        variants = [(p, prec, io) for p in active
                    for prec, io in (("fp32", "host"), ("fp32", "device"), ("fp16", "device"))
                    if p != "cpu" or prec == "fp32" or args.quick]
        for p, prec, io in variants:
            chk.step(f"encoder/{p}/{prec}/{io}", partial(enc, p, prec, io), "encoder")

        stack = make_synthetic_stack(tmp / "bench.tif", slices=args.slices, size=args.size)
        estack = make_synthetic_stack(tmp / "elastic.tif", slices=args.elastic_slices,
                                      size=args.size, seed=1)

        def bench(feat: str, p: str) -> dict[str, Any]:
            with GpuMemory() as mem:
                row = run_bench(stack, features=(feat,), providers=(p,),
                                threads=args.threads)[0]
            return {"mode": "affine", **row, "gpu_mem_peak_mb": mem.peak_mb}

        # Most informative first: the GPU runs, then their CPU baselines, TensorRT last (its
        # engine builds are slow and it is optional).
        runs: list[tuple[str, str, str]] = []
        for p in [q for q in ("cuda", "cpu", "tensorrt") if q in active]:
            if p == "cpu":
                runs += [("bench", "blocks", "cpu"), ("bench", "learned", "cpu")]
            else:
                runs += [("bench", "learned", p)]
            runs.append(("elastic", "blocks", p))
        for kind, feat, p in runs:
            if kind == "bench":
                chk.step(f"bench/{feat}/{p}", partial(bench, feat, p), "bench")
            else:
                chk.step(f"elastic/{p}", partial(elastic_run, estack, p, tmp, args.threads),
                         "elastic")
    chk.save()
    print((args.out / "gpu_check.md").read_text(), flush=True)
    return 1 if d["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
