"""Tiny random models written to disk in the real folder layouts, and the PyTorch reference.

Weights are drawn in Mistral's own (interleaved-rotary) layout; the HF layout is
derived with the same q/k permutation transformers' conversion script applies, so
the two loaders are checked independently against transformers' implementation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mistral_jax.args import ModelArgs, MoeArgs
from mistral_jax.config import args_to_params_json


def tiny_args(**overrides) -> ModelArgs:
    kw = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
              norm_eps=1e-5, vocab_size=32000, rope_theta=1e6, sliding_window=None)
    kw.update(overrides)
    return ModelArgs(**kw)


def tiny_moe_args(**overrides) -> ModelArgs:
    kw = dict(moe=MoeArgs(num_experts=4, num_experts_per_tok=2), vocab_size=512)
    kw.update(overrides)
    return tiny_args(**kw)


def random_mistral_state(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with Mistral checkpoint names and [out, in] shapes."""
    rng = np.random.default_rng(seed)
    d, hd, f = args.dim, args.head_dim, args.hidden_dim

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    state = {"tok_embeddings.weight": w(args.vocab_size, d), "norm.weight": norm(),
             "output.weight": w(args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state[p + "attention.wq.weight"] = w(args.n_heads * hd, d)
        state[p + "attention.wk.weight"] = w(args.n_kv_heads * hd, d)
        state[p + "attention.wv.weight"] = w(args.n_kv_heads * hd, d)
        state[p + "attention.wo.weight"] = w(d, args.n_heads * hd)
        state[p + "attention_norm.weight"] = norm()
        state[p + "ffn_norm.weight"] = norm()
        if args.moe is None:
            ffn = {"w1": w(f, d), "w2": w(d, f), "w3": w(f, d)}
        else:
            state[p + "feed_forward.gate.weight"] = w(args.moe.num_experts, d)
            ffn = {f"experts.{e}.{n}": w(*s) for e in range(args.moe.num_experts)
                   for n, s in (("w1", (f, d)), ("w2", (d, f)), ("w3", (f, d)))}
        for k, v in ffn.items():
            state[p + f"feed_forward.{k}.weight"] = v
    return state


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' convert_mistral_weights_to_hf `permute`: interleaved -> rotate-half rows."""
    dim1, dim2 = w.shape
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(dim1, dim2)


def mistral_to_hf_state(state: dict[str, np.ndarray], args: ModelArgs) -> dict[str, np.ndarray]:
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    sub = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
           "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
           "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
           "feed_forward.w3": "mlp.up_proj", "feed_forward.gate": "block_sparse_moe.gate",
           "feed_forward.experts": "block_sparse_moe.experts"}
    out = {}
    for name, w in state.items():
        if name in top:
            out[top[name]] = w
            continue
        _, i, rest = name.split(".", 2)
        for old, new in sub.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        if rest.startswith("self_attn.q_proj"):
            w = hf_permute(w, args.n_heads)
        elif rest.startswith("self_attn.k_proj"):
            w = hf_permute(w, args.n_kv_heads)
        out[f"model.layers.{i}.{rest}"] = w
    return out


def write_mistral_folder(folder: Path, args: ModelArgs, state: dict[str, np.ndarray],
                         dtype=np.float32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(args_to_params_json(args), indent=2))
    save_file({k: v.astype(dtype) for k, v in state.items()}, folder / "consolidated.safetensors")
    return folder


def hf_config(args: ModelArgs) -> dict:
    """A MistralForCausalLM / MixtralForCausalLM config.json for args, float32."""
    from mistral_jax.bench.vs_transformers import hf_config_dict

    return hf_config_dict(args, "float32")


def write_hf_folder(folder: Path, args: ModelArgs, state: dict[str, np.ndarray], shards: int = 2,
                    dtype=np.float32) -> Path:
    """HF layout: config.json + model-0000N-of-0000M.safetensors + index json."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = mistral_to_hf_state(state, args)
    (folder / "config.json").write_text(json.dumps(hf_config(args), indent=2))
    names = sorted(hf)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: hf[k].astype(dtype) for k in part}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


def both_layouts(root: Path, args: ModelArgs, seed: int):
    """A random model written in both layouts, and transformers' model of the HF folder.

    Returns (state, mistral_folder, hf_folder, reference).
    """
    state = random_mistral_state(args, seed=seed)
    mistral = write_mistral_folder(root / "mistral", args, state)
    hf = write_hf_folder(root / "hf", args, state, shards=2)
    return state, mistral, hf, torch_reference(hf)


def torch_reference(hf_folder: Path):
    """transformers' own model loaded from the HF folder, float32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.atleast_2d(tokens), dtype=torch.long)).logits.numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def fake_devices_env(n: int = 8) -> dict[str, str]:
    """This process's environment with JAX on `n` fake CPU devices (XLA reads the flag
    when it starts, so it only takes effect in a new process)."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
            "JAX_PLATFORMS": "cpu"}


def run_on_cpu_devices(*argv: str, devices: int = 8, timeout: int = 600,
                       cwd: Path | None = None) -> str:
    """`python *argv` in a new process with `devices` fake CPU devices; asserts it exits 0
    (showing the end of its stderr otherwise) and returns its stdout."""
    proc = subprocess.run([sys.executable, *argv], env=fake_devices_env(devices), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
