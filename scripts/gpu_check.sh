#!/usr/bin/env bash
# `make gpu-check`: the whole command for a device machine with one NVIDIA GPU (no network
# there). Installs the wheels of `make gpu-wheels` (WHEEL_DIR, default .whl) beside the torch the
# machine already has, then runs benchmarks/gpu_check.py, which writes gpu_check.json under $OUT
# (else ./gpu-check-out) within the budget.
#
#   scripts/gpu_check.sh           the GPU run (python3 of the machine, wheels installed)
#   scripts/gpu_check.sh --cpu     tiny sizes on the CPU, with .venv's python unless PYTHON is set
#
# GPU_CHECK_WHEELS=1 installs the wheels in a --cpu run too (a simulation of the device here);
# GPU_CHECK_BUDGET_S (default 450 on the GPU, 600 with --cpu) is the driver's budget for all
# parts; a hard stop follows 60 s after it.
set -euo pipefail

cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/sm-effdet-gpu-check-site}

cpu=0
for arg in "$@"; do [ "$arg" = "--cpu" ] && cpu=1; done
if [ "$cpu" = 1 ]; then
    default_python=.venv/bin/python
    [ -x "$default_python" ] || default_python=python3
    wheels=${GPU_CHECK_WHEELS:-0}
    BUDGET_S=${GPU_CHECK_BUDGET_S:-600}
else
    default_python=python3
    wheels=${GPU_CHECK_WHEELS:-1}
    BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
fi
PYTHON=${PYTHON:-$default_python}

if [ "$wheels" = 1 ]; then
    if ! compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
        echo "gpu-check: no wheels in $WHEEL_DIR; run 'make gpu-wheels' here first and carry $WHEEL_DIR." >&2
        exit 1
    fi
    rm -rf "$SITE"
    started=$EPOCHREALTIME
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEEL_DIR"/*.whl
    seconds=$("$PYTHON" -c "print(round($EPOCHREALTIME - $started, 1))")
    torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)')
    echo "gpu-check: $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels installed in $seconds s beside torch $torch_version"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
exec timeout --kill-after=10 $((BUDGET_S + 60)) "$PYTHON" benchmarks/gpu_check.py --budget-s "$BUDGET_S" "$@"
