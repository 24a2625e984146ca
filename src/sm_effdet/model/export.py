"""ONNX export of the network and its parity check; ONNX Runtime as a drop-in network.

Only effdet's EfficientDet (bench.model: image -> per-level class and box maps) is exported.
Anchor decoding and NMS stay in effdet's post-processing (DetBenchPredict), which is cheap and
data-dependent (top-k, batched NMS), so that both backends share it exactly:

    bench = effdet.create_model(..., bench_task="predict")
    bench.model = OnnxEfficientDet("model/model.onnx")   # same detections, ONNX Runtime inside

torch's dynamo exporter (torch.export) is used rather than the TorchScript one: it traces
effdet's TF-style "same" padding to constant pads for the fixed input size, so the graph has no
shape arithmetic left and runs faster in ONNX Runtime; the TorchScript exporter is deprecated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import ONNX_FILE, atomic_write_bytes

log = logging.getLogger(__name__)

INPUT_NAME = "images"
# Largest |onnx - torch| allowed, relative to the largest |torch| output (at least 1).
TOLERANCE = 1e-3
# For tests only: a tolerance the check must meet (0 makes the real, tiny differences fail it).
TOLERANCE_ENV = "SM_EFFDET_ONNX_TOLERANCE"


class ExportError(Exception):
    """The network could not be exported, or the export does not match PyTorch."""


def output_names(num_levels: int) -> list[str]:
    return [f"class_{i}" for i in range(num_levels)] + [f"box_{i}" for i in range(num_levels)]


@contextlib.contextmanager
def _quiet_exporter():
    # The exporter prints its progress and warns about torchvision ops effdet never uses; the
    # job's log should carry one line about the export, not forty.
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnx_ir", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as out:
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                out.close()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(net: torch.nn.Module, img_size: int, path: Path) -> dict[str, Any]:
    """Export an effdet EfficientDet (batch dimension dynamic) to `path`, then check it.

    Raises ExportError when the exporter fails or ONNX Runtime's outputs differ from PyTorch's
    beyond the tolerance; `path` is then left untouched. Returns what model.json records.
    """
    net = net.eval().cpu()
    num_levels = net.config.num_levels
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1.
    example = torch.randn(2, 3, img_size, img_size)
    started = time.monotonic()
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                net, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                output_names=output_names(num_levels),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            )
            data = program.model_proto.SerializeToString()
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {_first_line(exc)}") from exc
    seconds = time.monotonic() - started
    difference = check_parity(net, data, img_size)
    atomic_write_bytes(path, data)
    opset = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "file": path.name,
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "inputs": {INPUT_NAME: ["batch", 3, img_size, img_size]},
        "outputs": output_names(num_levels),
        "export_seconds": round(seconds, 1),
        "max_relative_difference": difference,
    }


def check_parity(net: torch.nn.Module, data: bytes, img_size: int) -> float:
    """Run the exported model and the network on one random batch; raise if they differ."""
    tolerance = float(os.environ.get(TOLERANCE_ENV, TOLERANCE))
    # Batch 3, unlike the export's 2, so that the dynamic batch dimension is checked too.
    x = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    try:
        got = OnnxEfficientDet(data, device="cpu")(x)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the export: {_first_line(exc)}") from exc
    with torch.no_grad():
        want = net(x)
    difference = 0.0
    for got_level, want_level in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        if got_level.shape != want_level.shape:
            raise ExportError(
                f"ONNX Runtime output shape {tuple(got_level.shape)} differs from PyTorch's "
                f"{tuple(want_level.shape)}"
            )
        scale = max(1.0, float(want_level.abs().max()))
        difference = max(difference, float((got_level - want_level).abs().max()) / scale)
    if not difference <= tolerance:  # `not <=` also refuses NaN
        raise ExportError(
            f"ONNX Runtime's outputs differ from PyTorch's by {difference:.2e} (relative), more "
            f"than the tolerance {tolerance:.0e}"
        )
    return float(f"{difference:.3g}")


def predict_network(
    effdet_model_name: str, num_classes: int, img_size: int, state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """effdet's EfficientDet for prediction on the CPU, holding `state` (model.safetensors)."""
    from effdet import create_model

    bench = create_model(
        effdet_model_name, bench_task="predict", num_classes=num_classes,
        image_size=(img_size, img_size), pretrained=False, pretrained_backbone=False,
    )
    bench.model.load_state_dict(state)
    return bench.model.eval().cpu()


def export_for_job(
    effdet_model_name: str, num_classes: int, img_size: int, state: dict[str, torch.Tensor],
    folder: Path,
) -> tuple[list[Path], dict[str, Any]]:
    """Export the best weights to folder/model.onnx for model/.

    Returns the files to add to the model and model.json's entries. A failure is logged and
    recorded ("onnx": null and why), never raised: the PyTorch model is the job's product.
    """
    started = time.monotonic()
    try:
        net = predict_network(effdet_model_name, num_classes, img_size, state)
        record = export_onnx(net, img_size, folder / ONNX_FILE)
    except Exception as exc:  # noqa: BLE001 (an optional artifact must never fail the job)
        reason = str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {_first_line(exc)}"
        log.warning(
            "no ONNX export for %s (the PyTorch model is written as usual): %s",
            effdet_model_name, reason,
        )
        return [], {"onnx": None, "onnx_error": reason[:1000]}
    log.info(
        "ONNX export: %s, opset %d, %.1f s (export %.1f s, then a parity check with ONNX "
        "Runtime: max relative difference %.1e)",
        record["file"], record["opset"], time.monotonic() - started, record["export_seconds"],
        record["max_relative_difference"],
    )
    return [folder / ONNX_FILE], {"onnx": record}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class OnnxEfficientDet(torch.nn.Module):
    """An ONNX Runtime session that answers like effdet.EfficientDet.forward.

    forward(x) returns (class_out, box_out), lists of tensors per FPN level on x's device, so
    effdet's DetBenchPredict post-processes them unchanged.
    """

    def __init__(self, model: str | Path | bytes, device: str | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = _cpu_threads()  # the default may leave cores idle
        options.log_severity_level = 3  # errors only
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.num_levels = len(self.session.get_outputs()) // 2

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        outputs = [
            torch.from_numpy(o).to(x.device) for o in self.session.run(None, {self.input_name: array})
        ]
        return outputs[: self.num_levels], outputs[self.num_levels :]
