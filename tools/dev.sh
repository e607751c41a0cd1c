#!/usr/bin/env bash
# One entry point for the project's routine jobs on a fresh machine (Python >= 3.11, a C++17
# compiler, cmake). Each job creates ./.venv on first use and installs what it needs into it.
#
#   tools/dev.sh demo    install, then align the bundled real FIB-SEM sample + QC report
#                        (into demo_out/, replacing the files of an earlier demo run)
#   tools/dev.sh test    install with test extras (+ CPU torch), build and run ctest, run pytest
#   tools/dev.sh test-oldest  pytest against the oldest supported dependency versions
#   tools/dev.sh bench   install, run the kernel benchmarks (benchmarks/run.py; writes
#                        benchmarks/out/*.json; `tools/dev.sh bench --help` for options)
#
# Environment: DEEPALIGN_VENV (default .venv), DEEPALIGN_DATA (shared EM stacks, optional).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DEEPALIGN_VENV:-.venv}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"

venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  python -m pip install -q --upgrade pip
}

install_project() {  # $1 = extras, e.g. "[test]"
  python -m pip install -q ".$1"
}

case "${1:-}" in
  demo)
    venv
    install_project ""
    deepalign-fast demo --out demo_out --overwrite
    ;;
  test)
    venv
    # torch, installed explicitly first: the export/ tests train and export a tiny network.
    # From PyPI, `pip install torch` on Linux pulls the CUDA build (several GB of nvidia-*
    # wheels); set DEEPALIGN_TORCH_INDEX=https://download.pytorch.org/whl/cpu to take the
    # CPU build from PyTorch's index instead (machines that provide a local CPU wheel of
    # torch 2.13.0 need nothing).
    if [ -n "${DEEPALIGN_TORCH_INDEX:-}" ]; then
      python -m pip install -q torch==2.13.0 --index-url "$DEEPALIGN_TORCH_INDEX"
    else
      python -m pip install -q torch==2.13.0
    fi
    install_project "[test,export]"
    # C++ unit tests (the core library alone, no Python).
    cmake -S . -B build/ctest -DBUILD_TESTING=ON -DDEEPALIGN_PYTHON=OFF -DDEEPALIGN_WERROR=ON
    cmake --build build/ctest -j "$JOBS"
    ctest --test-dir build/ctest --output-on-failure -j "$JOBS"
    # Lint and strict typing of the package (ruff, mypy --strict; pyproject.toml).
    python -m ruff check python tests benchmarks export
    python -m mypy
    # Import layering (contracts in pyproject.toml: stages import downward, no QC in the
    # alignment, no torch in the runtime), on the installed package.
    lint-imports
    # Python tests against the installed package.
    set +e
    python -m pytest "${@:2}"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
      echo "pytest collected no tests (exit 5): nothing to fail on" >&2
      rc=0
    fi
    exit "$rc"
    ;;
  test-oldest)
    # The same tests against the oldest supported dependency versions
    # (tools/oldest-requirements.txt), in their own venv. A machine that cannot install those
    # pinned wheels skips this job with a message; a test that fails on them fails it.
    OLD="${DEEPALIGN_OLDEST_VENV:-.venv-oldest}"
    [ -x "$OLD/bin/python" ] || python3 -m venv "$OLD"
    if ! "$OLD/bin/python" -m pip install -q -r tools/oldest-requirements.txt; then
      echo "test-oldest: could not install the pinned oldest versions; skipped" >&2
      exit 0
    fi
    "$OLD/bin/python" -m pip install -q --no-deps .
    set +e
    "$OLD/bin/python" -m pytest "${@:2}"
    rc=$?
    set -e
    [ "$rc" -eq 5 ] && rc=0
    exit "$rc"
    ;;
  bench)
    venv
    install_project "[test]"
    python -m benchmarks.run "${@:2}"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
