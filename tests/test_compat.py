"""mistral-inference's `Transformer.from_folder` keywords: accepted where they mean something
here, else refused with one sentence saying what to do instead (no TypeError)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import mistral_jax
from mistral_jax.errors import UserInputError
from mistral_jax.transformer import Transformer

DEMO = Path(mistral_jax.__file__).parent / "demo_model"


def test_mistral_inference_keywords_with_a_meaning_here_load_the_same_model():
    torch = pytest.importorskip("torch")
    plain = Transformer.from_folder(DEMO, dtype="float32")
    # as mistral-inference's client code writes it (its defaults: device="cuda", which is
    # JAX's default backend on a GPU machine; here the CPU)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    model = Transformer.from_folder(DEMO, max_batch_size=3, num_pipeline_ranks=1, device=device,
                                    dtype=torch.float32, softmax_fp32=True)
    assert model.dtype == np.float32
    tokens = np.array([[1, 1183, 9857]])
    np.testing.assert_array_equal(model.logits(tokens), plain.logits(tokens))
    Transformer.from_folder(DEMO, dtype="float32", device=torch.device(device))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_pipeline_ranks=2), "num_pipeline_ranks=2: pipeline parallelism is not "
     "implemented; shard the model over devices instead with mesh='tensor=2'"),
    (dict(num_pipeline_ranks=0), "num_pipeline_ranks must be a positive integer, got 0"),
    (dict(max_batch_size=0), "max_batch_size must be a positive integer, got 0"),
    (dict(softmax_fp32=False), "softmax is always computed in float32 here; leave "
     "softmax_fp32 out"),
    (dict(device="mps"), "device='mps' is not a device name mistral_jax knows: pass 'cpu' "
     "or 'cuda'"),
    (dict(device="cpu:1"), "CUDA_VISIBLE_DEVICES=1"),
    (dict(pipeline_rank=0), "unexpected keyword(s) pipeline_rank: it takes dtype, "
     "max_batch_size"),
])
def test_keywords_without_a_meaning_here_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(UserInputError) as e:
        Transformer.from_folder(DEMO, dtype="float32", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_says_how_to_get_one():
    with pytest.raises(UserInputError, match=r"device='cuda', but JAX's default backend here is "
                       r"cpu.*the cuda12/cuda13 extra for NVIDIA GPUs"):
        Transformer.from_folder(DEMO, device="cuda")


def test_model_args_overrides_still_work_and_typos_are_named():
    model = Transformer.from_folder(DEMO, dtype="float32", rope_theta=1e4)
    assert model.args.rope_theta == 1e4
    with pytest.raises(UserInputError, match="unexpected keyword.*rope_thetta.*ModelArgs fields"):
        Transformer.from_folder(DEMO, rope_thetta=1e4)
