"""What a channel holds, in words, for the message when no format's files are found there (or
not the forced format's): where the job looked and what it found instead, so that a user can
act on it ("412 .xml files, none with an <annotation> root (<annotations> 412)")."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...errors import shorten
from . import createml, voc
from .common import Boundary, first_char, is_image
from .scan import MAX_DEPTH, scan
from .yolo_find import CLASS_LISTS, YAML_NAMES, class_list, label_files

# XMLs whose root is read for the message (the first ones in walk order).
XML_SNIFFED = 1000
# Roots of XML formats this job does not read, and what to export instead.
OTHER_XML = {"annotations": "CVAT for images' own XML: export the task as Pascal VOC or YOLO instead"}


def count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def where(channel: Path) -> str:
    listing = scan(channel)
    text = (f"looked through its {count(listing.n_files, 'file')} in "
            f"{count(len(listing.folders), 'folder')}, down to {MAX_DEPTH} levels")
    if listing.deep_folders:
        text += f" ({len(listing.deep_folders):,} deeper folders not searched, such as " \
                f"{shorten(listing.deep_folders[0], 80)})"
    if listing.unreadable_folders:
        text += f" ({len(listing.unreadable_folders):,} unreadable folders, such as " \
                f"{shorten(listing.unreadable_folders[0], 80)})"
    return text


def holds(channel: Path) -> str:
    """The channel's files by kind, as a phrase: 'nothing' when it is empty."""
    listing = scan(channel)
    names = listing.relative_paths()
    if not names:
        return "nothing (the channel is empty)"
    boundary = Boundary(channel)
    parts = []
    images = [n for n in names if is_image(n)]
    if images:
        kinds = Counter(Path(n).suffix.lower() for n in images)
        parts.append(f"{count(len(images), 'image')} ({', '.join(f'{k} {v:,}' for k, v in kinds.most_common(3))})")
    xmls = [p for p in listing.paths(lambda n: n.lower().endswith(".xml"))]
    if xmls:
        roots = Counter(f"<{voc.root_tag(p, boundary) or '?'}>" for p in xmls[:XML_SNIFFED])
        sniffed = "" if len(xmls) <= XML_SNIFFED else f" of the first {XML_SNIFFED:,}"
        counted = ", ".join(f"{tag} {n:,}" for tag, n in roots.most_common(3))
        hints = "".join(f"; <{tag}> is {hint}" for tag, hint in OTHER_XML.items() if f"<{tag}>" in roots)
        if "<annotation>" in roots:
            parts.append(f"{count(len(xmls), '.xml file')} (roots{sniffed}: {counted}{hints})")
        else:
            parts.append(f"{count(len(xmls), '.xml file')}, none with an <annotation> root "
                         f"(roots{sniffed}: {counted}{hints})")
    parts += _jsons(channel, listing.paths(lambda n: n.lower().endswith(".json")), boundary)
    parts += _yolo(channel, names)
    others = Counter(Path(n).suffix.lower() or Path(n).name for n in names if not is_image(n)
                     and Path(n).suffix.lower() not in (".xml", ".json", ".txt", ".yaml", ".yml"))
    if others:
        parts.append("other files (" + ", ".join(f"{k} {v:,}" for k, v in others.most_common(4)) + ")")
    return "; ".join(parts)


def _jsons(channel: Path, jsons: list[Path], boundary: Boundary) -> list[str]:
    parts = []
    top = [p for p in jsons if p.parent in (channel, channel / "annotations")]
    for p in top[:3]:
        rel = p.relative_to(channel)
        if createml.label_studio(p, boundary):
            parts.append(f"{rel}, a Label Studio JSON export")
        else:
            kind = {"{": "a JSON object", "[": "a JSON list"}.get(first_char(p), "not a JSON object")
            parts.append(f"{rel} ({kind})")
    below = len(jsons) - len(top)
    if below:
        example = next(p for p in jsons if p not in top).relative_to(channel)
        parts.append(f"{count(below, '.json file')} below the root, such as {shorten(str(example), 80)} "
                     "(a COCO JSON is read at the root or in annotations/)")
    return parts


def _yolo(channel: Path, names: list[str]) -> list[str]:
    parts = []
    txts = [n for n in names if n.lower().endswith(".txt")]
    labels, _ = label_files(channel)
    lists = class_list(channel)
    if labels and lists is None:
        parts.append(f"YOLO label files (such as {labels[0].relative_to(channel)}) but no data.yaml, "
                     f"{' nor '.join(CLASS_LISTS)} naming the classes")
    elif lists is not None and not labels:
        parts.append(f"{lists.relative_to(channel)} but no label file of YOLO rows at an image's label "
                     "path (labels/ for images/, else beside the image)")
    elif txts:
        parts.append(count(len(txts), ".txt file"))
    yamls = [n for n in names if n.lower().endswith((".yaml", ".yml"))]
    if yamls:
        parts.append(f"{count(len(yamls), 'YAML file')}, such as {shorten(yamls[0], 80)} (YOLO's is a "
                     f"{', '.join(YAML_NAMES)} with 'names' or 'nc', or another YAML with 'train' "
                     "and 'names')")
    return parts
