"""Pipe mode: a Ground Truth augmented manifest streamed through a FIFO, cached to disk once.

SageMaker streams a Pipe channel anew for every epoch through the FIFO
/opt/ml/input/data/<channel>_<epoch>. With S3DataType AugmentedManifestFile, AttributeNames
["source-ref", "<label attribute>"] and RecordWrapperType RecordIO, as the built-in Object
Detection algorithm takes it, each line arrives as RecordIO records: the image's bytes, then
the label's JSON (then the metadata's, when its attribute is listed too). The job reads epoch
0's stream once into a folder holding the images and a manifest in Ground Truth's shape, and
trains from that folder like a File-mode channel: shuffling, resuming and every later epoch
then need no stream, and the FIFOs of later epochs are never opened.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import stat
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from ...errors import UserInputError, shorten
from .groundtruth import METADATA_SUFFIX, SOURCE_REF

log = logging.getLogger(__name__)

# RecordIO as MXNet's dmlc-core writes it and SageMaker's pipe wraps records: a magic word, a
# little-endian word of continuation flag (top 3 bits) and length (low 29 bits), the payload
# padded to 4 bytes. A record holding the magic word is split there into parts, the magic
# dropped; the reader puts it back between them.
MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3

MANIFEST_NAME = "pipe.manifest"
DEFAULT_LABEL_ATTRIBUTE = "bounding-box"
# Environment variables (documented in docs/data.md): where the cache goes, how long to wait for
# SageMaker to start a stream, how much disk to leave for checkpoints and the model.
CACHE_DIR_VARIABLE = "SM_EFFDET_PIPE_CACHE_DIR"
WAIT_VARIABLE = "SM_EFFDET_PIPE_WAIT_SECONDS"
MIN_FREE_VARIABLE = "SM_EFFDET_PIPE_MIN_FREE_BYTES"
DEFAULT_WAIT_S = 600.0
DEFAULT_MIN_FREE_BYTES = 2 * 1024**3


def pipe_channels(input_data_config: Mapping[str, Mapping]) -> list[str]:
    """The channels SageMaker streams (environment.py has refused every other kind of Pipe)."""
    return [n for n, s in input_data_config.items() if s.get("TrainingInputMode") == "Pipe"]


def cache_pipe_channels(
    input_data: Path, input_data_config: Mapping[str, Mapping], channels: Mapping[str, Path],
    label_attribute: str | None,
) -> dict[str, Path]:
    """`channels` with each Pipe channel replaced by its cached folder (read from epoch 0's
    FIFO, or found already cached: Lightning's DDP processes start after the first has read)."""
    result = dict(channels)
    names = pipe_channels(input_data_config)
    if not names:
        return result
    root = Path(os.environ.get(CACHE_DIR_VARIABLE) or input_data.parent / "pipe-cache")
    for name in names:
        result[name] = cache_channel(input_data / f"{name}_0", root / name, name,
                                     label_attribute or DEFAULT_LABEL_ATTRIBUTE)
    return result


def cache_channel(fifo: Path, folder: Path, channel: str, label_attribute: str) -> Path:
    if (folder / MANIFEST_NAME).is_file():
        log.info("Pipe channel '%s': using the images cached in %s", channel, folder)
        return folder
    partial = folder.with_name(folder.name + ".partial")
    for stale in (partial, folder):  # left by an earlier attempt in this container
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.monotonic()
    try:
        with _open_stream(fifo, _env_float(WAIT_VARIABLE, DEFAULT_WAIT_S), channel) as stream:
            images, records, size = _write_cache(stream, partial, channel, label_attribute, fifo)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-cached is ever read
        raise
    partial.rename(folder)
    log.info(
        "Pipe channel '%s': cached %d images (%d RecordIO records, %.1f MB) from %s into %s in "
        "%.1f s; training reads them from disk and opens no later epoch's FIFO",
        channel, images, records, size / 1e6, fifo, folder, time.monotonic() - started,
    )
    return folder


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise UserInputError(
            f"environment variable {name} is '{shorten(os.environ[name])}'; give a number."
        ) from None


def _open_stream(fifo: Path, wait_s: float, channel: str) -> BinaryIO:
    """Open the FIFO and wait, at most `wait_s`, for SageMaker to start writing: a plain open
    of a FIFO that nobody writes blocks forever. A regular file (a local run) opens at once."""
    deadline = time.monotonic() + wait_s
    while not os.path.lexists(fifo):
        if time.monotonic() > deadline:
            raise UserInputError(
                f"Pipe channel '{channel}' has no stream: {fifo} did not appear within "
                f"{wait_s:.0f} s; check the channel's S3DataType (AugmentedManifestFile) and "
                "S3Uri, or use File mode."
            )
        time.sleep(0.2)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            # Linux reports no hang-up on a FIFO no writer has opened yet: this waits for data.
            if not poller.poll(max(deadline - time.monotonic(), 0) * 1000):
                raise UserInputError(
                    f"Pipe channel '{channel}': nothing was written to {fifo} within "
                    f"{wait_s:.0f} s; check that the channel's augmented manifest lists images "
                    f"(or raise {WAIT_VARIABLE})."
                )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=1 << 20)
    except BaseException:
        os.close(fd)
        raise


def read_records(stream: BinaryIO, source: Path) -> Iterator[bytes]:
    """The RecordIO records of `stream`, multi-part records joined."""
    parts: list[bytes] | None = None
    offset = 0
    while True:
        header = stream.read(8)
        if not header and parts is None:
            return
        if len(header) < 8:
            raise _truncated(source, offset)
        magic, word = struct.unpack("<II", header)
        if magic != MAGIC:
            raise UserInputError(
                f"{source} is not RecordIO: no record starts at byte {offset}; set the "
                "channel's RecordWrapperType to RecordIO."
            )
        flag, length = word >> 29, word & LENGTH_MASK
        payload = stream.read(length)
        padding = stream.read(-length % 4)
        if len(payload) < length or len(padding) < -length % 4:
            raise _truncated(source, offset)
        offset += 8 + length + (-length % 4)
        if flag == WHOLE and parts is None:
            yield payload
        elif flag == FIRST and parts is None:
            parts = [payload]
        elif flag in (MIDDLE, LAST) and parts is not None:
            parts.append(payload)
            if flag == LAST:
                yield MAGIC_BYTES.join(parts)
                parts = None
        else:
            raise UserInputError(
                f"{source} has a RecordIO record part out of order at byte {offset}; the stream "
                "is corrupt: restart the job."
            )


def _truncated(source: Path, offset: int) -> UserInputError:
    return UserInputError(
        f"the stream {source} ends inside a RecordIO record at byte {offset}; the stream was cut "
        "short: restart the job."
    )


def _json_object(record: bytes) -> dict | None | bool:
    """The record as JSON: a dict, other JSON (True), or None for binary data (an image)."""
    if record[:1] not in b'{["-0123456789tfn' or len(record) > 64 * 1024**2:
        return None
    try:
        value = json.loads(record)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else True


def _write_cache(
    stream: BinaryIO, folder: Path, channel: str, label_attribute: str, source: Path
) -> tuple[int, int, int]:
    """Write each item (an image record and the JSON records after it) as an image file and a
    manifest line; return (images, records, bytes)."""
    min_free = _env_float(MIN_FREE_VARIABLE, DEFAULT_MIN_FREE_BYTES)
    images = records = size = 0
    line: dict | None = None
    with open(folder / MANIFEST_NAME, "w", encoding="utf-8") as manifest:
        def flush() -> None:
            if line is not None:
                manifest.write(json.dumps(line) + "\n")

        for record in read_records(stream, source):
            records += 1
            size += len(record)
            value = _json_object(record)
            if value is None:
                flush()
                images += 1
                name = f"{images:06d}{_extension(record)}"
                _write_image(folder, name, record, min_free, channel, images, size)
                line = {SOURCE_REF: f"pipe:{channel}/{name}"}
            elif line is None:
                raise UserInputError(
                    f"Pipe channel '{channel}' streams a JSON record before any image; list "
                    "\"source-ref\" first in the channel's AttributeNames."
                )
            elif isinstance(value, dict) and "annotations" in value:
                if label_attribute in line:
                    raise UserInputError(
                        f"Pipe channel '{channel}' streams several bounding-box labels for one "
                        "image; list one label attribute in the channel's AttributeNames."
                    )
                line[label_attribute] = value
            elif isinstance(value, dict) and ("class-map" in value or "type" in value):
                line[label_attribute + METADATA_SUFFIX] = value
            # Any other attribute (a classification label, a confidence) is not trained on.
        flush()
    if not images:
        raise UserInputError(
            f"Pipe channel '{channel}' streamed no image through {source}; check that its "
            "augmented manifest has lines and that AttributeNames lists \"source-ref\"."
        )
    return images, records, size


def _extension(data: bytes) -> str:
    # Only a name for people: images are decoded by their content.
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return ".img"


def _write_image(folder: Path, name: str, data: bytes, min_free: float, channel: str,
                 images: int, size: int) -> None:
    free = shutil.disk_usage(folder).free
    try:
        if free - len(data) < min_free:
            raise OSError(28, "no space left")
        (folder / name).write_bytes(data)
    except OSError as exc:
        if exc.errno != 28:  # ENOSPC
            raise UserInputError(
                f"Pipe channel '{channel}' cannot be cached in {folder} ({exc.strerror or exc}); "
                f"make it writable or point {CACHE_DIR_VARIABLE} at a writable folder."
            ) from None
        raise UserInputError(
            f"Pipe channel '{channel}' does not fit on the training volume: after {images} "
            f"images ({size / 1e6:.0f} MB) less than {min_free / 1e6:.0f} MB stayed free for "
            "checkpoints and the model; raise the job's VolumeSizeInGB above the channel's "
            f"size (the cache was removed), or lower {MIN_FREE_VARIABLE}."
        ) from None
