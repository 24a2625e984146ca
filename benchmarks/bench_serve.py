"""`make bench` sections on serving and prediction: 5 (./serve against a plain loop, and its
memory), 6 (PyTorch against ONNX Runtime) and 12 (./serve's memory under large images)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (
    REPO,
    images_per_second,
    jpeg_set,
    percentile,
    run_child,
    untrained_model_folder,
    wait_healthy,
)


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


# ---------------------------------------------------------------- 5. serving on CPU


def serving(work: Path, requests_per_run: int, rss_requests: int) -> list[str]:
    """./serve against the plain loop, both on the CPU with the same model and images."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests
    import torch

    from sm_effdet.model import inference
    from sm_effdet.model.export import export_onnx

    img_size = 256
    base = work / "serve-tree"
    bench = untrained_model_folder(base / "model", img_size)
    folder = jpeg_set(work / "serve-images", 640, 480, 16)
    images = [p.read_bytes() for p in sorted(folder.glob("images/*.jpg"))]

    # The plain loop: decode, preprocess, predict, one image at a time, all cores.
    torch.set_num_threads(os.cpu_count() or 1)
    model, loaded = inference.load_model(base / "model")
    inference.predict(model, loaded, images[0])
    latencies = []
    started = time.perf_counter()
    for i in range(requests_per_run):
        t = time.perf_counter()
        inference.predict(model, loaded, images[i % len(images)])
        latencies.append(time.perf_counter() - t)
    loop_ips = requests_per_run / (time.perf_counter() - started)
    lines = [f"  plain loop (model called directly): {loop_ips:6.1f} img/s, p50 "
             f"{percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms"]
    del model
    # What a job's model folder holds: model.onnx too, which `auto` serves on CPU.
    export_onnx(bench.model, img_size, base / "model" / "model.onnx")
    log = (work / "serve.log").open("w")

    def start_server(backend: str) -> tuple[subprocess.Popen, str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "SERVE_BACKEND": backend}
        server = subprocess.Popen([sys.executable, str(REPO / "serve")], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        return server, f"http://127.0.0.1:{port}"

    def post(session, url: str, i: int) -> float:
        t = time.perf_counter()
        r = session.post(url + "/invocations", data=images[i % len(images)],
                         headers={"Content-Type": "image/jpeg"}, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - t

    try:
        for backend in ("torch", "onnx"):
            server, url = start_server(backend)
            try:
                wait_healthy(url)
                for concurrency in (1, 8):
                    def client(n: int) -> list[float]:
                        session = requests.Session()
                        return [post(session, url, n + k * concurrency)
                                for k in range(requests_per_run // concurrency)]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        latencies = [t for ts in pool.map(client, range(concurrency)) for t in ts]
                    ips = len(latencies) / (time.perf_counter() - started)
                    lines.append(
                        f"  serve ({backend}), concurrency {concurrency}: {ips:6.1f} img/s = "
                        f"{ips / loop_ips:.2f}x the plain loop, p50 {percentile(latencies, 50) * 1000:.0f} ms, "
                        f"p99 {percentile(latencies, 99) * 1000:.0f} ms"
                    )
            finally:
                server.terminate()
                server.wait(60)
        # Memory on a fresh server with the default backend: after 10 requests and after rss_requests.
        server, url = start_server("auto")
        try:
            wait_healthy(url)
            session = requests.Session()
            for i in range(10):
                post(session, url, i)
            after_10 = _rss_mb(server.pid)
            for i in range(10, rss_requests):
                post(session, url, i)
            after_n = _rss_mb(server.pid)
            lines.append(f"  serve (auto: onnx) RSS: {after_10:.0f} MB after 10 requests, "
                         f"{after_n:.0f} MB after {rss_requests} (+{after_n - after_10:.0f} MB)")
        finally:
            server.terminate()
            server.wait(60)
    finally:
        log.close()
    return lines


# ---------------------------------------------------------------- 6. PyTorch against ONNX Runtime


def child_onnx_cpu(img_size: str, batches: str, rounds: str) -> dict:
    """Predict bench (network + effdet's post-processing), PyTorch against ONNX Runtime."""
    import torch
    from effdet import create_model

    from sm_effdet.model.export import OnnxEfficientDet, export_onnx

    size = int(img_size)
    # Random weights: speed does not depend on them; both benches hold the same ones.
    torch_bench = create_model("tf_efficientdet_lite0", bench_task="predict", num_classes=3,
                               image_size=(size, size), pretrained=False, pretrained_backbone=False).eval()
    onnx_bench = create_model("tf_efficientdet_lite0", bench_task="predict", num_classes=3,
                              image_size=(size, size), pretrained=False, pretrained_backbone=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        record = export_onnx(torch_bench.model, size, Path(tmp) / "model.onnx")
        export_seconds = time.perf_counter() - started
        onnx_bench.model = OnnxEfficientDet(Path(tmp) / "model.onnx", device="cpu")
    result = {"export_seconds": export_seconds, "check": record["max_relative_difference"],
              "threads": torch.get_num_threads()}
    for batch in map(int, batches.split(",")):
        x = torch.randn(batch, 3, size, size)
        rates = {"torch": 0.0, "onnx": 0.0}
        with torch.inference_mode():
            for bench in (torch_bench, onnx_bench):
                bench(x)  # warm-up: kernels chosen, memory arenas grown
            # Interleaved rounds, best of each: other load on the machine hits both alike.
            for _ in range(int(rounds)):
                for name, bench in (("torch", torch_bench), ("onnx", onnx_bench)):
                    rates[name] = max(rates[name], images_per_second(lambda b=bench, x=x: b(x), batch))
        result[f"batch_{batch}"] = rates
    return result


def onnx_vs_pytorch(img_size: int, rounds: int) -> str:
    result = run_child("onnx_cpu", str(img_size), "1,8", str(rounds))
    lines = [f"  export {result['export_seconds']:.1f} s (with its parity check), "
             f"{result['threads']} threads"]
    for batch in (1, 8):
        rates = result[f"batch_{batch}"]
        lines.append(
            f"  {img_size} px, batch {batch}: PyTorch {rates['torch']:6.2f} img/s, ONNX Runtime "
            f"{rates['onnx']:6.2f} img/s = {rates['onnx'] / rates['torch']:.2f}x"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- 12. serving memory


def decode_memory(work: Path, concurrent: int) -> list[str]:
    """Peak RSS of ./serve (VmHWM) for `concurrent` requests of a 39.7-megapixel PNG at once."""
    import io
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from PIL import Image

    base = work / "decode-tree"
    untrained_model_folder(base / "model", 256)
    out = io.BytesIO()
    Image.new("RGB", (7280, 5456), (90, 140, 200)).save(out, "PNG")
    png = out.getvalue()
    lines = [f"  {concurrent} concurrent requests, each a 7280x5456 PNG ({len(png) / 1000:.0f} kB)"]
    for label, budget in (("decode budget 80,000,000 px (default)", "80000000"),
                          ("budget lifted (every request decodes at once)", "10000000000")):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "SERVE_BACKEND": "torch",
               "SERVE_MAX_DECODE_PIXELS": budget}
        with (work / "decode-serve.log").open("a") as log:
            server = subprocess.Popen([sys.executable, str(REPO / "serve")], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url)
            ready = _rss_mb(server.pid)

            def one(_: int) -> int:
                return requests.post(url + "/invocations", data=png, headers={"Content-Type": "image/png"},
                                     timeout=600).status_code

            started = time.perf_counter()
            with ThreadPoolExecutor(concurrent) as pool:
                codes = list(pool.map(one, range(concurrent)))
            seconds = time.perf_counter() - started
            status = Path(f"/proc/{server.pid}/status").read_text()
            peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
            lines.append(
                f"  {label}: RSS {ready:.0f} MB ready, peak {peak:.0f} MB, {_rss_mb(server.pid):.0f} MB "
                f"after; {seconds:.1f} s for all, answers {sorted(set(codes))}"
            )
        finally:
            server.terminate()
            server.wait(60)
    return lines

