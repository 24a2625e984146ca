"""A YOLO data.yaml, read so that no file can make the job expand or misread it.

YAML aliases can multiply text without bound (a "billion laughs" file of a few hundred bytes
expands to gigabytes when its values are turned into strings), so an alias is refused while
the file is composed, before anything is expanded, and the file itself is bounded. Class names
are taken as the text written: YAML 1.1 reads `no`, `yes`, `on`, `off` and `null` as False,
True and None, which are nobody's class names. Names and paths must be plain text of bounded
length; anything else fails with one sentence naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from ...errors import UserInputError, shorten
from .common import read_text, require_regular_file

# Far beyond any real data.yaml (80 COCO classes take 1 KB; 10,000 names about 200 KB).
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_NAME_CHARS = 256
MAX_PATH_CHARS = 4096
PATH_KEYS = ("path", "train", "val", "validation", "test")


class _AliasFound(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that stops at the first alias, before composing (expanding) it."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(f"*{event.anchor} on line {event.start_mark.line + 1}")
        return super().compose_node(parent, index)


def load(path: Path) -> dict[str, Any]:
    """The data.yaml as a dict; `names` (a list or an {id: name} map) holds the names as text."""
    require_regular_file(path, "data.yaml")
    size = os.stat(path).st_size
    if size > MAX_YAML_BYTES:
        raise UserInputError(
            f"{path} is {size:,} bytes, more than a data.yaml needs ({MAX_YAML_BYTES:,} at "
            "most); give a data.yaml with 'train', 'val' and 'names' only."
        )
    loader = _Loader(read_text(path, "data.yaml"))
    try:
        node = loader.get_single_node()
        if not isinstance(node, MappingNode):
            raise UserInputError(f"{path} must hold a mapping with 'train', 'val' and 'names'.")
        data = loader.construct_document(node)
    except _AliasFound as exc:
        raise UserInputError(
            f"{path} uses a YAML alias ({shorten(str(exc), 80)}); write each name and path out "
            "in full (aliases are refused: they can expand a small file without bound)."
        ) from None
    except yaml.YAMLError as exc:
        raise UserInputError(
            f"{path} is not valid YAML ({shorten(str(exc).splitlines()[0], 200)}); fix it."
        ) from None
    except RecursionError:
        raise UserInputError(
            f"{path} is nested too deeply; give 'train', 'val' and 'names' as plain values."
        ) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):  # a mapping whose keys cannot be held in a dict
        raise UserInputError(f"{path} must hold a mapping with 'train', 'val' and 'names'.")
    for key, value in node.value:
        if isinstance(key, ScalarNode) and key.value == "names":
            data["names"] = _names(value, loader, path)
    for key in PATH_KEYS:
        for value in data.get(key) if isinstance(data.get(key), list) else [data.get(key)]:
            if isinstance(value, str) and len(value) > MAX_PATH_CHARS:
                raise UserInputError(
                    f"'{key}' in {path} is a path of {len(value):,} characters; give a folder "
                    "or .txt list relative to the yaml's folder."
                )
    return data


def _names(node: Any, loader: _Loader, path: Path) -> Any:
    """The names as written (a list, or a map from ids); other shapes are left for the reader
    to refuse."""
    if isinstance(node, SequenceNode):
        return [_name(child, k, path) for k, child in enumerate(node.value)]
    if isinstance(node, MappingNode):
        return {loader.construct_object(key, deep=True): _name(value, key.value, path)
                for key, value in node.value}
    return loader.construct_object(node, deep=True)


def _name(node: Any, key: Any, path: Path) -> str:
    if not isinstance(node, ScalarNode):
        raise UserInputError(
            f"class {shorten(key, 20)} in 'names' of {path} is not a plain name (found a YAML "
            f"{type(node).__name__.removesuffix('Node').lower()}); write each class name as text."
        )
    if not node.value.strip() or len(node.value) > MAX_NAME_CHARS:
        raise UserInputError(
            f"class {shorten(key, 20)} in 'names' of {path} is "
            f"{'empty' if not node.value.strip() else f'{len(node.value):,} characters long'}; "
            f"give each class a name of 1 to {MAX_NAME_CHARS} characters."
        )
    return node.value
