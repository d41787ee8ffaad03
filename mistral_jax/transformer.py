"""`Transformer`: the model object users hold, mirroring mistral-inference's API.

    model = Transformer.from_folder(path, dtype="float32")
    logits = model.logits([[1, 2, 3]])          # [B, T, V] float32
    model.args, model.params                     # ModelArgs, plain pytree

The pure function underneath is `mistral_jax.model.forward`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.args import ModelArgs
from mistral_jax.cache import Cache, init_cache
from mistral_jax.compat import check_from_folder_keywords, torch_dtype_name
from mistral_jax.dtypes import resolve_dtype
from mistral_jax.errors import UserInputError
from mistral_jax.kernels import Kernels, default_kernels
from mistral_jax.load import load
from mistral_jax.mesh import (
    gather,
    init_cache_sharded,
    init_params_sharded,
    resolve_mesh,
    shard_batch,
)
from mistral_jax.model import causal_positions, check_inputs, check_positions, forward, init_params
from mistral_jax.partitioning import use_mesh


@functools.partial(jax.jit, static_argnames=("args", "kernels"))
def jit_forward(params, tokens, positions, cache, *, args, kernels=None):
    return forward(params, tokens, positions, cache, args=args, kernels=kernels)


class Transformer:
    """A model: its `args`, its `params` pytree, and convenience methods around `forward`."""

    def __init__(self, args: ModelArgs, params: Any, *, folder: Path | None = None,
                 mesh: jax.sharding.Mesh | None = None, kernels: Kernels | None = None):
        self.args = args
        self.params = params
        self.kernels = default_kernels() if kernels is None else kernels
        self.folder = folder
        self.mesh = mesh  # the params are sharded over it (mesh.py); None: one device
        self.load_seconds: float | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, *, dtype: Any = "bfloat16",
                    max_batch_size: int | None = None, progress: bool = False,
                    lora_path: str | Path | None = None, lora_merge: bool | None = None,
                    lora_scaling: float | None = None, quantize: str | None = None,
                    mesh: Any = None, kernels: Kernels | None = None,
                    num_pipeline_ranks: int = 1, device: Any = None,
                    softmax_fp32: bool = True, **arg_overrides: Any) -> Transformer:
        """Load a Mistral-layout, HF-layout or converted (`mistral-jax-convert`) model folder.

        `arg_overrides` replace fields of the folder's args (e.g. `rope_theta=1e4` for
        Mistral 7B v0.1 in the Mistral layout). mistral-inference's keywords (compat.py):
        `max_batch_size` is accepted and unused (caches are sized per call);
        `num_pipeline_ranks` must be 1 (use `mesh` to shard); `device` ('cpu', 'cuda', a
        torch.device) must name JAX's default backend, where the weights go; `dtype` may be
        a torch dtype; `softmax_fp32` must be True (it always is here). Anything else is a
        UserInputError saying what to do instead.
        `lora_path`: a LoRA adapter file or folder (lora.py), merged into the weights
        unless `lora_merge=False` (by default unmerged only when the folder's params.json
        has a lora block, as in mistral-inference); `lora_scaling` overrides its scaling.
        `quantize`: 'int8', 'fp8' or 'fp8-tensor' quantizes the weights as they load
        (quantize.py); compressed-tensors int8/fp8 checkpoints, and folders converted with
        `mistral-jax-convert --quantize` or from such checkpoints, load quantized without
        it (and refuse it: UserInputError); `dtype` then applies to the other leaves.
        `dtype`: bfloat16 (mistral-inference's default), float16, float32 or 'auto'
        (`auto_dtype`: float32 on a CPU).
        `mesh`: a `jax.sharding.Mesh` with axes data/tensor/expert, a spec such as
        'tensor=4,expert=2', or 'auto' (every device along tensor); each weight is then
        placed straight onto its shards (mesh.py). None: the default device.
        `kernels`: which implementations `forward` runs (kernels.py); None:
        `default_kernels()`.
        """
        check_from_folder_keywords(max_batch_size=max_batch_size,
                                   num_pipeline_ranks=num_pipeline_ranks, device=device,
                                   softmax_fp32=softmax_fp32, overrides=arg_overrides)
        folder = Path(folder)
        start = time.perf_counter()
        mesh = resolve_mesh(mesh)
        args, params = load(folder, dtype=resolve_dtype(torch_dtype_name(dtype)), mesh=mesh,
                            progress=progress, lora_path=lora_path, lora_merge=lora_merge,
                            lora_scaling=lora_scaling, quantize=quantize, **arg_overrides)
        model = cls(args, params, folder=folder, mesh=mesh, kernels=kernels)
        model.load_seconds = time.perf_counter() - start
        return model

    @classmethod
    def random(cls, args: ModelArgs, *, seed: int = 0, dtype: Any = "float32",
               mesh: Any = None, kernels: Kernels | None = None) -> Transformer:
        """A model with random weights (tests, benchmarks), computed into its shards on `mesh`."""
        mesh = resolve_mesh(mesh)
        if mesh is None:
            return cls(args, init_params(args, seed, resolve_dtype(dtype)), kernels=kernels)
        params = init_params_sharded(args, mesh, seed, resolve_dtype(dtype))
        return cls(args, params, mesh=mesh, kernels=kernels)

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embedding"].dtype

    def init_cache(self, batch_size: int, max_seq_len: int) -> Cache:
        if self.mesh is not None:  # batch along data, KV heads along tensor
            return init_cache_sharded(self.args, self.mesh, batch_size, max_seq_len,
                                               self.dtype)
        return init_cache(self.args, batch_size, max_seq_len, self.dtype)

    def forward(self, tokens, positions, cache: Cache | None = None):
        """Jitted `model.forward`: tokens, positions [B, T] -> (logits [B, T, V], cache)."""
        tokens, positions = (a if isinstance(a, jax.Array) else np.asarray(a)
                             for a in (tokens, positions))
        check_inputs(tokens, positions, cache, self.args)  # before the int32 casts below
        check_positions(positions, cache, self.args)  # values: outside the jit below
        if self.mesh is not None:  # rows along data; traced under the mesh (partitioning.py)
            tokens, positions = shard_batch(
                self.mesh, np.asarray(tokens, np.int32), np.asarray(positions, np.int32))
            with use_mesh(self.mesh):
                return jit_forward(self.params, tokens, positions, cache, args=self.args,
                                   kernels=self.kernels)
        return jit_forward(self.params, jnp.asarray(tokens, jnp.int32),
                           jnp.asarray(positions, jnp.int32), cache, args=self.args,
                           kernels=self.kernels)

    def logits(self, tokens, seqlens: list[int] | None = None) -> jax.Array:
        """Full causal forward -> float32 logits: tokens [B, T] -> [B, T, V], [T] -> [T, V].

        With `seqlens` (mistral-inference's `forward(input_ids, seqlens)`): tokens are the
        sequences concatenated, [sum(seqlens)], each attending only within itself; returns
        the concatenated [sum(seqlens), V].
        """
        arr = _token_array(tokens, self.args.vocab_size)
        if seqlens is not None:
            lens = [int(n) for n in np.asarray(seqlens).reshape(-1)]
            if arr.ndim != 1 or not lens or min(lens) < 1 or sum(lens) != arr.shape[0]:
                raise UserInputError(
                    f"with seqlens, tokens must be 1-D and seqlens positive lengths summing to "
                    f"its length; got tokens of shape {arr.shape} and seqlens {lens}")
            starts = np.cumsum([0, *lens[:-1]])
            batch = np.zeros((len(lens), max(lens)), np.int32)
            positions = np.full(batch.shape, -1, np.int32)  # -1: right padding
            for row, (s, n) in enumerate(zip(starts, lens)):
                batch[row, :n], positions[row, :n] = arr[s:s + n], np.arange(n)
            logits, _ = self.forward(batch, positions, None)
            logits = self._gathered(logits)
            return jnp.concatenate([logits[row, :n] for row, n in enumerate(lens)])
        batch = jnp.asarray(np.atleast_2d(arr), jnp.int32)
        logits = self._gathered(self.forward(batch, causal_positions(batch), None)[0])
        return logits[0] if arr.ndim == 1 else logits

    @staticmethod
    def _gathered(logits: jax.Array) -> jax.Array:
        if not logits.is_fully_addressable:  # multi-host: every process gets all the logits
            logits = jnp.asarray(gather(logits))
        return logits


def _token_array(tokens, vocab_size: int) -> np.ndarray:
    """tokens as a non-empty integer [T] or [B, T] numpy array of ids in [0, vocab_size);
    else a UserInputError saying what is wrong (rows of different lengths, float ids ...)."""
    try:
        arr = np.asarray(tokens)
    except ValueError:
        raise UserInputError(
            "tokens must be one [T] or [B, T] array; rows of different lengths: concatenate "
            "them and pass seqlens=, pad them (forward with positions -1), or use generate()"
        ) from None
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise UserInputError(f"tokens must be a non-empty [T] or [B, T] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserInputError(f"tokens must be integer ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise UserInputError(f"token ids must be in [0, vocab_size={vocab_size})")
    return arr
