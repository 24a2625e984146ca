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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULT_FILE = "gpu_check.json"
FIRST_STEP = re.compile(r"first training step began ([0-9.]+) s after the process started")
EPOCH_LINE = re.compile(r"\bepoch=(\d+)/\d+ .*")
TRAIN_IMAGES = re.compile(r"training \S+ at \d+ px: (\d+) train")


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
        sigterm_batch=8, sigterm_epochs=2, deadline_s=deadline_s,
    )


def cpu_sizes(deadline_s: float) -> Sizes:
    cores = os.cpu_count() or 1
    return Sizes(
        device="cpu", img_size=256, images=24, image_size=(320, 240),
        backbones={"tf_lite0": 4, "tf_d0": 4}, epochs={"tf_lite0": 1, "tf_d0": 1},
        batch_search={"tf_lite0": (1, 2), "tf_d0": (1, 2)}, search_seconds=600,
        loop_batch=2, loop_steps=2,
        workers=[("all_cores", cores, cores), ("4_cores", min(4, cores), min(3, cores))],
        compile_backend="eager", serve_requests=8, half_precision="bf16-mixed",
        sigterm_batch=2, sigterm_epochs=1, deadline_s=deadline_s,
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


# ---------------------------------------------------------------- ./train runs


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


# ---------------------------------------------------------------- the model-only loop


def synthetic_step(backbone: str, img_size: int, batch: int, device: str, memory_format=None,
                   compile_backend: str | None = None):
    """The job's training step (effdet's bench: anchor labelling, loss, backward, AdamW) under
    the autocast `precision` auto picks, on one batch already on the device; returns step()."""
    import torch

    from sm_effdet.backbones import BACKBONES
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization, normalize
    from sm_effdet.training.job import resolve_precision

    torch.manual_seed(0)
    bench = build_model(backbone, 3, img_size, pretrained=False, pretrained_dir=None).to(device).train()
    if memory_format is not None:
        bench = bench.to(memory_format=memory_format)
    if compile_backend:
        bench.model = torch.compile(bench.model, backend=compile_backend)
    optimizer = torch.optim.AdamW(bench.parameters(), lr=1e-4)
    norm = backbone_normalization(BACKBONES[backbone])
    precision = resolve_precision("auto", "gpu" if device == "cuda" else "cpu")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    images = torch.randint(0, 255, (batch, 3, img_size, img_size), dtype=torch.uint8, device=device)
    if memory_format is not None:
        images = images.contiguous(memory_format=memory_format)
    box = torch.tensor([[20.0, 30.0, 120.0, 140.0], [60.0, 50.0, 200.0, 220.0]], device=device)
    targets = {"bbox": [box] * batch, "cls": [torch.tensor([1.0, 2.0], device=device)] * batch}

    def step(images=images, targets=targets) -> float:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = bench(normalize(images, norm["mean"], norm["std"]), targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, precision


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, steps: int, batch: int, device: str) -> float:
    """Images/s over `steps` steps after the caller's warm-up."""
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return round(steps * batch / (time.perf_counter() - started), 2)


def largest_batch(check: Check, backbone: str) -> dict:
    """Double the batch until the training step runs out of GPU memory (or the cap, or the
    search's time)."""
    import torch

    device = check.sizes.device
    batch, cap = check.sizes.batch_search[backbone]
    tried, fits, started = [], None, time.monotonic()
    while batch <= cap and time.monotonic() - started < check.sizes.search_seconds and check.seconds_left() > 60:
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step, _ = synthetic_step(backbone, check.sizes.img_size, batch, device)
            step()
            rate = timed_steps(step, 2, batch, device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
            tried.append({"batch": batch, "fits": True, "images_per_second": rate,
                          "peak_allocated_mb": round(peak, 1) if peak else None})
            fits = batch
        except torch.OutOfMemoryError:
            tried.append({"batch": batch, "fits": False})
            break
        finally:
            step = None  # frees the model and its activations before the next size
        batch *= 2
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the ./train runs after this one need the memory back
    return {"largest_batch": fits, "search_capped": bool(tried) and tried[-1]["fits"], "tried": tried}


# ---------------------------------------------------------------- the six parts


def part_train(check: Check) -> dict:
    out = {}
    # Keys by role, not name, so that --cpu (tf_d0) writes the GPU run's (tf_d2) keys.
    for key, (backbone, batch) in zip(("tf_lite0", "larger"), check.sizes.backbones.items()):
        base = job_tree(check, f"train-{backbone}", {"backbone": backbone, "batch_size": str(batch),
                                                     "epochs": str(check.sizes.epochs[backbone])})
        run = run_train(check, base)
        expect(run["exit_code"] == 0, f"./train {backbone} exited {run['exit_code']}", run)
        images = run["train_images"]
        out[key] = {
            "backbone": backbone, "batch_size": batch, "precision": run["precision"], "accelerator": run["accelerator"],
            "images_per_second_per_epoch": [round(images / float(e["epoch_time"]), 2) for e in run["epochs"]],
            "train_images": images, "peak_memory_mb": run["peak_memory_mb"],
            "memory_measure": "nvidia-smi memory.used" if check.sizes.device == "cuda" else "train RSS",
            "first_step_seconds": run["first_step_seconds"],
            "batch_search": largest_batch(check, backbone),
        }
    return out


def job_loop(step, loader, steps: int, batch_size: int, device: str) -> float:
    """Images/s of the step fed by the loader (host to device copies included), once its
    workers have started."""

    def batches():
        while True:
            yield from loader

    source = batches()

    def job_step() -> None:
        batch = next(source)
        images = batch["images"].to(device, non_blocking=True)
        targets = {k: [t.to(device, non_blocking=True) for t in v] if isinstance(v, list) else v
                   for k, v in batch["targets"].items()}
        step(images, targets)

    job_step()
    return timed_steps(job_step, steps, batch_size, device)


def part_loader(check: Check) -> dict:
    """The job loop (loader + step) against the model-only loop, both with the same step."""
    import torch

    from sm_effdet.data.dataset import DetectionDataset, make_loader
    from sm_effdet.data.formats import DataReport, coco
    from sm_effdet.data.transforms import train_transform

    sizes, device = check.sizes, check.sizes.device
    channel = dataset(check)
    records = coco.load_coco(channel, channel / "annotations.json", DataReport()).images
    step, precision = synthetic_step("tf_lite0", sizes.img_size, sizes.loop_batch, device)
    step()
    out = {"backbone": "tf_lite0", "batch_size": sizes.loop_batch, "precision": precision}
    out["model_only_images_per_second"] = timed_steps(step, sizes.loop_steps, sizes.loop_batch, device)
    every_core, threads = os.sched_getaffinity(0), torch.get_num_threads()
    for name, cores, workers in sizes.workers:
        os.sched_setaffinity(0, sorted(every_core)[:cores])  # the loader's workers inherit it
        torch.set_num_threads(min(cores, threads))
        try:
            loader = make_loader(DetectionDataset(records, train_transform(sizes.img_size, augment=True),
                                                  sizes.img_size),
                                 sizes.loop_batch, workers, shuffle=True, pin_memory=device == "cuda")
            rate = job_loop(step, loader, sizes.loop_steps, sizes.loop_batch, device)
            out[name] = {"cores": cores, "num_workers": workers, "job_loop_images_per_second": rate,
                         "job_over_model_only": round(rate / out["model_only_images_per_second"], 3)}
            del loader  # its persistent workers end before the next setting starts its own
        finally:
            os.sched_setaffinity(0, every_core)
            torch.set_num_threads(threads)
    return out


def part_model_loop(check: Check) -> dict:
    import torch

    sizes, device = check.sizes, check.sizes.device
    out = {"backbone": "tf_lite0", "batch_size": sizes.loop_batch, "compile_backend": sizes.compile_backend}
    variants = {"eager": {}, "channels_last": {"memory_format": torch.channels_last},
                "compile": {"compile_backend": sizes.compile_backend}}
    for name, options in variants.items():
        try:
            step, _ = synthetic_step("tf_lite0", sizes.img_size, sizes.loop_batch, device, **options)
            started = time.perf_counter()
            step()
            sync(device)
            first = time.perf_counter() - started
            step()  # a compiled step may recompile once for the optimizer's state
            out[name] = {"first_step_seconds": round(first, 2),
                         "images_per_second": timed_steps(step, sizes.loop_steps, sizes.loop_batch, device)}
        except Exception as exc:  # noqa: BLE001  (a variant that fails is a finding, not the end)
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
        step = None
    for name in ("channels_last", "compile"):
        if "images_per_second" in out[name]:
            out[name]["over_eager"] = round(out[name]["images_per_second"] / out["eager"]["images_per_second"], 3)
    return out


def part_serve(check: Check) -> dict:
    """./serve (real HTTP) against a plain loop over the same Predictor, one image at a time."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests
    import torch
    from bench import _percentile, jpeg_set, untrained_model_folder, wait_healthy

    from sm_effdet.serving.predictor import Predictor

    size, n = check.sizes.img_size, check.sizes.serve_requests
    base = check.work / "serve-tree"
    untrained_model_folder(base / "model", size)
    folder = jpeg_set(check.work / "serve-images", 640, 480, 16)
    images = [p.read_bytes() for p in sorted(folder.glob("images/*.jpg"))]

    def figures(latencies: list[float], seconds: float) -> dict:
        return {"images_per_second": round(len(latencies) / seconds, 2),
                "p50_ms": round(_percentile(latencies, 50) * 1000, 1),
                "p99_ms": round(_percentile(latencies, 99) * 1000, 1)}

    predictor = Predictor(base / "model", "torch")
    out = {"backbone": "tf_lite0", "img_size": size, "requests": n, "predictor": predictor.describe()}

    def plain(data: bytes) -> None:
        tensor, image_size = predictor.prepare(data, 40_000_000)
        predictor.records(predictor.rows([tensor], [image_size])[0], image_size, None, 100)

    plain(images[0])
    latencies, started = [], time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        plain(images[i % len(images)])
        latencies.append(time.perf_counter() - t)
    out["plain_loop"] = figures(latencies, time.perf_counter() - started)
    predictor = None  # the server gets the GPU's memory
    if check.sizes.device == "cuda":
        torch.cuda.empty_cache()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**job_env(base), "SAGEMAKER_BIND_TO_PORT": str(port), "SERVE_BACKEND": "auto"}
    url = f"http://127.0.0.1:{port}"
    with (check.work / "serve.log").open("w") as log:
        server = subprocess.Popen([sys.executable, str(REPO / "serve")], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, seconds=min(300, check.seconds_left()))

            def post(session, i: int) -> float:
                t = time.perf_counter()
                r = session.post(url + "/invocations", data=images[i % len(images)],
                                 headers={"Content-Type": "image/jpeg"}, timeout=120)
                r.raise_for_status()
                return time.perf_counter() - t

            for concurrency in (1, 8):
                def client(c: int, concurrency: int = concurrency) -> list[float]:
                    session = requests.Session()
                    return [post(session, c + k * concurrency) for k in range(n // concurrency)]

                started = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    latencies = [t for ts in pool.map(client, range(concurrency)) for t in ts]
                result = figures(latencies, time.perf_counter() - started)
                result["over_plain_loop"] = round(result["images_per_second"]
                                                  / out["plain_loop"]["images_per_second"], 3)
                out[f"concurrency_{concurrency}"] = result
        finally:
            server.terminate()
            server.wait(60)
    loaded = re.search(r"loaded (.*)", (check.work / "serve.log").read_text())
    out["server"] = loaded.group(1).strip() if loaded else None
    return out


def part_fp16(check: Check) -> dict:
    precision = check.sizes.half_precision
    base = job_tree(check, "fp16", {"backbone": "tf_lite0", "batch_size": str(check.sizes.backbones["tf_lite0"]),
                                    "epochs": "1", "precision": precision})
    run = run_train(check, base)
    expect(run["exit_code"] == 0, f"./train with precision {precision} exited {run['exit_code']}", run)
    loss = float(run["epochs"][-1]["train_loss"]) if run["epochs"] and "train_loss" in run["epochs"][-1] else None
    model = base / "model"
    written = sorted(p.name for p in model.iterdir()) if model.is_dir() else []
    expect(loss is not None and math.isfinite(loss), f"train_loss is {loss}, not finite", run)
    expect("model.safetensors" in written and "model.json" in written, f"model/ holds {written}", run)
    return {"precision": run["precision"], "train_loss": loss, "model_files": written,
            "images_skipped": run["epochs"][-1].get("images_skipped")}


def part_sigterm(check: Check) -> dict:
    from sm_effdet.training.checkpoints import list_checkpoints

    base = job_tree(check, "sigterm", {"backbone": "tf_lite0", "batch_size": str(check.sizes.sigterm_batch),
                                       "epochs": str(check.sizes.sigterm_epochs)})
    stopped = run_train(check, base, stop_after_first_step_s=1.0)
    failure = base / "output" / "failure"
    reason = failure.read_text() if failure.is_file() else ""
    checkpoints = [p.name for p in list_checkpoints(base / "checkpoints")]
    expect(stopped["exit_code"] == 143, f"the stopped ./train exited {stopped['exit_code']}, not 143", stopped)
    expect(bool(checkpoints), "no checkpoint after the stop", stopped)
    expect(not (base / "model").is_dir() or not any((base / "model").iterdir()), "model/ written", stopped)
    resumed = run_train(check, base)
    expect(resumed["exit_code"] == 0, f"the resumed ./train exited {resumed['exit_code']}", resumed)
    expect("resuming from checkpoint" in resumed["log_tail"] or "resuming from checkpoint"
           in (check.work / "sigterm.log").read_text(), "the second run did not resume", resumed)
    return {"exit_code": stopped["exit_code"], "failure": reason.strip()[:300], "checkpoints": checkpoints,
            "stopped_mid_epoch": bool(re.match(r"training was stopped by SIGTERM in epoch \d+ at step", reason)),
            "resumed_exit_code": resumed["exit_code"],
            "model_after_resume": (base / "model" / "model.safetensors").is_file()}


PARTS = {"train": part_train, "loader": part_loader, "model_loop": part_model_loop,
         "serve": part_serve, "fp16": part_fp16, "sigterm": part_sigterm}


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
