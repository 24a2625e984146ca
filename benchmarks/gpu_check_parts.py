"""The GPU check's six parts (gpu_check.py runs them in PARTS' order, each recorded under its
key): train, loader, model_loop, serve, fp16 and sigterm."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_common import jpeg_set, percentile, untrained_model_folder, wait_healthy
from gpu_check_loop import largest_batch, sync, synthetic_step, timed_steps
from gpu_check_train import dataset, expect, job_env, job_tree, run_train

if TYPE_CHECKING:
    from gpu_check_common import Check

REPO = Path(__file__).resolve().parents[1]


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

    from sm_effdet.serving.predictor import Predictor

    size, n = check.sizes.img_size, check.sizes.serve_requests
    base = check.work / "serve-tree"
    untrained_model_folder(base / "model", size)
    folder = jpeg_set(check.work / "serve-images", 640, 480, 16)
    images = [p.read_bytes() for p in sorted(folder.glob("images/*.jpg"))]

    def figures(latencies: list[float], seconds: float) -> dict:
        return {"images_per_second": round(len(latencies) / seconds, 2),
                "p50_ms": round(percentile(latencies, 50) * 1000, 1),
                "p99_ms": round(percentile(latencies, 99) * 1000, 1)}

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
    stopped = run_train(check, base, stop_after_first_step_s=check.sizes.sigterm_after_s)
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
