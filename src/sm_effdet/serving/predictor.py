"""The model behind the server: loaded once, warmed up, called with whole batches.

Everything about the network goes through inference.py and preprocessing.py, the same code the
model folder's standalone script runs, so the server predicts as validation measured.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import inference, model_card, preprocessing
from ..artifacts import ONNX_FILE

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "auto")


class ModelLoadError(RuntimeError):
    pass


def choose_backend(requested: str, model_dir: Path, device: torch.device) -> str:
    """The one place that decides between PyTorch and ONNX Runtime (SERVE_BACKEND).

    auto: ONNX Runtime on CPU when the model folder has model.onnx (measured 2.3x-5.6x
    PyTorch's images/s on CPU, `make bench` section 6), PyTorch on a GPU, where the image's
    onnxruntime package has no CUDA provider.
    """
    if requested not in BACKENDS:
        raise ModelLoadError(f"SERVE_BACKEND={requested!r} is unknown; use torch, onnx or auto.")
    has_onnx = (model_dir / ONNX_FILE).is_file()
    if requested == "onnx" and not has_onnx:
        raise ModelLoadError(
            f"SERVE_BACKEND=onnx but {model_dir} has no {ONNX_FILE} (the training job's export "
            "failed or export_onnx was false; model.json's 'onnx' says which); use "
            "SERVE_BACKEND=torch or train again with export_onnx true."
        )
    if requested == "auto":
        return "onnx" if has_onnx and device.type == "cpu" else "torch"
    return requested


class Predictor:
    def __init__(self, model_dir: str | Path, backend: str = "auto") -> None:
        model_dir = Path(model_dir)
        try:
            self.card = model_card.read_model_card(model_dir)
        except model_card.ModelCardError as exc:
            raise ModelLoadError(str(exc)) from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # all cores
        self.backend = choose_backend(backend, model_dir, self.device)
        try:
            self.model, _ = inference.load_model(model_dir, str(self.device))
            if self.backend == "onnx":
                from ..export import OnnxEfficientDet

                # The same effdet bench (anchors, decoding, NMS) around ONNX Runtime's network.
                self.model.model = OnnxEfficientDet(model_dir / ONNX_FILE, device=self.device.type)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the model in {model_dir} ({type(exc).__name__}: {str(exc)[:300]}); use "
                "the unchanged contents of a training job's model.tar.gz."
            ) from None
        # Training validated GPUs under bf16-mixed where supported: predict the same way.
        self.autocast = (
            torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        )
        self.img_size = int(self.card["img_size"])
        self.mean, self.std, self.fill = preprocessing.normalization_from_card(self.card)

    def prepare(self, data: bytes, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image bytes -> uint8 CHW at img_size and the image's (width, height). CPU work."""
        array, size = preprocessing.decode_image(data, self.img_size, max_pixels)
        padded, _ = preprocessing.resize_and_pad(array, self.img_size, self.fill)
        return preprocessing.to_chw_tensor(padded), size

    def rows(self, images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """effdet rows [x1, y1, x2, y2, score, label] per image, in each image's pixels."""
        return inference.infer(self.model, self.card, torch.stack(images), sizes, self.autocast)

    def warm_up(self) -> float:
        started = time.perf_counter()
        blank = torch.full((3, self.img_size, self.img_size), 128, dtype=torch.uint8)
        self.rows([blank], [(self.img_size, self.img_size)])
        return time.perf_counter() - started

    def describe(self) -> str:
        return f"{model_card.describe(self.card)}; backend {self.backend} on {self.device}" + (
            " (bf16 autocast)" if self.autocast else ""
        )

    def records(self, rows: np.ndarray, size: tuple[int, int], score_threshold: float | None,
                max_detections: int) -> list[dict[str, Any]]:
        if score_threshold is None:
            score_threshold = model_card.default_score_threshold(self.card)
        return preprocessing.detections_to_records(rows, size, self.card["classes"], score_threshold, max_detections)
