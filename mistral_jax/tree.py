"""Parameter paths and nested-dict trees: the one vocabulary every layer uses.

A params pytree is nested dicts; a leaf's path is a tuple of keys
(`('layers_0', 'attention', 'wq', 'kernel')`). Quantization and LoRA add leaves beside a
weight (`sibling`): inside a Linear's dict, or `<name>_<leaf>` beside stacked experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ParamPath = tuple[str, ...]


def flatten(tree, prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    """Nested dicts (params, abstract params, logical axes) -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[ParamPath, Any]) -> dict:
    """{path tuple: leaf} -> nested dicts (the inverse of `flatten`)."""
    tree: dict = {}
    for path, v in flat.items():
        set_leaf(tree, path, v)
    return tree


def set_leaf(tree: dict, path: ParamPath, value) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def split_dims(path: ParamPath, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(lead, in, out) axes of the linear weight at `path` with `ndim` dims.

    Kernels are [in..., out...]: `wo` [H, Hd, D] contracts two dims, other kernels one.
    Stacked expert weights [E, in, out] have the expert axis as a `lead` dim.
    """
    if path[-1] == "kernel":
        n_in = 2 if path[-2] == "wo" else 1
        return (), tuple(range(n_in)), tuple(range(n_in, ndim))
    if ndim == 3 and path[-1] in ("w1", "w2", "w3"):
        return (0,), (1,), (2,)
    raise ValueError(f"{'/'.join(path)} is not a linear weight")


def is_linear_weight(path: ParamPath, ndim: int) -> bool:
    """Whether the param at `path` is a Linear kernel or a stacked [E, in, out] expert weight."""
    return path[-1] == "kernel" or (ndim == 3 and path[-1] in ("w1", "w2", "w3"))


def sibling(path: ParamPath, leaf: str) -> ParamPath:
    """The path of the extra leaf `leaf` ('scale', 'input_scale', 'lora_a', ...) of a weight.

    Inside a Linear's dict for `.../kernel`; `<name>_<leaf>` beside stacked expert weights.
    """
    if path[-1] == "kernel":
        return path[:-1] + (leaf,)
    return path[:-1] + (f"{path[-1]}_{leaf}",)


EXTRA_LEAVES = ("input_scale", "scale", "lora_a", "lora_b")


def owner(path: ParamPath, weights) -> tuple[ParamPath, str] | None:
    """The weight an extra leaf (`EXTRA_LEAVES`) belongs to: (its path, found in `weights`,
    and the leaf's kind), or None when `path` is no extra leaf of any of them."""
    for kind in EXTRA_LEAVES:
        if path[-1] != kind and not path[-1].endswith("_" + kind):
            continue
        for weight in (path[:-1] + ("kernel",), path[:-1] + (path[-1][: -len(kind) - 1],)):
            if weight in weights and sibling(weight, kind) == path:
                return weight, kind
    return None
