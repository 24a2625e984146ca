"""The model behind the server: loaded once, warmed up, called with whole batches.

Everything about the network goes through inference.py and preprocessing.py, the same code the
model folder's standalone script runs, so the server predicts as validation measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import io
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..model import inference, model_card, preprocessing
from ..model.artifacts import ONNX_FILE

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


def decoded_pixels(data: bytes, img_size: int) -> int:
    """About how many pixels decoding `data` holds at once, read from its header (0 if unreadable:
    decode_image then refuses it). JPEGs of at least twice img_size decode at a reduced scale.
    An EXIF orientation changes nothing here: the pixels are turned once the decoded image is
    freed (preprocessing.turn_upright), and a turn keeps their number."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height, is_jpeg = img.width, img.height, img.format == "JPEG"
    except Exception:  # noqa: BLE001  (decode_image gives the reason, in a sentence)
        return 0
    scale = 1
    while is_jpeg and scale < 8 and max(width, height) >= 2 * scale * img_size:
        scale *= 2
    return math.ceil(width / scale) * math.ceil(height / scale)


# A decode this large leaves hundreds of MB freed in its thread's malloc arena (Pillow's
# tobytes() in small chunks): kept, 20 such requests on different threads held 4 GB.
TRIM_PIXELS = 4_000_000


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def _give_back_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PixelBudget:
    """At most `limit` pixels decoded at once by all requests together: 20 requests each holding
    a 40-megapixel PNG took the server from 1.2 GB to 6.4 GB before (docs/reliability.md,
    Serving limits).

    One image larger than the whole budget still decodes, alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._free:
            self._free.wait_for(lambda: self.in_use + pixels <= self.limit)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._free:
                self.in_use -= pixels
                self._free.notify_all()


def _first_non_finite(net: torch.nn.Module) -> str | None:
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class Predictor:
    def __init__(self, model_dir: str | Path, backend: str = "auto",
                 max_decode_pixels: int = 80_000_000) -> None:
        model_dir = Path(model_dir)
        try:
            self.card = model_card.read_model_card(model_dir)
        except model_card.ModelCardError as exc:
            raise ModelLoadError(str(exc)) from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # all cores
        self.backend = choose_backend(backend, model_dir, self.device)
        if self.backend == "onnx":
            try:  # the rule model.json and the weights follow: no file from outside the folder
                model_card.file_inside(model_dir, ONNX_FILE)
            except model_card.ModelCardError as exc:
                raise ModelLoadError(str(exc)) from None
        try:
            self.model, _ = inference.load_model(model_dir, str(self.device))
            non_finite = _first_non_finite(self.model.model)
            if self.backend == "onnx":
                from ..model.export import OnnxEfficientDet

                # The same effdet bench (anchors, decoding, NMS) around ONNX Runtime's network.
                self.model.model = OnnxEfficientDet(model_dir / ONNX_FILE, device=self.device.type)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the model in {model_dir} ({type(exc).__name__}: {str(exc)[:300]}); use "
                "the unchanged contents of a training job's model.tar.gz."
            ) from None
        self.img_size = int(self.card["img_size"])
        self._check_weights(model_dir, non_finite)
        # Training validated GPUs under bf16-mixed where supported: predict the same way.
        self.autocast = (
            torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        )
        self.mean, self.std, self.fill = preprocessing.normalization_from_card(self.card)
        self.decoding = PixelBudget(max_decode_pixels)

    def _check_weights(self, model_dir: Path, non_finite: str | None) -> None:
        """Non-finite weights answer NaN (not JSON), and an ONNX network exported at another size
        than model.json's img_size fails on every request: both are refused here, at load."""
        weights = model_dir / self.card["weights_file"]
        if non_finite is not None:
            raise ModelLoadError(
                f"{weights} holds non-finite values (NaN or infinity) in {non_finite}; use the "
                "weights of a training job that finished."
            )
        if self.backend == "onnx":
            shape = list(self.model.model.session.get_inputs()[0].shape)
            if shape[1:] != [3, self.img_size, self.img_size]:
                raise ModelLoadError(
                    f"{model_dir / ONNX_FILE} takes input of shape {shape}, but "
                    f"{model_dir / model_card.METADATA_FILE} says 'img_size' {self.img_size}; use "
                    "the unchanged contents of one training job's model.tar.gz (or SERVE_BACKEND=torch)."
                )

    def prepare(self, data: bytes, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image bytes -> uint8 CHW at img_size and the image's (width, height). CPU work."""
        pixels = decoded_pixels(data, self.img_size)
        with self.decoding.hold(pixels):
            try:
                array, size = preprocessing.decode_image(data, self.img_size, max_pixels)
                height, width = array.shape[:2]
                if min(preprocessing.resized_shape(height, width, self.img_size)) < 1:
                    raise preprocessing.ImageDecodeError(
                        f"the image is {size[0]}x{size[1]}, too narrow to scale to {self.img_size} px "
                        "(its short side would be under one pixel)"
                    )
                padded, _ = preprocessing.resize_and_pad(array, self.img_size, self.fill)
            finally:
                array = None
                if pixels >= TRIM_PIXELS:
                    _give_back_freed_memory()
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
