"""Local mode's file transfers: s3://, file:// URIs and plain paths, to and from the local tree.

An S3 prefix is downloaded as SageMaker downloads a channel (the paths below the prefix's folder
kept), a ManifestFile by the keys it lists; a folder is uploaded (or copied, for a local URI) as
SageMaker syncs checkpoints, with the objects the folder no longer has deleted on request.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import UserInputError, shorten
from .upload import split_s3


def uri_scheme(uri: str) -> str:
    """'s3', 'https' or 'file' (a file:// URI or a plain local path)."""
    scheme = urlparse(uri).scheme.lower()
    return scheme if scheme in ("s3", "https") else "file"


def local_path_of(uri: str) -> Path:
    if uri.lower().startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri).expanduser().absolute()


def join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _relative_key(key: str, folder: str) -> str | None:
    """`key` relative to `folder`, or None for a folder marker or a key that would climb out."""
    relative = key[len(folder):]
    normal = os.path.normpath(relative) if relative else ""
    if not relative or relative.endswith("/") or normal.startswith("..") or os.path.isabs(normal):
        return None
    return normal


def download_prefix(s3, uri: str, dest: Path) -> int:
    """Every object under the S3 prefix into `dest`, keeping the paths below the prefix's folder
    (as SageMaker does: s3://b/data/training/ gives dest/a.jpg, s3://b/data/train gives
    dest/train.../a.jpg). Returns the number of objects."""
    bucket, prefix = split_s3(uri)
    folder = prefix[: prefix.rfind("/") + 1]
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = _relative_key(item["Key"], folder)
            if relative is None:
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            count += 1
    return count


def download_manifest(s3, uri: str, dest: Path) -> int:
    """The objects a ManifestFile lists ([{"prefix": "s3://..."}, "relative/key", ...])."""
    bucket, key = split_s3(uri)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        entries = json.loads(body)
        prefix = entries[0]["prefix"]
        relatives = entries[1:]
        assert all(isinstance(r, str) for r in relatives) and isinstance(prefix, str)
    except (ValueError, LookupError, TypeError, AssertionError):
        raise UserInputError(
            f"the manifest {shorten(uri)} is not a JSON list of a {{\"prefix\": \"s3://...\"}} "
            "object and relative keys; fix it or give the channel an S3Prefix."
        ) from None
    source_bucket, source_prefix = split_s3(prefix)
    for relative in relatives:
        normal = _relative_key(relative, "")
        if normal is None:
            raise UserInputError(
                f"the manifest {shorten(uri)} lists {shorten(relative)!r}, which is not a file "
                "below its prefix; list relative keys only."
            )
        target = dest / normal
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(source_bucket, source_prefix + relative, str(target))
    return len(relatives)


def upload_folder(s3, folder: Path, uri: str, delete: bool = False) -> int:
    """Every file under `folder` to the S3 prefix `uri`/; with `delete`, objects under the prefix
    that `folder` no longer has are removed (SageMaker's checkpoint sync does so)."""
    bucket, prefix = split_s3(join_uri(uri, ""))
    keys = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(folder).as_posix()
        s3.upload_file(str(path), bucket, key)
        keys.add(key)
    if delete:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"] not in keys:
                    s3.delete_object(Bucket=bucket, Key=item["Key"])
    return len(keys)


def put_file(s3, path: Path, uri: str) -> None:
    if uri_scheme(uri) == "s3":
        bucket, key = split_s3(uri)
        s3.upload_file(str(path), bucket, key)
    else:
        target = local_path_of(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def sync_up(s3, folder: Path, uri: str, delete: bool = False) -> int:
    if uri_scheme(uri) == "s3":
        return upload_folder(s3, folder, uri, delete)
    target = local_path_of(uri)
    if delete and target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target, dirs_exist_ok=True)
    return sum(1 for p in folder.rglob("*") if p.is_file())


def sync_down(s3, uri: str, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    if uri_scheme(uri) == "s3":
        return download_prefix(s3, join_uri(uri, ""), folder)
    source = local_path_of(uri)
    if not source.is_dir():
        return 0
    shutil.copytree(source, folder, dirs_exist_ok=True)
    return sum(1 for p in folder.rglob("*") if p.is_file())


def s3_uris(request: Mapping[str, Any]) -> list[str]:
    """Every URI of the request that local mode reads or writes."""
    uris = [c["DataSource"]["S3DataSource"]["S3Uri"] for c in request.get("InputDataConfig") or []]
    uris.append(request["OutputDataConfig"]["S3OutputPath"])
    uris += [(request.get("CheckpointConfig") or {}).get("S3Uri")]
    uris += [(request.get("TensorBoardOutputConfig") or {}).get("S3OutputPath")]
    return [uri for uri in uris if uri and uri_scheme(uri) == "s3"]


def default_s3_client():
    """For a caller that passes no client (the CLI passes its own): the boto3 way, with
    botocore's standard retry mode as the launcher's clients have."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard"}))
