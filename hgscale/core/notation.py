"""The small grammars config values are written in: the paper's hierarchy notation ``"5@1 24@3 5@1"`` and step
ranges ``"20-22"``."""
from __future__ import annotations

import re

_LEVEL_RE = re.compile(r"^(\d+)@(\d+)$")


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
