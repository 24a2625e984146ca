"""`make bench` sections on training: 3 (end to end: the job's loop against the model alone),
4 (process start to the first training step), 7 (anchor labelling in the step or before it)
and 9 (TensorBoard's cost per epoch)."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import REPO, jpeg_set

# ---------------------------------------------------------------- 3. end to end


def end_to_end(work: Path, img_size: int, batch: int, steps: int) -> list[str]:
    import torch

    from sm_effdet.data.dataset import DetectionDataset, make_loader
    from sm_effdet.data.formats import DataReport, coco
    from sm_effdet.data.transforms import train_transform
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization, normalize
    from sm_effdet.training.job import resolve_num_workers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = jpeg_set(work / "e2e", 640, 480, batch * (steps + 2) * 2)  # a third is dropped
    records = coco.load_coco(folder, folder / "annotations.json", DataReport()).images
    loader = make_loader(
        DetectionDataset(records, train_transform(img_size, augment=True), img_size),
        batch, resolve_num_workers("auto"), shuffle=True, pin_memory=device.type == "cuda",
    )
    bench = build_model("tf_lite0", 3, img_size, pretrained=False, pretrained_dir=None).to(device).train()
    optimizer = torch.optim.AdamW(bench.parameters(), lr=1e-4)
    norm = backbone_normalization("tf_efficientdet_lite0")

    def to_device(batch_: dict) -> tuple:
        targets = {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device)
                   for k, v in batch_["targets"].items()}
        return batch_["images"].to(device, non_blocking=True), targets

    def step(images, targets) -> None:
        loss = bench(normalize(images, norm["mean"], norm["std"]), targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    batches = iter(loader)
    step(*to_device(next(batches)))  # warm-up: workers started, kernels chosen
    synthetic = to_device(next(batches))
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step(*synthetic)
    sync()
    model_only = steps * batch / (time.perf_counter() - started)
    started, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, targets = to_device(next(batches))
        step(images, targets)
        seen += len(images)
    sync()
    job = seen / (time.perf_counter() - started)
    return [
        f"  {device.type}, tf_lite0 at {img_size} px, batch {batch}: model only {model_only:.1f} img/s, "
        f"job loop {job:.1f} img/s = {job / model_only:.2f} (goal on a GPU >= 0.9)"
    ]


# ---------------------------------------------------------------- 4. first training step


def first_step(base: Path, label: str) -> str:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "PYTHONUNBUFFERED": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    job = subprocess.Popen([sys.executable, str(REPO / "train")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seconds = None
    for line in job.stdout:
        found = re.search(r"first training step began ([0-9.]+) s after the process started", line)
        if found:
            seconds = float(found.group(1))
            job.send_signal(signal.SIGTERM)
            break
    job.communicate(timeout=300)
    return f"  {label}: first training step {seconds} s after the process started"


def first_steps(work: Path, channel: Path | None, n_images: int):
    """Section 4's lines, each as soon as it is measured: the demo dataset, then the COCO-scale
    JSON of section 1 when it ran."""
    from sm_effdet.demo import DEMO_HYPERPARAMETERS, make_tree

    demo = make_tree(work / "demo-tree")
    yield first_step(demo, "demo dataset (80 images)")
    if channel is not None:
        coco_base = channel.parents[2]
        config = coco_base / "input" / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "hyperparameters.json").write_text(json.dumps(
            {**DEMO_HYPERPARAMETERS, "val_fraction": "0.01", "num_workers": "auto"}))
        yield first_step(coco_base, f"COCO-scale JSON ({n_images} images)")


# ---------------------------------------------------------------- 7. anchor labelling


def anchor_labelling(img_size: int, batch: int, steps: int) -> list[str]:
    """Step time with effdet's per-image anchor labelling inside the step (the training bench,
    on the training device) against labels made beforehand (what effdet's own trainer does in
    the loader workers: a bench without a labeler takes them in the targets)."""
    import torch
    from effdet import DetBenchTrain

    from sm_effdet.model.efficientdet import build_model

    torch.manual_seed(0)
    bench = build_model("tf_lite0", 3, img_size, pretrained=False, pretrained_dir=None).train()
    prelabelled = DetBenchTrain(bench.model, create_labeler=False).train()
    labeler = bench.anchor_labeler
    images = torch.randn(batch, 3, img_size, img_size)
    boxes = [torch.tensor([[20.0, 30.0, 120.0, 140.0], [60.0, 50.0, 200.0, 220.0]]) for _ in range(batch)]
    classes = [torch.tensor([1.0, 2.0]) for _ in range(batch)]
    targets = {"bbox": boxes, "cls": classes}

    def label() -> dict:
        cls_targets, box_targets, num_positives = labeler.batch_label_anchors(boxes, classes)
        labelled = {"label_num_positives": num_positives}
        for level, (c, b) in enumerate(zip(cls_targets, box_targets)):
            labelled[f"label_cls_{level}"], labelled[f"label_bbox_{level}"] = c, b
        return labelled

    def timed(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - started) / steps

    def step(net, t) -> None:
        net(images, t)["loss"].backward()

    labelled = label()
    labelling = timed(label)
    # Alternated rounds, medians: the two ways share one machine's ups and downs.
    rounds = [(timed(lambda: step(bench, targets)), timed(lambda: step(prelabelled, labelled)))
              for _ in range(3)]
    in_step = statistics.median(r[0] for r in rounds)
    before = statistics.median(r[1] for r in rounds)
    return [
        f"  cpu, tf_lite0 at {img_size} px, batch {batch} (forward + backward): labelling alone "
        f"{labelling * 1000:.1f} ms per batch; step with labelling in the bench {in_step * 1000:.0f} ms, "
        f"with labels made beforehand (loader workers) {before * 1000:.0f} ms"
    ]


# ---------------------------------------------------------------- 9. TensorBoard


def epoch_times(base: Path, tensorboard: bool) -> list[float]:
    config = base / "input" / "config" / "hyperparameters.json"
    hyperparameters = json.loads(config.read_text())
    config.write_text(json.dumps({**hyperparameters, "tensorboard": str(tensorboard).lower()}))
    for leftover in ("checkpoints", "model", "output"):  # each run from scratch, not resumed
        subprocess.run(["rm", "-rf", str(base / leftover)], check=True)
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, str(REPO / "train")], env=env, capture_output=True,
                         text=True, timeout=3600)
    times = [float(t) for t in re.findall(r"\bepoch=\d+/\d+ .*\bepoch_time=([0-9.]+)", out.stdout)]
    if out.returncode or not times:
        raise RuntimeError(f"./train failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    return times[1:] or times  # the first epoch also starts the workers


def tensorboard_cost(work: Path, epochs: int, repeats: int) -> list[str]:
    from sm_effdet.demo import DEMO_HYPERPARAMETERS, make_tree

    base = make_tree(work / "tb-tree", hyperparameters={**DEMO_HYPERPARAMETERS, "epochs": str(epochs)})
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):  # alternated, so that a slow spell of the machine hits both
        for tensorboard in (False, True):
            times[tensorboard] += epoch_times(base, tensorboard)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return [
        f"  demo dataset, {epochs} epochs x {repeats} runs each: epoch time with TensorBoard "
        f"{on:.2f} s, without {off:.2f} s = {100 * (on / off - 1):+.1f}% (goal within 2%)"
    ]
