"""The toy shapes world: prompt grammar, split, sampling and the renderer."""

import itertools
import time
from collections import Counter

import numpy as np
import pytest

from flowrl.toy import render as R
from flowrl.toy import shapes as S
from flowrl.toy.shapes import Obj, Scene


def test_constants():
    assert len(S.COLORS) == 6
    assert S.SHAPES == ("circle", "square", "triangle")
    assert S.RELATIONS == ("left of", "right of", "above", "below")
    assert S.CATEGORIES == ("single_object", "colors", "counting", "two_objects", "position")
    cols = np.array(list(S.COLORS.values()), float)
    for a, b in itertools.combinations(cols, 2):
        assert np.linalg.norm(a - b) > 120
    assert (np.linalg.norm(cols - np.array(S.BACKGROUND), axis=1) > 200).all()


def test_round_trip_and_uniqueness():
    scenes = S.all_scenes()
    prompts = [S.prompt_of(s) for s in scenes]
    assert len(set(prompts)) == len(prompts) == len(set(scenes))
    for s, p in zip(scenes, prompts):
        assert S.parse_prompt(p) == s
        assert p == p.lower() and p.strip() == p and "  " not in p
        assert p.replace(" ", "").isalpha()
    assert set(Counter(s.category for s in scenes)) == set(S.CATEGORIES)


def test_examples():
    assert S.prompt_of(Scene("single_object", (Obj("circle"),))) == "a circle"
    assert S.prompt_of(Scene("single_object", (Obj("circle"),), phrasing=1)) == "a photo of a circle"
    assert S.prompt_of(Scene("colors", (Obj("circle", "red"),))) == "a red circle"
    assert S.prompt_of(Scene("counting", (Obj("square", None, 2),))) == "two squares"
    assert S.prompt_of(Scene("counting", (Obj("triangle", "blue", 3),))) == "three blue triangles"
    assert S.prompt_of(Scene("counting", (Obj("circle", "green", 1),))) == "one green circle"
    two = Scene("two_objects", (Obj("circle", "red"), Obj("square", "blue")))
    assert S.prompt_of(two) == "a red circle and a blue square"
    pos = Scene("position", (Obj("square", "blue"), Obj("triangle", "green")), "left of")
    assert S.prompt_of(pos) == "a blue square left of a green triangle"
    assert S.parse_prompt("  A Blue SQUARE   left of a green triangle ") == pos
    # slightly more than the enumerated grammar is understood
    assert S.parse_prompt("a circle above a square").objects == (Obj("circle"), Obj("square"))
    assert S.parse_prompt("a photo of three red squares") == Scene(
        "counting", (Obj("square", "red", 3),), phrasing=1
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a dog",
        "a circle.",
        "two circle",
        "one circles",
        "five circles",
        "a pink circle",
        "a red circle and a blue circle",  # two objects must be different shapes
        "a red circle left of",
        "two red circles left of a square",
        "a red circle and two squares",
        "a photo of",
        "circle",
    ],
)
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match="not a toy shapes prompt"):
        S.parse_prompt(bad)


def test_prompt_of_rejects_invalid_scenes():
    with pytest.raises(ValueError):
        S.prompt_of(Scene("counting", (Obj("circle", None, 5),)))
    with pytest.raises(ValueError):
        S.prompt_of(Scene("position", (Obj("circle", "red"), Obj("square", "blue"))))  # no relation
    with pytest.raises(ValueError):
        S.prompt_of(Scene("colors", (Obj("hexagon", "red"),)))


def test_canonical_equivalences():
    p = S.parse_prompt
    assert S.canonical(p("a red circle and a blue square")) == S.canonical(
        p("a blue square and a red circle")
    )
    assert S.canonical(p("a red circle left of a blue square")) == S.canonical(
        p("a blue square right of a red circle")
    )
    assert S.canonical(p("a red circle above a blue square")) == S.canonical(
        p("a blue square below a red circle")
    )
    assert S.canonical(p("a red circle above a blue square")) != S.canonical(
        p("a red circle below a blue square")
    )
    assert S.canonical(p("a red circle left of a blue square")) != S.canonical(
        p("a red circle above a blue square")
    )
    assert S.canonical(p("one red circle")) == S.canonical(p("a red circle"))
    assert S.canonical(p("a photo of a circle")) == S.canonical(p("a circle"))


def test_vocabulary_covers_prompts():
    words = {w for s in S.all_scenes() for w in S.prompt_of(s).split()}
    assert words == set(S.VOCABULARY)
    assert S.VOCABULARY == sorted(set(S.VOCABULARY))
    assert all(w == w.lower() for w in S.VOCABULARY)


def test_split_properties():
    train, held = S.split_prompts()
    assert S.split_prompts() == (train, held)  # deterministic
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(S.prompt_of(s) for s in S.all_scenes())
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    cats_t = Counter(S.parse_prompt(p).category for p in train)
    cats_h = Counter(S.parse_prompt(p).category for p in held)
    for c in S.CATEGORIES:
        assert cats_t[c] > 0 and cats_h[c] > 0, c
        frac = cats_h[c] / (cats_h[c] + cats_t[c])
        assert 0.1 <= frac <= 0.3, (c, frac)
    # equivalent prompts (same category and phrasing) are on one side
    side = {p: "train" for p in train} | {p: "held" for p in held}
    groups = {}
    for s in S.all_scenes():
        key = (s.category, s.phrasing, S.canonical(s))
        groups.setdefault(key, set()).add(side[S.prompt_of(s)])
    assert all(len(v) == 1 for v in groups.values())
    assert any(
        len([1 for s in S.all_scenes() if (s.category, s.phrasing, S.canonical(s)) == k]) == 2 for k in groups
    )
    # every word of a held-out prompt is seen in training: held-out prompts are new combinations
    assert {w for p in held for w in p.split()} <= {w for p in train for w in p.split()}
    # other seeds give other (still valid) splits
    t1, h1 = S.split_prompts(seed=1)
    assert set(h1) != set(held) and not set(t1) & set(h1)
    with pytest.raises(ValueError):
        S.split_prompts(heldout_fraction=0.0)


def test_prompt_files_match_split():
    train, held = S.split_prompts()
    assert S.read_prompt_file("train") == train
    assert S.read_prompt_file("heldout") == held
    assert S.read_prompt_file("eval") == S.balanced_eval_prompts()
    assert S.read_prompt_file("train_balanced") == S.balanced_train_prompts()


def test_balanced_train_prompts_weigh_categories_equally():
    train, _ = S.split_prompts()
    prompts = S.balanced_train_prompts()
    assert set(prompts) == set(train)  # every training prompt kept, none held out
    counts = Counter(S.parse_prompt(p).category for p in prompts)
    largest = max(Counter(S.parse_prompt(p).category for p in train).values())
    assert set(counts) == set(S.CATEGORIES) and set(counts.values()) == {largest}
    with pytest.raises(ValueError, match="split"):
        S.balanced_prompts("eval", 4)


def test_balanced_eval_prompts_are_heldout_and_balanced():
    _, held = S.split_prompts()
    prompts = S.balanced_eval_prompts(per_category=20)
    assert set(prompts) <= set(held)
    counts = {c: 0 for c in S.CATEGORIES}
    for p in prompts:
        counts[S.parse_prompt(p).category] += 1
    assert set(counts.values()) == {20}
    # every held-out prompt of a small category appears
    single = {p for p in held if S.parse_prompt(p).category == "single_object"}
    assert single <= set(prompts)
    # interleaved: every run of 10 prompts holds two of each category (a sample grid of the first ones shows all)
    for start in range(0, len(prompts), 10):
        assert Counter(S.parse_prompt(p).category for p in prompts[start:start + 10]) == {c: 2 for c in S.CATEGORIES}


def test_sample_scene():
    rng = np.random.default_rng(0)
    cats = Counter(S.sample_scene(rng).category for _ in range(5000))
    assert set(cats) == set(S.CATEGORIES)
    assert all(900 < n < 1100 for n in cats.values()), cats
    train, held = S.split_prompts()
    held_set = set(held)
    drawn = [S.prompt_of(S.sample_scene(rng, held)) for _ in range(500)]
    assert set(drawn) <= held_set
    assert len(Counter(S.parse_prompt(p).category for p in drawn)) == 5
    only = ["a red circle", "two squares"]
    assert {S.prompt_of(S.sample_scene(rng, only)) for _ in range(50)} == set(only)


def _box_pixels(img):
    return (img != np.array(S.BACKGROUND, np.uint8)).any(-1)


@pytest.mark.parametrize("size", [24, 32, 48, 64])
def test_render_layout_exact(size):
    rng = np.random.default_rng(size)
    lo, hi = R.object_size_range(size)
    palette = {tuple(v) for v in S.COLORS.values()} | {S.BACKGROUND}
    for _ in range(300):
        scene = S.sample_scene(rng)
        img, placed = R.render_with_layout(scene, size, rng)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert {tuple(c) for c in img.reshape(-1, 3)} <= palette
        # exact objects: count, shapes and requested colours
        want = Counter()
        for o in scene.objects:
            want[o.shape] += o.count
        assert Counter(p.shape for p in placed) == want
        for o in scene.objects:
            if o.color is not None:
                assert sum(p.shape == o.shape and p.color == o.color for p in placed) == o.count
        for p in placed:
            assert lo <= p.size <= hi
            assert 0 <= p.y and p.y + p.size <= size and 0 <= p.x and p.x + p.size <= size
        # no two boxes touch (a gap of at least one free pixel)
        for a, b in itertools.combinations(placed, 2):
            apart = a.y + a.size < b.y or b.y + b.size < a.y or a.x + a.size < b.x or b.x + b.size < a.x
            assert apart, (a, b)
        # every object is fully visible
        assert _box_pixels(img).sum() == sum(R.shape_mask(p.shape, p.size).sum() for p in placed)
        if scene.relation is not None:
            a, b = placed
            assert (a.shape, a.color) == (scene.objects[0].shape, scene.objects[0].color)
            first, second = (a, b) if scene.relation in ("left of", "above") else (b, a)
            if scene.relation in ("left of", "right of"):
                # every pixel of first is left of every pixel of second, with a margin; rows overlap
                assert first.x + first.size + 2 < second.x
                assert min(first.y + first.size, second.y + second.size) - max(first.y, second.y) > 0
            else:
                assert first.y + first.size + 2 < second.y
                assert min(first.x + first.size, second.x + second.size) - max(first.x, second.x) > 0


def test_render_deterministic_and_varied():
    scene = S.parse_prompt("three red squares")
    a = R.render(scene, 32, np.random.default_rng(3))
    b = R.render(scene, 32, np.random.default_rng(3))
    c = R.render(scene, 32, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # unspecified colours vary
    colors = {
        tuple(R.render(S.parse_prompt("a circle"), 32, np.random.default_rng(i)).reshape(-1, 3).max(0))
        for i in range(40)
    }
    assert len(colors) >= 5
    assert R.render(scene).shape == (32, 32, 3)


def test_shape_masks_touch_their_box():
    for shape in S.SHAPES:
        for d in range(6, 23):
            m = R.shape_mask(shape, d)
            assert m.shape == (d, d) and m.any(0).all() and m.any(1).all()


def test_render_speed():
    rng = np.random.default_rng(0)
    scenes = [S.sample_scene(rng) for _ in range(2000)]
    t = time.perf_counter()
    for s in scenes:
        R.render(s, 32, rng)
    per_image = (time.perf_counter() - t) / len(scenes)
    assert per_image < 1e-3, f"{per_image * 1e3:.3f} ms per image"  # ~0.04 ms measured; loose for shared CPUs


@pytest.mark.parametrize("sizes", [(8, 10), (9, 9), (12, 12)])
def test_render_object_sizes_option(sizes):
    from flowrl.toy.verifier import verify

    rng = np.random.default_rng(0)
    seen, correct = set(), []
    for _ in range(200):
        scene = S.sample_scene(rng)
        img, placed = R.render_with_layout(scene, 32, rng, object_sizes=sizes)
        seen |= {p.size for p in placed}
        correct.append(verify(img, S.prompt_of(scene)).correct)
    assert seen == set(range(sizes[0], sizes[1] + 1))
    assert np.mean(correct) >= 0.99  # the verifier reads such renders as well as the default ones


def test_bad_object_sizes_name_the_fix():
    scene = S.parse_prompt("a red circle left of a blue square")
    for bad in [(5, 8), (9, 8), (8, 13), (8,), (8.0, 9)]:
        with pytest.raises(ValueError, match="object_sizes"):
            R.render(scene, 32, object_sizes=bad)
    with pytest.raises(ValueError, match="smaller object_sizes or a bigger image"):
        R.render(scene, 20, object_sizes=(12, 12))
