# syntax=docker/dockerfile:1
#
# SageMaker "bring your own container" training and hosting image for sm-effdet.
#
#   docker build --platform linux/amd64 -t sm-effdet .          (or: make build)
#   docker run --rm --gpus all --shm-size 16g -v "$PWD/opt_ml:/opt/ml" sm-effdet train
#   docker run --rm -p 8080:8080 -v "$PWD/opt_ml/model:/opt/ml/model" sm-effdet serve
#
# SageMaker starts it as `docker run <image> train` (training) or `... serve` (endpoints and
# Batch Transform; /opt/program/serve). `train` is this project's script in
# /opt/program, first on PATH; the entry point below only decides about the CUDA
# forward-compatibility libraries and then exec's `train`, so Python receives signals directly.
#
# Behind a TLS-inspecting proxy, pass its certificate authority as an optional build secret:
#   docker buildx build --secret id=ca_bundle,src=corporate-ca.pem ...
# It is used by pip and uv only while building and never lands in a layer.

# CUDA 12.8 user-space libraries, as used by the torch 2.10 (cu128) wheels in uv.lock, and
# Ubuntu 24.04's Python 3.12. Any Debian/Ubuntu base with python3 >= 3.11,< 3.13 builds
# (the repository's image test uses a plain Debian bookworm root file system, Python 3.11).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# The GPU architectures torch 2.10.0+cu128 (and torchvision) carry kernels for, from
# torch._C._cuda_getArchFlags(): V100 (sm_70, p3), T4 (sm_75, g4dn), A100 (sm_80, p4d),
# A10G (sm_86, g5), L4/L40S (sm_89 runs sm_86 code: g6, g6e), H100/H200 (sm_90, p5, p5e),
# B200 (sm_100, p6) and sm_120 (RTX PRO 6000 / RTX 50). No PTX, so no other architecture.
LABEL org.opencontainers.image.title="sm-effdet" \
      org.opencontainers.image.description="SageMaker training and hosting container: EfficientDet object detectors on COCO-format data" \
      sm-effdet.cuda.version="12.8" \
      sm-effdet.cuda.architectures="sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120" \
      sm-effdet.torch.version="2.10.0+cu128" \
      sm-effdet.driver.minimum="525 (CUDA 12 minor-version compatibility; older data-centre drivers use cuda-compat)"

# Python from the base's own packages (never a separate download); no compiler: every locked
# package is a wheel for Linux x86-64 (docs/image.md); ca-certificates for downloads at run time
# (pretrained weights through urllib use the system store).
#
# cuda-compat-12-8 (NVIDIA's apt repository, configured in the nvidia/cuda bases and usually
# already installed there) provides /usr/local/cuda/compat. It is installed when the base's apt
# knows it and skipped otherwise (plain Debian/Ubuntu bases), so any base builds. The entry point
# puts it on LD_LIBRARY_PATH only when the host driver is older than it.
# Versions are not pinned: they come from whichever base (Ubuntu or Debian release) is used.
ARG DEBIAN_FRONTEND=noninteractive
ARG CUDA_COMPAT_PACKAGE=cuda-compat-12-8
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv \
    && if apt-cache show "${CUDA_COMPAT_PACKAGE}" >/dev/null 2>&1; then \
           apt-get install -y --no-install-recommends "${CUDA_COMPAT_PACKAGE}"; \
       else \
           echo "${CUDA_COMPAT_PACKAGE} is not available on this base: no CUDA forward compatibility"; \
       fi \
    && rm -rf /var/lib/apt/lists/*

# uv from PyPI, in a venv of its own (Ubuntu 24.04's system pip is "externally managed").
ARG UV_VERSION=0.13.9
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle SSL_CERT_FILE=/run/secrets/ca_bundle; fi; \
    python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv --version

COPY --chmod=0755 scripts/entrypoint.sh /usr/local/bin/sm-effdet-entrypoint

# /opt/program (this project's `train` and `serve`) comes first on PATH: SageMaker runs
# `docker run <image> train|serve` and no package's console script may shadow them. With
# /opt/venv/bin before /usr/bin, `#!/usr/bin/env python3` is the venv's Python.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/program:/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /opt/program

# Exec form, no shell and no tini. `docker run <image> train` replaces CMD; the entry point
# exec's its arguments (and `train` when there are none).
# SageMaker hosting and Batch Transform run `docker run <image> serve` the same way: the
# server listens on 8080 (or SAGEMAKER_BIND_TO_PORT).
ENTRYPOINT ["/usr/local/bin/sm-effdet-entrypoint"]
CMD ["train"]
EXPOSE 8080

# The locked environment (about 7 GB, mostly CUDA libraries), in a layer that only changes with
# pyproject.toml / uv.lock. Then, in the same layer:
# - Icevision downloads a font at import time unless this file exists; matplotlib's DejaVuSans
#   stands in for it, so the job needs no network for it.
# - matplotlib's font cache is built now rather than at every job start.
# - a .pth file puts /opt/program/src on sys.path (`python -m sm_effdet...` works in the image;
#   `train` puts it there itself too).
COPY pyproject.toml uv.lock ./
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=cache,target=/root/.cache/uv \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi; \
    UV_PYTHON_DOWNLOADS=never UV_PYTHON=/usr/bin/python3 UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 \
        /opt/uv/bin/uv sync --frozen --no-dev --no-install-project \
    && site_packages="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && mkdir -p /root/.icevision/fonts \
    && cp "${site_packages}/matplotlib/mpl-data/fonts/ttf/DejaVuSans.ttf" /root/.icevision/fonts/SpaceGrotesk-Medium.ttf \
    && /opt/venv/bin/python -c 'import matplotlib.font_manager' \
    && echo /opt/program/src > "${site_packages}/sm_effdet_src.pth"

# The project itself: only these change from one source edit to the next.
COPY --chmod=0755 train ./train
COPY --chmod=0755 serve ./serve
COPY src/ ./src/
