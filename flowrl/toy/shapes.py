"""The toy "shapes" world: a GenEval-like prompt grammar (the renderer is :mod:`flowrl.toy.render`).

Prompts (lowercase, no punctuation), one category each:

- ``single_object``  "a circle", also with a phrasing template: "a photo of a circle", "an image of a
  circle", "a picture of a circle" (so that this small category has unseen held-out prompts)
- ``colors``         "a red circle"
- ``counting``       "two squares", "three blue triangles", "one circle" (counts one to four, colour optional)
- ``two_objects``    "a red circle and a blue square" (two different shapes in two different colours)
- ``position``       "a blue square left of a green triangle" (left of / right of / above / below)

Prompts that mean the same thing ("A and B" / "B and A", "A left of B" / "B right of A") are one
group: :func:`split_prompts` keeps a group on one side of the split and the verifier accepts either.

Images are RGB ``uint8`` on a plain black background, objects are filled circles, axis-aligned squares
and upright triangles of the six palette colours, placed at random without touching each other.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# Six saturated colours, pairwise at least ~150 apart in RGB and ~245 from the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (30, 60, 235),
    "yellow": (240, 220, 20),
    "purple": (190, 40, 220),
    "cyan": (20, 210, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "colors", "counting", "two_objects", "position")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

#: Phrasing templates; ``Scene.phrasing`` indexes this tuple. The grammar (``all_scenes``) uses the
#: non-default ones for ``single_object`` only, but ``parse_prompt``/``prompt_of`` accept them everywhere.
TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "an image of {}", "a picture of {}")

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_COUNT = len(COUNT_WORDS)
_PLURAL = {s: s + "s" for s in SHAPES}
_SINGULAR = {p: s for s, p in _PLURAL.items()}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Obj:
    """``count`` objects of ``shape``; ``color`` ``None`` means any colour."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for. ``relation`` relates ``objects[0]`` to ``objects[1]`` (position only).

    ``phrasing`` is the index of the template in :data:`TEMPLATES` (0: the bare prompt); it changes the
    wording only, never what the image must show.
    """

    category: str
    objects: tuple[Obj, ...]
    relation: str | None = None
    phrasing: int = 0


def _words(*parts: Sequence[str]) -> list[str]:
    return [w for part in parts for phrase in part for w in phrase.split()]


VOCABULARY: list[str] = sorted(
    set(
        _words(
            ["a", "and"],
            [t.format("") for t in TEMPLATES],
            COUNT_WORDS,
            SHAPES,
            list(_PLURAL.values()),
            list(COLORS),
            RELATIONS,
        )
    )
)


# ----------------------------------------------------------------------------------------------
# prompts


def _check_obj(o: Obj, where: str) -> None:
    if o.shape not in SHAPES:
        raise ValueError(f"{where}: unknown shape {o.shape!r}; shapes are {SHAPES}")
    if o.color is not None and o.color not in COLORS:
        raise ValueError(f"{where}: unknown colour {o.color!r}; colours are {tuple(COLORS)}")
    if not 1 <= o.count <= MAX_COUNT:
        raise ValueError(f"{where}: count {o.count} is outside 1..{MAX_COUNT}")


def _check_scene(scene: Scene) -> None:
    c = scene.category
    if c not in CATEGORIES:
        raise ValueError(f"unknown category {c!r}; categories are {CATEGORIES}")
    if not 0 <= scene.phrasing < len(TEMPLATES):
        raise ValueError(f"phrasing {scene.phrasing} is outside 0..{len(TEMPLATES) - 1}")
    objs = scene.objects
    for o in objs:
        _check_obj(o, f"scene {scene}")
    n_expected = 2 if c in ("two_objects", "position") else 1
    if len(objs) != n_expected:
        raise ValueError(f"a {c} scene has {n_expected} object(s), got {len(objs)}: {scene}")
    if c != "counting" and any(o.count != 1 for o in objs):
        raise ValueError(f"only counting scenes have counts other than 1: {scene}")
    if c == "single_object" and objs[0].color is not None:
        raise ValueError(f"a single_object scene has no colour (that is the colors category): {scene}")
    if c == "colors" and objs[0].color is None:
        raise ValueError(f"a colors scene needs a colour: {scene}")
    if c in ("two_objects", "position") and objs[0].shape == objs[1].shape:
        raise ValueError(f"the two objects of a {c} scene must be different shapes: {scene}")
    if (c == "position") != (scene.relation is not None):
        raise ValueError(f"a relation is required for position scenes and only for them: {scene}")
    if scene.relation is not None and scene.relation not in RELATIONS:
        raise ValueError(f"unknown relation {scene.relation!r}; relations are {RELATIONS}")


def _obj_phrase(o: Obj, counted: bool) -> str:
    color = f"{o.color} " if o.color else ""
    if counted:
        noun = o.shape if o.count == 1 else _PLURAL[o.shape]
        return f"{COUNT_WORDS[o.count - 1]} {color}{noun}"
    return f"a {color}{o.shape}"


def prompt_of(scene: Scene) -> str:
    """The prompt text of ``scene`` (the inverse of :func:`parse_prompt`)."""
    _check_scene(scene)
    c, objs = scene.category, scene.objects
    if c == "counting":
        text = _obj_phrase(objs[0], counted=True)
    elif c in ("single_object", "colors"):
        text = _obj_phrase(objs[0], counted=False)
    elif c == "two_objects":
        text = f"{_obj_phrase(objs[0], False)} and {_obj_phrase(objs[1], False)}"
    else:
        text = f"{_obj_phrase(objs[0], False)} {scene.relation} {_obj_phrase(objs[1], False)}"
    return TEMPLATES[scene.phrasing].format(text)


_EXAMPLES = "'a circle', 'a red circle', 'three blue squares', 'a red circle and a blue square', 'a blue square left of a green triangle'"


def _parse_obj(words: list[str], prompt: str) -> tuple[Obj, bool]:
    """Parses ``[a|one..four] [colour] shape(s)``; returns the object and whether it was counted."""

    def bad(why: str) -> ValueError:
        return ValueError(f"not a toy shapes prompt: {prompt!r} ({why}); examples: {_EXAMPLES}")

    if len(words) not in (2, 3):
        raise bad(f"cannot read an object from {' '.join(words)!r}")
    det, noun = words[0], words[-1]
    color = words[1] if len(words) == 3 else None
    if color is not None and color not in COLORS:
        raise bad(f"unknown colour {color!r}; colours are {', '.join(COLORS)}")
    if det == "a":
        if noun not in SHAPES:
            raise bad(f"unknown shape {noun!r}; shapes are {', '.join(SHAPES)}")
        return Obj(noun, color, 1), False
    if det in COUNT_WORDS:
        count = COUNT_WORDS.index(det) + 1
        if count == 1:
            if noun not in SHAPES:
                raise bad(f"'one' needs a singular shape ({', '.join(SHAPES)}), got {noun!r}")
            return Obj(noun, color, 1), True
        if noun not in _SINGULAR:
            raise bad(f"{det!r} needs a plural shape ({', '.join(_PLURAL.values())}), got {noun!r}")
        return Obj(_SINGULAR[noun], color, count), True
    raise bad(f"an object starts with 'a' or a count ({', '.join(COUNT_WORDS)}), got {det!r}")


def parse_prompt(prompt: str) -> Scene:
    """The scene a toy prompt asks for; ``ValueError`` naming the problem if it is not a toy prompt.

    Case and repeated spaces are ignored. Accepts the grammar of :func:`all_scenes` and slightly more
    (colours are optional on every object, templates are allowed in every category).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt is a string, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split())
    phrasing = 0
    for i, tpl in enumerate(TEMPLATES[1:], start=1):
        prefix = tpl.format("")
        if text.startswith(prefix) and len(text) > len(prefix):
            text, phrasing = text[len(prefix) :], i
            break
    words = text.split()
    for rel in RELATIONS:
        rw = rel.split()
        for i in range(1, len(words) - len(rw)):
            if words[i : i + len(rw)] == rw:
                a, ca = _parse_obj(words[:i], prompt)
                b, cb = _parse_obj(words[i + len(rw) :], prompt)
                if ca or cb:
                    raise ValueError(
                        f"not a toy shapes prompt: {prompt!r} (position prompts use 'a', not counts)"
                    )
                return _validated(Scene("position", (a, b), rel, phrasing), prompt)
    if "and" in words:
        i = words.index("and")
        a, ca = _parse_obj(words[:i], prompt)
        b, cb = _parse_obj(words[i + 1 :], prompt)
        if ca or cb:
            raise ValueError(f"not a toy shapes prompt: {prompt!r} (two-object prompts use 'a', not counts)")
        return _validated(Scene("two_objects", (a, b), None, phrasing), prompt)
    o, counted = _parse_obj(words, prompt)
    if counted:
        return _validated(Scene("counting", (o,), None, phrasing), prompt)
    return _validated(Scene("colors" if o.color else "single_object", (o,), None, phrasing), prompt)


def _validated(scene: Scene, prompt: str) -> Scene:
    try:
        _check_scene(scene)
    except ValueError as e:
        raise ValueError(f"not a toy shapes prompt: {prompt!r} ({e})") from None
    return scene


def canonical(scene: Scene) -> Scene:
    """A normal form of what ``scene`` asks for: two scenes are equivalent iff their normal forms are equal.

    Drops the phrasing, orders the objects of ``two_objects``, turns "right of"/"below" into
    "left of"/"above" (swapping the objects) and reads "one red circle" as "a red circle".
    """
    c, objs, rel = scene.category, scene.objects, scene.relation
    if c == "counting" and objs[0].count == 1:
        c = "colors" if objs[0].color else "single_object"
    if c == "two_objects":
        objs = tuple(sorted(objs, key=lambda o: (o.shape, o.color or "")))
    if rel in ("right of", "below"):
        objs, rel = (objs[1], objs[0]), _OPPOSITE[rel]
    return Scene(c, objs, rel, 0)


def _group_key(scene: Scene) -> Scene:
    # what split_prompts keeps together: equivalent prompts of one category with one phrasing
    return replace(canonical(scene), category=scene.category, phrasing=scene.phrasing)


# ----------------------------------------------------------------------------------------------
# the prompt set


@functools.lru_cache(maxsize=1)
def _all_scenes() -> tuple[Scene, ...]:
    colors, out = list(COLORS), []
    for phrasing in range(len(TEMPLATES)):
        out += [Scene("single_object", (Obj(s),), None, phrasing) for s in SHAPES]
    out += [Scene("colors", (Obj(s, c),)) for c in colors for s in SHAPES]
    out += [
        Scene("counting", (Obj(s, c, n),))
        for n in range(1, MAX_COUNT + 1)
        for c in [None, *colors]
        for s in SHAPES
    ]
    pairs = [
        (Obj(s1, c1), Obj(s2, c2))
        for s1, c1, s2, c2 in itertools.product(SHAPES, colors, SHAPES, colors)
        if s1 != s2 and c1 != c2
    ]
    out += [Scene("two_objects", p) for p in pairs]
    out += [Scene("position", p, rel) for p in pairs for rel in RELATIONS]
    return tuple(out)


def all_scenes() -> list[Scene]:
    """Every distinct prompt of the grammar, as scenes (equivalent orderings are separate prompts)."""
    return list(_all_scenes())


@functools.lru_cache(maxsize=8)
def _split(seed: int, heldout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    train, heldout = [], []
    for ci, cat in enumerate(CATEGORIES):
        groups: dict[Scene, list[str]] = {}
        for s in _all_scenes():
            if s.category == cat:
                groups.setdefault(_group_key(s), []).append(prompt_of(s))
        members = sorted(sorted(g) for g in groups.values())
        n_held = min(max(1, round(heldout_fraction * len(members))), len(members) - 1)
        order = np.random.default_rng([seed, ci]).permutation(len(members))
        held = set(order[:n_held].tolist())
        for i, g in enumerate(members):
            (heldout if i in held else train).extend(g)
    return tuple(train), tuple(heldout)


def split_prompts(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic (train, heldout) split of all prompts, stratified per category.

    About ``heldout_fraction`` of each category's groups of equivalent prompts are held out (at least one
    group, and at least one is kept for training); a group is never split.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train, heldout = _split(int(seed), float(heldout_fraction))
    return list(train), list(heldout)


PROMPTS_DIR = Path(__file__).parent / "prompts"


def balanced_prompts(split: str, per_category: int, seed: int = 0) -> list[str]:
    """Prompts of ``split`` ("train" or "heldout") with ``per_category`` entries in every category (small
    categories' prompts repeated, large ones sampled without replacement), in category order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    pool = split_prompts()[0 if split == "train" else 1]
    rng = np.random.default_rng(seed)
    out = []
    for category in CATEGORIES:
        prompts = [p for p in pool if parse_prompt(p).category == category]
        order = [prompts[i] for i in rng.permutation(len(prompts))]
        out += [order[i % len(order)] for i in range(per_category)]
    return out


def balanced_eval_prompts(per_category: int = 32, seed: int = 0, block: int = 2) -> list[str]:
    """Held-out prompts with ``per_category`` entries in every category, so that each category's accuracy
    has the same sample size and the overall accuracy (the mean over categories) is not dominated by
    sampling noise of a 2-prompt one. Interleaved by category, ``block`` prompts of each in turn: any leading part
    of the list (the first validation batch, a sample grid, ``max_val_prompts``) covers every category alike."""
    ordered = balanced_prompts("heldout", per_category, seed)  # in category order
    by_category = [ordered[i * per_category:(i + 1) * per_category] for i in range(len(CATEGORIES))]
    return [p for start in range(0, per_category, block) for prompts in by_category for p in prompts[start:start + block]]


def balanced_train_prompts(seed: int = 0) -> list[str]:
    """Training prompts with every category equally likely (as many entries per category as the largest
    category has prompts). The raw split is 71% position prompts, where a fresh model almost never
    scores, so uniform sampling over it would spend most of the RL budget on all-zero groups while the
    evaluation weighs the five categories equally."""
    pool = split_prompts()[0]
    largest = max(sum(parse_prompt(p).category == c for p in pool) for c in CATEGORIES)
    return balanced_prompts("train", largest, seed)


def write_prompt_files(directory: str | Path = PROMPTS_DIR) -> None:
    """Writes ``train.txt`` and ``heldout.txt`` (one prompt a line) of the default :func:`split_prompts`,
    ``train_balanced.txt`` (:func:`balanced_train_prompts`) and ``eval.txt``, the category-balanced
    validation list of :func:`balanced_eval_prompts`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, prompts in zip(("train", "heldout"), split_prompts()):
        (directory / f"{name}.txt").write_text("\n".join(prompts) + "\n")
    (directory / "train_balanced.txt").write_text("\n".join(balanced_train_prompts()) + "\n")
    (directory / "eval.txt").write_text("\n".join(balanced_eval_prompts()) + "\n")


def read_prompt_file(name: str) -> list[str]:
    """The prompts of the shipped ``train``, ``train_balanced``, ``heldout`` or ``eval`` file."""
    return [line for line in (PROMPTS_DIR / f"{name}.txt").read_text().splitlines() if line.strip()]


@functools.lru_cache(maxsize=16)
def _by_category(prompts: tuple[str, ...] | None) -> tuple[tuple[str, tuple[Scene, ...]], ...]:
    scenes = _all_scenes() if prompts is None else [parse_prompt(p) for p in prompts]
    if not scenes:
        raise ValueError("sample_scene needs at least one prompt")
    cats: dict[str, list[Scene]] = {}
    for s in scenes:
        cats.setdefault(s.category, []).append(s)
    return tuple((c, tuple(cats[c])) for c in CATEGORIES if c in cats)


def sample_scene(rng: np.random.Generator, prompts: Sequence[str] | None = None) -> Scene:
    """A random scene: a uniform category (of those present), then a uniform prompt of that category.

    With ``prompts`` (e.g. the train split) only those prompts are drawn.
    """
    cats = _by_category(None if prompts is None else tuple(prompts))
    _, scenes = cats[int(rng.integers(len(cats)))]
    return scenes[int(rng.integers(len(scenes)))]
