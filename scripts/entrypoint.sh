#!/bin/sh
# Image entry point: enables NVIDIA's CUDA forward-compatibility libraries when, and only when,
# the host's driver is older than the CUDA the image was built for, then REPLACES itself with
# the command (`exec "$@"`), so the job (for SageMaker: `train` or `serve`, whose python then execs over the
# `/usr/bin/env` of its shebang) ends up with this process's PID: signals such as SageMaker's
# SIGTERM reach Python directly, no shell stays in between.
#
# Why: CUDA 12.x user-space libraries (torch 2.10's cu128 wheels) run on any driver >= 525
# (minor-version compatibility), but some CUDA features and older hosts need the newer
# libcuda.so that the `cuda-compat-12-8` package ships in /usr/local/cuda/compat. Those
# libraries must NOT be used with a driver that is as new as or newer than them (and only work on
# data-centre GPUs), hence the comparison rather than a fixed LD_LIBRARY_PATH. AWS's own
# training images do the same in their entry script.
#
# CUDA_COMPAT=auto (default) | 1 (always prepend the compat folder) | 0 (never).
# Without the compat folder (for example an image built on a plain Debian base) or without an
# NVIDIA driver (CPU hosts), nothing is changed.

compat_dir=/usr/local/cuda/compat

# The compat package's libcuda.so.1 links to libcuda.so.<driver version it implements>.
compat_version() {
    target=$(readlink "$compat_dir/libcuda.so.1" 2>/dev/null) || return 1
    target=${target##*/}
    version=${target#libcuda.so.}
    [ "$version" != "$target" ] && [ -n "$version" ] && printf '%s\n' "$version"
}

# The host's kernel-module version, e.g. 535.183.01 (proprietary and open modules alike).
driver_version() {
    version=$(awk '/^NVRM version/ {
        for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+(\.[0-9]+)*$/) { print $i; exit }
    }' /proc/driver/nvidia/version 2>/dev/null)
    if [ -z "$version" ] && command -v nvidia-smi >/dev/null 2>&1; then
        version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    fi
    [ -n "$version" ] && printf '%s\n' "$version"
}

# True when version $1 sorts strictly before version $2.
version_lt() {
    [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$1" ]
}

use_compat() {
    LD_LIBRARY_PATH="$compat_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    echo "entrypoint: CUDA forward compatibility enabled ($1): $compat_dir first on LD_LIBRARY_PATH" >&2
}

case "${CUDA_COMPAT:-auto}" in
    0 | off | false) ;;
    1 | on | true)
        if [ -d "$compat_dir" ]; then use_compat "CUDA_COMPAT=${CUDA_COMPAT}"; fi
        ;;
    *)
        if compat=$(compat_version) && driver=$(driver_version) && version_lt "$driver" "$compat"; then
            use_compat "host driver $driver is older than $compat"
        fi
        ;;
esac

if [ "$#" -eq 0 ]; then
    set -- train
fi
exec "$@"
