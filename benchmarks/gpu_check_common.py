"""What every part of the GPU check is given: its sizes (the GPU's, or tiny ones for --cpu)
and the Check, which runs a part within the budget and records its result in gpu_check.json."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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
