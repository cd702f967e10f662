"""Memory per device of one SFT (or GRPO policy-gradient) step, for any Gemma 3 size and mesh.

No weights are loaded and nothing is allocated: the step (LoRA forward + backward
with the completion-only float32 loss, clipping, AdamW on the adapters) is traced
on abstract shapes, sharded by Gemma 3's partition specs over an (fsdp, tp) mesh
of simulated CPU devices, and compiled; XLA's buffer assignment then says what one
device holds: weights + adapters + optimizer state (arguments), the updated
adapters (outputs) and activations (temporaries). A TPU's compiler assigns
buffers somewhat differently (fusion, rematerialisation), so read these as the
shape of the cost, not to the megabyte. The peer in the same run is the
arithmetic: the bf16 weights alone, divided over the devices.

    python bench/memory.py --model gemma3-1b-it --mesh 8x1 --rows 8 --seq 1400
    python bench/memory.py --all      # the table of docs/scaling.md

A GRPO update of P prompts x G completions is the same computation with
rows = P x G (plus a forward pass of the reference, which needs no gradients).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import json

TABLE = [  # (model, mesh, rows per step, sequence)
    ("gemma3-270m", "1x1", 4, 256),
    ("gemma3-270m", "1x1", 1, 1400),
    ("gemma3-1b-it", "1x1", 1, 1400),
    ("gemma3-1b-it", "8x1", 8, 1400),
    ("gemma3-1b-it", "2x4", 8, 1400),
    ("gemma3-4b-it", "1x1", 1, 1400),
    ("gemma3-4b-it", "8x1", 8, 1400),
    ("gemma3-4b-it", "2x4", 8, 1400),
]


def measure(model_name: str, mesh_shape: str, rows: int, seq: int, rank: int, dtype: str, path: str = "chunked") -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tunix.models.gemma3 import model as gemma3

    from tracetune.config import LoraConfig, MeshConfig
    from tracetune.mesh import active, make_mesh
    from tracetune.models.params import ModelConfig, with_dtype
    from tracetune.models.registry import resolve
    from tracetune.lora import apply_lora
    from tracetune.sft import LOSSES, model_inputs

    fsdp, tp = (int(n) for n in mesh_shape.split("x"))
    mesh = make_mesh(MeshConfig(fsdp=fsdp, tp=tp))
    config = with_dtype(getattr(ModelConfig, resolve(model_name).config)(), dtype)
    lora = LoraConfig(rank=rank, alpha=2.0 * rank)
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: apply_lora(gemma3.Gemma3(config, rngs=nnx.Rngs(0)), lora, 0))
    graphdef, adapters, base = nnx.split(abstract, nnx.LoRAParam, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    opt_state = jax.eval_shape(tx.init, adapters)

    def sharding(tree):
        specs = nnx.get_partition_spec(tree)
        return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(adapters, base, opt_state, tokens, loss_mask, scored, scored_weight):
        inputs = model_inputs({"tokens": tokens, "loss_mask": loss_mask, "scored": scored, "scored_weight": scored_weight}, pad_id=0)

        def loss_of(adapters):
            return LOSSES[path](nnx.merge(graphdef, adapters, base), **inputs)[0]

        loss, grads = jax.value_and_grad(loss_of)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_sharding = jax.tree.map(lambda _: replicated, opt_state)  # adapters are small: replicated
    jitted = jax.jit(step, in_shardings=(sharding(adapters), sharding(base), opt_sharding, data, data, data, data),
                     donate_argnums=(0, 2))
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, seq), jnp.float32)
    scored = jax.ShapeDtypeStruct((rows, seq - 1), jnp.int32)  # at most every position is scored
    weight = jax.ShapeDtypeStruct((rows, seq - 1), jnp.float32)
    with active(mesh):  # as in training: the trainer runs under the mesh
        compiled = jitted.lower(adapters, base, opt_state, tokens, mask, scored, weight).compile()
    stats = compiled.memory_analysis()
    n = fsdp * tp
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    weights = nbytes(base)
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    return {
        "model": model_name, "mesh": mesh_shape, "logprobs": path, "rows": rows, "seq": seq, "dtype": dtype, "lora_rank": rank,
        "params_m": sum(x.size for x in jax.tree.leaves(base)) / 1e6,
        "lora_params_m": sum(x.size for x in jax.tree.leaves(adapters)) / 1e6,
        "per_device_gb": peak / 1e9,
        "arguments_gb": stats.argument_size_in_bytes / 1e9,
        "temporaries_gb": stats.temp_size_in_bytes / 1e9,
        "peer_weights_per_device_gb": weights / n / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-1b-it", help="a registry name: gemma3-270m, gemma3-1b-it, gemma3-4b-it, ...")
    parser.add_argument("--mesh", default="8x1", help="FSDPxTP, e.g. 8x1 or 2x4 (simulated CPU devices)")
    parser.add_argument("--rows", type=int, default=8, help="sequences per step (SFT micro-batch, or GRPO prompts x G)")
    parser.add_argument("--seq", type=int, default=1400, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--dtype", default="bfloat16", help="weight dtype")
    parser.add_argument("--logprobs", default="chunked", choices=("chunked", "full"), help="the SFT loss's log-prob path")
    parser.add_argument("--all", action="store_true", help="every row of docs/scaling.md's table, each in its own process")
    args = parser.parse_args()
    if not args.all:
        fsdp, tp = (int(n) for n in args.mesh.split("x"))
        if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            # The device count is fixed when JAX starts: re-run this process with enough devices.
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={fsdp * tp}", "JAX_PLATFORMS": "cpu"}
            sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
        print(json.dumps(measure(args.model, args.mesh, args.rows, args.seq, args.rank, args.dtype, args.logprobs)))
        return
    print(f"{'model':<14} {'mesh':<5} {'rows x seq':<11} {'params':>8} {'LoRA':>6} {'held (exact)':>13} "
          f"{'activations':>12} {'step peak':>10} {'peer: weights/devices':>22}")
    for model, mesh, rows, seq in TABLE:
        out = subprocess.run([sys.executable, __file__, "--model", model, "--mesh", mesh, "--rows", str(rows), "--seq", str(seq),
                              "--rank", str(args.rank), "--dtype", args.dtype, "--logprobs", args.logprobs], capture_output=True, text=True)
        if out.returncode:
            print(f"{model:<14} {mesh:<5} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{model:<14} {mesh:<5} {f'{rows} x {seq}':<11} {r['params_m']:>7.0f}M {r['lora_params_m']:>5.1f}M "
              f"{r['arguments_gb']:>10.2f} GB {r['temporaries_gb']:>9.2f} GB {r['per_device_gb']:>7.2f} GB "
              f"{r['peer_weights_per_device_gb']:>19.2f} GB", flush=True)


if __name__ == "__main__":
    main()
