"""`sm-effdet predict ENDPOINT IMAGE...`: send images to an endpoint, print the detections, and
with --draw write the image with its boxes (Pillow, only then imported).

Each image is one InvokeEndpoint request with the raw bytes (serve's image/jpeg, image/png or
application/x-image), options in CustomAttributes (serve reads score_threshold and
max_detections there) and Accept application/jsonlines, the one answer serve always gives in
the same shape, {"width", "height", "detections": [{"box", "box_normalized", "score",
"class_name", ...}]}, whatever SERVE_DEFAULT_FORMAT the endpoint was given.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..errors import JobError, UserInputError, shorten
from .aws import named
from .hosting import check_invoke_body, invoke_request

ACCEPT = "application/jsonlines"
IMAGE_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
DRAW_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}
# Endpoints that answer InvokeEndpoint: Updating and SystemUpdating still serve the old config.
SERVING = ("InService", "Updating", "SystemUpdating", "UpdateRollbackFailed")


def read_images(paths: list[Path]) -> list[tuple[Path, bytes, str]]:
    """Each image's bytes and content type; unreadable or too large ones refused first."""
    images = []
    for path in paths:
        try:
            body = path.read_bytes()
        except OSError as exc:
            raise UserInputError(f"cannot read the image {path}: {exc.strerror}; give an "
                                 "existing image file.") from None
        if not body:
            raise UserInputError(f"the image {path} is empty; give a JPEG or PNG file.")
        check_invoke_body(len(body), f"the image {path}")
        images.append((path, body, IMAGE_CONTENT_TYPES.get(path.suffix.lower(), "application/x-image")))
    return images


def custom_attributes(threshold: float | None, max_detections: int | None) -> str | None:
    parts = []
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise UserInputError(f"--threshold {threshold:g} is not between 0 and 1; give a "
                                 "score such as 0.5.")
        parts.append(f"score_threshold={threshold:g}")
    if max_detections is not None:
        if max_detections < 1:
            raise UserInputError(f"--max-detections {max_detections} is below 1; give a whole "
                                 "number from 1.")
        parts.append(f"max_detections={max_detections}")
    return ",".join(parts) or None


def check_draw(draw: Path | None, count: int) -> None:
    """--draw before any call: one image, a known format, Pillow present, a folder to write to."""
    if draw is None:
        return
    if count != 1:
        raise UserInputError(f"--draw writes one image and {count} were given; predict one image "
                             "at a time to draw it.")
    if draw.suffix.lower() not in DRAW_FORMATS:
        raise UserInputError(f"--draw {draw} must end in .jpg, .jpeg or .png (the format it is "
                             "written in).")
    if not draw.parent.resolve().is_dir():
        raise UserInputError(f"--draw {draw}: the folder {draw.parent} does not exist; create it "
                             "or write elsewhere.")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UserInputError(
            "--draw needs Pillow, which this environment lacks (the launcher's light environment "
            "has boto3 only); install it (pip install pillow) or run sm-effdet from the project's "
            "full environment."
        ) from None


def parse_answer(text: str, where: str) -> dict[str, Any]:
    """serve's JSON Lines answer for one image."""
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        answer = json.loads(lines[0]) if len(lines) == 1 else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("detections"), list):
        raise JobError(
            f"the endpoint's answer for {where} is not serve's detections ({shorten(text, 200)!r}); "
            "is the endpoint serving this project's image?"
        )
    return answer


def format_detections(path: Path, answer: dict[str, Any]) -> list[str]:
    detections = answer["detections"]
    size = f"{answer.get('width', '?')}x{answer.get('height', '?')}"
    lines = [f"{path}: {size}, {len(detections)} detection{'s' if len(detections) != 1 else ''}"]
    for d in detections:
        box = ", ".join(f"{v:.0f}" for v in d.get("box", []))
        label = d.get("class_name", d.get("label", "?"))
        lines.append(f"  {str(label):<20} {d.get('score', 0):.3f}  [{box}]")
    return lines


def draw_detections(image_path: Path, answer: dict[str, Any], target: Path) -> None:
    """The image upright as serve saw it (EXIF), each box with its class and score."""
    from PIL import Image, ImageDraw, ImageOps

    with Image.open(image_path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    width, height = image.size
    pen = ImageDraw.Draw(image)
    line = max(2, min(width, height) // 200)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60)]
    for d in answer["detections"]:
        # Normalised boxes fit this image even when serve's pixel size differs from Pillow's.
        x1, y1, x2, y2 = d.get("box_normalized") or [
            v / s for v, s in zip(d["box"], (answer["width"], answer["height"]) * 2)
        ]
        box = (x1 * width, y1 * height, x2 * width, y2 * height)
        name = str(d.get("class_name", d.get("label", "?")))
        colour = palette[sum(name.encode()) % len(palette)]
        pen.rectangle(box, outline=colour, width=line)
        caption = f"{name} {d.get('score', 0):.2f}"
        left, top, right, bottom = pen.textbbox((box[0], box[1]), caption)
        pen.rectangle((left, top, right + 2, bottom + 2), fill=colour)
        pen.text((box[0] + 1, box[1] + 1), caption, fill=(255, 255, 255))
    image.save(target, format=DRAW_FORMATS[target.suffix.lower()])


def predict(args, *, sagemaker=None, runtime=None, out: TextIO = sys.stdout) -> int:
    from botocore.exceptions import ClientError

    from .hosting import clients

    images = read_images(args.images)
    attributes = custom_attributes(args.threshold, args.max_detections)
    check_draw(args.draw, len(images))
    # Clients only now: bad input is refused without credentials or a region.
    sagemaker, runtime = clients("sagemaker", "sagemaker-runtime",
                                 given={"sagemaker": sagemaker, "sagemaker-runtime": runtime})
    region = sagemaker.meta.region_name
    with named("endpoint", args.endpoint, region, "sm-effdet endpoints"):
        status = sagemaker.describe_endpoint(EndpointName=args.endpoint)["EndpointStatus"]
    if status not in SERVING:
        raise JobError(f"endpoint {args.endpoint} is {status}, so it answers nothing; wait until it "
                       "is InService (sm-effdet endpoints) or deploy it again.")
    answers = []
    for path, body, content_type in images:
        request = invoke_request(args.endpoint, body, content_type, accept=ACCEPT,
                                 custom_attributes=attributes)
        try:
            response = runtime.invoke_endpoint(**request)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") != "ModelError":
                raise
            # serve refused the image: its one sentence is in the message.
            raise JobError(
                f"endpoint {args.endpoint} answered {exc.response.get('OriginalStatusCode', 'an error')} "
                f"for {path}: {shorten(error.get('Message', ''), 600)}"
            ) from None
        text = response["Body"].read().decode("utf-8", errors="replace")
        if args.json:
            print(text.strip(), file=out, flush=True)
            answer = parse_answer(text, str(path)) if args.draw else None
        else:
            answer = parse_answer(text, str(path))
            print("\n".join(format_detections(path, answer)), file=out, flush=True)
        answers.append((path, answer))
    if args.draw:
        path, answer = answers[0]
        draw_detections(path, answer, args.draw)
        print(f"drew {len(answer['detections'])} boxes on {path}: {args.draw}", file=sys.stderr if args.json else out)
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="send images to an endpoint and print (or draw) the detections",
        description="InvokeEndpoint once per image (raw bytes, at most 6 MiB each), print each "
        "detection's class, score and box in pixels.",
    )
    parser.add_argument("endpoint", metavar="ENDPOINT")
    parser.add_argument("images", metavar="IMAGE", nargs="+", type=Path)
    parser.add_argument("--threshold", type=float, metavar="SCORE",
                        help="lowest score shown (serve's score_threshold; default the endpoint's)")
    parser.add_argument("--max-detections", type=int, metavar="N",
                        help="at most N boxes per image (default the endpoint's)")
    parser.add_argument("--draw", type=Path, metavar="OUT.jpg",
                        help="write the image with its boxes (one image; needs Pillow)")
    parser.add_argument("--json", action="store_true",
                        help="print serve's answer as it came (one JSON line per image)")
    parser.set_defaults(run=run_predict)


def run_predict(args, *, sagemaker=None, runtime=None, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # at call time: tests capture it
    return predict(args, sagemaker=sagemaker, runtime=runtime, out=out)
