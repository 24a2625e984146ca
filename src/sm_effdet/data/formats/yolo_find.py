"""Where YOLO data is in a channel: its data.yaml, or Darknet's class list and label files in
the layouts tools write, and where each image's label is.

- Ultralytics / Roboflow: a data.yaml (the root's, else the shallowest one naming `names` or
  `nc`, else a YAML of another name with `train` and `names`, as Ultralytics' coco128.yaml);
  labels by the images -> labels rule.
- CVAT "YOLO 1.1" (datumaro's writer): obj.names, obj.data (`classes = 2`, `train =
  data/train.txt`, `names = data/obj.names`, `backup = backup/`), the subset lists naming
  `data/obj_train_data/a.jpg`, each label beside its image in obj_<subset>_data/. Darknet runs
  from its own folder with the export in data/, so a `data/` that leads nowhere is dropped.
- LabelImg: classes.txt beside the images, each label .txt beside its image, any folder.
- Darknet by hand: classes.txt or obj.names with images/ and labels/.

Without a data.yaml the layout is recognised by content: a class list anywhere (the
shallowest) and a label file, rows of `class cx cy w h` numbers, at an image's label path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import UserInputError, shorten
from .common import Boundary, is_image, read_class_list, read_text, relative
from .image_records import DataReport, safe_join
from .scan import decode, head, scan

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
CLASS_LISTS = ("obj.names", "classes.txt")
DARKNET_DATA = "obj.data"
# Label files looked at (at most) to recognise the layout; the first with a numeric row wins.
LABEL_PROBES = 200
# obj.data keys naming subset lists, by the part they are used for (lower case; others unused).
DARKNET_SUBSETS = {"train": "train", "valid": "val", "val": "val", "validation": "val"}
_YAML_NAMES_KEY = re.compile(rb"^(names|nc)\s*:", re.M)
_YAML_TRAIN_KEY = re.compile(rb"^train\s*:", re.M)


def label_path(image: str) -> str:
    """Ultralytics' documented rule: the last /images/ becomes /labels/, the extension .txt."""
    head_, sep, tail = ("/" + image).rpartition("/images/")
    stem = os.path.splitext(tail if sep else image)[0]
    return (head_ + "/labels/" + stem + ".txt").lstrip("/") if sep else stem + ".txt"


def label_candidates(image: str) -> list[str]:
    """Where an image's label may be: by the images -> labels rule, else beside the image
    (LabelImg and CVAT save it there, whatever the folder is called)."""
    rule, beside = label_path(image), os.path.splitext(image)[0] + ".txt"
    return [rule] if rule == beside else [rule, beside]


def _by_depth(paths: list[Path], channel: Path) -> list[Path]:
    return sorted(paths, key=lambda p: (len(p.relative_to(channel).parts), str(p)))


def yaml_file(channel: Path) -> Path | None:
    """The root's data.yaml, else the shallowest one below that names `names` or `nc`, else
    the shallowest YAML of another name (Ultralytics' coco128.yaml) with `train` and `names`."""
    found = [channel / n for n in YAML_NAMES if (channel / n).is_file()]
    if found:
        return found[0]
    boundary = Boundary(channel)
    yamls = _by_depth(scan(channel).paths(lambda n: n.lower().endswith((".yaml", ".yml"))), channel)
    for named in (True, False):
        for path in yamls:
            if (path.name in YAML_NAMES) != named:
                continue
            data = head(path, boundary.inside, 65536)
            if data and _YAML_NAMES_KEY.search(data) and (named or _YAML_TRAIN_KEY.search(data)):
                return path
    return None


def class_list(channel: Path) -> Path | None:
    lists = scan(channel).paths(lambda n: n in CLASS_LISTS)
    return _by_depth(lists, channel)[0] if lists else None


def looks_like_labels(data: bytes) -> bool:
    """Whether a file's first row is YOLO's: a whole class number, then 4 or more numbers."""
    line = next((ln for ln in decode(data).splitlines() if ln.strip()), "")
    values = line.split()
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return False
    return len(numbers) >= 5 and numbers[0].is_integer() and numbers[0] >= 0


def label_files(channel: Path, limit: int = LABEL_PROBES) -> tuple[list[Path], int]:
    """Label files with a YOLO row at their images' label paths (the first found, at most
    `limit` looked at) and how many files were looked at."""
    listing = scan(channel)
    files = listing.relative()
    boundary = Boundary(channel)
    found, looked = [], 0
    for image in listing.relative_paths(is_image):
        for candidate in label_candidates(image):
            if candidate in files:
                looked += 1
                data = head(channel / candidate, boundary.inside)
                if data and looks_like_labels(data):
                    found.append(channel / candidate)
                    return found, looked
                break
        if looked >= limit:
            break
    return found, looked


def find(channel: Path) -> list[Path]:
    """A data.yaml; else a class list with a label file (see the module's docstring)."""
    data = yaml_file(channel)
    if data is not None:
        return [data]
    names = class_list(channel)
    if names is None:
        return []
    labels, _ = label_files(channel)
    return [names, *labels] if labels else []


def darknet_parts(channel: Path, boundary: Boundary, report: DataReport
                  ) -> tuple[list[str], dict[str, list[str]], Path]:
    """Class names, the images of each part and the file naming them, without a data.yaml:
    CVAT's obj.data subset lists when beside the class list, else every image in the channel."""
    names_file = class_list(channel)
    if names_file is None:
        raise UserInputError(
            f"no data.yaml, classes.txt nor obj.names in {channel}; add a data.yaml with "
            "'train', 'val' and 'names'."
        )
    names = read_class_list(names_file, boundary)
    obj_data = names_file.parent / DARKNET_DATA
    if obj_data.is_file():
        parts = _obj_data_parts(obj_data, channel, boundary, report)
        if parts:
            return names, parts, obj_data
    images = scan(channel).relative_paths(is_image)
    return names, {"all": images}, names_file


def _obj_data_parts(obj_data: Path, channel: Path, boundary: Boundary, report: DataReport
                    ) -> dict[str, list[str]]:
    boundary.check(obj_data, "Darknet obj.data")
    parts: dict[str, list[str]] = {}
    for line in read_text(obj_data, "Darknet obj.data").splitlines():
        key, sep, value = line.partition("=")
        part = DARKNET_SUBSETS.get(key.strip().lower())
        if not sep or part is None or not value.strip():
            continue
        listed = _darknet_path(obj_data.parent, value.strip())
        if listed is None or not listed.is_file():
            raise UserInputError(
                f"{obj_data} names the list {shorten(value.strip())} for '{key.strip()}', which is "
                "not in the channel; put the list beside obj.data or remove the line."
            )
        boundary.check(listed, "image list")
        parts.setdefault(part, []).extend(_darknet_list(listed, obj_data.parent, channel, report))
    return parts


def _darknet_path(root: Path, text: str) -> Path | None:
    """A path from obj.data or a subset list: as written, else without Darknet's `data/`."""
    text = text.replace("\\", "/")
    path = safe_join(root, text[2:] if text.startswith("./") else text)
    if path is not None and not os.path.lexists(path) and text.startswith("data/"):
        path = safe_join(root, text[len("data/"):]) or path
    return path


def _darknet_list(listed: Path, root: Path, channel: Path, report: DataReport) -> list[str]:
    images = []
    for line in read_text(listed, "image list").splitlines():
        line = line.strip()
        if not line:
            continue
        path = _darknet_path(root, line)
        if path is None:
            report.add("image_skipped_unsafe_file_name", f"{listed.name}: {shorten(line)}")
            continue
        images.append(os.path.normpath(relative(channel, path)))
    return images
