"""The toy world's fast procedural renderer: scenes of :mod:`flowrl.toy.shapes` as RGB ``uint8`` images on a plain
black background; objects are filled circles, axis-aligned squares and upright triangles of the palette colours,
placed at random without touching each other."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flowrl.toy.shapes import BACKGROUND, COLORS, SHAPES, Scene


@dataclass(frozen=True)
class Placed:
    """An object drawn by :func:`render_with_layout`: its box is ``[y, y + size) x [x, x + size)``."""

    shape: str
    color: str
    y: int
    x: int
    size: int


def in_shape(shape: str, ry, rx, h, w) -> np.ndarray:
    """Whether pixel ``(ry, rx)`` (row, column; arrays broadcast) of an ``h x w`` box lies in a filled ``shape``
    that touches all four sides of the box: the one geometry of the renderer and of the verifier's templates."""
    if shape == "square":
        return np.ones(np.broadcast(ry, rx, h, w).shape, bool)
    if shape == "circle":
        # radius a little under the half side: small circles stay visibly round (fill ~0.67-0.79, never ~0.9)
        radius = 0.5 - 0.2 / np.maximum(h, w)
        return ((ry + 0.5) / h - 0.5) ** 2 + ((rx + 0.5) / w - 0.5) ** 2 <= radius**2
    if shape == "triangle":
        # apex row on top (1-2 px), full-width base at the bottom
        return np.abs((rx + 0.5) / w - 0.5) <= (ry + 1) / (2 * h) + 1e-9
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


@functools.cache
def shape_mask(shape: str, d: int) -> np.ndarray:
    """Boolean ``(d, d)`` mask of a filled ``shape`` that touches all four sides of its box."""
    ry, rx = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
    m = in_shape(shape, ry, rx, d, d)
    m.setflags(write=False)
    return m


#: inclusive range of object box sides at 32 px (scaled with the image size)
DEFAULT_OBJECT_SIZES = (6, 11)


def check_object_sizes(object_sizes: Sequence[int] | None) -> tuple[int, int]:
    """``object_sizes`` (None = :data:`DEFAULT_OBJECT_SIZES`) as a validated ``(lo, hi)`` at 32 px.

    Sides below 6 px leave too few pixels to tell a shape; above 12 px four objects no longer fit.
    """
    if object_sizes is None:
        return DEFAULT_OBJECT_SIZES
    vals = tuple(object_sizes)
    if len(vals) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"object_sizes must be two integers (lo, hi), got {object_sizes!r}")
    lo, hi = int(vals[0]), int(vals[1])
    if not 6 <= lo <= hi <= 12:
        raise ValueError(f"object_sizes must satisfy 6 <= lo <= hi <= 12 (box sides at 32 px), got ({lo}, {hi})")
    return lo, hi


def object_size_range(size: int, object_sizes: Sequence[int] | None = None) -> tuple[int, int]:
    """Inclusive range of object box sides at image ``size``: ``object_sizes`` (default 6..11), the sides
    at 32 px, scaled (never below 6; at least two sizes with the default). Raises if two objects of the
    smallest size cannot stand side by side in the image."""
    lo32, hi32 = check_object_sizes(object_sizes)
    lo = max(6, round(lo32 * size / 32))
    hi = max(lo + (lo32 < hi32), round(hi32 * size / 32))
    border, gap, margin = _layout_params(size)
    if 2 * lo + max(gap, margin) + 2 * border > size:  # two objects side by side (a relation, a 2x2 count)
        raise ValueError(f"objects of at least {lo} px do not fit twice across a {size}px image; "
                         "use smaller object_sizes or a bigger image")
    return lo, hi


def _layout_params(size: int) -> tuple[int, int, int]:
    s = size / 32
    border = max(1, round(s))  # free pixels along the image edge
    gap = max(2, round(2 * s))  # free pixels between any two objects
    margin = max(3, round(3 * s))  # free pixels between the two objects of a relation, along its axis
    return border, gap, margin


_COLOR_NAMES = tuple(COLORS)
_COLOR_ARR = {k: np.array(v, np.uint8) for k, v in COLORS.items()}


def _place_free(rng: np.random.Generator, shapes_colors, size: int, lo: int, hi: int) -> list[Placed]:
    border, gap, _ = _layout_params(size)
    n = len(shapes_colors)
    for attempt in range(200):
        top = max(lo, hi - attempt // 20)  # shrink objects if they do not fit
        ds = np.sort(rng.integers(lo, top + 1, size=n))[::-1]
        boxes: list[tuple[int, int, int]] = []
        for d in ds:
            d = int(d)
            cand = rng.integers(border, size - border - d + 1, size=(32, 2))
            ok = np.ones(len(cand), bool)
            for y0, x0, d0 in boxes:
                ok &= (
                    (cand[:, 0] + d + gap <= y0)
                    | (y0 + d0 + gap <= cand[:, 0])
                    | (cand[:, 1] + d + gap <= x0)
                    | (x0 + d0 + gap <= cand[:, 1])
                )
            hits = np.flatnonzero(ok)
            if len(hits) == 0:
                break
            boxes.append((int(cand[hits[0], 0]), int(cand[hits[0], 1]), d))
        else:
            order = rng.permutation(n)  # sizes were sorted: do not tie the big ones to the first objects
            return [Placed(shapes_colors[i][0], shapes_colors[i][1], *boxes[j]) for j, i in enumerate(order)]
    raise RuntimeError(f"could not place {n} objects in a {size}px image")


def _place_relation(
    rng: np.random.Generator, first, second, relation: str, size: int, lo: int, hi: int
) -> list[Placed]:
    border, _, margin = _layout_params(size)
    # P is left of (or above) Q; place along the main axis "u", across it "v", then map to (y, x)
    p, q = (first, second) if relation in ("left of", "above") else (second, first)
    while True:  # terminates: object_size_range checked that two objects of size lo fit
        dp, dq = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        free = size - 2 * border - dp - dq
        if free >= margin:
            break
        hi = max(lo, hi - 1)
    g = int(rng.integers(margin, free + 1))
    up = int(rng.integers(border, size - border - (dp + g + dq) + 1))
    uq = up + dp + g
    # across the axis the two boxes overlap by at least half the smaller one: the relation is unambiguous
    ov = (min(dp, dq) + 1) // 2
    vp = int(rng.integers(border, size - border - dp + 1))
    vq = int(rng.integers(max(border, vp - dq + ov), min(size - border - dq, vp + dp - ov) + 1))
    if relation in ("left of", "right of"):
        pp, pq = (vp, up), (vq, uq)
    else:
        pp, pq = (up, vp), (uq, vq)
    placed = [Placed(p[0], p[1], *pp, dp), Placed(q[0], q[1], *pq, dq)]
    return placed if p is first else placed[::-1]  # in the order of the scene's objects


def render_with_layout(
    scene: Scene,
    size: int = 32,
    rng: np.random.Generator | None = None,
    object_sizes: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[Placed]]:
    """Like :func:`render`, also returning the objects drawn (colours resolved, boxes): for a relation in
    the order of ``scene.objects``, otherwise in random order."""
    if size < 20:
        raise ValueError(f"image size must be at least 20 px, got {size}")
    lo, hi = object_size_range(size, object_sizes)
    rng = np.random.default_rng() if rng is None else rng
    rand_colors = rng.integers(len(_COLOR_NAMES), size=8)
    objs = []
    k = 0
    for o in scene.objects:
        for _ in range(o.count):
            objs.append((o.shape, o.color or _COLOR_NAMES[int(rand_colors[k % 8])]))
            k += 1
    if scene.relation is not None:
        placed = _place_relation(rng, objs[0], objs[1], scene.relation, size, lo, hi)
    else:
        placed = _place_free(rng, objs, size, lo, hi)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for p in placed:
        img[p.y : p.y + p.size, p.x : p.x + p.size][shape_mask(p.shape, p.size)] = _COLOR_ARR[p.color]
    return img, placed


def render(
    scene: Scene,
    size: int = 32,
    rng: np.random.Generator | None = None,
    object_sizes: Sequence[int] | None = None,
) -> np.ndarray:
    """A random ``uint8 (size, size, 3)`` image of ``scene``: exact counts, relations with a clear margin,
    random sizes (``object_sizes``, see :func:`object_size_range`) and positions, objects never touching,
    unspecified colours random."""
    return render_with_layout(scene, size, rng, object_sizes)[0]
