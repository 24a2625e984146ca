#!/usr/bin/env bash
# `make gpu-wheels`: the wheels that the device machine's image (torch 2.11, CUDA, lightning,
# timm, onnxruntime, opencv, pillow, tensorboard, numpy 2.5, scipy, scikit-image/-learn, anyio,
# click, h11, pyyaml, psutil, matplotlib, safetensors ...) lacks for `train` and `serve`, for
# CPython 3.12 on manylinux x86-64, into an ignored folder (WHEEL_DIR, default .whl). Versions
# are uv.lock's, so the check runs what the image would run. torch is never among them: the
# check runs beside the torch it finds.
#
# The list is what an import of sm_effdet's train and serve modules needs on that image
# (tests/test_gpu_check.py installs the folder beside a torch it did not bring and imports them).
set -euo pipefail

cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}
# Words, not one path: the Makefile passes `python3 -m uv` where uv is not on PATH.
read -r -a uv <<<"${UV:-uv}"
# 64 MiB is what travels to the device machine; the rest of the tree needs some of it.
LIMIT_MB=${LIMIT_MB:-48}

PACKAGES=(
    icevision fastcore loguru                   # Icevision 0.12 (its other pins are overridden)
    effdet omegaconf                            # the model
    albumentations qudida                       # transforms (albumentations <= 1.4.0 and its helper)
    pycocotools faster-coco-eval                # evaluation
    defusedxml                                  # formats/ (Pascal VOC)
    fastapi starlette pydantic pydantic-core annotated-types typing-inspection
    opentelemetry-api uvicorn                   # serve
    typing-extensions                           # pydantic-core needs >= 4.16, newer than some images
)

if ! command -v "$PYTHON" >/dev/null; then
    echo "gpu-wheels: $PYTHON is missing; run 'make install' first (make gpu-wheels does)." >&2
    exit 1
fi
locked=$("${uv[@]}" export --frozen --no-hashes --no-emit-project --no-dev)
pins=()
for name in "${PACKAGES[@]}"; do
    # Markers split a few packages by Python version; the device runs 3.12.
    line=$(grep -E "^${name}==" <<<"$locked" | grep -v "python_full_version < '3.12'" | head -1 || true)
    if [ -z "$line" ]; then
        echo "gpu-wheels: $name is not in uv.lock; update scripts/gpu_wheels.sh's list to the lock." >&2
        exit 1
    fi
    pins+=("${line%% *}")
done

# Into a staging folder, renamed when complete: a failed download never leaves half a set.
staging="$WHEEL_DIR.partial"
rm -rf "$staging"
mkdir -p "$staging"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$staging" "${pins[@]}"
rm -rf "$WHEEL_DIR"
mv "$staging" "$WHEEL_DIR"

size_kb=$(du -sk "$WHEEL_DIR" | cut -f1)
echo "gpu-wheels: $(ls "$WHEEL_DIR" | wc -l) wheels, $((size_kb / 1024)).$((size_kb % 1024 * 10 / 1024)) MiB in $WHEEL_DIR"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
    echo "gpu-wheels: $WHEEL_DIR is over ${LIMIT_MB} MiB: the working tree travels beside it within 64 MiB; drop a wheel the device image already has." >&2
    exit 1
fi
