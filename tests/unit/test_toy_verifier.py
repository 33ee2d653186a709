"""The rule-based verifier of toy shapes images and the "shapes" reward."""

from collections import defaultdict

import numpy as np
import pytest
import torch

from flowrl.rewards import build_reward
from flowrl.toy import render as R
from flowrl.toy import shapes as S
from flowrl.toy.verifier import ShapesReward, Verdict, detect, verify, verify_batch


def _renders(n, size, seed):
    rng = np.random.default_rng(seed)
    scenes = [S.sample_scene(rng) for _ in range(n)]
    return scenes, np.stack([R.render(s, size, rng) for s in scenes])


def _blur(imgs):
    p = np.pad(imgs.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h = (p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]) / 4
    v = (h[:, :-2] + 2 * h[:, 1:-1] + h[:, 2:]) / 4
    return v.round().astype(np.uint8)


@pytest.mark.parametrize("size,n", [(32, 2000), (24, 300), (64, 200)])
def test_accuracy_on_true_renders(size, n):
    scenes, imgs = _renders(n, size, seed=size)
    verdicts = verify_batch(imgs, [S.prompt_of(s) for s in scenes])
    by_cat = defaultdict(list)
    for s, v in zip(scenes, verdicts):
        assert v.category == s.category
        by_cat[s.category].append(v.correct)
    assert np.mean([v.correct for v in verdicts]) >= 0.99
    assert set(by_cat) == set(S.CATEGORIES)
    for cat, ok in by_cat.items():
        assert np.mean(ok) >= 0.97, (cat, np.mean(ok))
    # strict correctness is exactly a full graded score
    assert all(v.correct == (v.score == 1.0) for v in verdicts)


def test_tolerates_blur_and_dim_colours():
    scenes, imgs = _renders(500, 32, seed=1)
    prompts = [S.prompt_of(s) for s in scenes]
    assert np.mean([v.correct for v in verify_batch(_blur(imgs), prompts)]) >= 0.97
    dim = (imgs.astype(np.float32) * 0.65).astype(np.uint8)
    assert np.mean([v.correct for v in verify_batch(dim, prompts)]) >= 0.97


def test_equivalent_prompts_accepted():
    pairs = [
        ("a red circle and a blue square", "a blue square and a red circle"),
        ("a red circle left of a blue square", "a blue square right of a red circle"),
        ("a green triangle above a yellow circle", "a yellow circle below a green triangle"),
        ("a circle", "an image of a circle"),
        ("one purple square", "a purple square"),
    ]
    rng = np.random.default_rng(0)
    for a, b in pairs:
        for _ in range(20):
            img = R.render(S.parse_prompt(a), 32, rng)
            assert verify(img, a).correct and verify(img, b).correct, (a, b)


def test_mismatched_prompts_rejected():
    scenes, imgs = _renders(1500, 32, seed=7)
    rng = np.random.default_rng(1)
    every = S.all_scenes()
    by_cat = defaultdict(list)
    for s in every:
        by_cat[s.category].append(s)

    def other(s, pool):
        while True:
            o = pool[rng.integers(len(pool))]
            if S.canonical(o) != S.canonical(s):
                return o

    # a random non-equivalent prompt (a few legitimately pass: "a red circle" shows "a circle")
    wrong = [S.prompt_of(other(s, every)) for s in scenes]
    acc = np.mean([v.correct for v in verify_batch(imgs, wrong)])
    assert acc <= 0.02, acc
    # a non-equivalent prompt of the same category
    wrong = [S.prompt_of(other(s, by_cat[s.category])) for s in scenes]
    verdicts = verify_batch(imgs, wrong)
    assert np.mean([v.correct for v in verdicts]) <= 0.02
    assert np.mean([v.score for v in verdicts]) < 0.4


def _image_with(objs, size=32):
    """Draws (shape, colour, y, x, d) objects on the background."""
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = S.BACKGROUND
    for shape, color, y, x, d in objs:
        img[y : y + d, x : x + d][R.shape_mask(shape, d)] = S.COLORS[color]
    return img


def test_graded_counting():
    two = R.render(S.parse_prompt("two red circles"), 32, np.random.default_rng(0))
    assert verify(two, "two red circles").correct
    v3 = verify(two, "three red circles")
    v4 = verify(two, "four red circles")
    assert not v3.correct and 0 < v3.score < 1
    assert v4.score < v3.score  # farther from the count, less credit
    vb = verify(two, "two blue circles")
    assert not vb.correct and vb.score < v3.score
    assert verify(two, "two circles").correct
    assert verify(two, "two triangles").score == 0.0
    # three red squares plus a blue square: the squares are not exactly three red ones
    img = _image_with([("square", "red", 1, 1, 8), ("square", "red", 1, 14, 8), ("square", "red", 14, 1, 8)])
    assert verify(img, "three red squares").correct
    extra = _image_with(
        [
            ("square", "red", 1, 1, 8),
            ("square", "red", 1, 14, 8),
            ("square", "red", 14, 1, 8),
            ("square", "blue", 14, 14, 8),
        ]
    )
    v = verify(extra, "three red squares")
    assert not v.correct and 0.5 < v.score < 1
    assert not verify(extra, "three squares").correct and verify(extra, "four squares").correct


def test_graded_single_colors_two_objects():
    img = _image_with([("circle", "red", 5, 5, 9)])
    assert verify(img, "a red circle").correct and verify(img, "a circle").correct
    wrong_color = verify(img, "a blue circle")
    wrong_shape = verify(img, "a red square")
    assert not wrong_color.correct and 0 < wrong_color.score < 1
    assert not wrong_shape.correct and 0 < wrong_shape.score < 1
    assert verify(img, "a blue square").score == 0.0
    two = _image_with([("circle", "red", 5, 5, 9), ("circle", "green", 18, 18, 9)])
    assert not verify(two, "a red circle").correct  # an extra circle: "a" means one
    assert 0 < verify(two, "a red circle").score < 1
    pair = _image_with([("circle", "red", 5, 5, 9), ("square", "blue", 18, 18, 9)])
    assert verify(pair, "a red circle and a blue square").correct
    half = verify(pair, "a red circle and a blue triangle")
    assert not half.correct and 0.4 < half.score < 0.9


def test_graded_position():
    img = _image_with([("square", "blue", 10, 2, 9), ("triangle", "green", 12, 20, 9)])
    assert verify(img, "a blue square left of a green triangle").correct
    assert verify(img, "a green triangle right of a blue square").correct
    swapped = verify(img, "a blue square right of a green triangle")
    assert not swapped.correct and swapped.score == pytest.approx(2 / 3)  # both objects, no relation
    assert swapped.details["checks"]["relation"] == 0.0
    assert not verify(img, "a blue square above a green triangle").correct
    assert not verify(img, "a blue square below a green triangle").correct
    one_missing = verify(img, "a blue square left of a red triangle")
    assert 0 < one_missing.score < swapped.score
    # diagonal: the square is left of and above, but more left than above -> left of, not above
    diag = _image_with([("square", "blue", 2, 2, 8), ("triangle", "green", 12, 20, 8)])
    assert verify(diag, "a blue square left of a green triangle").correct
    assert not verify(diag, "a blue square above a green triangle").correct


def test_shapes_read_by_template_overlap():
    """A shape is the template it overlaps best: small defects of a generated object do not unmake it, odd
    blobs (elongated, or matching no template) have no shape."""
    red = S.COLORS["red"]

    def shape_of(mask):
        img = np.zeros((32, 32, 3), np.uint8)
        img[8 : 8 + mask.shape[0], 8 : 8 + mask.shape[1]][mask] = red
        (blob,) = detect(img)
        return blob.shape

    for shape in S.SHAPES:
        for d in range(6, 13):
            assert shape_of(R.shape_mask(shape, d)) == shape, (shape, d)
    circle = R.shape_mask("circle", 9).copy()
    circle[7:, 3:6] = True  # bottom-heavy by a few pixels: the old centre-of-mass rule said "no shape"
    assert shape_of(circle) == "circle"
    square = R.shape_mask("square", 10).copy()
    square[0, 0] = square[9, 9] = square[0, 9] = False  # three corners nicked
    assert shape_of(square) == "square"
    triangle = R.shape_mask("triangle", 10).copy()
    triangle[9, 0] = False
    assert shape_of(triangle) == "triangle"
    assert shape_of(np.ones((5, 12), bool)) is None  # a rectangle is no square
    ring = np.ones((10, 10), bool)
    ring[2:8, 2:8] = False  # a hollow frame matches no template well
    assert shape_of(ring) is None
    cross = np.zeros((10, 10), bool)
    cross[4:6] = cross[:, 4:6] = True
    assert shape_of(cross) is None


def test_garbage_images_score_low():
    rng = np.random.default_rng(0)
    prompts = [S.prompt_of(S.sample_scene(rng)) for _ in range(200)]
    noise = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    verdicts = verify_batch(noise, prompts)
    assert not any(v.correct for v in verdicts)
    assert np.mean([v.score for v in verdicts]) < 0.05
    for img in [
        np.zeros((32, 32, 3), np.uint8),
        np.full((32, 32, 3), 255, np.uint8),
        np.full((24, 24, 3), (230, 25, 25), np.uint8),
    ]:
        v = verify(img, "a red circle")
        assert not v.correct and v.score <= 0.34  # a full red frame is no circle (at most colour credit)
    assert verify(np.zeros((32, 32, 3), np.uint8), "three blue triangles").score == 0.0
    # float images are read as [0, 1]; NaNs do not crash
    f = np.full((32, 32, 3), np.nan, np.float32)
    assert verify(f, "a circle").score == 0.0


def test_detect_reports_objects():
    img = _image_with([("triangle", "yellow", 3, 3, 10), ("square", "cyan", 18, 18, 7)])
    blobs = detect(img)
    assert sorted((b.shape, b.color) for b in blobs) == [("square", "cyan"), ("triangle", "yellow")]
    v = verify(img, "a yellow triangle and a cyan square")
    assert isinstance(v, Verdict) and v.correct and v.category == "two_objects"
    assert {o["shape"] for o in v.details["objects"]} == {"triangle", "square"}
    assert set(v.details["checks"].values()) == {1.0}


def test_bad_prompt_raises():
    with pytest.raises(ValueError, match="not a toy shapes prompt"):
        verify(np.zeros((32, 32, 3), np.uint8), "a dog on a skateboard")


def test_shapes_reward():
    scenes, imgs = _renders(16, 32, seed=3)
    prompts = [S.prompt_of(s) for s in scenes]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    r = ShapesReward()
    out = r(x, prompts)
    assert out.shape == (16,) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones(16))
    wrong = prompts[1:] + prompts[:1]
    graded, strict = ShapesReward(graded=True)(x, wrong), ShapesReward(graded=False)(x, wrong)
    assert (
        set(strict.tolist()) <= {0.0, 1.0}
        and (graded >= strict).all()
        and ((graded > 0) & (graded < 1)).any()
    )
    verdicts = r.evaluate(x, prompts)
    assert len(verdicts) == 16 and all(v.correct for v in verdicts)
    # registered; videos get the mean frame score; garbage does not crash
    assert isinstance(build_reward("shapes", graded=False), ShapesReward)
    vid = torch.stack([x, torch.zeros_like(x)], 1)
    assert torch.allclose(r(vid, prompts), torch.full((16,), 0.5))
    nan = torch.full((2, 3, 32, 32), float("nan"))
    assert r(nan, prompts[:2]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        r(x[:, :1], prompts)
    with pytest.raises(ValueError):
        r(x, prompts[:3])
