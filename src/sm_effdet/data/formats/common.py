"""What every reader shares: finding images, reading annotation files (regular files only, JSON
and text with one-sentence errors), the channel boundary for them, class lists and matching
classes by name, and the hand-over to `image_records.coco_records`.

A reader builds COCO-shaped data in memory (images with file_name relative to the channel,
width, height; annotations with bbox [x, y, w, h] in pixels; categories with id and name) and
calls `records`, so that every format gets COCO's validation and data report.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import posixpath
import stat
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ...errors import UserInputError, shorten
from . import scan
from .image_records import Category, CocoData, DataReport, coco_records, shown_size

# The image files the readers look for (by extension, case-insensitive).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# Class lists beside VOC or YOLO data: one name a line.
CLASS_LIST_FILES = ("labelmap.txt", "classes.txt", "obj.names")
# Boxes whose class the training channel does not have: the model cannot predict them.
NOT_IN_TRAINING = "category_not_in_training"


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def walk_files(folder: Path, keep) -> list[Path]:
    """The files under `folder` whose name `keep` accepts, in walk order: from the job's one
    bounded walk of the channel (scan.py; symlinked folders not followed)."""
    return scan.scan(folder).paths(keep)


def relative(channel: Path, path: Path) -> str:
    return os.path.relpath(path, channel)


class Boundary:
    """Whether annotation files lie inside the channel once symlinks are followed: the rule the
    images follow (image_records._check_image_path), for every file a reader opens. One lstat a
    file; each folder on the way is resolved once."""

    def __init__(self, channel: Path):
        self.root = os.path.realpath(channel).rstrip(os.sep) + os.sep
        self._dirs: dict[str, str] = {}

    def inside(self, path: Path) -> bool:
        try:
            mode = os.lstat(path).st_mode
        except (OSError, ValueError):
            return False
        if stat.S_ISLNK(mode):
            real = os.path.realpath(path)
        else:
            parent, name = os.path.split(os.path.abspath(path))
            if parent not in self._dirs:
                self._dirs[parent] = os.path.realpath(parent)
            real = os.path.join(self._dirs[parent], name)
        return real.startswith(self.root)

    def check(self, path: Path, what: str) -> Path:
        """The annotation file itself (a COCO JSON, a data.yaml, a list): refused outside."""
        if not self.inside(path):
            raise UserInputError(
                f"{what} {path} is a symlink to a file outside its channel; put the file itself "
                "in the channel (annotation files, like images, must lie inside it)."
            )
        return path

    def per_image(self, path: Path, report: DataReport) -> bool:
        """A per-image annotation file (an XML, a label .txt, a JSON): counted and skipped."""
        if self.inside(path):
            return True
        report.add("annotation_skipped_outside_channel", str(path))
        return False


def require_regular_file(path: Path, what: str, kind: str = "file") -> None:
    """A FIFO or a device would block the job forever on open: refuse it by its mode first."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UserInputError(
            f"{what} {path} is not a regular file (a pipe, device or folder); replace it with "
            f"the {kind} itself."
        )


def read_json_file(path: Path, what: str) -> Any:
    try:
        require_regular_file(path, what, "JSON file")
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}); fix or replace the file."
        ) from None
    except UnicodeDecodeError:
        raise UserInputError(f"{what} {path} is not UTF-8 text; save it as UTF-8 JSON.") from None
    except RecursionError:
        raise UserInputError(
            f"{what} {path} is nested too deeply to be read; give it the flat COCO layout."
        ) from None
    except OSError as exc:
        raise UserInputError(
            f"{what} {path} cannot be read ({exc.strerror or exc}); make it a readable file."
        ) from None


def first_char(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1].decode("latin-1")
    except OSError:
        return ""


def read_text(path: Path, what: str) -> str:
    try:
        require_regular_file(path, what)
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserInputError(f"{what} {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as exc:
        raise UserInputError(
            f"{what} {path} cannot be read ({exc.strerror or exc}); make it a readable file."
        ) from None


def find_class_list(folders: list[Path]) -> Path | None:
    for folder in folders:
        for name in CLASS_LIST_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def read_class_list(path: Path, boundary: Boundary) -> list[str]:
    """Names, one a line, in order; a CVAT labelmap's `name:color:parts:actions` keeps its name,
    and its 'background' line (no class of the user's) is left out."""
    boundary.check(path, "class list")
    names = []
    for line in read_text(path, "class list").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split(":", 1)[0].strip() if path.name == "labelmap.txt" else line
        if name and not (path.name == "labelmap.txt" and name == "background"):
            names.append(name)
    if len(set(names)) != len(names):
        raise UserInputError(
            f"class list {path} names a class twice; give each class one line."
        )
    return names


def categories_by_name(names: list[str]) -> list[dict]:
    """COCO categories for a format that names classes only: ids 1..K in the given order (a
    class list's, else sorted by name); model.json carries the names back."""
    return [{"id": k + 1, "name": name} for k, name in enumerate(names)]


def match_by_name(coco: dict, categories: list[Category], source: Path, report: DataReport) -> dict:
    """A validation channel's classes matched to training's by name: each box gets the training
    category of its name; a box of a class training lacks is dropped (the model cannot predict
    it) and the class is counted under category_not_in_training."""
    train_id = {c.name: c.id for c in categories}
    own_name = {c.get("id"): str(c.get("name")) for c in coco["categories"] if isinstance(c, dict)}
    for name in sorted(set(own_name.values()) - set(train_id)):
        report.add(NOT_IN_TRAINING, f"{source}: {shorten(name)}")
    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            continue  # counted as malformed by coco_records
        own = ann.get("category_id")
        name = own_name.get(own) if isinstance(own, (int, str)) else None
        # Text no dataset uses as an id: the box is dropped as of an unknown category, and the
        # report's example says why.
        ann["category_id"] = (f"unknown: {shorten(own, 40)}" if name is None
                              else train_id.get(name, f"not in training: {shorten(name, 40)}"))
    coco["categories"] = [{"id": c.id, "name": c.name} for c in categories]
    return coco


def refuse_shared_files(coco: dict, report: DataReport, refused: dict | None = None) -> None:
    """Drop the images whose file another image entry names too (two S3 refs copied flat as
    one file, two built-in JSONs found by one file name): the file cannot be both pictures, so
    neither is used. `refused` adds image ids already found ambiguous (id: why). They are
    counted as coco_records would count them: listed, skipped, their boxes not again."""
    refused = dict(refused or {})
    first: dict[str, Any] = {}
    shared: dict[str, set] = defaultdict(set)
    for entry in coco["images"]:  # COCO-scale manifests: one dict lookup an image, mostly
        image_id, file_name = entry["id"], entry["file_name"]
        if image_id in refused:
            continue
        if "//" in file_name or "/." in file_name or file_name.startswith("."):
            file_name = posixpath.normpath(file_name)
        owner = first.setdefault(file_name, image_id)
        if owner != image_id:
            shared[file_name].update((owner, image_id))
    for file_name, ids in shared.items():
        if len(ids) > 1:
            ordered = sorted(ids, key=str)
            for image_id in ordered:
                rest = shorten(", ".join(str(i) for i in ordered if i != image_id), 120)
                refused[image_id] = f"and {rest} all resolve to {shorten(file_name, 100)}"
    if not refused:
        return
    boxes = Counter(a.get("image_id") for a in coco["annotations"] if isinstance(a, dict))
    for image_id, why in refused.items():
        report.add("images_listed")
        report.add("boxes_listed", n=boxes[image_id])
        report.add("image_skipped_ambiguous_file_name", f"{shorten(str(image_id), 100)} {why}")
    coco["images"] = [e for e in coco["images"] if e["id"] not in refused]
    coco["annotations"] = [a for a in coco["annotations"]
                           if not isinstance(a, dict) or a.get("image_id") not in refused]


def records(
    channel: Path, coco: dict, source: Path, report: DataReport,
    categories: list[Category] | None, image_root: Path | None = None,
    split: dict[str, set] | None = None,
) -> CocoData:
    """Hand COCO-shaped data from any reader to coco_records; `categories` (validation) are
    matched by name."""
    own = [Category(c["id"], c["name"]) for c in coco["categories"]]
    if categories is not None:
        coco = match_by_name(coco, categories, source, report)
    data = coco_records(channel, coco, source, report, categories,
                        image_root=image_root if image_root is not None else channel)
    data.file_categories = own
    data.split = split
    return data


# Per-file formats (a label or an XML per image) are read here or by worker processes, chosen
# from measurements rather than a file count. A worker is a fresh Python (spawn) importing the
# readers before its first file: WORKER_START_S (make bench, section 10: 1.2-2.0 s on a
# shared 2-CPU machine, where a fixed 2,000-file threshold made 3,000 files 3-4x slower pooled). The
# files' own cost varies with the disk (warm page cache ~0.3 ms a file, a network volume far
# more), so it is measured: the first PROBE_S of reading happens here, and the rest goes to
# workers only when, at the rate seen, it would take longer here than the workers need to
# start and share it, with POOL_MARGIN for sending the results back; as many workers as CPUs
# are free (idle_cpus: the load average).
WORKER_START_S = 1.5
PROBE_S = 0.5
PROBE_CHUNK = 100
POOL_MARGIN = 1.3
# None: choose as above; 1: always in this process; n >= 2: always n workers (tests, bench).
WORKERS: int | None = None


def map_chunks(function, items: list, *args) -> tuple[list, DataReport]:
    """function(items_chunk, *args) -> (results, DataReport) over all items, results in order:
    in this process, or in worker processes when measured to be faster (see WORKERS)."""
    report = DataReport()
    results: list = []
    done = 0
    cpus = min(len(os.sched_getaffinity(0)), 16)
    if WORKERS is None or WORKERS == 1:
        started = time.perf_counter()
        while done < len(items) and (WORKERS == 1 or time.perf_counter() - started < PROBE_S):
            found, part = function(items[done:done + PROBE_CHUNK], *args)
            results.extend(found)
            merge(report, part)
            done += PROBE_CHUNK
        rest = len(items) - done
        if rest <= 0:
            return results, report
        per_item = (time.perf_counter() - started) / done
        workers = pool_workers(per_item * rest, idle_cpus(cpus))
    else:
        workers = WORKERS
    rest_items = items[done:]
    if not rest_items:
        return results, report
    if workers < 2:
        found, part = function(rest_items, *args)
        results.extend(found)
        merge(report, part)
        return results, report
    size = max(1, -(-len(rest_items) // (workers * 4)))  # four tasks a worker: the load evens out
    chunks = [rest_items[k:k + size] for k in range(0, len(rest_items), size)]
    # spawn, not fork: the job may hold threads (torch's) that a fork would copy half-made.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        parts = list(pool.map(function, chunks, *([a] * len(chunks) for a in args)))
    finally:  # a stop lands here as an exception: leave the queued chunks undone
        pool.shutdown(wait=False, cancel_futures=True)
    for found, part in parts:
        results.extend(found)
        merge(report, part)
    return results, report


def idle_cpus(cpus: int) -> int:
    """The CPUs free for workers: ours less the other runners of the 1-minute load average (on
    a machine others keep busy, workers would only queue behind them: bench section 10 on a
    shared 2-CPU machine at a load of 11 read 20,000 files slower pooled)."""
    try:
        return free_cpus(cpus, os.getloadavg()[0])
    except OSError:
        return cpus


def free_cpus(cpus: int, load: float) -> int:
    others = max(0.0, load - 1)  # this process is one of the runners
    return max(1, min(cpus, int(cpus - others + 0.5)))


def pool_workers(seconds_here: float, cpus: int) -> int:
    """How many workers read the rest fastest, given how long it would take here and the CPUs
    free: 1 (none) unless starting them and sharing the work beats reading it here."""
    if cpus < 2:
        return 1
    pooled = WORKER_START_S + POOL_MARGIN * seconds_here / cpus
    return cpus if pooled < seconds_here else 1


def merge(into: DataReport, part: DataReport) -> None:
    for reason, n in part.counts.items():
        into.add(reason, n=n)
    for reason, examples in part.examples.items():
        for example in examples:
            into.add(reason, example, n=0)


def image_size(path: Path) -> tuple[int, int] | None:
    """The image's size as shown (EXIF orientation applied: image_records.shown_size), from its
    header (Pillow reads no pixels here); None when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return shown_size(img)
    except Exception:
        return None
