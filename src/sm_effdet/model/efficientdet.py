"""EfficientDet through Icevision, and the COCO-pretrained weights effdet publishes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..backbones import BACKBONES
from ..errors import UserInputError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def ensure_icevision_font() -> None:
    """Icevision downloads a font when imported unless one is in place; give it matplotlib's."""
    font = Path.home() / ".icevision" / "fonts" / "SpaceGrotesk-Medium.ttf"
    if font.exists():
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    font.parent.mkdir(parents=True, exist_ok=True)
    tmp = font.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(font)


def effdet_config(backbone: str, img_size: int) -> Any:
    from effdet import get_efficientdet_config

    config = get_efficientdet_config(BACKBONES[backbone])
    config.image_size = (img_size, img_size)
    return config


def build_model(
    backbone: str, num_classes: int, img_size: int, pretrained: bool, pretrained_dir: Path | None
) -> torch.nn.Module:
    """Icevision's EfficientDet training bench for `num_classes` object classes (no background)."""
    ensure_icevision_font()
    from icevision.models.ross import efficientdet as ice_efficientdet
    from icevision.models.ross.efficientdet.utils import EfficientDetBackboneConfig

    # The backbone's own ImageNet weights would come from the Hugging Face hub; the COCO
    # weights loaded below cover the backbone too, so that download is never wanted.
    bench = ice_efficientdet.model(
        backbone=EfficientDetBackboneConfig(model_name=BACKBONES[backbone])(pretrained=False),
        num_classes=num_classes + 1,  # Icevision counts the background
        img_size=img_size,
        pretrained_backbone=False,
    )
    if pretrained:
        state, source = load_pretrained_state(backbone, pretrained_dir)
        load_matching_weights(bench.model, state, source, backbone)
    return bench


def load_pretrained_state(backbone: str, pretrained_dir: Path | None) -> tuple[dict, str]:
    url = effdet_config(backbone, 512).url
    expected = url.rsplit("/", 1)[-1] if url else None
    if pretrained_dir is not None:
        path = _find_weights_file(pretrained_dir, expected)
        return read_state_dict(path), str(path)
    if not url:
        raise UserInputError(
            f"effdet publishes no COCO-pretrained weights for backbone '{backbone}'; provide "
            "weights in a 'pretrained' channel or set pretrained to false."
        )
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, weights_only=True
        )
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserInputError(
            f"could not download the COCO-pretrained weights for backbone '{backbone}' from "
            f"{url} ({reason}); for a job without internet access add a channel named "
            f"'pretrained' holding {expected}, or set the hyperparameter pretrained to false."
        ) from exc
    return state, url


def _find_weights_file(folder: Path, expected: str | None) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    named = [p for p in files if expected and p.name == expected]
    if named:
        return named[0]
    if len(files) == 1:
        return files[0]
    wanted = f" (expected {expected})" if expected else ""
    if not files:
        raise UserInputError(
            f"the 'pretrained' channel {folder} holds no weights file{wanted}; add one "
            f"({', '.join(WEIGHT_SUFFIXES)}) or set pretrained to false."
        )
    names = ", ".join(str(p.relative_to(folder)) for p in files[:5])
    raise UserInputError(
        f"the 'pretrained' channel {folder} holds several weights files ({names}); keep only "
        f"the one for this backbone{wanted}."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load weights without executing code from the file (safetensors or weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserInputError(
            f"cannot read weights file {path} ({type(exc).__name__}: {str(exc)[:120]}); give a "
            "PyTorch state dict (.pth) or a .safetensors file."
        ) from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserInputError(f"weights file {path} does not hold a state dict of tensors.")
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_matching_weights(
    net: torch.nn.Module, state: dict[str, torch.Tensor], source: str, backbone: str
) -> None:
    """Load detector weights; only the class head may differ (other classes than COCO's)."""
    own = net.state_dict()
    head = "class_net.predict."
    misfit = [
        k for k, v in state.items()
        if k in own and v.shape != own[k].shape and not k.startswith(head)
    ]
    missing = [k for k in own if k not in state and not k.startswith(head)]
    if misfit or missing:
        raise UserInputError(
            f"weights {source} do not fit backbone '{backbone}' ({len(missing)} of {len(own)} "
            f"tensors missing, {len(misfit)} of another shape); give the file effdet publishes "
            "for this backbone."
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    net.load_state_dict(usable, strict=False)
    log.info(
        "pretrained weights: %s (%d of %d tensors; the class head is new)",
        source, len(usable), len(own),
    )
