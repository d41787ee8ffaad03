"""Fields of params.json / config.json that the model does not read: one warning each, with
the closest known name, never an error (a misspelt field would otherwise be left at its default)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mistral_jax
from mistral_jax import config as args_module
from mistral_jax.config import load_args
from mistral_jax.errors import ConfigError

PARAMS = {"dim": 32, "n_layers": 2, "head_dim": 8, "hidden_dim": 64, "n_heads": 4,
          "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": 128}
CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 32,
          "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 128,
          "num_local_experts": 4, "num_experts_per_tok": 1}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(args_module, "_WARNED", set())


def write(folder, name, cfg):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(cfg))
    return folder


def test_a_misspelt_params_json_field_is_named_with_the_closest_known_one_once(tmp_path, capsys):
    folder = write(tmp_path / "m", "params.json", {**PARAMS, "sliding_windw": 16})
    args, layout = load_args(folder)
    assert layout == "mistral" and args.sliding_window is None  # a warning, not an error
    err = capsys.readouterr().err
    assert err == (f"warning: {folder / 'params.json'}: field 'sliding_windw' is not read by "
                   "mistral_jax; did you mean 'sliding_window'?\n")
    load_args(folder)  # loading again (sample reads the args, then from_folder does) is quiet
    assert capsys.readouterr().err == ""


def test_a_misspelt_config_json_field_warns_and_the_default_applies(tmp_path, capsys):
    cfg = {k: v for k, v in CONFIG.items() if k != "num_experts_per_tok"}
    folder = write(tmp_path / "hf", "config.json", {**cfg, "num_expert_per_tok": 1})
    args, layout = load_args(folder)
    assert layout == "hf" and args.moe.num_experts_per_tok == 2  # transformers' default
    err = capsys.readouterr().err
    assert "field 'num_expert_per_tok' is not read" in err
    assert "did you mean 'num_experts_per_tok'?" in err and err.count("\n") == 1


def test_a_misspelt_field_in_the_moe_block_is_named_before_the_error(tmp_path, capsys):
    folder = write(tmp_path / "m", "params.json",
                   {**PARAMS, "moe": {"num_experts": 4, "num_expert_per_tok": 1}})
    with pytest.raises(ConfigError, match="missing required field 'num_experts_per_tok'"):
        load_args(folder)
    assert "did you mean 'moe.num_experts_per_tok'?" in capsys.readouterr().err


def test_unknown_field_without_a_close_name_and_known_fields(tmp_path, capsys):
    folder = write(tmp_path / "m", "params.json", {**PARAMS, "colour": "blue",
                                                   "max_batch_size": 3, "model_type": "transformer"})
    load_args(folder)
    err = capsys.readouterr().err
    assert "field 'colour' is not read by mistral_jax\n" in err and "did you mean" not in err
    assert "max_batch_size" not in err and "model_type" not in err


def test_configs_written_by_transformers_and_the_demo_model_load_without_warnings(
        tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    for name, config in (("mistral", transformers.MistralConfig), ("mixtral",
                                                                  transformers.MixtralConfig)):
        config(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128).save_pretrained(tmp_path / name)
        load_args(tmp_path / name)
    load_args(Path(mistral_jax.__file__).parent / "demo_model")
    assert capsys.readouterr().err == ""
