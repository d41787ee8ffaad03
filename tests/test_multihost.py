"""Two processes on localhost, 4 CPU devices each, joined by `jax.distributed.initialize`
(through `sharding.initialize_distributed`), run one MoE model over the 8-device mesh
tensor=4,expert=2: heads and hidden dims split inside each process, the experts split
across the two, so every MoE layer sums over both processes, and the logits and tokens
are gathered from both. They equal this process's single-device run. Each process
first runs the `sample` CLI with --mesh and the multi-host flags (the README's command),
which prints what one process prints alone.

CPU collectives across processes use gloo (JAX's default CPU collectives on Linux). The
run is bounded: both processes are killed after TIMEOUT_S and the test fails with
their output.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import fake_devices_env, random_mistral_state, rel_err, write_mistral_folder
from sharding_worker import MULTIHOST_MESHES, batch, run, sample_cli, tiny_models

from mistral_jax.transformer import Transformer

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process(tmp_path):
    args = dict(tiny_models())["moe"]
    folder = write_mistral_folder(tmp_path / "moe", args, random_mistral_state(args, 0))
    out = tmp_path / "out.json"
    env = fake_devices_env(4)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), "multihost", str(out), str(folder),
         "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"multi-process run exceeded {TIMEOUT_S}s:\n" + "\n".join(
            log[-3000:] for log in logs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]

    result = json.loads(out.read_text())
    assert (result["process_count"], result["device_count"],
            result["local_device_count"]) == (2, 8, 4)
    tokens, prompts = batch(args.vocab_size)
    reference = run(Transformer.from_folder(folder, dtype="float32"), tokens, prompts)
    assert set(result["runs"]) == set(MULTIHOST_MESHES)
    for spec, got in result["runs"].items():
        assert np.shape(got["logits"]) == np.shape(reference["logits"])
        assert rel_err(got["logits"], reference["logits"]) <= 1e-5, spec
        assert got["tokens"] == reference["tokens"], spec
    # `sample --mesh ... --coordinator ... --process-id i` on each process (the demo model)
    cli, one = result["cli"], sample_cli(None)
    assert cli["status"] == 0 == one["status"], cli["stderr"]
    assert cli["stdout"].strip() and cli["stdout"] == one["stdout"]
