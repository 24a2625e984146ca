"""`make gpu-check`: the GPU path's figures in one JSON, on a machine with one NVIDIA GPU.

Six parts, each recorded under its own key (a part that fails records its error and the others
still run; the JSON is rewritten after every part, so a run cut short keeps what it measured):

1. train: ./train on a generated dataset, `precision` auto, tf_lite0 and tf_d2: images/s per
   epoch, peak GPU memory, time to the first step; the largest batch that fits for each
   backbone (a doubling search on the training step, model only).
2. loader: the job loop (the job's DataLoader, persistent workers, pinned memory) against the
   model-only loop on the same GPU, with every core and with 4 cores and 3 workers (g5.xlarge).
3. model_loop: the model-only loop eager, channels_last and torch.compile'd.
4. serve: ./serve's images/s and p50/p99 at concurrency 1 and 8 against a plain loop.
5. fp16: one epoch of ./train with `16-mixed` (the grad-scaler path): finite loss, a model.
6. sigterm: SIGTERM during an epoch: exit 143, a checkpoint, and a run that resumes from it.

`--cpu` runs the same parts on the CPU with tiny sizes (tests/test_gpu_check.py), so that the
check cannot rot between GPU loans; there `16-mixed` becomes `bf16-mixed` (Lightning has no
fp16 grad scaler on CPU) and torch.compile uses the eager backend (Dynamo traces the model,
without the code generation: aot_eager took 189 s on a loaded 2-core machine).

The parts live beside this file: gpu_check_parts.py (the six), gpu_check_train.py (their
./train runs) and gpu_check_loop.py (the model-only training step); its serve part shares
bench_common.py with `make bench`. This file holds the sizes, runs the parts and writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# The parts' modules, importable even where the script's folder is not put on the path
# (python -P, PYTHONSAFEPATH): the device machine runs this file from a copied tree.
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check_parts import PARTS  # noqa: E402

RESULT_FILE = "gpu_check.json"


@dataclass
class Sizes:
    """How big each part runs: the GPU's sizes, or tiny ones for --cpu."""

    device: str
    img_size: int
    images: int
    image_size: tuple[int, int]
    backbones: dict[str, int]  # backbone -> batch size of its ./train run
    epochs: dict[str, int]
    batch_search: dict[str, tuple[int, int]]  # backbone -> (first batch, largest tried)
    search_seconds: float  # per backbone, so that the parts after it keep their time
    loop_batch: int
    loop_steps: int
    workers: list[tuple[str, int, int]]  # (name, cores, loader workers)
    compile_backend: str
    serve_requests: int
    half_precision: str
    sigterm_batch: int
    sigterm_epochs: int  # 2 on the GPU: a stop after a fast first epoch still lands in one
    sigterm_after_s: float  # after the first step began; 0: during the first step
    deadline_s: float


def gpu_sizes(deadline_s: float) -> Sizes:
    cores = os.cpu_count() or 1
    return Sizes(
        device="cuda", img_size=512, images=768, image_size=(640, 480),
        backbones={"tf_lite0": 32, "tf_d2": 16}, epochs={"tf_lite0": 3, "tf_d2": 2},
        batch_search={"tf_lite0": (32, 1024), "tf_d2": (16, 512)}, search_seconds=45,
        loop_batch=32, loop_steps=30,
        workers=[("all_cores", cores, cores), ("4_cores", min(4, cores), 3)],
        compile_backend="inductor", serve_requests=400, half_precision="16-mixed",
        sigterm_batch=8, sigterm_epochs=2, sigterm_after_s=1.0, deadline_s=deadline_s,
    )


def cpu_sizes(deadline_s: float) -> Sizes:
    cores = os.cpu_count() or 1
    return Sizes(
        # 8 images: each ./train's fixed cost (imports, model, report) is most of its time;
        # 4 steps of batch 2 still leave the SIGTERM, sent during the first, mid-epoch.
        device="cpu", img_size=256, images=8, image_size=(320, 240),
        backbones={"tf_lite0": 4, "tf_d0": 4}, epochs={"tf_lite0": 1, "tf_d0": 1},
        batch_search={"tf_lite0": (1, 2), "tf_d0": (1, 2)}, search_seconds=600,
        loop_batch=2, loop_steps=2,
        workers=[("all_cores", cores, cores), ("4_cores", min(4, cores), min(3, cores))],
        compile_backend="eager", serve_requests=8, half_precision="bf16-mixed",
        sigterm_batch=2, sigterm_epochs=1, sigterm_after_s=0.0, deadline_s=deadline_s,
    )


@dataclass
class Check:
    sizes: Sizes
    work: Path
    out: Path
    started: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)

    def seconds_left(self) -> float:
        return self.sizes.deadline_s - (time.monotonic() - self.started)

    def write(self) -> None:
        self.results["wall_seconds"] = round(time.monotonic() - self.started, 1)
        path = self.out / RESULT_FILE
        path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def part(self, name: str, run) -> None:
        """Run one part; its failure is recorded under its key, and the next part runs."""
        started = time.monotonic()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            if self.seconds_left() < 10:
                raise TimeoutError(f"skipped: {self.sizes.deadline_s:.0f} s budget spent")
            self.results[name] = run(self)
        except Exception as exc:  # noqa: BLE001  (recorded, and the other parts still run)
            self.results[name] = {"error": f"{type(exc).__name__}: {str(exc)[-3000:]}"}
        self.results[name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"gpu-check: {name} {json.dumps(self.results[name])[:400]}", flush=True)
        self.write()


def machine(device: str) -> dict:
    import torch

    gpu = device == "cuda" and torch.cuda.is_available()
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": "gpu" if device == "cuda" else "cpu",
            "gpu": torch.cuda.get_device_name() if gpu else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
            "bf16_supported": torch.cuda.is_bf16_supported() if gpu else None,
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "git": _git_revision()}


def _git_revision() -> str | None:
    try:  # the device machine gets the working tree, maybe without git or .git
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             check=False, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test's run)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu-check-out"),
                        help="folder for gpu_check.json (default: $OUT, else ./gpu-check-out)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall time for all parts (default 450 s on the GPU, 600 s with --cpu); "
                             "a part that would start past it is skipped")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts, e.g. train,serve")
    args = parser.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children too: the CPU path even on a GPU machine
        # One OpenMP thread per process: on a shared, oversubscribed CPU torch's spinning thread
        # teams made a 6-step epoch take 300 s instead of 28 s.
        os.environ["OMP_NUM_THREADS"] = "1"
    budget_s = args.budget_s or (600 if args.cpu else 450)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu-check: torch sees no GPU; run with --cpu for the CPU check.", file=sys.stderr)
        return 2
    sizes = cpu_sizes(budget_s) if args.cpu else gpu_sizes(budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sm-effdet-gpu-check-") as tmp:
        check = Check(sizes, Path(tmp), args.out)
        check.results = {"machine": machine(sizes.device), "sizes": asdict(sizes)}
        check.write()
        for name in args.parts.split(","):
            check.part(name, PARTS[name])
    failed = [name for name, value in check.results.items() if isinstance(value, dict) and "error" in value]
    print(f"gpu-check: {args.out / RESULT_FILE} written in {check.results['wall_seconds']} s"
          + (f"; failed: {', '.join(failed)}" if failed else "; every part ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
