"""Which parameters train: freezing by pattern over params paths, and the trainable-parameter table.

Paths are the dotted names of the params tree (`ov_jax.params`), e.g. ``text.layers.q.kernel``. A pattern is
a preset name from :data:`PRESETS` or a regular expression matched with ``re.search`` against each path.
Frozen leaves get no gradient (they enter the loss through ``lax.stop_gradient``) and no optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import numpy as np

# Preset name → regex over params paths; the towers as transformers names them.
PRESETS: dict[str, str] = {
    "vision_tower": r"^vision\.",
    "projector": r"^projector\.",
    "language_model": r"^text\.",
    "image_newline": r"^image_newline$",
}
# Rows of the trainable table: tower → path prefix regex.
TOWERS: tuple[tuple[str, str], ...] = (
    ("vision", r"^vision\."), ("projector", r"^projector\."), ("newline", r"^image_newline"), ("LM", r"^text\."))


class FreezeError(ValueError):
    """A freeze pattern that is not a valid regex or matches no parameter."""


def path_name(path) -> str:
    """Dotted name of a pytree key path: ``text.layers.q.kernel``."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def leaf_paths(tree: Any) -> list[str]:
    return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def compile_patterns(patterns: str | Iterable[str] | None) -> list[tuple[str, re.Pattern]]:
    """Presets and regexes (a comma-separated string or an iterable) → ``(given, compiled)`` pairs."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    out = []
    for given in patterns:
        try:
            out.append((given, re.compile(PRESETS.get(given, given))))
        except re.error as e:
            raise FreezeError(f"freeze pattern {given!r} is neither a preset ({', '.join(PRESETS)}) "
                              f"nor a valid regular expression: {e}") from None
    return out


def matching(tree: Any, patterns: str | Iterable[str] | None, what: str = "freeze") -> Any:
    """Tree of bools: leaves whose path any pattern matches. A pattern matching nothing is a :class:`FreezeError`."""
    compiled = compile_patterns(patterns)
    names = leaf_paths(tree)
    for given, rx in compiled:
        if not any(rx.search(n) for n in names):
            raise FreezeError(f"{what} pattern {given!r} matches no parameter; parameter paths look like "
                              f"{names[0]!r}, {names[-1]!r} (presets: {', '.join(PRESETS)})")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(rx.search(path_name(p)) for _, rx in compiled), tree)


def select(tree: dict, mask: Any) -> dict:
    """The sub-tree of ``tree`` where ``mask`` is True (empty dicts dropped): the trainable params."""
    out = {}
    for key, value in tree.items():
        m = mask[key]
        if isinstance(value, dict):
            sub = select(value, m)
            if sub:
                out[key] = sub
        elif m:
            out[key] = value
    return out


def merge(tree: dict, sub: dict) -> dict:
    """``tree`` with the leaves of ``sub`` (a :func:`select` result) put back in their places."""
    out = dict(tree)
    for key, value in sub.items():
        out[key] = merge(tree[key], value) if isinstance(value, dict) else value
    return out


def trainable_table(params: Any, trainable: Any) -> str:
    """Trainable vs total parameter counts per tower (vision / projector / newline / LM), as text."""
    counts = {name: [0, 0] for name, _ in TOWERS}
    other = [0, 0]
    for (path, leaf), train in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(trainable)):
        name = path_name(path)
        row = next((counts[t] for t, rx in TOWERS if re.search(rx, name)), other)
        size = int(np.prod(leaf.shape))
        row[0] += size if train else 0
        row[1] += size
    rows = [(name, *counts[name]) for name, _ in TOWERS]
    if other[1]:
        rows.append(("other", *other))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    lines = [f"{'tower':<10} {'trainable':>14} {'total':>14} {'%':>7}"]
    for name, train, total in rows:
        pct = 100.0 * train / total if total else 0.0
        lines.append(f"{name:<10} {train:>14,} {total:>14,} {pct:>6.2f}%")
    return "\n".join(lines)
