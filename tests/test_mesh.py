"""Device meshes, multi-host start and the shared backbone.

The sharded tests need several devices, which JAX fixes when it starts: they run
in fresh processes with ``--xla_force_host_platform_device_count`` (8 simulated
CPU devices) or as two real processes joined by ``jax.distributed``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, adapter_weights
from tracetune import mesh as mesh_lib
from tracetune.config import ConfigError, MeshConfig, load_config, mesh_preset_names
from tracetune.errors import TrainingError

# ------------------------------------------------------------------ config


def test_mesh_presets_set_the_shape_and_overrides_win():
    assert set(mesh_preset_names()) >= {"v5e-8", "gpu-1", "gpu-8", "pod"}
    assert (load_config("recipe-1b", mesh="v5e-8").mesh.fsdp, load_config("recipe-1b", mesh="v5e-8").mesh.tp) == (8, 1)
    assert load_config("recipe-1b", mesh="gpu-1").mesh == MeshConfig()
    assert load_config("recipe-1b", mesh="pod").mesh == MeshConfig(fsdp=-1, tp=1, distributed="on")
    mixed = load_config("recipe-1b", ["mesh.fsdp=2", "mesh.tp=4"], mesh="gpu-8").mesh
    assert (mixed.fsdp, mixed.tp) == (2, 4)
    # The mesh preset only touches the mesh: the recipe stays the recipe.
    assert load_config("recipe-1b", mesh="v5e-8").sft == load_config("recipe-1b").sft


@pytest.mark.parametrize("overrides, message", [
    (["mesh.fsdp=0"], "mesh.fsdp must be >= 1 or -1"),
    (["mesh.tp=0"], "mesh.tp >= 1"),
    (["mesh.distributed=maybe"], "mesh.distributed must be"),
])
def test_bad_mesh_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_an_unknown_mesh_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown mesh preset 'v4-2048'; known: gpu-1, gpu-8, pod, v5e-8"):
        load_config("tiny", mesh="v4-2048")


def test_mesh_shape_fills_fsdp_and_refuses_too_many_devices():
    assert mesh_lib.mesh_shape(MeshConfig(fsdp=-1, tp=4), 8) == (2, 4)
    assert mesh_lib.mesh_shape(MeshConfig(fsdp=2, tp=1), 8) == (2, 1)  # a mesh smaller than the machine
    with pytest.raises(ConfigError, match=r"mesh.fsdp=8 x mesh.tp=1 needs 8 devices, but this process sees 1"):
        mesh_lib.mesh_shape(MeshConfig(fsdp=8), 1)
    with pytest.raises(ConfigError, match="needs 4 devices"):
        mesh_lib.mesh_shape(MeshConfig(fsdp=-1, tp=4), 2)


def test_batches_and_heads_must_divide_over_the_mesh():
    mesh = SimpleNamespace(shape={"fsdp": 8, "tp": 4})
    mesh_lib.check_batch(mesh, 32, "sft.micro_batch_size")
    with pytest.raises(ConfigError, match="sft.micro_batch_size gives batches of 4 rows, which must be a multiple of mesh.fsdp=8"):
        mesh_lib.check_batch(mesh, 4, "sft.micro_batch_size")
    mesh_lib.check_heads(mesh, 8, "gemma3-4b-it")
    with pytest.raises(ConfigError, match="mesh.tp=4 must divide the 6 attention heads of m"):
        mesh_lib.check_heads(mesh, 6, "m")


def test_a_run_with_a_mesh_larger_than_the_machine_stops_before_loading_data(tmp_path):
    from tracetune.sft import train_sft

    with pytest.raises(ConfigError, match="needs 8 devices, but this process sees 1"):
        train_sft(load_config("tiny", ["mesh.fsdp=8", "sft.max_steps=1"]), tmp_path / "run")


# -------------------------------------------------------------- multi-host


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0"}, None),  # one TPU host: nothing to join
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, "a TPU pod slice of 4 hosts"),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "16"}, "Slurm with 16 tasks"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI with 2 tasks"),
])
def test_the_environment_decides_whether_to_join_a_multi_host_run(env, expected):
    found = mesh_lib.cluster_requested(env)
    assert (found is None) if expected is None else expected in found
    if expected is None:  # "auto" with nothing to join: a single process, nothing initialized
        assert mesh_lib.initialize(MeshConfig(), env) is False
    assert mesh_lib.initialize(MeshConfig(distributed="off"), env) is False


def test_a_coordinator_without_process_count_is_a_clear_error():
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}
    with pytest.raises(ConfigError, match="so JAX_PROCESS_ID must be a non-negative integer too; got ''"):
        mesh_lib.initialize(MeshConfig(), env)


def test_host_id_comes_from_the_launcher():
    assert mesh_lib.host_id({}) == 0
    assert mesh_lib.host_id({"JAX_PROCESS_ID": "3"}) == 3
    assert mesh_lib.host_id({"TPU_WORKER_ID": "1"}) == 1
    assert mesh_lib.host_id({"SLURM_PROCID": "5"}) == 5


def test_hosts_split_every_batch_into_contiguous_equal_shares():
    rows = list(range(12))
    shares = [mesh_lib.host_share(rows, p, 3) for p in range(3)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    array = np.arange(12).reshape(6, 2)
    assert mesh_lib.host_share(array, 1, 2).tolist() == [[6, 7], [8, 9], [10, 11]]
    with pytest.raises(ConfigError, match="a batch of 12 rows cannot be split evenly across 5 hosts"):
        mesh_lib.host_share(rows, 0, 5)


def test_each_host_feeds_its_share_of_the_sft_micro_batch(monkeypatch):
    """Two hosts' SFT batches, stacked, are the one-host batch (same width: padding
    follows the whole micro-batch, not the host's rows)."""
    from tracetune.runs import StopFlag
    from tracetune.sft import Batches, Tokenized

    config = load_config("tiny", ["sft.micro_batch_size=4", "sft.batch_size=4", "sft.pad_multiple=1"]).sft
    rng = np.random.default_rng(0)
    examples = [Tokenized(rng.integers(3, 50, size=int(n)).astype(np.int32), 2) for n in rng.integers(5, 40, size=16)]

    def batches(index: int, count: int) -> list[dict]:
        monkeypatch.setattr(mesh_lib.jax, "process_index", lambda: index)
        monkeypatch.setattr(mesh_lib.jax, "process_count", lambda: count)
        return list(Batches(examples, config, 0, 6, StopFlag()))

    whole, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
    for w, a, b in zip(whole, first, second, strict=True):
        for key in ("tokens", "loss_mask"):
            assert a[key].shape == b[key].shape == (2, w[key].shape[1])
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])


def test_each_host_feeds_its_share_of_the_grpo_prompts(monkeypatch):
    from tracetune.data import Example
    from tracetune.grpo import PromptBatches
    from tracetune.runs import StopFlag

    examples = [Example(f"q{i}", f"What is {i} + 1?", str(i + 1)) for i in range(20)]

    def references(index: int, count: int) -> list[list[str]]:
        monkeypatch.setattr(mesh_lib.jax, "process_index", lambda: index)
        monkeypatch.setattr(mesh_lib.jax, "process_count", lambda: count)
        stream = PromptBatches(examples, 4, 7, "plain", StopFlag())
        return [b["reference"].tolist() for b, _ in zip(stream, range(6))]

    whole, first, second = references(0, 1), references(0, 2), references(1, 2)
    assert [a + b for a, b in zip(first, second)] == whole


# ---------------------------------------------------------- shared backbone


def test_the_backbone_check_passes_one_copy_and_stops_two():
    """lora_on_mesh puts the adapters on the reference's own weights; a LoRA model
    built on another copy (what resharding in the wrong order does) is refused."""
    import jax

    from tracetune.grpo import check_shared_backbone
    from tracetune.models.registry import load_model
    from tracetune.lora import apply_lora, lora_on_mesh

    config = load_config("tiny").grpo.lora
    mesh = mesh_lib.make_mesh(MeshConfig())

    def cluster(actor, reference):
        return SimpleNamespace(actor_trainer=SimpleNamespace(model=actor),
                               inference_worker=SimpleNamespace(get_model=lambda role: reference),
                               rollout=SimpleNamespace(model=lambda: actor))

    reference, actor = lora_on_mesh(load_model("tiny").model, config, 0, mesh)
    check_shared_backbone(cluster(actor, reference))
    with jax.set_mesh(mesh):
        separate = apply_lora(load_model("tiny").model, config, 0)  # equal values, other arrays
    with pytest.raises(TrainingError, match="the actor and the reference hold separate copies of the base weights"):
        check_shared_backbone(cluster(separate, reference))


# ------------------------------------------------------- sharded equivalence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_sft_and_grpo_steps_match_one_device(tmp_path):
    """On 8 simulated CPU devices, SFT and GRPO with (8, 1) and (2, 4) meshes give the
    losses and rewards of one device; the weights really are split 8 ways; and actor,
    reference and rollout still share one backbone after training (Tunix's step hands
    back fresh arrays for the frozen base: the cluster re-points them)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_steps.py"), str(tmp_path), "1x1", "8x1", "2x4"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    one = result["meshes"]["1x1"]
    assert len(one["sft_loss"]) == 4 and one["sft_loss"][-1] < one["sft_loss"][0]
    assert one["embedding_shards"] == 1
    for name in ("8x1", "2x4"):
        run = result["meshes"][name]
        np.testing.assert_allclose(run["sft_loss"], one["sft_loss"], rtol=1e-5)
        np.testing.assert_allclose(run["grpo_reward"], one["grpo_reward"], atol=1e-6)
        np.testing.assert_allclose([x for x in run["grpo_loss"] if x is not None],
                                   [x for x in one["grpo_loss"] if x is not None], rtol=1e-3, atol=1e-6)
        assert run["embedding_shards"] == 8, name
    for name, run in result["meshes"].items():
        assert run["shared_reference"] and run["shared_rollout"], name


@pytest.mark.slow
def test_two_processes_train_one_sft_run_like_one_process(tmp_path):
    """Two real processes joined by jax.distributed (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID), one CPU device each, one run directory:
    each feeds half of every batch, and the run equals a single process's."""
    settings = ["--preset", "tiny", "--set", "sft.max_steps=3", "--set", "sft.eval_every_steps=0",
                "--set", "sft.eval_examples=0", "--set", "sft.checkpoint_steps=0"]
    base = [sys.executable, "-m", "tracetune.cli", "sft"]
    single = subprocess.run([*base, "--run-dir", str(tmp_path / "one"), *settings], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]

    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    hosts = [subprocess.Popen([*base, "--run-dir", str(tmp_path / "two"), *settings, "--mesh", "pod"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    outputs = [host.communicate(timeout=600) for host in hosts]
    for host, (_, err) in zip(hosts, outputs):
        assert host.returncode == 0, err[-3000:]
    assert "host 1 of 2, 2 devices in all" in outputs[1][1]
    assert "mesh fsdp=2 x tp=1 on 2 cpu devices (2 hosts)" in outputs[0][1]

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    # One metrics file, written once (by host 0), with the single process's losses.
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    one, two = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:  # Adam's normalised steps carry the gradients' float32 summation-order noise
        np.testing.assert_allclose(two[key], one[key], rtol=1e-3, atol=1e-4)
    assert (tmp_path / "two" / "export" / "merged").is_dir()


# ------------------------------------------------------------ rollout engine


def test_vanilla_is_the_default_rollout_engine_and_vllm_needs_vllm():
    import importlib.util

    from tracetune.grpo import vllm_settings
    from tracetune.models.registry import load_model

    assert load_config("recipe-1b").grpo.rollout_engine == "vanilla"
    assert load_config("cpu-demo").grpo.rollout_engine == "tracetune"  # measured faster on CPU
    config = load_config("tiny", ["grpo.rollout_engine=vllm"]).grpo
    mesh = SimpleNamespace(shape={"fsdp": 2, "tp": 4})
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"grpo.rollout_engine=vllm needs vLLM \(pip install vllm"):
            vllm_settings(config, load_model("tiny"), mesh)
    else:  # where vLLM is installed: the architecture id and the mesh's layout reach Tunix
        settings = vllm_settings(load_config("tiny", ["grpo.rollout_engine=vllm", "grpo.vllm_model=google/gemma-3-1b-it"]).grpo,
                                 load_model("tiny"), mesh)
        assert settings["rollout_vllm_model_version"] == "google/gemma-3-1b-it"
        assert (settings["data_parallel_size"], settings["tensor_parallel_size"]) == (2, 4)
