"""The tests' network guard (tests/netguard/sitecustomize.py) refuses connections outside
loopback, in the test process and in every Python process a test starts."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import sitecustomize as guard


def test_guard_refuses_outside_addresses_and_allows_loopback(monkeypatch):
    attempted = []
    # The real connect is replaced first, so that even a broken guard sends nothing anywhere.
    monkeypatch.setattr(guard, "_original_connect", lambda sock, address: attempted.append(address))
    with socket.socket() as s:
        with pytest.raises(guard.OutsideConnectionError, match="192.0.2.10"):
            s.connect(("192.0.2.10", 443))
    with socket.socket(socket.AF_INET6) as s:
        with pytest.raises(guard.OutsideConnectionError):
            s.connect(("2001:db8::1", 443, 0, 0))
    with socket.socket() as s:
        with pytest.raises(guard.OutsideConnectionError, match="sagemaker.us-east-1"):
            s.connect(("sagemaker.us-east-1.amazonaws.com", 443))
    assert attempted == []
    with socket.socket() as s:
        s.connect(("127.0.0.1", 9))
        s.connect(("localhost", 9))
    assert attempted == [("127.0.0.1", 9), ("localhost", 9)]


def test_guard_is_loaded_in_processes_the_tests_start():
    script = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.10', 443), timeout=0.1)\n"
        "except ConnectionRefusedError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    # The address is refused before connect() runs: create_connection never reaches the wire.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "OutsideConnectionError", out.stderr


def test_emulator_answers_on_loopback(aws):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="guard-check")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["guard-check"]
    assert aws.startswith("http://127.0.0.1:")
