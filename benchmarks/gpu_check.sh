#!/usr/bin/env bash
# The GPU check in one call: install the package and onnxruntime-gpu in a venv of its own,
# verify the execution providers, run the GPU parity tests, then benchmarks/gpu_check.py
# (parity, encoder throughput, `deepalign-fast bench`, elastic align). Results under $OUT:
# gpu_check.json, gpu_check.md, gpu_check.log and parity_junit.xml.
#
#   [WHEELS=dir] [VENV=dir] [OUT=dir] bash benchmarks/gpu_check.sh [gpu_check.py options]
#
# WHEELS       folder to install from offline (pip --no-index --find-links): onnxruntime_gpu-*.whl
#              and, where the machine lacks them, deepalign_fast-*.whl, runtime dependencies,
#              tensorrt*.whl. Unset: the package index.
# VENV         venv to use (default build/gpu-venv); created when absent. One that already offers
#              CUDAExecutionProvider and imports deepalign_fast is used as it is.
# SYSTEM_SITE  1 (default): the venv also sees the system's site-packages (numpy, OpenCV, the
#              nvidia-* CUDA/cuDNN wheels of an installed PyTorch). A CPU onnxruntime there is
#              shadowed by the venv's onnxruntime-gpu; the script checks that it is. 0: isolated.
# ORT_GPU      requirement for onnxruntime-gpu (default "onnxruntime-gpu[cuda,cudnn]": the CUDA
#              13 build; CUDA 12 machines: "onnxruntime-gpu[cuda,cudnn]>=1.21,<1.27").
# TRT_REQ      requirement for TensorRT 10 (e.g. "tensorrt-cu13>=10,<11"); unset: not installed.
# PYTHON       interpreter for a new venv (default python3). CHECK_TIMEOUT: hard limit in seconds
#              for gpu_check.py (default 300; its own --budget-s, default 240, stops new steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_check}"
VENV="${VENV:-build/gpu-venv}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
t0=$SECONDS
say() { echo "[gpu_check.sh $((SECONDS - t0)) s] $*"; }

nvidia-smi || say "nvidia-smi not found: no NVIDIA driver here"

if [ ! -x "$VENV/bin/python" ]; then
  site=()
  if [ "${SYSTEM_SITE:-1}" = 1 ]; then site=(--system-site-packages); fi
  say "creating venv $VENV ${site[*]+${site[*]}}"
  "${PYTHON:-python3}" -m venv ${site[@]+"${site[@]}"} "$VENV" ||
    "${PYTHON:-python3}" -m venv --without-pip ${site[@]+"${site[@]}"} "$VENV"
  if [ "${SYSTEM_SITE:-1}" = 1 ]; then
    # --system-site-packages reaches the base interpreter's packages only. Where PYTHON is itself
    # a venv (e.g. the one holding PyTorch and its CUDA wheels), a .pth file appends its
    # site-packages after the new venv's own, so packages installed here still come first.
    parent=$("${PYTHON:-python3}" -c "import sys, sysconfig
if sys.prefix != sys.base_prefix:
    print(sysconfig.get_paths()['purelib']); print(sysconfig.get_paths()['platlib'])")
    if [ -n "$parent" ]; then
      own=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      printf '%s\n' "$parent" | sort -u > "$own/zz_parent_venv.pth"
      say "the venv also sees $(tr '\n' ' ' < "$own/zz_parent_venv.pth")"
    fi
  fi
fi
PY="$VENV/bin/python"
pip=("$PY" -m pip)  # a venv made without pip is served by PYTHON's pip
"$PY" -m pip --version >/dev/null 2>&1 || pip=("${PYTHON:-python3}" -m pip --python "$PY")
pip_install() {
  if [ -n "${WHEELS:-}" ]; then
    "${pip[@]}" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "$@"
  else
    "${pip[@]}" install -q --disable-pip-version-check "$@"
  fi
}

# 1. The package (its C++ core is built here unless a matching wheel is given).
if ! "$PY" -c "import deepalign_fast._core" 2>/dev/null; then
  whl=$(ls "${WHEELS:-.}"/deepalign_fast-*.whl 2>/dev/null | head -n 1 || true)
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  if [ -n "$whl" ] && pip_install --no-deps "$whl"; then
    say "installed $whl"
  elif "$PY" -c "import scikit_build_core, pybind11" 2>/dev/null; then
    say "building the package"
    "${pip[@]}" install -q --disable-pip-version-check --no-deps --no-build-isolation .
  else
    say "building the package (build requirements from the index)"
    pip_install --no-deps .
  fi
fi

# 2. Its runtime dependencies that are missing, except onnxruntime (the GPU build comes next).
missing=$("$PY" - <<'EOF'
import importlib.util
import re

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
module = {"opencv-contrib-python-headless": "cv2"}
for dep in deps + ["pytest", "onnx"]:  # onnx: the fp16 encoder variant
    name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]
    if name != "onnxruntime" and importlib.util.find_spec(
            module.get(name, name.replace("-", "_"))) is None:
        print(dep)
EOF
)
if [ -n "$missing" ]; then
  say "installing missing dependencies: $missing"
  # shellcheck disable=SC2086
  pip_install $missing || say "some did not install; the check may not need them"
fi

# 3. onnxruntime-gpu, never beside the CPU onnxruntime: both install the same onnxruntime/ folder.
if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  "${pip[@]}" uninstall -y -q onnxruntime 2>/dev/null || true  # only this venv's copy
  req="${ORT_GPU:-onnxruntime-gpu[cuda,cudnn]}"
  say "installing $req"
  # Offline, the CUDA/cuDNN wheels may be the machine's own (e.g. PyTorch's) at other pins.
  pip_install "$req" || { [ -n "${WHEELS:-}" ] && pip_install --no-deps "${req%%\[*}"; }
fi
if [ -n "${TRT_REQ:-}" ]; then
  say "installing $TRT_REQ"
  pip_install "$TRT_REQ" || say "TensorRT did not install; the check runs without it"
fi

# 4. CUDA, cuDNN and TensorRT libraries from pip wheels on the library path (onnxruntime's
#    provider libraries have no RUNPATH; the bench and align subprocesses need it too).
libs=$("$PY" - <<'EOF'
import glob
import os
import sys

dirs = [d for p in sys.path for pat in ("nvidia/*/lib", "tensorrt_libs")
        for d in glob.glob(os.path.join(p, pat)) if os.path.isdir(d)]
print(":".join(dict.fromkeys(dirs)))
EOF
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

"$PY" - <<'EOF'
import importlib.metadata as md
import os
import sys
import sysconfig

import onnxruntime as ort

site = sysconfig.get_paths()["purelib"]
here = sorted(d.metadata["Name"] for d in md.distributions(path=[site])
              if d.metadata["Name"].lower().startswith("onnxruntime"))
print(f"onnxruntime {ort.__version__} from {ort.__file__}; in this venv: {here}")
print(f"providers listed: {ort.get_available_providers()}")
if hasattr(ort, "print_debug_info"):  # onnxruntime-gpu >= 1.21: CUDA/cuDNN packages, libraries
    ort.print_debug_info()
if "onnxruntime" in [h.lower() for h in here]:
    sys.exit("the CPU onnxruntime is installed in this venv beside onnxruntime-gpu")
if not os.path.realpath(ort.__file__).startswith(os.path.realpath(sys.prefix)):
    sys.exit(f"onnxruntime is imported from outside the venv: {ort.__file__}")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("this onnxruntime offers no CUDAExecutionProvider")
EOF

# 5. Parity tests (pass/fail), then the measurements. Each keeps its results if the other fails.
say "parity tests"
rc=0
timeout 150 "$PY" -m pytest tests/python/onnx/test_gpu_parity.py -q -p no:cacheprovider \
  --junitxml "$OUT/parity_junit.xml" || rc=$?
say "parity tests exit $rc"
timeout "${CHECK_TIMEOUT:-300}" "$PY" -m benchmarks.gpu_check --out "$OUT" "$@" || rc2=$?
say "gpu_check exit ${rc2:-0}; done"
exit $(( rc || ${rc2:-0} ))
