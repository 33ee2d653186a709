"""A rule-based verifier of toy "shapes" images: the GenEval analogue of the toy world.

Each pixel goes to the palette colour it is a shade of (at least half as bright; within ~17 degrees of
its hue) or else to the background; 4-connected blobs of one colour, at least ~12 px at 32x32 (scaled with the image area),
are objects. A blob's shape is the template (circle, square or upright triangle drawn in the blob's box) it
overlaps best, by intersection over union, like a detector's box-and-mask match: a circle a little lopsided or
a square with a nicked corner still reads as one, while odd blobs (too long, too big, or matching no template
well) are objects of unknown shape.

``correct`` is GenEval's strict pass/fail: every requirement of the prompt holds and there is nothing
extra of a requested shape ("three red squares" needs exactly three squares, all red). ``score`` is the
graded reward in [0, 1], the mean over the prompt's requirement units:

- one unit per object, the mean of: its shape is present, its colour is present on that shape (0.5 if
  the colour is only on another blob), and (outside counting) exactly one of it;
- counting: one more unit for the count, ``1 - (|found - n| + wrong-colour extras) / n`` clipped at 0;
- position: one more unit for the relation (0.5 when only the centres are in the right order).

``correct`` is true exactly when ``score`` is 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flowrl.rewards.registry import register_reward
from flowrl.toy.render import in_shape
from flowrl.toy.shapes import CATEGORIES, COLORS, SHAPES, Scene, parse_prompt

_NAMES = tuple(COLORS)
_COLS = np.array(list(COLORS.values()), np.float32)  # (6, 3)
_COLS_N2 = (_COLS * _COLS).sum(1)
# A pixel x is colour c when x ~ a * c with a in [_MIN_ALPHA, _MAX_ALPHA] (a darker or brighter shade, e.g.
# a blurred edge that is still more object than background) and its distance from that ray is at most
# _MAX_REL times |a * c| (about 17 degrees; the closest two palette colours are 28 degrees apart).
_MIN_ALPHA, _MAX_ALPHA, _MAX_REL = 0.5, 1.6, 0.3


@dataclass
class Verdict:
    score: float
    correct: bool
    category: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Blob:
    """A detected object: ``shape`` is None when no shape rule fits. ``box`` is (y0, x0, y1, x1), inclusive."""

    shape: str | None
    color: str
    pixels: int
    box: tuple[int, int, int, int]
    center: tuple[float, float]


def _labels(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H, W) int8: 0 background/unknown, k > 0 the k-th palette colour."""
    x = images.reshape(-1, 3).astype(np.float32)
    dots = x @ _COLS.T  # (N, 6)
    alpha = dots / _COLS_N2
    # squared distance from x to the ray of each colour, relative to the squared length of the shade
    rel = np.maximum((x * x).sum(1, keepdims=True) - dots * alpha, 0.0) / np.maximum(alpha * dots, 1e-6)
    rel[(alpha < _MIN_ALPHA) | (alpha > _MAX_ALPHA) | (rel > _MAX_REL**2)] = np.inf
    lab = rel.argmin(1).astype(np.int8) + 1
    lab[~np.isfinite(rel.min(1))] = 0
    return lab.reshape(images.shape[:-1])


def _components(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (4-neighbourhood, same label, label > 0) of a (B, H, W) label array.

    Returns the flat indices of the foreground pixels and a component id (0..n-1) for each of them.
    Vectorised union-find: hook each root onto its smallest neighbouring root, then pointer-jump.
    """
    fg = lab > 0
    n = lab.size
    idx = np.arange(n).reshape(lab.shape)
    eh = fg[:, :, :-1] & (lab[:, :, :-1] == lab[:, :, 1:])
    ev = fg[:, :-1, :] & (lab[:, :-1, :] == lab[:, 1:, :])
    a = np.concatenate([idx[:, :, :-1][eh], idx[:, :-1, :][ev]])
    b = np.concatenate([idx[:, :, 1:][eh], idx[:, 1:, :][ev]])
    parent = np.arange(n)
    while len(a):
        pa, pb = parent[a], parent[b]
        keep = pa != pb
        a, b, pa, pb = a[keep], b[keep], pa[keep], pb[keep]
        if not len(a):
            break
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    pix = np.flatnonzero(fg)
    _, comp = np.unique(parent[pix], return_inverse=True)
    return pix, comp.reshape(-1)


#: a blob is read as the shape whose template (the shape drawn in the blob's box) it overlaps best, when that
#: intersection-over-union is at least this; renders, blurred or not, score >= 0.8 for their own shape.
MIN_SHAPE_IOU = 0.7


@functools.cache
def _template_area(shape: str, h: int, w: int) -> int:
    ry, rx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return int(in_shape(shape, ry, rx, h, w).sum())


def _classify(comp, ry, rx, h, w, sizes, min_side, max_side):
    """Shape names (or None) of blobs from their pixels (``comp`` the blob of each pixel, ``ry, rx`` its
    place in the blob's box) and boxes ``h x w``: the best-overlapping template, if its IoU is at least
    :data:`MIN_SHAPE_IOU` and the box is square enough (a rectangle is no square) and neither tiny nor huge."""
    aspect = h / w
    side = np.maximum(h, w)
    ok = (aspect >= 0.7) & (aspect <= 1.43) & (side >= min_side) & (side <= max_side)
    ph, pw = h[comp], w[comp]
    ious = np.zeros((len(h), len(SHAPES)))
    for j, shape in enumerate(SHAPES):
        inter = np.bincount(comp, weights=in_shape(shape, ry, rx, ph, pw), minlength=len(h))
        area = np.ones(len(h))  # only blobs that pass the box checks need their template's area
        area[ok] = [_template_area(shape, int(a), int(b)) for a, b in zip(h[ok], w[ok])]
        ious[:, j] = inter / (sizes + area - inter)
    best = ious.argmax(1)
    ok &= ious[np.arange(len(h)), best] >= MIN_SHAPE_IOU
    out = np.full(len(h), None, object)
    out[ok] = np.array(SHAPES, object)[best[ok]]
    return out


def detect(images: np.ndarray) -> list[list[Blob]]:
    """The objects in each image of a ``(B, H, W, 3)`` (or one ``(H, W, 3)``) uint8 batch."""
    images = _as_uint8(images)
    single = images.ndim == 3
    if single:
        images = images[None]
    bsz, H, W, _ = images.shape
    lab = _labels(images)
    pix, comp = _components(lab)
    out: list[list[Blob]] = [[] for _ in range(bsz)]
    if len(pix):
        ncomp = int(comp.max()) + 1
        sizes = np.bincount(comp, minlength=ncomp)
        order = np.argsort(comp, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        p = pix[order]
        img_i, rem = np.divmod(p, H * W)
        y, x = np.divmod(rem, W)
        y0, y1 = np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts)
        x0, x1 = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
        cy, cx = np.add.reduceat(y, starts) / sizes, np.add.reduceat(x, starts) / sizes
        h, w = y1 - y0 + 1, x1 - x0 + 1
        comp_of = np.repeat(np.arange(ncomp), sizes)  # the blob of each pixel in ``p`` order
        min_side = max(5, round(5 * min(H, W) / 32))
        shapes = _classify(comp_of, y - y0[comp_of], x - x0[comp_of], h, w, sizes, min_side, 0.6 * min(H, W))
        colors = lab.reshape(-1)[p[starts]]
        bimg = img_i[starts]
        min_pixels = max(5, round(12 * H * W / 1024))
        for k in np.flatnonzero(sizes >= min_pixels):
            out[int(bimg[k])].append(
                Blob(
                    shapes[k],
                    _NAMES[int(colors[k]) - 1],
                    int(sizes[k]),
                    (int(y0[k]), int(x0[k]), int(y1[k]), int(x1[k])),
                    (float(cy[k]), float(cx[k])),
                )
            )
    return out[0] if single else out


def _as_uint8(images) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        # float images are taken to be in [0, 1]; NaN/inf become black/clipped
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return a


def _relation_credit(a: Blob, b: Blob, relation: str) -> float:
    """1 if ``a`` is ``relation`` ``b`` with a pixel gap along the relation's axis that is at least the gap
    across it; 0.5 if only the centres are in that order (along the axis more than across); else 0."""
    if relation in ("right of", "below"):
        a, b = b, a
    horizontal = relation in ("left of", "right of")
    ax = 1 if horizontal else 0  # the axis: a must come first along it
    cr = 1 - ax
    # boxes are (y0, x0, y1, x1): the start of axis k is box[k], its end box[k + 2]
    gap_main = b.box[ax] - a.box[ax + 2] - 1  # free pixels between them along the axis
    gap_cross = max(b.box[cr] - a.box[cr + 2], a.box[cr] - b.box[cr + 2]) - 1  # < 0 if they overlap across
    if gap_main >= 0 and gap_main >= gap_cross:
        return 1.0
    d_main = b.center[ax] - a.center[ax]
    d_cross = b.center[cr] - a.center[cr]
    return 0.5 if d_main > 0 and d_main >= abs(d_cross) else 0.0


def score_scene(scene: Scene, blobs: Sequence[Blob]) -> tuple[float, bool, dict]:
    """(score, correct, checks) of detected ``blobs`` against ``scene``."""
    counting = scene.category == "counting"
    units: list[float] = []
    checks: dict[str, float] = {}
    picked: list[Blob | None] = []
    for i, o in enumerate(scene.objects):
        same_shape = [b for b in blobs if b.shape == o.shape]
        match = [b for b in same_shape if o.color is None or b.color == o.color]
        parts = {"shape": float(bool(same_shape))}
        if o.color is not None:
            parts["color"] = 1.0 if match else (0.5 if any(b.color == o.color for b in blobs) else 0.0)
        count = max(0.0, 1.0 - (abs(len(match) - o.count) + len(same_shape) - len(match)) / o.count)
        if not counting:
            parts["count"] = count
        for k, v in parts.items():
            checks[f"object{i}_{k}"] = v
        units.append(sum(parts.values()) / len(parts))
        if counting:
            checks["count"] = count
            units.append(count)
        picked.append(max(match, key=lambda b: b.pixels) if match else None)
    if scene.relation is not None:
        a, b = picked
        rel = _relation_credit(a, b, scene.relation) if a is not None and b is not None else 0.0
        checks["relation"] = rel
        units.append(rel)
    correct = all(v == 1.0 for v in checks.values())
    return float(sum(units) / len(units)), correct, checks


def _verdict(scene: Scene, blobs: list[Blob]) -> Verdict:
    score, correct, checks = score_scene(scene, blobs)
    details = {
        "checks": checks,
        "objects": [{"shape": b.shape, "color": b.color, "pixels": b.pixels, "box": b.box} for b in blobs],
    }
    return Verdict(score, correct, scene.category, details)


def verify(image: np.ndarray, prompt: str) -> Verdict:
    """Checks one ``uint8 (H, W, 3)`` image (float images are read as [0, 1]) against a toy prompt."""
    scene = parse_prompt(prompt)
    return _verdict(scene, detect(image))


def verify_batch(images: np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
    """:func:`verify` for a ``(B, H, W, 3)`` batch, faster than one call per image."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scenes = [parse_prompt(p) for p in prompts]
    blobs: list[list[Blob]] = []
    for i in range(0, len(images), 256):  # bounded memory for big batches
        blobs += detect(images[i : i + 256])
    return [_verdict(s, b) for s, b in zip(scenes, blobs)]


@register_reward("shapes")
class ShapesReward:
    """The toy-world verifier as a reward: the graded score (``graded=True``) or strict 0/1 correctness.

    ``images`` are float ``(B, 3, H, W)`` in [0, 1] (videos ``(B, T, 3, H, W)`` get their mean frame score).
    """

    #: the verdict categories; algorithms log a validation accuracy for each (and their mean).
    categories = CATEGORIES

    def __init__(self, graded: bool = True):
        self.graded = graded

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str]) -> list[Verdict]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        arr = images.detach().to("cpu", torch.float32).nan_to_num(0.0).clamp(0, 1)
        arr = (arr * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return verify_batch(arr, list(prompts))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim == 5:
            b, t = images.shape[:2]
            frames = self(images.flatten(0, 1), [p for p in prompts for _ in range(t)])
            return frames.view(b, t).mean(1)
        verdicts = self.evaluate(images, prompts)
        vals = [v.score if self.graded else float(v.correct) for v in verdicts]
        return torch.tensor(vals, dtype=torch.float32)
