"""The GPU check's model-only loop (gpu_check.py): the job's training step on one batch already
on the device, its images/s, and the largest batch that fits."""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_check_common import Check


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
