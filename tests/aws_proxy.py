"""An HTTP proxy on 127.0.0.1 in front of the AWS emulator, for tests of what clients send.

It forwards every request to moto unchanged and records, for each, the operation, who signed it
(access key, region and service from the SigV4 Authorization header) and the client (its
User-Agent); it notes the keys STS hands out, so a test can tell a role's requests from the
caller's own. moto completes a training job at once; the proxy can answer a job's first
describes with InProgress, as SageMaker does while a job runs, so waiting code really waits.
A client marks where a part of a test begins with GET /__part__/NAME?hold=N (not forwarded).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CREDENTIAL = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")
ISSUED_KEY = re.compile(rb"<AccessKeyId>([^<]+)</AccessKeyId>")
# Headers that describe one hop of HTTP, not the request: the proxy sets its own.
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect",
       "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Call:
    part: str
    operation: str  # "SageMaker.DescribeTrainingJob", "sts:AssumeRole", "s3:PUT /bucket/key"
    key: str | None
    region: str | None
    service: str | None
    agent: str
    body: bytes = b""


@dataclass
class Recorder:
    target: str  # host:port of the emulator
    hold: int = 0  # describes of each training job answered InProgress (set per part)
    calls: list[Call] = field(default_factory=list)
    issued_keys: set[str] = field(default_factory=set)
    part: str = ""
    described: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def in_part(self, part: str) -> list[Call]:
        return [c for c in self.calls if c.part == part]


def operation_of(method: str, path: str, headers, body: bytes) -> str:
    target = headers.get("X-Amz-Target")
    if target:
        return target
    if body and b"Action=" in body:
        action = parse_qs(body.decode(errors="replace")).get("Action", ["?"])[0]
        return f"query:{action}"
    query_action = parse_qs(urlsplit(path).query).get("Action")
    if query_action:
        return f"query:{query_action[0]}"
    return f"{method} {urlsplit(path).path}"


def make_handler(recorder: Recorder):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the test reads the recorder
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self) -> None:
            body = self._body()
            if self.path.startswith("/__part__/"):
                marker = urlsplit(self.path)
                with recorder.lock:
                    recorder.part = marker.path.split("/", 2)[2]
                    recorder.hold = int(parse_qs(marker.query).get("hold", [recorder.hold])[0])
                    recorder.described.clear()
                self._reply(200, [], b"ok")
                return
            match = CREDENTIAL.search(self.headers.get("Authorization", ""))
            key, region, service = match.groups() if match else (None, None, None)
            operation = operation_of(self.command, self.path, self.headers, body)
            with recorder.lock:
                recorder.calls.append(Call(recorder.part, operation, key, region, service,
                                           self.headers.get("User-Agent", ""), body))
            upstream = http.client.HTTPConnection(recorder.target, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            upstream.close()
            if operation == "query:AssumeRole":
                with recorder.lock:
                    recorder.issued_keys.update(k.decode() for k in ISSUED_KEY.findall(data))
            if operation == "SageMaker.DescribeTrainingJob" and response.status == 200:
                data = hold(recorder, data)
            self._reply(response.status, response.getheaders(), data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


def hold(recorder: Recorder, data: bytes) -> bytes:
    """The job as SageMaker shows it while it runs, for its first `hold` describes."""
    described = json.loads(data)
    name = described.get("TrainingJobName", "")
    with recorder.lock:
        seen = recorder.described[name] = recorder.described.get(name, 0) + 1
    if seen > recorder.hold or described.get("TrainingJobStatus") != "Completed":
        return data
    described["TrainingJobStatus"] = "InProgress"
    described["SecondaryStatus"] = "Training"
    transitions = described.get("SecondaryStatusTransitions") or []
    described["SecondaryStatusTransitions"] = [*transitions, {
        "Status": "Training", "StartTime": described.get("CreationTime"),
        "StatusMessage": "Training image download completed. Training in progress."}]
    for finished in ("TrainingEndTime", "ModelArtifacts", "FinalMetricDataList"):
        described.pop(finished, None)
    return json.dumps(described).encode()


class RecordingProxy:
    def __init__(self, emulator_url: str, hold: int = 0):
        self.recorder = Recorder(target=urlsplit(emulator_url).netloc, hold=hold)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.recorder))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
