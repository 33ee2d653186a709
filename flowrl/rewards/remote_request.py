"""The body of a ``POST /compute`` that ``flowrl serve-reward`` accepts, checked before the reward sees it.

Every refusal is a :class:`BadRequest` carrying the HTTP status and one sentence naming what is wrong, so the
server answers each malformed request with a 4xx JSON error instead of raising in its handler (which the client
sees as a dropped connection, and the server's log as a traceback). Images are opened header first: their sizes
are checked (each under PIL's decompression-bomb limit, all equal, all together under ``max_pixels``) before any
pixel is decoded, so a few kilobytes that claim a gigapixel image cost nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["FIELDS", "BadRequest", "parse_compute"]

FIELDS = ("prompt", "image", "video", "condition_images", "condition_videos", "kwargs")
UNSUPPORTED = ("condition_videos", "kwargs")  # the protocol has them; a flowrl reward takes none


class BadRequest(ValueError):
    """A request the server refuses: ``status`` (4xx) and a message naming the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _json(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("the body is empty; send a JSON object with prompt and image (or video)")
    try:
        request = json.loads(body)
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise BadRequest(f"the body is not JSON ({err})") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object with prompt and image (or video); "
                         f"got a JSON {_kind(request)}")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; the fields are {', '.join(FIELDS)}")
    for key in UNSUPPORTED:
        if request.get(key):
            raise BadRequest(f"{key} is not supported: flowrl serve-reward gives the reward prompts and images (or "
                             f"video frames) only; send {key}: null")
    return request


def _prompts(request: dict[str, Any]) -> list[str]:
    if "prompt" not in request:
        raise BadRequest("missing field prompt: send prompt: [str, ...], one per image (or video)")
    prompts = request["prompt"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(f"prompt must be a list of strings; got {_kind(prompts)}"
                         + (f" holding {sorted({_kind(p) for p in prompts} - {'str'})}" if isinstance(prompts, list)
                            else ""))
    if not prompts:
        raise BadRequest("empty batch: prompt is []; send at least one prompt with its image (or video)")
    return prompts


def _frames(request: dict[str, Any], n: int) -> tuple[list[list[Any]], str]:
    """Each sample's base64 frames (one for an image) and the field they came from."""
    image, video = request.get("image"), request.get("video")
    for key, value in (("image", image), ("video", video)):
        if value is not None and not isinstance(value, list):
            raise BadRequest(f"{key} must be a list (or null); got {_kind(value)}")
    if image and video:
        raise BadRequest("the request has both image and video; send one of them (the other null)")
    if not image and not video:
        raise BadRequest("the request has neither image nor video; send image: [base64 PNG, ...] (one per prompt) "
                         "or video: [[base64 PNG frame, ...], ...]")
    key, items = ("image", image) if image else ("video", video)
    if len(items) != n:
        raise BadRequest(f"{n} prompt(s) but {len(items)} {key}(s); send one {key} per prompt")
    if key == "image":
        return [[x] for x in items], key
    for i, frames in enumerate(items):
        if not isinstance(frames, list) or not frames:
            raise BadRequest(f"video[{i}] must be a non-empty list of base64 PNG frames; got "
                             + ("[]" if isinstance(frames, list) else _kind(frames)))
        if len(frames) != len(items[0]):
            raise BadRequest(f"video[{i}] has {len(frames)} frames but video[0] has {len(items[0])}; every video of "
                             "a request must have the same number of frames")
    return items, key


def _where(key: str, i: int, j: int) -> str:
    return f"image[{i}]" if key == "image" else f"video[{i}][{j}]"


def _open(data: Any, where: str) -> Image.Image:
    """The image's header only (PIL decodes lazily): its size is known, no pixel is decoded yet."""
    if not isinstance(data, str):
        raise BadRequest(f"{where} must be a base64 string; got {_kind(data)}")
    if data.startswith("data:"):  # a data URL (data:image/png;base64,...)
        data = data.partition(",")[2]
    data = data.replace("\n", "").replace("\r", "")  # MIME base64 (base64.encodebytes) breaks lines
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:  # ValueError: non-ASCII characters
        raise BadRequest(f"{where} is not valid base64 ({err})") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:
        raise BadRequest(f"{where} is too large to decode: {err}", 413) from None
    except Exception as err:  # noqa: BLE001 (whatever PIL raises on bytes that are no image is the client's error)
        raise BadRequest(f"{where} is not an image PIL can read ({type(err).__name__}: {err})") from None
    limit = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (it only warns between 1x and 2x of it)
    width, height = image.size
    if limit is not None and width * height > limit:
        raise BadRequest(f"{where} is {width}x{height} ({width * height} pixels), above the limit of {limit} pixels "
                         "per image (PIL's decompression-bomb limit); send smaller images", 413)
    return image


def _decode(image: Image.Image, where: str) -> torch.Tensor:
    try:
        rgb = np.asarray(image.convert("RGB"))
    except Exception as err:  # noqa: BLE001 (a truncated or corrupt file fails only here, when its pixels are read)
        raise BadRequest(f"{where} could not be decoded ({type(err).__name__}: {err})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


def _conditions(request: dict[str, Any], n: int, max_pixels: int) -> list | None:
    """Each sample's condition images (:class:`flowrl.conditions.ConditionImages`, or None), each image at its own
    size, all together under ``max_pixels``."""
    from flowrl.conditions import ConditionImages

    value = request.get("condition_images")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        raise BadRequest(f"condition_images must be a list with one entry per prompt ({n}), each a list of base64 "
                         f"PNGs or null; got {_kind(value) if not isinstance(value, list) else f'{len(value)} entries'}")
    opened, total = [], 0
    for i, entry in enumerate(value):
        if entry is not None and not isinstance(entry, list):
            raise BadRequest(f"condition_images[{i}] must be a list of base64 PNGs or null; got {_kind(entry)}")
        images = [_open(data, f"condition_images[{i}][{j}]") for j, data in enumerate(entry or [])]
        total += sum(im.size[0] * im.size[1] for im in images)
        opened.append(None if entry is None else images)
    if total > max_pixels:
        raise BadRequest(f"the condition images decode to {total} pixels, above this server's limit of {max_pixels} "
                         "(--max-pixels); send fewer samples per request", 413)
    return [None if images is None else
            ConditionImages([_decode(im, f"condition_images[{i}][{j}]") for j, im in enumerate(images)])
            for i, images in enumerate(opened)]


def parse_compute(body: bytes, max_pixels: int) -> tuple[list[str], torch.Tensor, list | None]:
    """The prompts, the batch (``(B, 3, H, W)`` images or ``(B, T, 3, H, W)`` videos, float32 in [0, 1]) and each
    sample's condition images (None when the request has none) of a ``/compute`` body; :class:`BadRequest` when the
    body is not one ``flowrl serve-reward`` can score."""
    request = _json(body)
    prompts = _prompts(request)
    conditions = _conditions(request, len(prompts), max_pixels)
    samples, key = _frames(request, len(prompts))
    opened = [[_open(data, _where(key, i, j)) for j, data in enumerate(frames)] for i, frames in enumerate(samples)]
    first = opened[0][0].size
    for i, frames in enumerate(opened):
        for j, image in enumerate(frames):
            if image.size != first:
                raise BadRequest(f"{_where(key, i, j)} is {image.size[0]}x{image.size[1]} but {_where(key, 0, 0)} is "
                                 f"{first[0]}x{first[1]}; every image (and video frame) of a request must have the "
                                 "same size")
    total = len(opened) * len(opened[0]) * first[0] * first[1]
    if total > max_pixels:
        raise BadRequest(f"the request decodes to {total} pixels, above this server's limit of {max_pixels} "
                         "(--max-pixels); send fewer samples per request (the remote reward's batch_size)", 413)
    batch = torch.stack([torch.stack([_decode(image, _where(key, i, j)) for j, image in enumerate(frames)])
                         for i, frames in enumerate(opened)])
    return prompts, batch[:, 0] if key == "image" else batch, conditions
