"""SageMaker Ground Truth bounding-box output manifests (JSON Lines), read as COCO-shaped data.

Each line names an image by `source-ref` (an s3:// URI) and holds the boxes under a label
attribute the labelling job named, with `image_size` (so no image is opened) and a per-line
`class-map` in `<attribute>-metadata`. The lines become one COCO dict that
`image_records.coco_records` validates and counts like any COCO file. In File and FastFile mode
the images sit in the channel beside the manifest: a `source-ref` is found by its path below the
manifest's common S3 prefix, else by its file name when exactly one file in the channel has it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import posixpath
import stat
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ...errors import UserInputError, shorten
from ...hyperparameters import Hyperparameters
from .coco import ANNOTATIONS_FOLDER
from .common import match_by_name, refuse_shared_files
from .image_records import Category, CocoData, DataReport, coco_records, safe_join

log = logging.getLogger(__name__)

NAME = "groundtruth"
SUFFIXES = (".manifest", ".jsonl")
SOURCE_REF = "source-ref"
METADATA_SUFFIX = "-metadata"
# Ground Truth writes the hyphen; manifests converted by hand or by older jobs have the underscore.
BOX_TYPES = ("groundtruth/object-detection", "groundtruth/object_detection")


def find(channel: Path) -> list[Path]:
    """The manifests at the channel's root and in its annotations/ folder (no deeper: cheap)."""
    found = []
    for folder in (channel, channel / ANNOTATIONS_FOLDER):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        found += [Path(e.path) for e in entries if e.name.endswith(SUFFIXES) and e.is_file()]
    return found


def read(
    channel: Path, hp: Hyperparameters, report: DataReport, categories: list[Category] | None = None
) -> CocoData:
    """The channel's manifest as image records; `categories` given (validation) fixes the class
    list, matched by name (two labelling jobs may number the same classes differently)."""
    manifest = _manifest(channel, hp.annotations_file if categories is None else None)
    # A COCO-scale manifest makes millions of objects and no reference cycles: the collector
    # would walk them again and again, half of the reading time (measured).
    collecting = gc.isenabled()
    gc.disable()
    try:
        lines = _read_lines(manifest, report)
        attribute = _label_attribute(lines, manifest, hp.label_attribute)
        data = _coco_dict(lines, manifest, attribute, report, by_name=categories is not None)
        del lines
        if categories is not None:
            # Each labelling job numbers its classes itself: ids from another job's class-map
            # may mean other classes (a class training lacks is dropped and counted).
            match_by_name(data, categories, manifest, report)
        _resolve_file_names(channel, data, manifest, report)
        return coco_records(channel, data, manifest, report, categories, image_root=channel)
    finally:
        if collecting:
            gc.enable()


def _manifest(channel: Path, annotations_file: str | None) -> Path:
    if annotations_file:
        path = safe_join(channel, annotations_file)
        if path is None or not path.is_file():
            raise UserInputError(
                f"annotations_file '{shorten(annotations_file)}' was not found in {channel}; "
                "give the manifest's path relative to the channel's root."
            )
        return path
    found = find(channel)
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserInputError(
            f"no Ground Truth manifest (.manifest or .jsonl) at the root of {channel} nor in its "
            f"{ANNOTATIONS_FOLDER}/ folder; add the labelling job's output manifest there."
        )
    names = shorten(", ".join(str(p.relative_to(channel)) for p in found), 200)
    raise UserInputError(
        f"several manifests in {channel} ({names}); keep one per channel, or name the training "
        "one with the annotations_file hyperparameter."
    )


def _read_lines(manifest: Path, report: DataReport) -> list[tuple[int, dict]]:
    """(line number, object) for every line that is a JSON object; the others are counted."""
    try:
        if not stat.S_ISREG(os.stat(manifest).st_mode):
            raise UserInputError(
                f"manifest {manifest} is not a regular file (a pipe, device or folder); replace "
                "it with the manifest file itself."
            )
        data = manifest.read_bytes()
    except OSError as exc:
        raise UserInputError(
            f"manifest {manifest} cannot be read ({exc.strerror or exc}); make it a readable file."
        ) from None
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM, as Windows editors write it
        data = data[3:]
    encoding = _wide_encoding(data)
    if encoding:
        raise UserInputError(
            f"manifest {manifest} is {encoding}; save it as UTF-8 text, one JSON object per "
            "line, as Ground Truth writes it."
        )
    numbered = [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    try:
        # One parser call for the whole file, as fast as json.load of a COCO file; a file with
        # a bad line is read again line by line to count and name it.
        values = json.loads(b"[" + b",".join(raw for _, raw in numbered) + b"]")
        # A line holding two objects, or an object spread over two lines, changes the count.
        if len(values) == len(numbered) and all(type(v) is dict for v in values):
            return [(n, v) for (n, _), v in zip(numbered, values)]
    except (ValueError, RecursionError):
        pass
    lines, problems = [], []
    for number, raw in numbered:
        try:
            value = json.loads(raw)  # bytes: a trailing \r is whitespace to the parser
            problem = None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
            problem = getattr(exc, "msg", None) or type(exc).__name__
        if problem:
            problems.append(f"{manifest.name} line {number}: {shorten(problem, 80)}")
            continue
        lines.append((number, value))
    if problems and not lines:
        raise UserInputError(
            f"manifest {manifest} {_not_json_lines(data, numbered[0], problems[0])}; a "
            "manifest holds one JSON object per line (JSON Lines), as Ground Truth writes it: "
            "write each image's object on a line of its own."
        )
    for problem in problems:
        report.add("images_listed")
        report.add("image_skipped_unreadable_manifest_line", problem)
    return lines


# Byte-order marks of the encodings a Windows editor may save a manifest in; UTF-32's first.
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
         (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _wide_encoding(data: bytes) -> str | None:
    """The encoding of a manifest saved as UTF-16 or UTF-32, said as a user can check it."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return f"{name} text (it starts with the {name} byte-order mark)"
    if b"\x00" in data[:256]:  # JSON text in UTF-8 holds no NUL byte
        return "UTF-16 or UTF-32 text (it holds NUL bytes), not UTF-8"
    return None


def _not_json_lines(data: bytes, first: tuple[int, bytes], first_problem: str) -> str:
    """What a manifest none of whose lines is a JSON object holds instead."""
    try:
        whole = json.loads(data)
    except (ValueError, RecursionError):
        text = shorten(first[1].decode("utf-8", "replace").strip(), 40)
        return (f"has no line that is a JSON object (line {first[0]} holds {text!r}: "
                f"{first_problem.split(': ', 1)[-1]})")
    lines = data.count(b"\n") + 1
    if isinstance(whole, list):
        return f"holds one JSON list of {len(whole)} items, not one object per line"
    if isinstance(whole, dict):
        return f"holds one JSON object spread over {lines} lines"
    return f"holds a JSON {type(whole).__name__} ({first_problem})"


def _is_box_label(line: dict, key: str) -> bool:
    if key.endswith((METADATA_SUFFIX, "-ref")):
        return False
    metadata = line.get(key + METADATA_SUFFIX)
    if isinstance(metadata, dict) and metadata.get("type") in BOX_TYPES:
        return True
    value = line[key]
    return isinstance(value, dict) and "annotations" in value and "image_size" in value


def _label_attribute(lines: list[tuple[int, dict]], manifest: Path, named: str | None) -> str:
    """The attribute holding the boxes: the one named, else the only one found."""
    found = Counter(key for _, line in lines for key in line if _is_box_label(line, key))
    listed = ", ".join(f"'{k}' ({n} lines)" for k, n in found.most_common(10))
    if named:
        if named in found:
            return named
        raise UserInputError(
            f"hyperparameter 'label_attribute' is '{shorten(named)}' but no line of manifest "
            f"{manifest} has bounding boxes under it (found: {listed or 'none'}); set it to one "
            "of those or leave it out."
        )
    if len(found) == 1:
        return next(iter(found))
    if not found:
        raise UserInputError(
            f"manifest {manifest} has no bounding-box label: no line has an attribute with "
            "'image_size' and 'annotations' whose '-metadata' type is "
            "'groundtruth/object-detection'; give the output manifest of a bounding-box "
            "labelling job."
        )
    raise UserInputError(
        f"manifest {manifest} has several bounding-box label attributes ({listed}), as after "
        "an adjustment job; name the one to train on with the label_attribute hyperparameter."
    )


def class_id(value: Any) -> Any:
    """Ground Truth writes class ids as numbers, some tools as text ("3"); both are one id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return value if isinstance(value, (int, str)) else None


def _image_size(label: dict) -> tuple[Any, Any]:
    sizes = label.get("image_size")
    size = sizes[0] if isinstance(sizes, list) and sizes else sizes
    if isinstance(size, dict):
        return size.get("width"), size.get("height")
    return None, None  # coco_records reads the image's header instead


def _skip_reason(line: dict, attribute: str, label: Any, metadata: dict, boxes: Any) -> tuple[str, str] | None:
    """Why a line gives no image (a report reason and a detail), or None."""
    if metadata.get("failure-reason"):
        return "image_skipped_labelling_failed", f": {shorten(metadata['failure-reason'], 80)}"
    if label is None:
        return "image_skipped_not_labelled", ""
    if not isinstance(line.get(SOURCE_REF), str) or not line[SOURCE_REF]:
        return "image_skipped_no_source_ref", ""
    if not isinstance(boxes, list):
        return "image_skipped_malformed_label", f": '{attribute}' {shorten(json.dumps(label), 60)}"
    return None


def _coco_dict(lines: list[tuple[int, dict]], manifest: Path, attribute: str, report: DataReport,
               by_name: bool = False) -> dict:
    """One COCO image per usable line (id: its source-ref), one annotation per box; the
    categories are the union of the lines' class-maps. `by_name` (a validation manifest, to be
    matched to training by name): each box's category is the name its own line's class-map
    gives it, as lines of several labelling jobs may number classes differently."""
    images, annotations = [], []
    unnamed: list[dict] = []  # by_name: boxes whose line's class-map does not name their id
    names: dict[Any, str] = {}
    seen: set = set()  # (key, name) pairs of the class-maps, most of them repeated on every line
    used: set = set()
    ids: list = []  # the boxes' int class ids, made a set once
    metadata_key = attribute + METADATA_SUFFIX
    for number, line in lines:
        label = line.get(attribute)
        metadata = line.get(metadata_key)
        metadata = metadata if isinstance(metadata, dict) else {}
        boxes = label.get("annotations") if isinstance(label, dict) else None
        skipped = _skip_reason(line, attribute, label, metadata, boxes)
        if skipped:
            report.add("images_listed")
            report.add("boxes_listed", n=len(boxes) if isinstance(boxes, list) else 0)
            report.add(skipped[0], f"{manifest.name} line {number}{skipped[1]}")
            continue
        class_map = metadata.get("class-map")
        if by_name:
            items = class_map.items() if isinstance(class_map, dict) else ()
            line_names = {class_id(k): str(v) for k, v in items}
        for key, name in (class_map.items() if isinstance(class_map, dict) else ()):
            name = str(name)
            if (key, name) in seen:
                continue
            seen.add((key, name))
            cid = class_id(key)
            # (by_name, each line's own names are used: a differing one is no problem)
            if names.setdefault(cid, name) != name and not by_name:
                report.add("category_name_differs_between_lines",
                           f"{manifest.name} line {number}: class {key} is '{shorten(name, 40)}', "
                           f"earlier '{names[cid]}'")
        ref = line[SOURCE_REF]
        width, height = _image_size(label)
        images.append({"id": ref, "file_name": ref, "width": width, "height": height})
        for box in boxes:
            if type(box) is not dict:
                annotations.append(box)  # counted as malformed by coco_records
                continue
            cid = box.get("class_id")
            if type(cid) is not int:
                cid = class_id(cid)
                used.add(cid)
            annotations.append({
                "id": len(annotations) + 1, "image_id": ref, "category_id": cid,
                "bbox": [box.get("left"), box.get("top"), box.get("width"), box.get("height")],
            })
            ids.append(cid)
            if by_name:
                if cid in line_names:
                    annotations[-1]["category_id"] = line_names[cid]
                elif cid is not None:
                    unnamed.append(annotations[-1])
    if by_name:
        return _named(images, annotations, names, unnamed, report)
    used.update(ids)
    for cid in used - names.keys() - {None}:
        # A class the boxes use but no class-map names: trained under its id, and said so.
        names[cid] = str(cid)
        report.add("category_not_in_any_class_map", str(cid))
    ordered = sorted(names, key=lambda c: (isinstance(c, str), str(c) if isinstance(c, str) else c))
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": names[c]} for c in ordered if c is not None],
    }


def _named(images: list, annotations: list, names: dict, unnamed: list[dict], report: DataReport
           ) -> dict:
    """The COCO dict of a manifest read by_name: names as category ids; a box whose line's
    class-map does not name its id takes another line's name for it, else the id as text."""
    for annotation in unnamed:
        cid = annotation["category_id"]
        if cid not in names:
            names[cid] = str(cid)
            report.add("category_not_in_any_class_map", str(cid))
        annotation["category_id"] = names[cid]
    used = {a["category_id"] for a in annotations if type(a) is dict} - {None}
    return {"images": images, "annotations": annotations,
            "categories": [{"id": n, "name": n} for n in sorted(used | set(names.values()))]}


def common_prefix(refs: list[str]) -> str:
    """The manifest's common S3 "folder": everything up to the last '/' all refs share."""
    if not refs:
        return ""
    prefix = os.path.commonprefix(refs)
    return prefix[: prefix.rfind("/") + 1]


def _resolve_file_names(channel: Path, data: dict, manifest: Path, report: DataReport) -> None:
    """Turn each image's source-ref into a path relative to the channel. An unsafe path is left
    for coco_records to refuse and count; one matching several files by name is skipped here."""
    prefix = common_prefix([e["id"] for e in data["images"]])
    root = str(channel)
    by_name: dict[str, list[str]] | None = None
    ambiguous: dict[str, str] = {}
    # The folder where the last image was found by name (images/, say) is tried next, before
    # a search by name.
    folder = ""
    for entry in data["images"]:
        relative = entry["id"][len(prefix):]
        entry["file_name"] = relative
        if safe_join(channel, relative) is None:
            continue  # coco_records refuses and counts it
        if os.path.lexists(os.path.join(root, relative)):
            continue
        if folder and os.path.lexists(os.path.join(root, folder + relative)):
            entry["file_name"] = folder + relative
            continue
        if by_name is None:
            by_name = _files_by_name(channel, manifest)
        candidates = by_name.get(posixpath.basename(relative), [])
        if len(candidates) > 1:  # files of one name in several folders: the S3 path's folders decide
            candidates = [c for c in candidates if ("/" + c).endswith("/" + relative)] or candidates
        if len(candidates) == 1:
            entry["file_name"] = candidates[0]
            if candidates[0].endswith("/" + relative):
                folder = candidates[0][: -len(relative)]
        elif len(candidates) > 1:
            ambiguous[entry["id"]] = f"matches {shorten(', '.join(candidates[:3]), 160)}"
    # s3://b/cam1/0001.jpg and s3://b/cam2/0001.jpg copied flat as one 0001.jpg are refused
    # here too: the file cannot be both pictures.
    refuse_shared_files(data, report, ambiguous)


def _files_by_name(channel: Path, manifest: Path) -> dict[str, list[str]]:
    """Every file under the channel by its name (walked once, only when a path does not match);
    linked folders are not followed, as they could lead out of the channel."""
    found: dict[str, list[str]] = defaultdict(list)
    for folder, _, files in os.walk(channel):
        relative = os.path.relpath(folder, channel)
        for name in files:
            found[name].append(name if relative == "." else f"{relative}/{name}")
    found.pop(manifest.name, None)
    return found
