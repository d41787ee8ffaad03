"""mistral-inference's `Transformer.from_folder` keywords, read for what they mean here.

Client code written for mistral-inference calls
`Transformer.from_folder(path, max_batch_size=3, num_pipeline_ranks=1, device="cuda",
dtype=torch.bfloat16, softmax_fp32=True)`. What has a meaning in JAX is accepted; what does
not is refused with one sentence saying what to do instead (a UserInputError, never a
TypeError from inside ModelArgs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mistral_jax.args import ModelArgs
from mistral_jax.errors import UserInputError

# mistral-inference's device names -> JAX's platform names.
DEVICE_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}
FROM_FOLDER_KEYWORDS = ("dtype", "max_batch_size", "progress", "lora_path", "lora_merge",
                        "lora_scaling", "quantize", "mesh", "num_pipeline_ranks", "device",
                        "softmax_fp32")


def torch_dtype_name(dtype: Any) -> Any:
    """torch.bfloat16 (mistral-inference's dtype argument) -> 'bfloat16'; anything else as is."""
    text = str(dtype)
    return text.removeprefix("torch.") if text.startswith("torch.") else dtype


def check_device(device: Any) -> None:
    """Accepts None, or a device ('cpu', 'cuda', 'cuda:0', a torch.device) on JAX's default
    backend, which is where the weights go; refuses any other with what to do instead."""
    if device is None:
        return
    kind, _, index = str(device).lower().partition(":")
    backend = jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    if kind not in DEVICE_PLATFORMS:
        raise UserInputError(f"device={device!r} is not a device name mistral_jax knows: pass "
                             f"'cpu' or 'cuda', or leave it out (JAX's default backend here "
                             f"is {backend})")
    if DEVICE_PLATFORMS[kind] != backend:
        raise UserInputError(
            f"device={device!r}, but JAX's default backend here is {backend}, where the weights "
            "go: leave device out, or choose the backend before JAX starts (JAX_PLATFORMS=cpu "
            "for the CPU; the cuda12/cuda13 extra for NVIDIA GPUs)")
    if index not in ("", "0"):
        raise UserInputError(
            f"device={device!r}: the weights go on the first device, or are sharded over "
            f"mesh=; to use another GPU alone, start with CUDA_VISIBLE_DEVICES={index}")


def check_from_folder_keywords(*, max_batch_size: Any, num_pipeline_ranks: Any, device: Any,
                               softmax_fp32: Any, overrides: dict[str, Any]) -> None:
    """Raises UserInputError for a mistral-inference keyword that has no meaning here, or a
    keyword that is neither one of `from_folder`'s nor a ModelArgs field to override."""
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserInputError(
            f"Transformer.from_folder got unexpected keyword(s) {', '.join(unknown)}: it takes "
            f"{', '.join(FROM_FOLDER_KEYWORDS)}, and ModelArgs fields to override "
            f"({', '.join(sorted(fields))})")
    for name, value in (("max_batch_size", max_batch_size),
                        ("num_pipeline_ranks", num_pipeline_ranks)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    if num_pipeline_ranks not in (None, 1):
        raise UserInputError(
            f"num_pipeline_ranks={num_pipeline_ranks}: pipeline parallelism is not implemented; "
            f"shard the model over devices instead with mesh='tensor={num_pipeline_ranks}' "
            "(or mesh='auto' for every device)")
    if softmax_fp32 is not True:
        raise UserInputError(f"softmax_fp32={softmax_fp32!r}: attention's softmax is always "
                             "computed in float32 here; leave softmax_fp32 out")
    check_device(device)
