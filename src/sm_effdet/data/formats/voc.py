"""Pascal VOC: one XML per image, found by content (an `<annotation>` root; any name case, UTF-8
or UTF-16) anywhere in the channel: beside the images (LabelImg), in Annotations/ (VOCdevkit,
CVAT, nested Annotations/<folder>/ too), annots/, xml/, Roboflow's train/ valid/ test/ ...

Coordinates: VOC's are 1-based inclusive pixel indices; like detectron2, 1 is subtracted from
xmin and ymin only, so that a box from pixel 1 to pixel W (the whole image) becomes [0, W] in
the 0-based, end-exclusive pixels the model uses; floats are kept as given. CVAT's exports
(written by datumaro, which writes `xmin = x`, 0-based, and says so by its
`<source><database>Unknown</database><annotation>Unknown</annotation><image>Unknown</image>`)
are read as written, 0-based; other 0-based writers' boxes land 1 px up and left. The image
size is the XML's `size`; a missing or zero one is read from the image's header. The image is
found by the XML's stem (a `filename` that names another file is common), else by `filename`;
among images of that stem, one whose path ends with a `filename` holding folders (CVAT's
`sub/a.jpg`) wins, else the nearest to the XML.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ...errors import UserInputError, shorten
from ...hyperparameters import Hyperparameters
from .common import (
    Boundary,
    categories_by_name,
    find_class_list,
    image_size,
    is_image,
    map_chunks,
    merge,
    read_class_list,
    read_text,
    records,
    relative,
    walk_files,
)
from .image_records import Category, CocoData, DataReport
from .scan import head, xml_root

log = logging.getLogger(__name__)

NAME = "voc"
# Roboflow's split folders, and what each is used for.
SPLIT_FOLDERS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": None}


# The datumaro writer's mark (CVAT's VOC export): its boxes are 0-based.
DATUMARO_SOURCE = {"database": "Unknown", "annotation": "Unknown", "image": "Unknown"}


def find(channel: Path) -> list[Path]:
    """The first XMLs (up to 3) anywhere in the channel whose root is <annotation>."""
    boundary = Boundary(channel)
    found = []
    for path in _xml_files(channel):
        if root_tag(path, boundary) == "annotation":
            found.append(path)
            if len(found) == 3:
                break
    return found


def root_tag(path: Path, boundary: Boundary) -> str | None:
    data = head(path, boundary.inside)
    return xml_root(data) if data else None


def _xml_files(channel: Path) -> list[Path]:
    return walk_files(channel, lambda f: f.lower().endswith(".xml"))


def _parse(path: Path, report: DataReport) -> Element | None:
    """The XML's root; an XML that does not parse, or declares entities (defusedxml refuses
    them: no external entity is fetched and no entity bomb expanded), is named and skipped."""
    try:
        root = SafeET.parse(path).getroot()
    except (ParseError, DefusedXmlException, OSError, UnicodeDecodeError) as exc:
        report.add("annotation_skipped_unreadable_xml", f"{path}: {shorten(str(exc), 120)}")
        return None
    if root.tag != "annotation":
        report.add("annotation_skipped_unreadable_xml", f"{path}: root <{shorten(root.tag, 40)}>, not <annotation>")
        return None
    return root


def _number(element: Element | None, tag: str) -> float | None:
    text = element.findtext(tag) if element is not None else None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value


def _flag(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes")


def _image_index(channel: Path) -> dict[str, list[Path]]:
    """Every image in the channel by stem, to find each XML's image in any layout."""
    index: dict[str, list[Path]] = defaultdict(list)
    for path in walk_files(channel, is_image):
        index[path.stem].append(path)
    return index


def _find_image(xml: Path, filename: str | None, index: dict[str, list[Path]]) -> Path | None:
    candidates = index.get(xml.stem) or (index.get(Path(filename).stem) if filename else None)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    # Several images share the stem (split folders, CVAT's sub/a.jpg and other/a.jpg): one
    # whose path ends with a filename that holds folders, else the nearest to the XML.
    name = (filename or "").replace("\\", "/").lstrip("/")
    tail = "/" + name if "/" in name else None

    def distance(p: Path) -> int:
        common = os.path.commonpath([p.parent, xml.parent])
        return len(p.parent.parts) + len(xml.parent.parts) - 2 * len(Path(common).parts)
    return min(candidates, key=lambda p: (not (tail and p.as_posix().endswith(tail)), distance(p),
                                          p.name != filename, str(p)))


# Subset lists in ImageSets/Main (or ImageSets/): VOCdevkit's train.txt and val.txt, CVAT's
# (datumaro's) Train.txt and Validation.txt; names compared in lower case.
IMAGE_SET_NAMES = {"train": ("train",), "val": ("val", "valid", "validation")}


def _imagesets(channel: Path, boundary: Boundary) -> tuple[dict[str, set[str]], str] | None:
    """The shallowest ImageSets/Main (or ImageSets) holding a training and a validation list:
    their entries (image ids: stems, or paths without extension, CVAT's sub/a) and the files'
    names. The per-class lists (<class>_train.txt) are not splits."""
    lists = walk_files(channel, lambda f: f.lower().endswith(".txt"))
    by_folder: dict[Path, dict[str, Path]] = {}
    for path in lists:
        if path.parent.name == "ImageSets" or (path.parent.name, path.parent.parent.name) == ("Main", "ImageSets"):
            by_folder.setdefault(path.parent, {})[path.stem.lower()] = path

    def shallowest(folder: Path) -> tuple:  # ImageSets/Main before ImageSets/ itself
        sets = folder.parent if folder.name == "Main" else folder
        return len(sets.parts), folder.name != "Main", str(folder)
    for folder in sorted(by_folder, key=shallowest):
        named = by_folder[folder]
        chosen = {part: next((named[n] for n in names if n in named), None)
                  for part, names in IMAGE_SET_NAMES.items()}
        if None in chosen.values():
            continue
        sets = {}
        for part, path in chosen.items():
            boundary.check(path, "VOC image set")
            sets[part] = {line.split()[0].replace("\\", "/") for line in
                          read_text(path, "VOC image set").splitlines() if line.strip()}
        return sets, f"{chosen['train'].name} and {chosen['val'].name}"
    return None


def parse_xmls(xmls: list[Path], channel: str) -> tuple[list, DataReport]:
    """Each XML as (filename, width, height, [(name, bbox [x, y, w, h] or None, difficult)]),
    None when it cannot be used (in a worker process when there are many)."""
    report = DataReport()
    boundary = Boundary(Path(channel))
    return [_read_xml(xml, boundary, report) for xml in xmls], report


def _read_xml(xml: Path, boundary: Boundary, report: DataReport) -> tuple | None:
    if not boundary.per_image(xml, report):
        return None
    root = _parse(xml, report)
    if root is None:
        return None
    size = root.find("size")
    origin = 1
    if _written_by_datumaro(root):
        origin = 0
        report.add("xml_read_0_based_cvat", n=1)
    objects = []
    for obj in root.iter("object"):  # <part> boxes sit inside objects as <part>, not <object>
        box = obj.find("bndbox")
        x1, y1, x2, y2 = (_number(box, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        bbox = None
        if None not in (x1, y1, x2, y2):
            bbox = [x1 - origin, y1 - origin, x2 - (x1 - origin), y2 - (y1 - origin)]
        objects.append(((obj.findtext("name") or "").strip(), bbox, _flag(obj.findtext("difficult"))))
    return ((root.findtext("filename") or "").strip(), _number(size, "width"),
            _number(size, "height"), objects)


def _written_by_datumaro(root: Element) -> bool:
    source = root.find("source")
    return source is not None and all(
        (source.findtext(tag) or "").strip() == text for tag, text in DATUMARO_SOURCE.items())


def read(channel: Path, hp: Hyperparameters, report: DataReport,
         categories: list[Category] | None = None) -> CocoData:
    boundary = Boundary(channel)
    xmls = _xml_files(channel)
    index = _image_index(channel)
    class_file = find_class_list([channel, channel / "Annotations", channel / "annotations"])
    listed = read_class_list(class_file, boundary) if class_file else None

    parsed, part = map_chunks(parse_xmls, xmls, str(channel))
    merge(report, part)
    if part.counts["xml_read_0_based_cvat"]:
        log.info("%d XMLs in %s were written by CVAT (datumaro): their boxes are read 0-based, "
                 "as written", part.counts["xml_read_0_based_cvat"], channel)
    images, boxes = [], []
    seen_images: set[str] = set()
    for xml, found in zip(xmls, parsed):
        if found is None:
            continue
        filename, width, height, objects = found
        image = _find_image(xml, filename, index)
        if image is None:
            report.add("image_skipped_missing_file", f"{relative(channel, xml)}: {shorten(filename)}")
            continue
        file_name = relative(channel, image)
        if file_name in seen_images:
            report.add("annotation_skipped_second_xml_for_image", relative(channel, xml))
            continue
        seen_images.add(file_name)
        entry = {"id": file_name, "file_name": file_name}
        if width and height and width > 0 and height > 0:
            entry["width"], entry["height"] = width, height
        elif boundary.inside(image):
            # coco_records counts a size read from the header; read it here for the boxes.
            size = image_size(image)
            if size:
                entry["width"], entry["height"] = size
                report.add("image_size_read_from_file", file_name)
        images.append(entry)
        for name, bbox, difficult in objects:
            if difficult and not hp.keep_difficult:
                report.add("box_dropped_difficult", f"{file_name}: {shorten(name)}")
                continue
            boxes.append((file_name, name, bbox))

    unannotated = sum(len(v) for v in index.values()) - len(seen_images)
    if unannotated > 0:  # LabelImg writes an XML without objects for a negative; no XML: not listed
        report.add("images_without_xml_not_used", n=unannotated)
    names = listed if listed is not None else sorted({name for _, name, _ in boxes if name})
    coco_categories = categories_by_name(names)
    id_of = {c["name"]: c["id"] for c in coco_categories}
    unknown = sorted({name for _, name, _ in boxes} - set(id_of))
    if listed is not None and unknown:
        report.add("category_not_in_class_list", f"{class_file}: {shorten(unknown)}", n=len(unknown))
    annotations = [
        {"id": k, "image_id": file_name, "category_id": id_of.get(name, f"unknown: {name}"), "bbox": bbox}
        for k, (file_name, name, bbox) in enumerate(boxes)
    ]
    if not images:
        raise UserInputError(
            f"no Pascal VOC XML in {channel} names an image found in the channel (see the data "
            f"report: {report.summary()}); put each image beside its XML or in JPEGImages/."
        )
    if not coco_categories:
        raise UserInputError(
            f"the Pascal VOC XMLs in {channel} name no object class; give each <object> a <name>."
        )
    coco = {"images": images, "annotations": annotations, "categories": coco_categories}
    return records(channel, coco, class_file or channel, report, categories,
                   split=_split(channel, images, boundary))


def _split(channel: Path, images: list[dict], boundary: Boundary) -> dict | None:
    found = _imagesets(channel, boundary)
    if found is not None:
        sets, names = found

        def listed(file_name: str, entries: set[str]) -> bool:
            # an entry names the image by its stem or by its path's last parts, extension off
            parts = Path(file_name).with_suffix("").parts
            return any("/".join(parts[k:]) in entries for k in range(len(parts)))
        return {"train": {e["id"] for e in images if listed(e["file_name"], sets["train"])},
                "val": {e["id"] for e in images if listed(e["file_name"], sets["val"])},
                "how": f"VOC ImageSets/Main {names}"}
    return split_by_folder(images)


def split_by_folder(images: list[dict]) -> dict | None:
    """Roboflow's train/ valid/ (test/) folders as the split, when both train and valid exist."""
    parts = {"train": set(), "val": set()}
    for e in images:
        top = Path(e["file_name"]).parts[0]
        if top in SPLIT_FOLDERS and SPLIT_FOLDERS[top]:
            parts[SPLIT_FOLDERS[top]].add(e["id"])
    if parts["train"] and parts["val"]:
        return {**parts, "how": "train/ and valid/ folders"}
    return None
