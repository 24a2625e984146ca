"""The bucket check and the upload of local channel folders, skipping what is already there.

A folder goes to a prefix named after its content (`dataset_folder`): two datasets that share a
folder name never mix, and a folder whose files changed gets a prefix of its own, so that what
the local check read is exactly what the job gets. A prefix that holds objects the folder lacks
is refused (or emptied of them with --sync) before anything is uploaded; unchanged files of an
earlier version are copied within S3 instead of uploaded again.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserInputError, shorten

# The skip rule compares the size and a SHA-256 of the file's bytes, kept as the object's
# metadata at upload. S3's ETag is not used: it is an MD5 only for single-part uploads without
# KMS, and for multipart uploads it depends on the part size the uploader chose, so the same
# file can have two ETags and a second launch would upload it again.
CHECKSUM_KEY = "sha256"
WRITE_CHECK_KEY = ".sm-effdet-write-check"
DATASETS = "datasets"  # PREFIX/datasets/NAME-DIGEST/: one folder's content
DIGEST_CHARS = 12  # 48 bits: two different folders of one name never share a prefix by chance


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


@dataclass
class FolderListing:
    """A local folder's files (relative POSIX path -> size, SHA-256), hashed once: the digest
    names the S3 prefix and the hashes decide what is uploaded."""

    folder: Path
    files: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        lines = "".join(f"{sha} {size} {name}\n" for name, (size, sha) in sorted(self.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def total(self) -> int:
        return sum(size for size, _ in self.files.values())


def list_folder(folder: Path) -> FolderListing:
    listing = FolderListing(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        listing.files[path.relative_to(folder).as_posix()] = (path.stat().st_size, sha256(path))
    return listing


def dataset_name(folder: Path) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", folder.resolve().name).strip("-") or "data"


def dataset_folder(listing: FolderListing) -> str:
    """NAME-DIGEST: the folder's name for people, its content's digest for identity."""
    return f"{dataset_name(listing.folder)}-{listing.digest[:DIGEST_CHARS]}"


def stale_objects(s3, listing: FolderListing, uri: str) -> list[str]:
    """The keys under `uri` that the folder lacks: the job would read them too."""
    bucket, prefix = split_s3(uri)
    return sorted(k for k in remote_objects(s3, bucket, prefix)
                  if k[len(prefix):] not in listing.files)


def check_prefixes(s3, targets: list[tuple[FolderListing, str]], sync: bool, out=sys.stdout) -> None:
    """Refuse a prefix holding objects its folder lacks (all are looked at before anything is
    deleted or uploaded); with `sync`, delete those objects."""
    stale = [(listing, uri, keys) for listing, uri in targets
             if (keys := stale_objects(s3, listing, uri))]
    if stale and not sync:
        listing, uri, keys = stale[0]
        raise UserInputError(
            f"{uri} holds {_objects(len(keys))} that {listing.folder} lacks (e.g. "
            f"{shorten(keys[0].rsplit('/', 1)[-1], 80)}), which the job would train on too; pass "
            "--sync to delete them, or delete them yourself."
        )
    for listing, uri, keys in stale:
        bucket, _ = split_s3(uri)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys a call
            s3.delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
        print(f"--sync: deleted {_objects(len(keys))} from {uri} that {listing.folder} lacks",
              file=out)


def _objects(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


def _earlier_versions(s3, bucket: str, prefix: str) -> dict[tuple[str, int], list[str]]:
    """(relative path, size) -> keys of that file in the other NAME-DIGEST folders of this
    dataset name, candidates for a copy within S3."""
    parent, _, own = prefix.rstrip("/").rpartition("/")
    name = own[: -(DIGEST_CHARS + 1)]
    found: dict[tuple[str, int], list[str]] = {}
    for key, size in remote_objects(s3, bucket, f"{parent}/{name}-").items():
        version, _, relative = key[len(parent) + 1:].partition("/")
        if version != own and len(version) == len(own) and relative:
            found.setdefault((relative, size), []).append(key)
    return found


class UploadInterrupted(KeyboardInterrupt):
    """Ctrl-C during an upload: the message says what is up and that a rerun resumes."""


def upload_folder(s3, listing: FolderListing, uri: str, out=sys.stdout, progress_stream=None) -> int:
    """Put every file of `listing` under the `uri` prefix: skipped when there with the same size
    and SHA-256, copied within S3 from an earlier version of the dataset when one holds it,
    uploaded otherwise; returns the bytes uploaded. Ctrl-C raises UploadInterrupted."""
    bucket, prefix = split_s3(uri)
    earlier = None
    todo: list[tuple[str, str]] = []
    copies: list[tuple[str, str, str]] = []
    there = 0
    try:
        remote = remote_objects(s3, bucket, prefix)
        for relative, (size, digest) in listing.files.items():
            key = prefix + relative
            if remote.get(key) == size and _checksum(s3, bucket, key) == digest:
                there += 1
                continue
            if earlier is None:
                earlier = _earlier_versions(s3, bucket, prefix)
            source = next((k for k in earlier.get((relative, size), [])
                           if _checksum(s3, bucket, k) == digest), None)
            if source:
                copies.append((source, key, digest))
            else:
                todo.append((relative, digest))
        for source, key, digest in copies:
            s3.copy({"Bucket": bucket, "Key": source}, bucket, key, ExtraArgs={
                "Metadata": {CHECKSUM_KEY: digest}, "MetadataDirective": "REPLACE"})
    except KeyboardInterrupt:
        raise UploadInterrupted(
            f"interrupted while comparing {listing.folder} with {uri}, before any file was "
            "uploaded; run the same command again to upload it (what was copied within S3 is "
            "skipped then)."
        ) from None
    total = sum(listing.files[relative][0] for relative, _ in todo)
    progress = Progress(f"upload {listing.folder.name}", total, progress_stream)
    done = 0
    try:
        for relative, digest in todo:
            if _size_now(listing.folder / relative) != listing.files[relative][0]:
                raise UserInputError(
                    f"{listing.folder / relative} changed while sm-effdet was checking and "
                    f"uploading {listing.folder}; the files already up stay under {uri}: run the "
                    "command again when the folder no longer changes."
                )
            s3.upload_file(str(listing.folder / relative), bucket, prefix + relative,
                           ExtraArgs={"Metadata": {CHECKSUM_KEY: digest}}, Callback=progress)
            done += 1
    except KeyboardInterrupt:
        # The file in flight may have landed whole before the interrupt reached it (a PUT is
        # atomic; an interrupted multipart upload is aborted by s3transfer, never left half).
        if done < len(todo) and _is_up(s3, bucket, prefix + todo[done][0], todo[done][1]):
            done += 1
        files = len(listing.files)
        up = files - len(todo) + done
        if progress.tty:
            progress.stream.write("\n")
        raise UploadInterrupted(
            f"interrupted during the upload of {listing.folder} to {uri}: {up} of {files} files "
            f"are there ({done} uploaded now); run the same command again to upload the other "
            f"{files - up}: files already there with the same key, size and SHA-256 are skipped."
        ) from None
    if todo:
        progress.close()
    copied = f"{len(copies)} copied within S3 from an earlier upload, " if copies else ""
    print(f"{listing.folder} -> {uri}: {len(todo)} files uploaded ({_size(total)}), {copied}"
          f"{there} already there", file=out)
    return total


def _size_now(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # deleted since it was listed
        return None


def _checksum(s3, bucket: str, key: str) -> str | None:
    return s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(CHECKSUM_KEY)


def _is_up(s3, bucket: str, key: str, digest: str) -> bool:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception:  # noqa: BLE001 - a failed look counts it as not up: never over-promise
        return False
    return head.get("Metadata", {}).get(CHECKSUM_KEY) == digest
