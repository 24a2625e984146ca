"""`serve` end to end: the real ./serve process on loopback, a real HTTP client (requests), a
model trained once by the real ./train, and the parity of validation and serving (issue 10).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import FAST, REPO
from PIL import Image

SERVE = REPO / "serve"
MAX_PIXELS = 4_000_000
MAX_PAYLOAD_MB = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE)], cwd=base, stdout=self._log_file, stderr=subprocess.STDOUT,
            env={
                **os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(self.port),
                "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
                "SERVE_MAX_IMAGE_PIXELS": str(MAX_PIXELS), "SERVE_MAX_PAYLOAD_MB": str(MAX_PAYLOAD_MB),
                **env,
            },
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                started = time.monotonic()
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
                assert time.monotonic() - started < 2  # answers fast even while loading
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise AssertionError("serve was not healthy within 180 s: " + log.read_text()[-3000:])

    def post(self, body: bytes, content_type: str = "image/jpeg", **headers: str) -> requests.Response:
        return requests.post(self.url + "/invocations", data=body,
                             headers={"Content-Type": content_type, **headers}, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log_file.close()


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    srv = Server(trained_model, tmp_path_factory.mktemp("log") / "serve.log")
    yield srv
    srv.stop()


def jpeg_bytes(base: Path, index: int = 0) -> bytes:
    return sorted((base / "input" / "data" / "training" / "images").glob("*.jpg"))[index].read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


ATTRS = "X-Amzn-SageMaker-Custom-Attributes"


def test_ping_and_execution_parameters(server):
    assert requests.get(server.url + "/ping", timeout=2).status_code == 200
    params = requests.get(server.url + "/execution-parameters", timeout=2).json()
    assert params == {"MaxConcurrentTransforms": 8, "BatchStrategy": "MultiRecord", "MaxPayloadInMB": MAX_PAYLOAD_MB}
    assert "loaded model tf_lite0 (tf_efficientdet_lite0) at 256 px, 3 classes: rectangle, ellipse, triangle" in server.log.read_text()


def test_single_image_in_pixels_and_normalised(server, trained_model):
    data = jpeg_bytes(trained_model)
    width, height = Image.open(io.BytesIO(data)).size
    response = server.post(data, **{ATTRS: "score_threshold=0,max_detections=7"})
    assert response.status_code == 200, response.text
    (image,) = response.json()["predictions"]
    assert (image["width"], image["height"]) == (width, height)
    assert len(image["detections"]) == 7
    for det in image["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert det["box_normalized"] == pytest.approx([x1 / width, y1 / height, x2 / width, y2 / height])
        assert (det["category_id"], det["class_name"]) in {(3, "rectangle"), (7, "ellipse"), (12, "triangle")}
    scores = [d["score"] for d in image["detections"]]
    assert scores == sorted(scores, reverse=True)
    # the default threshold is model.json's recommended one (best F1 on validation), else 0.3
    card = json.loads((trained_model / "model" / "model.json").read_text())
    threshold = card.get("recommended_score_threshold", 0.3)
    default = server.post(data).json()["predictions"][0]["detections"]
    assert all(d["score"] >= threshold for d in default)
    everything = server.post(data, **{ATTRS: "score_threshold=0"}).json()["predictions"][0]["detections"]
    assert len(default) == sum(d["score"] >= threshold for d in everything)


def test_json_batch_with_options_in_the_body_and_jsonlines(server, trained_model):
    images = [jpeg_bytes(trained_model, i) for i in range(3)]
    body = json.dumps({"images": [b64(i) for i in images], "score_threshold": 0, "max_detections": 2})
    response = server.post(body.encode(), "application/json", **{ATTRS: "max_detections=9"})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [len(p["detections"]) for p in predictions] == [2, 2, 2]  # the body wins

    lines = "".join(json.dumps({"image": b64(i)}) + "\n" for i in images).encode()
    response = server.post(lines, "application/jsonlines", Accept="application/jsonlines",
                           **{ATTRS: "score_threshold=0,max_detections=2"})
    assert response.status_code == 200, response.text
    out = [json.loads(line) for line in response.text.splitlines()]
    assert [o["detections"] for o in out] == [p["detections"] for p in predictions]


def test_builtin_algorithm_format(server, trained_model):
    data = jpeg_bytes(trained_model)
    ours = server.post(data, **{ATTRS: "score_threshold=0,max_detections=5"}).json()["predictions"][0]
    response = server.post(data, "application/x-image", Accept="application/x-sagemaker-object-detection",
                           **{ATTRS: "score_threshold=0,max_detections=5"})
    assert response.status_code == 200, response.text
    rows = response.json()["prediction"]
    assert len(rows) == 5
    for row, det in zip(rows, ours["detections"]):
        assert row[0] == det["label"] - 1  # the built-in algorithm's 0-based class index
        assert row[1:] == pytest.approx([det["score"], *det["box_normalized"]])


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")
    return out.getvalue()


BAD_REQUESTS = {
    "non-image bytes": (400, lambda: (b"this is not an image", "image/jpeg", {})),
    "decompression bomb": (400, lambda: (_png(2500, 2000), "image/png", {})),
    "payload over the limit": (413, lambda: (os.urandom(MAX_PAYLOAD_MB * 1024 * 1024 + 10), "image/jpeg", {})),
    "unknown content type": (415, lambda: (b"a,b\n1,2\n", "text/csv", {})),
    "unknown accept": (406, lambda: (b"x", "image/jpeg", {"Accept": "text/html"})),
    "broken base64": (400, lambda: (b'{"images": ["%%%not base64"]}', "application/json", {})),
    "broken json": (400, lambda: (b'{"images": [', "application/json", {})),
    "broken jsonlines": (400, lambda: (b'{"image": "aGk="}\n{oops\n', "application/jsonlines", {})),
    "bad custom attribute": (400, lambda: (b"x", "image/jpeg", {ATTRS: "score_threshold=high"})),
    "empty body": (400, lambda: (b"", "image/jpeg", {})),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_sentence_and_the_server_keeps_serving(server, trained_model, name):
    status, make = BAD_REQUESTS[name]
    body, content_type, headers = make()
    response = server.post(body, content_type, **headers)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert 20 < len(message) <= 1024 and "Traceback" not in message and message.endswith(".")
    assert message.count(". ") == 0 or name == "non-image bytes", message
    good = server.post(jpeg_bytes(trained_model))
    assert good.status_code == 200 and "predictions" in good.json()


def test_sixteen_concurrent_clients_get_answers(server, trained_model):
    images = [jpeg_bytes(trained_model, i) for i in range(4)]

    def client(n: int) -> list[int]:
        session = requests.Session()
        codes = []
        for i in range(20):
            r = session.post(server.url + "/invocations", data=images[(n + i) % 4],
                             headers={"Content-Type": "image/jpeg"}, timeout=120)
            codes.append(r.status_code if "predictions" in r.json() else -1)
        return codes

    with ThreadPoolExecutor(16) as pool:
        codes = [c for cs in pool.map(client, range(16)) for c in cs]
    assert codes == [200] * 320
    log = server.log.read_text()
    assert log.count("POST /invocations status=200 latency_ms=") >= 320
    assert "images=1" in log


def test_validation_and_server_see_the_same_large_jpeg(server, trained_model, tmp_path):
    """The same 1600x1200 JPEG (drafted at 1/4) through the job's validation path and the server."""
    import torch
    from safetensors.torch import load_file

    from sm_effdet.data.dataset import DetectionDataset, collate
    from sm_effdet.data.formats import DataReport, ImageRecord
    from sm_effdet.data.transforms import eval_transform
    from sm_effdet.demo import draw_shapes_image
    from sm_effdet.hyperparameters import parse_hyperparameters
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization
    from sm_effdet.training.lightning_module import EfficientDetModule

    image, _ = draw_shapes_image(random.Random(5), 1600, 1200)
    path = tmp_path / "large.jpg"
    image.save(path, "JPEG", quality=90)
    record = ImageRecord(1, "large.jpg", path, 1600, 1200, np.array([[100, 100, 500, 400]], np.float32), np.array([1]))

    hp = parse_hyperparameters(FAST)
    fill = backbone_normalization("tf_efficientdet_lite0")["fill"]
    dataset = DetectionDataset([record], eval_transform(hp.img_size, fill), hp.img_size)
    bench = build_model(hp.backbone, 3, hp.img_size, pretrained=False, pretrained_dir=None)
    bench.model.load_state_dict(load_file(str(trained_model / "model" / "model.safetensors")))
    module = EfficientDetModule(bench, hp, None, DataReport()).eval()
    batch = collate([dataset[0]])
    with torch.no_grad():  # what validation_step does
        rows = bench(module.normalise(batch["images"]), batch["targets"])["detections"][0].numpy()
    rows[:, [0, 2]] = rows[:, [0, 2]].clip(0, 1600)
    rows[:, [1, 3]] = rows[:, [1, 3]].clip(0, 1200)

    response = server.post(path.read_bytes(), **{ATTRS: "score_threshold=0,max_detections=100"})
    assert response.status_code == 200, response.text
    served = response.json()["predictions"][0]["detections"]
    assert len(served) == len(rows) == 100
    for x1, y1, x2, y2, score, label in rows[:30]:
        matches = [
            d for d in served
            if d["label"] == int(label) and abs(d["score"] - score) <= 1e-3
            and np.abs(np.array(d["box"]) - [x1, y1, x2, y2]).max() <= 1.0
        ]
        assert matches, (x1, y1, x2, y2, score, label, served[:3])


@pytest.fixture(scope="module")
def old_card_server(trained_model, tmp_path_factory):
    """The model as an older job wrote it: ImageNet statistics, no padding fill in model.json."""
    base = tmp_path_factory.mktemp("old") / "opt_ml"
    shutil.copytree(trained_model / "model", base / "model")
    card_path = base / "model" / "model.json"
    card = json.loads(card_path.read_text())
    card["normalization"] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                             "input": "RGB scaled to [0, 1], then (x - mean) / std"}
    card_path.write_text(json.dumps(card))
    srv = Server(base, base.parent / "serve.log")
    yield srv, base / "model"
    srv.stop()


def test_old_model_json_predicts_the_same_through_inference_py_and_serve(old_card_server, server, trained_model, tmp_path):
    srv, model_dir = old_card_server
    image = tmp_path / "one.jpg"
    image.write_bytes(jpeg_bytes(trained_model, 1))
    script = subprocess.run(
        [sys.executable, "-I", str(model_dir / "inference.py"), str(model_dir), str(image), "--threshold", "0"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    by_script = json.loads(script.stdout.splitlines()[-1])["detections"]
    served = srv.post(image.read_bytes(), **{ATTRS: "score_threshold=0,max_detections=100"}).json()
    served = served["predictions"][0]["detections"]
    assert len(served) == len(by_script) == 100
    for a, b in zip(served[:30], by_script[:30]):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["box"] == pytest.approx(b["box"], abs=1e-3)
    # and the ImageNet statistics were really used: the current model.json predicts otherwise
    current = server.post(image.read_bytes(), **{ATTRS: "score_threshold=0,max_detections=100"}).json()
    current_scores = [d["score"] for d in current["predictions"][0]["detections"][:10]]
    assert current_scores != pytest.approx([d["score"] for d in served[:10]], abs=1e-4)


def test_sigterm_drains_the_request_in_flight_and_exits_0(old_card_server, trained_model):
    srv, _ = old_card_server
    body = json.dumps({"images": [b64(jpeg_bytes(trained_model, i % 4)) for i in range(24)]}).encode()
    result: dict = {}

    def in_flight() -> None:
        result["response"] = srv.post(body, "application/json")

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(0.5)  # the request is being decoded or predicted
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.log.read_text()[-3000:]
    thread.join(30)
    response = result["response"]
    assert response.status_code == 200 and len(response.json()["predictions"]) == 24
    assert "stopped" in srv.log.read_text()


def test_make_n_deploy_prints_the_sm_effdet_deploy_call_and_makes_none():
    out = subprocess.run(
        ["make", "-n", "deploy", "MODEL_DATA=s3://bucket/model.tar.gz", "ROLE=arn:aws:iam::1:role/r",
         "IMAGE_URI=1.dkr.ecr.us-east-1.amazonaws.com/sm-effdet:t", "REGION=us-east-1", "DEPLOY_NAME=ep1",
         'SERVE_ENV="SERVE_SCORE_THRESHOLD":"0.5"'],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # make deploy is a thin call of sm-effdet deploy (tests/test_launch_hosting.py runs it).
    assert 'sm-effdet deploy "s3://bucket/model.tar.gz"' in out.stdout
    for flag in ('--endpoint-name "ep1"', '--instance-type "ml.m5.xlarge"', '--role "arn:aws:iam::1:role/r"',
                 "--env 'SERVE_SCORE_THRESHOLD=0.5'", 'AWS_REGION="us-east-1"'):
        assert flag in out.stdout, out.stdout
    assert "aws sagemaker" not in out.stdout
