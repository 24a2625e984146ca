"""The GPU check's ./train runs (gpu_check.py): a job tree on the generated dataset, the job's
environment, its peak memory while it runs, and the figures read from its log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_check_common import Check

REPO = Path(__file__).resolve().parents[1]
FIRST_STEP = re.compile(r"first training step began ([0-9.]+) s after the process started")
EPOCH_LINE = re.compile(r"\bepoch=(\d+)/\d+ .*")
TRAIN_IMAGES = re.compile(r"training \S+ at \d+ px: (\d+) train")


def dataset(check: Check) -> Path:
    """The generated training channel, made once and hard-linked into each job's tree."""
    channel = check.work / "dataset"
    if not channel.exists():
        from sm_effdet.demo import make_shapes_dataset

        make_shapes_dataset(channel, n_images=check.sizes.images, size=check.sizes.image_size)
    return channel


def job_tree(check: Check, name: str, hyperparameters: dict) -> Path:
    base = check.work / name
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(dataset(check), base / "input" / "data" / "training", copy_function=os.link)
    config = base / "input" / "config"
    config.mkdir(parents=True)
    hp = {"img_size": str(check.sizes.img_size), "pretrained": "false", "export_onnx": "false",
          "val_fraction": "0", "num_workers": "auto", **hyperparameters}
    (config / "hyperparameters.json").write_text(json.dumps(hp))
    (config / "inputdataconfig.json").write_text(json.dumps({"training": {"TrainingInputMode": "File"}}))
    return base


def job_env(base: Path) -> dict:
    return {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1",
            # pretrained is false; any download attempt fails fast, as on the device machine.
            "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
            "TORCH_HOME": str(base / "torch-home")}


class MemorySampler:
    """Peak memory while a child runs: the GPU's used memory (nvidia-smi, above what was used
    before it started), or on CPU the child's resident set."""

    def __init__(self, device: str, pid: int) -> None:
        self.device, self.pid, self.peak_mb, self.baseline_mb = device, pid, 0.0, 0.0
        if device == "cuda":
            with contextlib.suppress(Exception):  # no nvidia-smi: the peak stays 0, not a failure
                self.baseline_mb = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> float:
        if self.device == "cuda":
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 check=False, capture_output=True, text=True, timeout=10)
            return float(out.stdout.split()[0])
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(Exception):  # the child may just have ended
                self.peak_mb = max(self.peak_mb, self._read() - self.baseline_mb)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_mb, 1)


def run_train(check: Check, base: Path, stop_after_first_step_s: float | None = None) -> dict:
    """./train on the tree at `base`; its exit code, log lines and figures read from them."""
    job = subprocess.Popen([sys.executable, str(REPO / "train")], env=job_env(base),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(check.sizes.device, job.pid)
    timer = threading.Timer(max(check.seconds_left(), 30), job.kill)
    timer.start()
    lines, first_step, stopper = [], None, None
    try:
        for line in job.stdout:
            lines.append(line.rstrip())
            found = FIRST_STEP.search(line)
            if found:
                first_step = float(found.group(1))
                if stop_after_first_step_s is not None:
                    stopper = threading.Timer(stop_after_first_step_s, job.send_signal, [signal.SIGTERM])
                    stopper.start()
        job.wait()
    finally:
        timer.cancel()
        if stopper:
            stopper.cancel()
        peak = sampler.stop()
    log = "\n".join(lines)
    (check.work / f"{base.name}.log").write_text(log)
    epochs = [dict(re.findall(r"(\w+)=([-+0-9.eE]+|nan|inf)", m.group(0))) for m in EPOCH_LINE.finditer(log)]
    train_images = TRAIN_IMAGES.search(log)
    precision = re.search(r"(\S+) precision on (\S+),", log)
    return {"exit_code": job.returncode, "first_step_seconds": first_step, "peak_memory_mb": peak,
            "epochs": epochs, "train_images": int(train_images.group(1)) if train_images else None,
            "precision": precision.group(1) if precision else None,
            "accelerator": precision.group(2) if precision else None, "log_tail": log[-1500:]}


def expect(condition: bool, what: str, run: dict) -> None:
    if not condition:
        raise AssertionError(f"{what}; log tail:\n{run['log_tail']}")
