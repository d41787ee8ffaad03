"""LoRA adapters, as mistral-finetune writes them (and peft), merged or applied unmerged.

Adapter file (mistral-finetune / mistral-inference): a safetensors file of pairs

    layers.0.attention.wq.lora_A.weight    [r, in]     PyTorch [out, in] convention
    layers.0.attention.wq.lora_B.weight    [out, r]    delta W = scaling * B @ A

for any linear layer: attention wq/wk/wv/wo, feed_forward w1/w2/w3, MoE
`feed_forward.experts.N.w1` and `feed_forward.gate`. peft adapters (a folder with
adapter_config.json and adapter_model.safetensors, names like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) load too; their
q/k rows are in HF's rotate-half order, which the checkpoint transforms undo.

dtype: every LoRA tensor of a file must have one float dtype (float32, float16 or
bfloat16; the key with another dtype than most is named). The factors are combined in
float32 (scaling folded into B) and cast to the model's dtype (`load_lora(dtype=)`,
which `Transformer.from_folder` sets to its own); a merged delta is added in float32
and cast to the weight's dtype (requantized per output channel for int8 / fp8 weights).

rank: lora_A [r, in] and lora_B [out, r] of each layer must agree, and every pair must
have one rank (the pair whose rank differs from most is named); a rank given by the
config (peft `r`, a params.json lora block) must equal it.

scaling (delta W = scaling * B @ A), first found of:
1. the `scaling` argument (`Transformer.from_folder(lora_scaling=...)`);
2. peft's adapter_config.json: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora);
3. the lora block of a params.json beside the adapter, {"lora": {"rank": 8,
   "scaling": 2.0}}: both fields required, rank a positive int and scaling a number,
   as mistral-inference's LoraArgs (ConfigError naming the file, field and value);
4. the base model's params.json lora block (`args.lora`);
5. 2.0, mistral-inference's default.
A lora block in the base model's params.json also means the adapter stays unmerged
(mistral-inference's convention); `lora_merge=True/False` overrides that.

Two modes, one pure `forward`:
- merged (`merge_lora`): W + scaling * B @ A written into the kernels; no runtime cost.
- unmerged (`attach_lora`): the params carry `lora_a` [in..., r] and `lora_b`
  [r, out...] (scaling folded into lora_b) next to each `kernel`
  (`w1_lora_a` / `w1_lora_b` [E, ...] beside stacked experts), and `Linear` adds
  (x @ lora_a) @ lora_b. One base params tree serves several adapters: each
  `attach_lora(base, adapter)` shares the base arrays.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from mistral_jax.args import ModelArgs, config_field, lora_args, read_json
from mistral_jax.checkpoint import flatten, tensor_target, unflatten
from mistral_jax.errors import CheckpointError, ConfigError, UserInputError
from mistral_jax.quant import (
    ParamPath,
    dequantize,
    is_linear_weight,
    is_quantized,
    on_host,
    quantize_array,
    resolve_mode,
    sibling,
    split_dims,
)

DEFAULT_SCALING = 2.0
LORA_LEAVES = ("lora_a", "lora_b")
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<base>.+)\.lora_(?P<ab>[AB])\.weight")
_FLOAT_DTYPES = ("F32", "F16", "BF16")


# ---------------------------------------------------------------------------------------------
# Reading an adapter.


def _adapter_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("lora.safetensors", "adapter_model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no lora.safetensors or adapter_model.safetensors")
    raise CheckpointError(f"{path}: no such LoRA adapter file or folder")


def _adapter_config(file: Path, args: ModelArgs) -> tuple[float, int | None, str]:
    """(scaling, rank or None, where they came from) from peft's adapter_config.json
    (lora_alpha / r), a params.json lora block beside the adapter (rank and scaling, both
    required as in mistral-inference's LoraArgs), the base model's args.lora, or the
    default 2.0."""
    peft = file.parent / "adapter_config.json"
    if peft.is_file():
        cfg = read_json(peft)
        if cfg.get("target_parameters"):  # peft's adapters on fused expert tensors
            raise ConfigError(
                f"{peft}: target_parameters = {cfg['target_parameters']!r}: peft adapters on "
                "parameters (transformers' fused Mixtral experts) are not supported; adapters "
                "on modules (q_proj ... down_proj) are, and expert adapters in "
                "mistral-finetune's format (layers.N.feed_forward.experts.E.w1.lora_A.weight)")
        for key, ok in (("peft_type", lambda v: v in (None, "LORA")),
                        ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v),
                        ("use_dora", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                        ("bias", lambda v: v in (None, "none"))):
            if not ok(cfg.get(key)):
                raise ConfigError(f"{peft}: {key} = {cfg.get(key)!r} is not supported")
        r = config_field(peft, cfg, "r", "int")
        alpha = config_field(peft, cfg, "lora_alpha", "float") if "lora_alpha" in cfg else float(r)
        return (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r), r, str(peft)
    params = file.parent / "params.json"
    if params.is_file():
        data = read_json(params)
        if data.get("lora") is not None:
            lora = lora_args(data["lora"], params)
            return lora.scaling, lora.rank, str(params)
    if args.lora is not None:
        return (float(args.lora.scaling), int(args.lora.rank),
                "the base model's params.json lora block")
    return DEFAULT_SCALING, None, "the default"


def _read_tensors(file: Path) -> dict[str, tuple[tuple[int, ...], str, np.ndarray | None]]:
    try:
        with safe_open(file, framework="np") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                dt = sl.get_dtype()
                out[name] = (tuple(sl.get_shape()), dt,
                             f.get_tensor(name) if dt in _FLOAT_DTYPES else None)
            return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None


def load_lora(path: str | Path, args: ModelArgs, *, dtype: Any = jnp.float32,
              scaling: float | None = None) -> dict:
    """Read and check a LoRA adapter for a model of `args`; returns the adapter pytree.

    The adapter is a params-shaped pytree of `lora_a` [in..., r] / `lora_b` [r, out...]
    leaves in `dtype`, lora_b holding scaling * B (see module docstring). Raises
    CheckpointError naming the key for a key that is not a LoRA tensor or matches no
    linear layer, a missing A/B partner, ranks or shapes that do not fit, and tensors of
    different or non-float dtypes; ConfigError for a rank that disagrees with the config.
    """
    from mistral_jax.model import abstract_params

    file = _adapter_file(Path(path))
    scale, cfg_rank, cfg_source = _adapter_config(file, args)
    if scaling is not None:
        scale = float(scaling)
    tensors = _read_tensors(file)
    if not tensors:
        raise CheckpointError(f"{file}: the adapter holds no tensors")
    expected = flatten(abstract_params(args))
    # The dtype most keys have is the adapter's; a key with another is the one named.
    dtypes = collections.Counter(dt for _, dt, _ in tensors.values())
    common = dtypes.most_common(1)[0][0]
    pairs: dict[tuple[ParamPath, int | None], dict[str, str]] = {}
    targets = {}
    for name, (_, dt, _) in tensors.items():
        m = _KEY.fullmatch(name)
        if m is None:
            raise CheckpointError(f"{file}: key {name!r} is not a LoRA tensor "
                                  "(expected <module>.lora_A.weight / <module>.lora_B.weight)")
        if dt not in _FLOAT_DTYPES:
            raise CheckpointError(f"{file}: key {name!r} has dtype {dt}; LoRA weights must be "
                                  "float32, float16 or bfloat16")
        if dt != common:
            example = next(k for k, (_, d, _) in tensors.items() if d == common)
            raise CheckpointError(f"{file}: key {name!r} has dtype {dt} but {example!r} (and "
                                  f"{dtypes[common] - 1} other keys) have {common}; all LoRA "
                                  "weights must share one dtype")
        base = m["base"]
        layout = "hf" if base.startswith(("model.", "lm_head")) else "mistral"
        target = tensor_target(base + ".weight", layout, args)
        if (target is None or target.path not in expected
                or not is_linear_weight(target.path, len(expected[target.path].shape))):
            raise CheckpointError(
                f"{file}: key {name!r} matches no linear layer of this model "
                f"(n_layers={args.n_layers}, moe={args.moe})")
        key = (target.path, target.expert)
        slot = pairs.setdefault(key, {})
        if m["ab"] in slot:
            raise CheckpointError(f"{file}: key {name!r} and {slot[m['ab']]!r} both adapt "
                                  f"{'/'.join(target.path)}")
        slot[m["ab"]] = name
        targets[key] = target

    # Each pair on its own first: lora_A [r, in] and lora_B [out, r] of its layer.
    ranks: dict[tuple[ParamPath, int | None], int] = {}
    for key, slot in pairs.items():
        path, _ = key
        for ab, other in (("A", "B"), ("B", "A")):
            if ab not in slot:
                raise CheckpointError(f"{file}: key {slot[other]!r} has no matching "
                                      f"lora_{ab} tensor")
        a_name, b_name = slot["A"], slot["B"]
        shape = expected[path].shape
        _, ins, outs = split_dims(path, len(shape))
        n_in = math.prod(shape[i] for i in ins)
        n_out = math.prod(shape[i] for i in outs)
        a_shape, b_shape = list(tensors[a_name][0]), list(tensors[b_name][0])
        if len(a_shape) != 2 or a_shape[1] != n_in:
            raise CheckpointError(f"{file}: key {a_name!r} has shape {a_shape}, expected "
                                  f"[rank, {n_in}] (rank, in_features)")
        if len(b_shape) != 2 or b_shape[0] != n_out:
            raise CheckpointError(f"{file}: key {b_name!r} has shape {b_shape}, expected "
                                  f"[{n_out}, rank] (out_features, rank)")
        if a_shape[0] != b_shape[1]:
            raise CheckpointError(
                f"{file}: keys {a_name!r} {a_shape} and {b_name!r} {b_shape} disagree on the "
                f"rank ({a_shape[0]} vs {b_shape[1]}): lora_A is [rank, in_features], lora_B "
                "[out_features, rank]")
        ranks[key] = a_shape[0]
    # Then one rank for every pair: the one most pairs have; the others are named.
    counts = collections.Counter(ranks.values())
    rank = counts.most_common(1)[0][0]
    odd = [pairs[k]["A"] for k, r in ranks.items() if r != rank]
    if odd:
        example = next(pairs[k]["A"] for k, r in ranks.items() if r == rank)
        listed = ", ".join(f"{n!r} has rank {tensors[n][0][0]}" for n in odd[:4])
        raise CheckpointError(
            f"{file}: key {listed}{' ...' if len(odd) > 4 else ''} but {example!r} (and "
            f"{counts[rank] - 1} other pairs) have rank {rank}; all LoRA pairs must share one "
            "rank")
    if cfg_rank is not None and rank != cfg_rank:
        first = next(iter(pairs.values()))["A"]
        raise ConfigError(f"{file}: key {first!r} has rank {rank} but {cfg_source} says "
                          f"rank {cfg_rank}")
    flat: dict[ParamPath, np.ndarray] = {}
    for key, slot in pairs.items():
        path, expert = key
        a_name, b_name = slot["A"], slot["B"]
        shape = expected[path].shape
        lead, ins, _ = split_dims(path, len(shape))
        A = tensors[a_name][2].astype(np.float32)
        B = tensors[b_name][2].astype(np.float32) * np.float32(scale)
        transform = targets[key].transform
        if len(ins) == 1:  # one input dim: A^T is [in, r]; B moves like a weight with r inputs
            a, b = A.T, transform(B)
        else:  # one output dim (wo): A moves like a weight with r outputs; B^T is [r, out]
            a, b = transform(A), B.T
        a_path, b_path = sibling(path, "lora_a"), sibling(path, "lora_b")
        if expert is None:
            flat[a_path], flat[b_path] = a, b
        else:  # stacked experts: experts the adapter leaves out get zeros
            e = shape[lead[0]]
            flat.setdefault(a_path, np.zeros((e, *a.shape), np.float32))[expert] = a
            flat.setdefault(b_path, np.zeros((e, *b.shape), np.float32))[expert] = b
    return unflatten({p: jnp.asarray(v, dtype) for p, v in flat.items()})


# ---------------------------------------------------------------------------------------------
# Using an adapter.


def is_lora_leaf(path: ParamPath) -> bool:
    """Whether a param path is an unmerged adapter leaf (`lora_a`, `w1_lora_b`, ...)."""
    return any(path[-1] == leaf or path[-1].endswith("_" + leaf) for leaf in LORA_LEAVES)


def detach_lora(params):
    """params without any unmerged LoRA leaves (the base model)."""
    return unflatten({p: v for p, v in flatten(params).items() if not is_lora_leaf(p)})


def attach_lora(params, adapter):
    """Unmerged mode: params with the adapter's lora_a/lora_b leaves (any previous
    adapter's removed). The base arrays are shared, not copied."""
    flat = flatten(detach_lora(params))
    for path, v in flatten(adapter).items():
        owner = [k for k in (path[:-1] + ("kernel",),
                             path[:-1] + (path[-1].rsplit("_lora_", 1)[0],)) if k in flat]
        if not owner:
            raise UserInputError(f"adapter leaf {'/'.join(path)} has no weight in these params")
        flat[path] = v
    return unflatten(flat)


def lora_delta(a: jax.Array, b: jax.Array, n_lead: int = 0) -> jax.Array:
    """The weight delta of an adapter: a [lead..., in..., r], b [lead..., r, out...] ->
    [lead..., in..., out...] in float32 (scaling is already in b)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    fn = lambda x, y: jnp.tensordot(x, y, axes=1)  # noqa: E731
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn(a, b)


def lora_einsum(eqn: str, n_in: int, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The unmerged adapter's output for a Linear of einsum `eqn` with `n_in` input dims:
    (x @ a) @ b, x [..., in...], a [in..., r], b [r, out...] -> [..., out...] in x.dtype."""
    inputs, out = eqn.replace(" ", "").split("->")
    xs, ks = inputs.split(",")
    r = next(c for c in "rzyqpo" if c not in eqn)
    k_in, k_out = ks[:n_in], ks[n_in:]
    xb = "".join(c for c in xs if c not in k_in)
    h = jnp.einsum(f"{xs},{k_in}{r}->{xb}{r}", x, a.astype(x.dtype))
    return jnp.einsum(f"{xb}{r},{r}{k_out}->{out}", h, b.astype(x.dtype))


def merge_leaf(path: ParamPath, w, adapter_flat: dict[ParamPath, Any], scale=None):
    """One weight with its adapter's delta added: returns (w, scale).

    Quantized weights (`scale` given) are dequantized, merged and requantized per
    output channel in their storage dtype. numpy inputs are merged on the host CPU.
    """
    a_path, b_path = sibling(path, "lora_a"), sibling(path, "lora_b")
    if a_path not in adapter_flat:
        return w, scale
    a, b = adapter_flat[a_path], adapter_flat[b_path]
    lead, ins, _ = split_dims(path, np.ndim(w))
    if isinstance(w, np.ndarray):
        return on_host(functools.partial(_merge, n_lead=len(lead), ins=ins), w, np.asarray(a),
                       np.asarray(b), scale)
    return _merge(w, a, b, scale, n_lead=len(lead), ins=ins)


@functools.partial(jax.jit, static_argnames=("n_lead", "ins"))
def _merge(w, a, b, scale, *, n_lead: int, ins: tuple[int, ...]):
    delta = lora_delta(a, b, n_lead)
    if scale is None:
        return (w.astype(jnp.float32) + delta).astype(w.dtype), None
    mode = resolve_mode("int8" if jnp.dtype(w.dtype) == jnp.int8 else "fp8")
    return quantize_array(dequantize(w, scale, ins) + delta, mode, ins)


def merge_lora(params, adapter):
    """Merged mode: params whose kernels hold W + scaling * B @ A (no lora leaves)."""
    flat, ad = flatten(params), flatten(adapter)
    for path, w in list(flat.items()):
        if is_linear_weight(path, np.ndim(w)) and sibling(path, "lora_a") in ad:
            s_path = sibling(path, "scale")
            scale = flat.get(s_path) if is_quantized(w) else None
            flat[path], new_scale = merge_leaf(path, w, ad, scale)
            if scale is not None:
                flat[s_path] = new_scale
    return unflatten(flat)


def load_hooks(folder: Path, args: ModelArgs, dtype, *, lora_path=None, lora_merge=None,
               lora_scaling=None, quantize=None, prequantized: str | None = None):
    """What `Transformer.from_folder` does around `checkpoint.load_params` for LoRA and
    quantization: returns (finish, post) where `finish(path, host_array)` merges the
    adapter into each weight and then quantizes it as it is read, and `post(params)`
    attaches an unmerged adapter (or merges into an already quantized checkpoint).

    `lora_merge=None` merges unless the folder's params.json has a lora block, which,
    as in mistral-inference, asks for the adapter to stay unmerged. `prequantized` names
    how the weights are already stored quantized; None: `convert.folder_quantization`.
    """
    from mistral_jax.convert import folder_quantization
    from mistral_jax.quant import quantize_leaf

    if prequantized is None:
        prequantized = folder_quantization(folder)
    if quantize is not None:
        resolve_mode(quantize)
        if prequantized:
            raise UserInputError(f"{folder}: the checkpoint is already quantized "
                                 f"({prequantized}); load it without quantize=")
    adapter = None if lora_path is None else load_lora(lora_path, args, dtype=dtype,
                                                       scaling=lora_scaling)
    merge = adapter is not None and (args.lora is None if lora_merge is None else lora_merge)
    ad = {} if prequantized or not merge else flatten(adapter)  # merged as each weight loads

    def finish(path, w):
        if ad and is_linear_weight(path, w.ndim):
            w, _ = merge_leaf(path, w, ad)
        return quantize_leaf(path, w, quantize) if quantize is not None else {path: w}

    def post(params):
        if adapter is None:
            return params
        if not merge:
            return attach_lora(params, adapter)
        return merge_lora(params, adapter) if prequantized else params

    return (finish if ad or quantize is not None else None), post


def finish_params(params, finish):
    """Apply a `load_hooks` finish to every leaf of an already loaded params tree."""
    if finish is None:
        return params
    out = {}
    for path, w in flatten(params).items():
        out.update(finish(path, w))
    return unflatten(out)
