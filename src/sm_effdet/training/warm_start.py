"""Starting points other than effdet's COCO detector: an earlier model, or ImageNet backbone weights.

Warm start (SageMaker's "incremental training") takes a previous job's model/ folder or its
model.tar.gz from a channel named `model`: every tensor but the class head is loaded as it is;
class-head rows are matched by class name. Only the weights carry over: optimiser, schedule and
epochs start anew, which is what tells it apart from resuming a checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ..backbones import BACKBONES
from ..errors import UserInputError
from ..model.artifacts import non_finite_tensors
from ..model.efficientdet import WEIGHT_SUFFIXES, read_state_dict
from ..model.model_card import METADATA_FILE, ModelCardError, file_inside, read_model_card

log = logging.getLogger(__name__)

MODEL_CHANNEL = "model"
MODEL_JSON = METADATA_FILE
MODEL_WEIGHTS = "model.safetensors"
MODEL_ARCHIVE = "model.tar.gz"
CLASS_HEAD = "class_net.predict.conv_pw."  # the last conv: num_anchors x num_classes outputs
COPY_CHUNK = 1 << 20
# model.json holds settings, classes and per-class numbers: kilobytes, a few MB with 10,000 classes.
MAX_MODEL_JSON_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------
# Warm start from an earlier model


def read_previous_model(channel: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """model.json and the weights from the `model` channel (a model/ folder or model.tar.gz)."""
    card_path = _find_one(channel, MODEL_JSON)
    if card_path is not None:
        card, state = _read_model_folder(card_path.parent, channel)
        return card, state, card_path.parent
    archive = _find_one(channel, MODEL_ARCHIVE)
    if archive is None:
        raise UserInputError(
            f"the '{MODEL_CHANNEL}' channel {channel} holds neither {MODEL_JSON} with "
            f"{MODEL_WEIGHTS} nor {MODEL_ARCHIVE}; give a previous job's model/ folder or "
            "its model.tar.gz, or remove the channel."
        )
    with tempfile.TemporaryDirectory(prefix="sm-effdet-warm-") as folder:
        _extract_model(archive, Path(folder))
        missing = [name for name in (MODEL_JSON, MODEL_WEIGHTS) if not (Path(folder) / name).is_file()]
        if missing:
            raise UserInputError(
                f"{archive} holds no {' and no '.join(missing)}; give the model.tar.gz a previous "
                "job wrote (it holds both), or its model/ folder."
            )
        try:
            card, state = _read_model_folder(Path(folder), Path(folder))
        except UserInputError as exc:
            # The user knows the archive, not the temporary folder it was unpacked into.
            raise UserInputError(_in_archive(str(exc), Path(folder), archive)) from None
    return card, state, archive


def _read_model_folder(folder: Path, root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """model.json and the weights of a model folder inside `root` (the channel, or the folder
    an archive was unpacked into)."""
    card_path = folder / MODEL_JSON
    try:  # no file of the channel may lead outside it (model_card.file_inside)
        file_inside(root, card_path.relative_to(root))
        weights_path = file_inside(root, folder.relative_to(root) / MODEL_WEIGHTS)
    except ModelCardError as exc:
        raise UserInputError(str(exc)) from exc
    if not weights_path.is_file():
        raise UserInputError(
            f"{card_path} has no {MODEL_WEIGHTS} beside it; give the whole model/ folder of the "
            "previous job, or its model.tar.gz."
        )
    try:  # model.json's format has one home: model_card.py
        card = read_model_card(folder)
    except ModelCardError as exc:
        raise UserInputError(str(exc)) from exc
    try:
        card["backbone"] = str(card["backbone"])
        card["classes"] = [c["name"] for c in card["classes"]]
    except (KeyError, TypeError) as exc:
        raise UserInputError(
            f"{card_path} is not a model.json written by this container ({type(exc).__name__}: "
            f"{one_line(str(exc), 200)}); give a previous job's model/ folder or its model.tar.gz."
        ) from exc
    return card, read_state_dict(weights_path)


def _in_archive(message: str, folder: Path, archive: Path) -> str:
    for name in (MODEL_JSON, MODEL_WEIGHTS):
        message = message.replace(str(folder / name), f"{name} in {archive}")
    return message.replace(str(folder), str(archive))


def _find_one(folder: Path, name: str) -> Path | None:
    found = sorted(folder.rglob(name), key=lambda p: len(p.parts))
    return found[0] if found else None


def one_line(text: str, limit: int) -> str:
    """`text` on one line (a failure reason is one sentence), at most `limit` characters."""
    return " ".join(text.split())[:limit]


def _extract_model(archive: Path, folder: Path) -> None:
    """Only model.json and model.safetensors, by their base names: nothing else is written.

    Each is copied to disk a chunk at a time: a model's weights can be gigabytes, and read
    whole they would be held in memory twice (here and when loaded).
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = Path(member.name).name
                if not (member.isfile() and name in (MODEL_JSON, MODEL_WEIGHTS)):
                    continue
                if name == MODEL_JSON and member.size > MAX_MODEL_JSON_BYTES:
                    raise UserInputError(
                        f"{MODEL_JSON} in {archive} is {member.size} bytes, more than a model.json "
                        f"of this container holds ({MAX_MODEL_JSON_BYTES}); give the model.tar.gz "
                        "a previous job wrote."
                    )
                source = tar.extractfile(member)
                if source is not None:
                    with source, (folder / name).open("wb") as target:
                        shutil.copyfileobj(source, target, COPY_CHUNK)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserInputError(
            f"cannot read {archive} ({type(exc).__name__}: {one_line(str(exc), 100)}); give "
            "the model.tar.gz a previous job wrote, or its model/ folder."
        ) from exc


def warm_start(net: torch.nn.Module, channel: Path, backbone: str, classes: list[str]) -> None:
    """Load a previous model into `net` (an effdet.EfficientDet for `classes`)."""
    card, state, source = read_previous_model(channel)
    if card["backbone"] != backbone:
        raise UserInputError(
            f"the model in the '{MODEL_CHANNEL}' channel ({source}) was trained with backbone "
            f"'{card['backbone']}', but this job's backbone is '{backbone}'; set backbone to "
            f"'{card['backbone']}' or remove the '{MODEL_CHANNEL}' channel."
        )
    own = net.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(CLASS_HEAD)}
    misfit = [k for k in own if not k.startswith(CLASS_HEAD)
              and (k not in body or body[k].shape != own[k].shape)]
    if misfit:
        raise UserInputError(
            f"the weights in {source} do not fit backbone '{backbone}' ({len(misfit)} of "
            f"{len(own)} tensors missing or of another shape, e.g. {misfit[0]}); give a model "
            "this container wrote."
        )
    head = {k: _class_rows(own[k], state[k], card["classes"], classes)
            for k in own if k.startswith(CLASS_HEAD)}
    net.load_state_dict({**{k: body[k] for k in own if k in body}, **head})
    bad = non_finite_tensors(net.state_dict())
    if bad:  # else training would start from NaN and blame learning_rate for diverging
        raise UserInputError(
            f"the starting weights in {source} (the '{MODEL_CHANNEL}' channel) hold non-finite "
            f"values (NaN or infinity, in {len(bad)} tensors such as {bad[0]}); give a model "
            f"whose weights are finite, or remove the '{MODEL_CHANNEL}' channel."
        )
    kept = [c for c in classes if c in card["classes"]]
    new = [c for c in classes if c not in card["classes"]]
    dropped = [c for c in card["classes"] if c not in classes]
    log.info(
        "warm start from %s (backbone %s, trained at %s px): classes kept %d (%s), new %d (%s), "
        "dropped %d (%s); optimiser, schedule and epochs start anew",
        source, backbone, card.get("img_size", "?"), len(kept), ", ".join(kept) or "-",
        len(new), ", ".join(new) or "-", len(dropped), ", ".join(dropped) or "-",
    )


def _class_rows(
    fresh: torch.Tensor, old: torch.Tensor, old_classes: list[str], classes: list[str]
) -> torch.Tensor:
    """The class head's rows for `classes`: the old row where the name is known, else fresh.

    effdet reads the head's output channels anchors-major (bench.py permutes to NHWC and
    reshapes to [..., num_anchors, num_classes]), so channel = anchor * num_classes + class.
    """
    anchors = fresh.shape[0] // len(classes)
    if old.shape[0] != anchors * len(old_classes) or old.shape[1:] != fresh.shape[1:]:
        raise UserInputError(
            f"the previous model's class head has shape {tuple(old.shape)}, which does not fit "
            f"its {len(old_classes)} classes; give a model this container wrote."
        )
    rows = fresh.clone().view(anchors, len(classes), *fresh.shape[1:])
    old_rows = old.view(anchors, len(old_classes), *old.shape[1:])
    for index, name in enumerate(classes):
        if name in old_classes:
            rows[:, index] = old_rows[:, old_classes.index(name)]
    return rows.view_as(fresh)


# ---------------------------------------------------------------------------------------------
# ImageNet weights for the backbone only


def timm_backbone_name(backbone: str) -> str:
    from effdet import get_efficientdet_config

    return get_efficientdet_config(BACKBONES[backbone]).backbone_name


def load_backbone_weights(net: torch.nn.Module, backbone: str, pretrained_dir: Path | None) -> None:
    """ImageNet weights into net.backbone (timm's names); the FPN and heads stay as built."""
    name = timm_backbone_name(backbone)
    if pretrained_dir is not None:
        path = _find_backbone_file(pretrained_dir, name)
        state, source = read_state_dict(path), str(path)
    else:
        state, source = _download_backbone(name, backbone), f"timm's {name} (downloaded)"
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    own = net.backbone.state_dict()
    wanted = [k for k in own if not k.endswith("num_batches_tracked")]
    misfit = [k for k in wanted if k not in state or state[k].shape != own[k].shape]
    if misfit:
        raise UserInputError(
            f"the backbone weights {source} do not fit backbone '{backbone}' ({len(misfit)} of "
            f"{len(wanted)} tensors missing or of another shape, e.g. {misfit[0]}); give timm's "
            f"{name} ImageNet weights (docs/training.md, Starting points)."
        )
    net.backbone.load_state_dict({k: state[k] for k in wanted}, strict=False)
    log.info(
        "backbone weights: %s (%d of %d backbone tensors as timm's %s; the FPN and heads are new)",
        source, len(wanted), len(wanted), name,
    )


def _find_backbone_file(folder: Path, timm_name: str) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    backbone_files = [p for p in files if _is_backbone_file(p)]
    if len(backbone_files) == 1:
        return backbone_files[0]
    names = ", ".join(str(p.relative_to(folder)) for p in files[:5]) or "none"
    how = "several" if backbone_files else "no"
    raise UserInputError(
        f"pretrained is 'backbone' but the 'pretrained' channel {folder} holds {how} backbone "
        f"weights files (files: {names}); give exactly one file with timm's {timm_name} "
        "ImageNet weights (keys such as conv_stem.weight, blocks.0.0...), or set pretrained "
        "to true or false."
    )


def _is_backbone_file(path: Path) -> bool:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
        else:
            keys = set(read_state_dict(path))
    except (UserInputError, OSError, RuntimeError):  # not a weights file: not a backbone file
        return False
    keys = {k.removeprefix("backbone.") for k in keys}
    return "conv_stem.weight" in keys and not any(k.startswith("class_net.") for k in keys)


def _download_backbone(timm_name: str, backbone: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(timm_name, pretrained=True).state_dict()
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserInputError(
            f"could not download the ImageNet weights of backbone '{backbone}' (timm's "
            f"{timm_name}) ({reason}); for a job without internet access add a channel named "
            f"'pretrained' holding a file with timm's {timm_name} weights (docs/training.md, "
            "Starting points), or set the hyperparameter pretrained to false."
        ) from exc


def choose_starting_point(
    pretrained: bool | str, model_channel: Path | None, resuming: bool
) -> str:
    """'resume', 'warm', 'backbone', 'coco' or 'scratch': where the weights come from."""
    if resuming:  # a resumed job takes every weight from its checkpoint
        return "resume"
    if model_channel is not None and pretrained is not False:
        log.info("the '%s' channel is given: warm start instead of pretrained=%s",
                 MODEL_CHANNEL, str(pretrained).lower())
    return weights_origin(pretrained, model_channel)


def weights_origin(pretrained: bool | str, model_channel: Path | None) -> str:
    """'warm', 'backbone', 'coco' or 'scratch': where the run's first weights came from, for a
    resumed job too (its checkpoint's run began there)."""
    if model_channel is not None:
        return "warm"
    if pretrained == "backbone":
        return "backbone"
    return "coco" if pretrained else "scratch"
