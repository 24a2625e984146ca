#!/usr/bin/env bash
# Builds the training image WITHOUT a Docker engine (buildah, vfs storage, chroot isolation; see
# shared/docs/building-images-here.md) and checks it the way SageMaker uses it:
#   (a) `train` and `serve` on the image's PATH are this project's scripts;
#       python3 is the venv's; the entry point exec's (no shell left between it and Python);
#   (b) `<ENTRYPOINT> train` on a generated /opt/ml tree exits 0 and writes model/model.json;
#   (c) a misspelt hyperparameter makes it exit non-zero with output/failure naming the key;
#   (d) SIGTERM sent to the job's process (what `docker stop` / StopTrainingJob do to the
#       container's process) reaches Python's handler: non-zero exit and output/failure;
#   (e) `<ENTRYPOINT> serve` on the model that (b) wrote answers /ping and one image on
#       SAGEMAKER_BIND_TO_PORT, and SIGTERM stops it with exit status 0.
# The /opt/ml tree comes from `uv run --frozen python -m sm_effdet.demo --make-tree DIR`.
#
# Run as root:  scripts/image_test.sh        (or: make image-test)
# Environment:
#   KEEP_IMAGE=1   keep the built image (default: removed at the end; the base image is kept)
#   SKIP_BUILD=1   test an image built before (with KEEP_IMAGE=1) instead of building
#   LAYERS=1       build with --layers, so a rebuild after a source-only change reuses the
#                  environment layer (costs disk: vfs stores every layer as a full copy;
#                  `buildah rmi --prune` frees the intermediate images)
#   OFFLINE=0      let the job reach the network (default: proxies point at a closed port, so
#                  any download at run time fails, as under SageMaker network isolation)
#   SIGTERM_AFTER=S  seconds of training before check (d) sends SIGTERM (default 30)
#   CA_BUNDLE=F    certificate bundle passed as the optional `ca_bundle` build secret
#                  (default /etc/ssl/certs/ca-certificates.crt when present)
#   IMAGE_TEST_IMAGE, IMAGE_TEST_CACHE, MIN_FREE_GB, DEBIAN_MIRROR
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${IMAGE_TEST_IMAGE:-localhost/sm-effdet:image-test}
base_image=localhost/debian-base:bookworm
cache_dir=${IMAGE_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sm-effdet-image-test}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
debian_mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
min_free_gb=${MIN_FREE_GB:-30}
keep_image=${KEEP_IMAGE:-0}
skip_build=${SKIP_BUILD:-0}
layers=${LAYERS:-0}
offline=${OFFLINE:-1}
sigterm_after=${SIGTERM_AFTER:-30}

storage=(--storage-driver vfs)
work=""
containers=()
timings=()
current_phase=""

log() { printf '\n[image-test %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf '[image-test] FAILED: %s\n' "$*" >&2; exit 1; }

now_us() { local t=${EPOCHREALTIME/./}; echo "${t#0}"; }

# phase NAME COMMAND...: runs COMMAND and records how long it took.
phase() {
    local name=$1 start end
    shift
    current_phase=$name
    log "== $name"
    start=$(now_us)
    "$@"
    end=$(now_us)
    timings+=("$(printf '%-34s %8.1f s' "$name" "$(((end - start) / 100000))e-1")")
    current_phase=""
}

print_timings() {
    local line
    printf '\n[image-test] timings\n'
    for line in "${timings[@]}"; do printf '  %s\n' "$line"; done
    if [[ -n $current_phase ]]; then printf '  %-34s %s\n' "$current_phase" "(failed)"; fi
}

cleanup() {
    local rc=$? c
    for c in "${containers[@]}"; do
        buildah "${storage[@]}" rm "$c" >/dev/null 2>&1 || true
    done
    if [[ -n $work && -d $work ]]; then rm -rf "$work"; fi
    if [[ $keep_image != 1 && $skip_build != 1 ]]; then
        buildah "${storage[@]}" rmi "$image" >/dev/null 2>&1 || true
        if [[ $layers == 1 ]]; then buildah "${storage[@]}" rmi --prune >/dev/null 2>&1 || true; fi
    fi
    print_timings
    if [[ $rc -eq 0 ]]; then echo "[image-test] PASSED"; else echo "[image-test] FAILED (exit $rc)"; fi
}

ensure_tools() {
    local missing=() tool
    for tool in buildah podman debootstrap crun fuse-overlayfs newuidmap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        echo "missing: ${missing[*]}; installing buildah podman debootstrap crun fuse-overlayfs uidmap"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            buildah podman debootstrap crun fuse-overlayfs uidmap
    fi
    buildah --version
    command -v uv >/dev/null 2>&1 || die "uv is needed to generate the /opt/ml tree (make install)"
}

check_disk() {
    local storage_dir=/var/lib/containers avail
    [[ -d $storage_dir ]] || storage_dir=/
    df -h / "$storage_dir" | uniq
    avail=$(df -BG --output=avail "$storage_dir" | tail -n 1 | tr -dc '0-9')
    if [[ $skip_build != 1 ]] && ((avail < min_free_gb)); then
        die "only ${avail} GB free under $storage_dir; the vfs build needs about ${min_free_gb} GB (MIN_FREE_GB)"
    fi
}

# A Debian bookworm minbase root file system, made once, imported once as a local base image.
ensure_base_image() {
    local rootfs=$cache_dir/debian-bookworm-minbase
    if podman "${storage[@]}" image exists "$base_image"; then
        echo "$base_image present"
        return
    fi
    if [[ ! -f $rootfs.done ]]; then
        rm -rf "$rootfs" "$rootfs.tmp"
        mkdir -p "$cache_dir"
        debootstrap --variant=minbase bookworm "$rootfs.tmp" "$debian_mirror"
        mv "$rootfs.tmp" "$rootfs"
        touch "$rootfs.done"
    fi
    tar -C "$rootfs" --exclude='./var/cache/apt/archives/*.deb' -c . |
        podman "${storage[@]}" import - "$base_image"
}

build_image() {
    local args=(bud --isolation chroot --build-arg "BASE_IMAGE=$base_image" -t "$image" -f Dockerfile)
    if [[ -s $ca_bundle ]]; then args+=(--secret "id=ca_bundle,src=$ca_bundle"); fi
    if [[ $layers == 1 ]]; then args+=(--layers); fi
    (cd "$repo_root" && nice -n 10 buildah "${storage[@]}" "${args[@]}" .)
}

# image_config KEY: a field of the image's OCI config as JSON (buildah 1.28's --format has no
# `json` function, so the whole inspect output is parsed instead).
image_config() {
    buildah "${storage[@]}" inspect --type image "$image" |
        python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"].get(sys.argv[1])))' "$1"
}

show_image() {
    buildah "${storage[@]}" images "$image"
    echo "Entrypoint=$(image_config Entrypoint) Cmd=$(image_config Cmd)"
}

make_trees() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/sm-effdet-image-test.XXXXXX")
    (cd "$repo_root" && uv run --frozen python -m sm_effdet.demo --make-tree "$work/ok" --epochs 2)
    [[ -f $work/ok/input/config/hyperparameters.json ]] || die "the demo wrote no hyperparameters.json"
    cp -a "$work/ok" "$work/bad"
    # The demo's full length, so that the job is still training when check (d) stops it.
    (cd "$repo_root" && uv run --frozen python -m sm_effdet.demo --make-tree "$work/stop")
    # The same configuration plus one misspelt key.
    python3 - "$work/bad/input/config/hyperparameters.json" <<'PY'
import json, sys
path = sys.argv[1]
with open(path) as f:
    hps = json.load(f)
hps["learning_rat"] = "0.1"
with open(path, "w") as f:
    json.dump(hps, f)
PY
    echo "trees in $work: ok/ (2 epochs), bad/ (+ learning_rat), stop/ (20 epochs)"
}

# The image's ENTRYPOINT words: `docker run IMAGE train` runs ENTRYPOINT + [train];
# buildah run does not apply ENTRYPOINT, so they are put in front explicitly.
entrypoint=()
read_entrypoint() {
    local json
    json=$(image_config Entrypoint)
    mapfile -t entrypoint < <(python3 -c 'import json, sys; [print(w) for w in json.loads(sys.argv[1]) or []]' "$json")
    echo "ENTRYPOINT: ${entrypoint[*]:-(none)}"
    [[ ${#entrypoint[@]} -eq 0 || ${entrypoint[0]} == /* ]] || die "ENTRYPOINT is not exec form: $json"
}

# new_container: a fresh container of the image in $new_c (not a subshell: cleanup needs it).
new_c=""
new_container() {
    new_c=$(buildah "${storage[@]}" from --pull-never "$image")
    containers+=("$new_c")
}

extra_env=()
# run_in CONTAINER TREE COMMAND...: what `docker run -v TREE:/opt/ml IMAGE COMMAND...` runs.
run_in() {
    local c=$1 tree=$2
    shift 2
    local env_args=()
    if [[ $offline == 1 ]]; then
        local proxy=http://127.0.0.1:9
        env_args=(-e "http_proxy=$proxy" -e "https_proxy=$proxy" -e "HTTP_PROXY=$proxy"
            -e "HTTPS_PROXY=$proxy" -e "no_proxy=" -e "NO_PROXY=" -e HF_HUB_OFFLINE=1)
    fi
    env_args+=("${extra_env[@]}")
    buildah "${storage[@]}" run --isolation chroot "${env_args[@]}" -v "$tree:/opt/ml" "$c" -- \
        "${entrypoint[@]}" "$@"
}

check_path() {
    local c out
    new_container
    c=$new_c
    container_a=$c
    # shellcheck disable=SC2016  # expanded inside the image
    out=$(run_in "$c" "$work/ok" sh -c '
        echo "train=$(command -v train)"
        IFS=:; for d in $PATH; do if [ -x "$d/train" ]; then echo "candidate=$d/train"; fi; done
        echo "shebang=$(head -n 1 "$(command -v train)")"
        echo "env_python3_prefix=$(/usr/bin/env python3 -c "import sys; print(sys.prefix)")"
        echo "font=$(ls /root/.icevision/fonts/SpaceGrotesk-Medium.ttf)"')
    echo "$out"
    grep -qx 'train=/opt/program/train' <<<"$out" || die "train on PATH is not /opt/program/train"
    if grep '^candidate=' <<<"$out" | grep -qv '=/opt/program/train$'; then
        echo "note: another train is on PATH after /opt/program/train"
    fi
    grep -qx 'shebang=#!/usr/bin/env python3' <<<"$out" || die "unexpected shebang of train"
    grep -qx 'env_python3_prefix=/opt/venv' <<<"$out" || die "/usr/bin/env python3 is not the venv's"
    grep -q '^font=/root/.icevision/fonts/SpaceGrotesk-Medium.ttf$' <<<"$out" || die "icevision font missing"
    # With exec all the way, Python's parent is whatever started the container (buildah here,
    # docker's runtime there), never a shell left behind by the entry point.
    out=$(run_in "$c" "$work/ok" python3 -c \
        'import os; print(open(f"/proc/{os.getppid()}/comm").read().strip())')
    echo "parent of python3 started through the entry point: $out"
    case $out in sh | dash | bash) die "a shell stays between the entry point and Python" ;; esac
}

check_train_ok() {
    local rc=0
    run_in "$container_a" "$work/ok" train 2>&1 | tee "$work/ok.log" || rc=$?
    echo "exit status: $rc"
    ((rc == 0)) || die "train failed on the demo tree (exit $rc)"
    [[ -s $work/ok/model/model.json ]] || die "model/model.json was not written"
    echo "model/:"
    ls -l "$work/ok/model"
}

check_train_bad() {
    local c rc=0 first
    new_container
    c=$new_c
    container_c=$c
    run_in "$c" "$work/bad" train >"$work/bad.log" 2>&1 || rc=$?
    tail -n 5 "$work/bad.log"
    echo "exit status: $rc"
    ((rc != 0)) || die "train accepted an unknown hyperparameter"
    [[ -s $work/bad/output/failure ]] || die "output/failure was not written"
    first=$(head -n 1 "$work/bad/output/failure")
    echo "output/failure, first line: $first"
    [[ $first == *learning_rat* ]] || die "output/failure does not name learning_rat on its first line"
}

# descendants PID: the host PIDs of all processes below PID.
descendants() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END { for (p in parent) { q = p; while ((q in parent) && q != root && q > 1) q = parent[q]; if (q == root && p != root) print p } }'
}

cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }
parent_of() { ps -o ppid= -p "$1" | tr -d ' '; }

# train_process PID: the topmost process below PID that runs /opt/program/train.
train_process() {
    local p
    for p in $(descendants "$1"); do
        [[ $(cmdline_of "$p") == */opt/program/train* ]] || continue
        [[ $(cmdline_of "$(parent_of "$p")") == */opt/program/train* ]] && continue
        echo "$p"
        return 0
    done
    return 1
}

check_sigterm() {
    local pid py="" rc=0 waited=0 chain="" p first
    run_in "$container_c" "$work/stop" train >"$work/stop.log" 2>&1 &
    pid=$!
    while [[ -z $py ]] && ((waited < 120)); do
        sleep 1
        waited=$((waited + 1))
        py=$(train_process "$pid") || py=""
    done
    [[ -n $py ]] || die "no process running /opt/program/train appeared"
    p=$py
    for _ in 1 2 3; do
        chain+="$(ps -o comm= -p "$p") ($p) <- "
        p=$(parent_of "$p")
    done
    echo "process running train, and its parents: ${chain% <- }"
    [[ $(ps -o comm= -p "$py") == python* ]] || die "the process running train is not Python"
    sleep "$sigterm_after"
    echo "SIGTERM to $py after ${sigterm_after} s"
    kill -TERM "$py"
    waited=$SECONDS
    while kill -0 "$pid" 2>/dev/null && ((SECONDS - waited < 150)); do sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$py" 2>/dev/null || true
        die "the job was still running 150 s after SIGTERM"
    fi
    wait "$pid" || rc=$?
    tail -n 4 "$work/stop.log"
    echo "exit status: $rc, $((SECONDS - waited)) s after SIGTERM"
    ((rc != 0)) || die "the job exited 0 after SIGTERM (did it finish before the signal?)"
    ((rc != 137)) || die "the job was killed, not stopped"
    [[ -s $work/stop/output/failure ]] || die "no output/failure after SIGTERM"
    first=$(head -n 1 "$work/stop/output/failure")
    echo "output/failure, first line: $first"
}

# http_get URL [FILE CONTENT_TYPE]: "STATUS BODY" from the host (python3, no curl needed).
http_call() {
    python3 - "$@" <<'PY'
import sys, urllib.request, urllib.error
url = sys.argv[1]
data = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else None
req = urllib.request.Request(url, data=data, headers={"Content-Type": sys.argv[3]} if data else {})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status, r.read().decode()[:300])
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode()[:300])
except OSError as e:
    print(0, e)
PY
}

# serve_process PID: the topmost process below PID that runs /opt/program/serve.
serve_process() {
    local p
    for p in $(descendants "$1"); do
        [[ $(cmdline_of "$p") == */opt/program/serve* ]] || continue
        [[ $(cmdline_of "$(parent_of "$p")") == */opt/program/serve* ]] && continue
        echo "$p"
        return 0
    done
    return 1
}

check_serve() {
    # (`image` is the image's name, used by new_container: the JPEG has a name of its own.)
    local c pid py="" port=18080 waited=0 out jpeg rc=0
    new_container
    c=$new_c
    jpeg=$(find "$work/ok/input/data/training" -name '*.jpg' | head -n 1)
    # chroot isolation shares the host's network: the server is reachable on 127.0.0.1.
    extra_env=(-e "SAGEMAKER_BIND_TO_PORT=$port")
    run_in "$c" "$work/ok" serve >"$work/serve.log" 2>&1 &
    pid=$!
    extra_env=()
    out=""
    while ((waited < 180)); do
        out=$(http_call "http://127.0.0.1:$port/ping")
        [[ $out == 200* ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log"; die "serve exited before /ping answered 200"; }
        sleep 1
        waited=$((waited + 1))
    done
    [[ $out == 200* ]] || { tail -n 20 "$work/serve.log"; die "/ping did not answer 200 within 180 s"; }
    echo "/ping 200 after ${waited} s"
    out=$(http_call "http://127.0.0.1:$port/invocations" "$jpeg" image/jpeg)
    echo "POST /invocations: ${out:0:200}"
    [[ $out == '200 {"predictions"'* ]] || die "serve did not answer an image with predictions"
    py=$(serve_process "$pid") || die "no process running /opt/program/serve"
    kill -TERM "$py"
    wait "$pid" || rc=$?
    tail -n 3 "$work/serve.log"
    echo "exit status after SIGTERM: $rc"
    ((rc == 0)) || die "serve did not exit 0 after SIGTERM"
}

main() {
    [[ $(id -u) -eq 0 ]] || die "run as root (buildah with vfs storage and chroot isolation)"
    trap cleanup EXIT
    phase "tools" ensure_tools
    phase "disk" check_disk
    if [[ $skip_build != 1 ]]; then
        phase "base image (debootstrap/import)" ensure_base_image
        phase "build" build_image
    fi
    phase "image" show_image
    phase "generate /opt/ml trees" make_trees
    read_entrypoint
    phase "check (a): PATH, python, exec" check_path
    phase "check (b): train on demo tree" check_train_ok
    phase "check (c): bad hyperparameter" check_train_bad
    phase "check (d): SIGTERM reaches Python" check_sigterm
    phase "check (e): serve answers ping and an image" check_serve
    df -h / | tail -n 1
}

container_a=""
container_c=""
main "$@"
