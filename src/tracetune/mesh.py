"""Devices: the JAX mesh a stage runs on, multi-host start, and each host's rows.

Scale comes from JAX and Tunix, not from anything here: the mesh has two axes,
``fsdp`` (batches split across devices, weights sharded along the same axis) and
``tp`` (attention heads and MLP columns split across devices). Gemma 3's modules
carry partition specs for these axis names, Tunix's trainers shard every batch
along ``fsdp`` (``jax.make_array_from_process_local_data``), and XLA inserts the
collectives. What tracetune adds is the configuration and its checks:

* ``mesh.fsdp`` x ``mesh.tp`` from the config (presets ``--mesh v5e-8 | gpu-1 |
  gpu-8 | pod``), with errors that say which number does not fit;
* ``jax.distributed.initialize`` when the environment describes a multi-host run;
* on a multi-host run, each host feeds only its contiguous share of every global
  batch (``host_share``), the layout Tunix's ``shard_input`` assembles.

    initialize(config.mesh)          # before anything touches a device
    mesh = make_mesh(config.mesh)
    check_batch(mesh, 8, "sft.micro_batch_size")
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tunix.rl import reshard

from tracetune.config import MESH_AXES, ConfigError, MeshConfig

JOIN_TIMEOUT_SECONDS = 4 * 3600
S = TypeVar("S", bound=Sequence)  # a list or an array: slicing keeps the type


# ------------------------------------------------------------------ multi-host


def cluster_requested(env: Mapping[str, str] = os.environ) -> str | None:
    """What in the environment describes a multi-host run, or None for one process."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"a TPU pod slice of {len(hosts)} hosts (TPU_WORKER_HOSTNAMES)"
    for name, what in (("SLURM_NTASKS", "Slurm"), ("OMPI_COMM_WORLD_SIZE", "Open MPI")):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 1:
            return f"{what} with {value} tasks ({name})"
    return None


HOST_ID_VARIABLES = ("JAX_PROCESS_ID", "TPU_WORKER_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def host_id(env: Mapping[str, str] = os.environ) -> int:
    """This host's index in a multi-host run, from the environment alone (before, or
    without, joining it): 0 when nothing says otherwise."""
    for name in HOST_ID_VARIABLES:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def initialize(config: MeshConfig, env: Mapping[str, str] = os.environ) -> bool:
    """Join the multi-host run the environment describes (``mesh.distributed``:
    auto / on / off); True when this process is part of one. Must run before any
    JAX computation, so ``tracetune sft`` and ``tracetune grpo`` call it first
    (evaluation runs on host 0 alone and does not join)."""
    reason = cluster_requested(env)
    if config.distributed == "off" or (config.distributed == "auto" and reason is None):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        # JAX reads the coordinator address from the environment itself, but the
        # process count and id only from Slurm / Open MPI / TPU metadata.
        for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            value = env.get(name, "")
            if not value.isdigit():
                raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set, so {name} must be a non-negative integer too; got {value!r}")
            kwargs[key] = int(value)
    # CPU hosts (tests, CPU clusters) need a cross-process collectives backend;
    # GPUs and TPUs bring their own, and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        # A long timeout: between training stages only the first host evaluates,
        # so the others may reach the next stage's start well before it does.
        jax.distributed.initialize(**kwargs, initialization_timeout=JOIN_TIMEOUT_SECONDS)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            f"mesh.distributed={config.distributed}: jax.distributed.initialize failed "
            f"({reason or 'no cluster found in the environment'}): {error}"
        ) from None
    return True


def host_share(rows: S, process_index: int | None = None, process_count: int | None = None) -> S:
    """This host's contiguous share of a global batch: rows [p * n / P, (p + 1) * n / P).

    Works on lists and on arrays (rows = the first axis). Tunix builds the global array with ``jax.make_array_from_process_local_data``,
    which places each host's rows on that host's devices in process order, so the
    hosts together feed exactly the batch one process would.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if len(rows) % count:
        raise ConfigError(f"a batch of {len(rows)} rows cannot be split evenly across {count} hosts")
    share = len(rows) // count
    return rows[index * share : (index + 1) * share]


def host_array(x: jax.Array) -> np.ndarray:
    """The whole array on this host, gathered from every host when it is sharded
    across them (a collective: every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# ------------------------------------------------------------------------ mesh


def mesh_shape(config: MeshConfig, n_devices: int) -> tuple[int, int]:
    """(fsdp, tp) for ``n_devices`` devices; fsdp = -1 takes every device tp leaves."""
    fsdp = n_devices // config.tp if config.fsdp == -1 else config.fsdp
    if fsdp < 1 or fsdp * config.tp > n_devices:
        raise ConfigError(
            f"mesh.fsdp={config.fsdp} x mesh.tp={config.tp} needs {max(fsdp, 1) * config.tp} devices, "
            f"but this process sees {n_devices}; pick another --mesh preset or lower them with --set mesh.fsdp=N"
        )
    return fsdp, config.tp


def make_mesh(config: MeshConfig) -> jax.sharding.Mesh:
    """The (fsdp, tp) mesh over the first fsdp x tp devices (all of them on a multi-host run).

    Axis types are Auto: with this JAX's default (Explicit) Tunix's rollout fails
    with a ShardingTypeError.
    """
    devices = jax.devices()
    fsdp, tp = mesh_shape(config, len(devices))
    if jax.process_count() > 1 and fsdp * tp != len(devices):
        raise ConfigError(f"a multi-host mesh must span every device: mesh.fsdp={fsdp} x mesh.tp={tp} "
                          f"leaves {len(devices) - fsdp * tp} of {len(devices)} unused; use mesh.fsdp=-1")
    return jax.make_mesh((fsdp, tp), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices[: fsdp * tp])


def describe(mesh: jax.sharding.Mesh) -> str:
    """'mesh fsdp=2 x tp=4 on 8 cpu devices (1 host)'."""
    hosts = jax.process_count()
    return (f"mesh fsdp={mesh.shape['fsdp']} x tp={mesh.shape['tp']} on {mesh.devices.size} "
            f"{mesh.devices.flat[0].platform} devices ({hosts} host{'s' if hosts > 1 else ''})")


def check_batch(mesh: jax.sharding.Mesh, rows: int, what: str) -> None:
    """A batch of ``rows`` must split evenly over ``fsdp`` (and the hosts): Tunix
    would otherwise replicate it on every device, which is correct on one host but
    gives no speed-up, and wrong across hosts (each host holds other rows)."""
    fsdp = mesh.shape["fsdp"]
    if rows % fsdp or rows % jax.process_count():
        raise ConfigError(f"{what} gives batches of {rows} rows, which must be a multiple of mesh.fsdp={fsdp}"
                          + (f" and of the {jax.process_count()} hosts" if jax.process_count() > 1 else "")
                          + " so that every device gets an equal share")


def check_heads(mesh: jax.sharding.Mesh, num_heads: int, model: str) -> None:
    tp = mesh.shape["tp"]
    if num_heads % tp:
        raise ConfigError(f"mesh.tp={tp} must divide the {num_heads} attention heads of {model}")


def shard(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """The model's weights laid out on ``mesh`` by their partition specs (a no-op
    when they already are)."""
    return reshard.reshard_model_to_mesh(model, mesh)


@contextlib.contextmanager
def active(mesh: jax.sharding.Mesh) -> Iterator[None]:
    """Make ``mesh`` the current one for Tunix's trainers. Tunix 0.1.7's
    ``shard_input`` reads the legacy ``with mesh:`` context, which this JAX
    deprecates in favour of ``jax.set_mesh`` (which Tunix does not read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`with mesh:` context manager has been deprecated", DeprecationWarning)
        mesh.__enter__()
    try:
        yield
    finally:
        mesh.__exit__(None, None, None)

