"""The small grammars config values are written in: the paper's hierarchy notation ``"5@1 24@3 5@1"``, per-layer
initialisation ``"down=normal up=normal"``, step ranges ``"20-22"``, data mixtures and activation-checkpointing
policies."""
from __future__ import annotations

import math
import re

_LEVEL_RE = re.compile(r"^(\d+)@(\d+)$")
INIT_SCHEMES = ("trax", "normal")
# model.init_layers' layer groups: the embedding, blocks at factor 1, shortening layers, blocks of the shortened
# levels, upsampling layers, the output projection
INIT_GROUPS = ("embed", "full", "down", "shortened", "up", "head")
# Named model.init_layers values. small_budget: the blocks at factor 1 from N(0, init_std), the rest model.init; it
# lowered validation bpc by 0.09-0.22 against trax at 1e12-4e12 FLOPs, width 64, on two corpora (BENCHMARKS.md).
INIT_RECIPES = {"small_budget": "full=normal"}


def parse_hierarchy(spec: str) -> list[tuple[int, int]]:
    """Parse the paper's notation ``"5@1 24@3 5@1"`` into ``[(n_layers, cumulative_factor), ...]``.

    The string is a palindrome of factors (layer counts may differ between the way down and up),
    the outermost factor is 1, factors strictly grow to the middle and each divides the next inner one.
    Raises ValueError showing the string and what is wrong.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"model.hierarchy {spec!r}: {why} "
                          f"(example: \"5@1 24@3 5@1\"; a plain Transformer is \"12@1\")")

    if not isinstance(spec, str) or not spec.strip():
        raise bad("is empty")
    levels = []
    for tok in spec.split():
        m = _LEVEL_RE.match(tok)
        if not m:
            raise bad(f"item {tok!r} is not of the form N@K (N layers at cumulative shortening factor K)")
        n, k = int(m.group(1)), int(m.group(2))
        if k < 1:
            raise bad(f"item {tok!r} has factor {k}; factors are >= 1")
        levels.append((n, k))
    if len(levels) % 2 == 0:
        raise bad(f"has {len(levels)} items; it must have an odd number (way down, middle, way up)")
    factors = [k for _, k in levels]
    if factors != factors[::-1]:
        raise bad(f"factors {factors} are not a palindrome")
    if factors[0] != 1:
        raise bad(f"the outermost factor is {factors[0]}; it must be 1 (full resolution)")
    mid = len(levels) // 2
    for outer, inner in zip(factors[:mid], factors[1:mid + 1], strict=True):
        if inner <= outer or inner % outer:
            raise bad(f"factor {inner} does not strictly grow from {outer} and divide by it")
    if levels[mid][0] < 1:
        raise bad("the innermost level has no layers")
    return levels


_SPEC = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_init_layers(spec: str) -> dict[str, str]:
    """``"down=normal up=normal"`` -> ``{"down": "normal", "up": "normal"}``: the layer groups whose initialisation
    differs from model.init (space-separated group=scheme pairs, each group once, or a name of INIT_RECIPES).
    Raises ValueError naming the pair that is not one."""
    out: dict[str, str] = {}
    for pair in INIT_RECIPES.get(spec.strip(), spec).split():
        group, _, scheme = pair.partition("=")
        if group not in INIT_GROUPS or scheme not in INIT_SCHEMES or group in out:
            why = "names its group twice" if group in out else (f"is not group=scheme with a group of "
                                                                 f"{', '.join(INIT_GROUPS)} and a scheme of "
                                                                 f"{', '.join(INIT_SCHEMES)}")
            raise ValueError(f"model.init_layers = {spec!r}: {pair!r} {why} (e.g. 'down=normal up=normal', or a "
                             f"recipe: {', '.join(INIT_RECIPES)})")
        out[group] = scheme
    return out


def parse_steps(spec: str) -> tuple[int, int]:
    """'20-22' -> (20, 22); '20' -> (20, 20). ValueError for anything else."""
    m = _SPEC.match(spec or "")
    if not m:
        raise ValueError(spec)
    a, b = int(m.group(1)), int(m.group(2) or m.group(1))
    if a < 1 or b < a:
        raise ValueError(spec)
    return a, b


def steps_problem(spec: str) -> list[str]:
    try:
        parse_steps(spec)
    except ValueError:
        return [f"train.profile_steps = {spec!r} is not a step range: write 'A-B' with 1 <= A <= B "
                f"(e.g. '20-22'), or one step 'A'"]
    return []


CHECKPOINT_POLICIES = ("none", "all", "full_resolution")


def checkpointed_levels(policy, levels: list[tuple[int, int]]) -> set[int]:
    """The level indices (into ``levels``, the parsed hierarchy) whose layers recompute their activations in the
    backward pass, for ``parallel.activation_checkpointing``: true/"all", false/"none", "full_resolution" (the
    levels at factor 1, which hold most of the activations) or a list of level indices. Raises ValueError naming
    the value and what is accepted."""
    if policy is True or policy == "all":
        return set(range(len(levels)))
    if policy is False or policy == "none":
        return set()
    if policy == "full_resolution":
        return {i for i, (_, k) in enumerate(levels) if k == 1}
    if isinstance(policy, list) and all(type(i) is int and 0 <= i < len(levels) for i in policy):
        return set(policy)
    last = len(levels) - 1
    raise ValueError(f"parallel.activation_checkpointing = {policy!r} is not one of true, false, "
                     f"{', '.join(repr(p) for p in CHECKPOINT_POLICIES)} or a list of level indices 0..{last} of "
                     f"model.hierarchy (e.g. [0, {last}])")


SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")  # names metrics: val/<name>/bpc, data/share/<name>


def mixture_problems(mixture) -> list[str]:
    """Problems of a ``data.mixture`` list (no I/O): shape, names, weights."""
    if not isinstance(mixture, list):
        return [f"data.mixture must be a list of {{\"name\", \"url\", \"weight\"}} objects, got {mixture!r:.60}"]
    out, names = [], []
    for i, e in enumerate(mixture):
        where = f"data.mixture[{i}]"
        if not isinstance(e, dict) or set(e) != {"name", "url", "weight"}:
            keys = sorted(e) if isinstance(e, dict) else type(e).__name__
            out.append(f"{where} must be an object with exactly the keys name, url, weight (got {keys})")
            continue
        name, url, w = e["name"], e["url"], e["weight"]
        if not isinstance(name, str) or not SOURCE_NAME_RE.match(name):
            out.append(f"{where}.name = {name!r} must be a non-empty string of letters, digits, '_', '.', '-' "
                       f"(it names metrics such as val/<name>/bpc)")
        elif name in names:
            out.append(f"{where}.name = {name!r} is used twice; give every source its own name")
        names.append(name)
        if not isinstance(url, str) or not url:
            out.append(f"{where}.url must be the dataset root of the source (a path, file:// or s3:// URL)")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            out.append(f"{where}.weight = {w!r} must be a number > 0 (weights are relative: 0.8 and 0.2, or 4 and 1)")
    if not mixture:
        out.append("data.mixture is an empty list; list at least one source, or use data.url")
    return out
