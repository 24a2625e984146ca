"""The bucket check and the upload of local channel folders, skipping what is already there."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from ..errors import UserInputError

# The skip rule compares the size and a SHA-256 of the file's bytes, kept as the object's
# metadata at upload. S3's ETag is not used: it is an MD5 only for single-part uploads without
# KMS, and for multipart uploads it depends on the part size the uploader chose, so the same
# file can have two ETags and a second launch would upload it again.
CHECKSUM_KEY = "sha256"
WRITE_CHECK_KEY = ".sm-effdet-write-check"


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def check_bucket(s3, bucket: str, prefix: str) -> None:
    """The bucket exists and these credentials can write under the prefix (a tiny object is
    written and deleted), before anything else is uploaded or created."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UserInputError(
                f"the bucket '{bucket}' does not exist; create it in your region "
                f"(aws s3 mb s3://{bucket}) or pass an existing one with --bucket."
            ) from None
        if code in ("301", "PermanentRedirect"):
            where = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
                "x-amz-bucket-region", "another region")
            raise UserInputError(
                f"the bucket '{bucket}' is in {where}, not in {s3.meta.region_name} where the job "
                "runs; SageMaker reads and writes only buckets of its own region: pass one with "
                "--bucket or set AWS_REGION to the bucket's region."
            ) from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise UserInputError(
                f"the bucket '{bucket}' cannot be read with these credentials; pass a bucket of "
                "your account with --bucket or get access to it."
            ) from None
        raise
    key = f"{prefix.strip('/')}/{WRITE_CHECK_KEY}".lstrip("/")
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"")
        s3.delete_object(Bucket=bucket, Key=key)
    except ClientError:
        raise UserInputError(
            f"cannot write to s3://{bucket}/{prefix.strip('/')}/ with these credentials; pass a "
            "bucket you can write with --bucket, or get s3:PutObject on it."
        ) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Progress:
    """A progress bar in bytes on stderr; on a terminal it redraws, elsewhere it prints only the
    final line (logs of CI runs stay short)."""

    def __init__(self, label: str, total: int, stream=None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and now - self.last > 0.1:
            self.last = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        share = self.done / self.total if self.total else 1.0
        bar = "#" * int(share * 30)
        return f"{self.label} [{bar:<30}] {_size(self.done)} / {_size(self.total)} ({share:.0%})"

    def close(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
        self.stream.flush()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def remote_objects(s3, bucket: str, prefix: str) -> dict[str, int]:
    sizes = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            sizes[item["Key"]] = item["Size"]
    return sizes


class UploadInterrupted(KeyboardInterrupt):
    """Ctrl-C during an upload: the message says what is up and that a rerun resumes."""


def upload_folder(s3, folder: Path, uri: str, out=sys.stdout, progress_stream=None) -> int:
    """Upload every file under `folder` to the `uri` prefix, skipping files already there with
    the same size and SHA-256; returns the bytes uploaded. Ctrl-C raises UploadInterrupted."""
    bucket, prefix = split_s3(uri)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    todo: list[tuple[Path, str, str]] = []
    try:
        remote = remote_objects(s3, bucket, prefix)
        for path in files:
            key = prefix + path.relative_to(folder).as_posix()
            digest = sha256(path)
            if remote.get(key) == path.stat().st_size:
                head = s3.head_object(Bucket=bucket, Key=key)
                if head.get("Metadata", {}).get(CHECKSUM_KEY) == digest:
                    continue
            todo.append((path, key, digest))
    except KeyboardInterrupt:
        raise UploadInterrupted(
            f"interrupted while comparing {folder} with {uri}, before any file was uploaded; "
            "run the same command again to upload it."
        ) from None
    total = sum(p.stat().st_size for p, _, _ in todo)
    progress = Progress(f"upload {folder.name}", total, progress_stream)
    done = 0
    try:
        for path, key, digest in todo:
            s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {CHECKSUM_KEY: digest}},
                           Callback=progress)
            done += 1
    except KeyboardInterrupt:
        # The file in flight may have landed whole before the interrupt reached it (a PUT is
        # atomic; an interrupted multipart upload is aborted by s3transfer, never left half).
        if done < len(todo) and _is_up(s3, bucket, todo[done][1], todo[done][2]):
            done += 1
        up = len(files) - len(todo) + done
        if progress.tty:
            progress.stream.write("\n")
        raise UploadInterrupted(
            f"interrupted during the upload of {folder} to {uri}: {up} of {len(files)} files are "
            f"there ({done} uploaded now); run the same command again to upload the other "
            f"{len(files) - up}: files already there with the same key, size and SHA-256 are "
            "skipped."
        ) from None
    if todo:
        progress.close()
    print(f"{folder} -> {uri}: {len(todo)} files uploaded ({_size(total)}), "
          f"{len(files) - len(todo)} already there", file=out)
    return total


def _is_up(s3, bucket: str, key: str, digest: str) -> bool:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception:  # noqa: BLE001 - a failed look counts it as not up: never over-promise
        return False
    return head.get("Metadata", {}).get(CHECKSUM_KEY) == digest
