"""SFT and GRPO steps of the tiny model on several meshes, in one process.

Run by test_mesh.py with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the
flag must be set before JAX starts, hence a separate process):

    python tests/sharded_steps.py OUT_DIR 1x1 8x1 2x4

Prints one JSON object: per mesh, the SFT losses, the GRPO losses and rewards, and
whether actor, reference and rollout shared one backbone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from tunix.rl import utils as rl_utils

from tracetune.config import load_config
from tracetune.grpo import GRPORun, cluster_models
from tracetune.sft import train_sft

SFT = ["sft.max_steps=4", "sft.eval_every_steps=0", "sft.eval_examples=0", "sft.checkpoint_steps=0"]
# A start with some format and some errors, so GRPO's groups have reward spread.
SFT_START = ["sft.max_steps=60", "sft.eval_every_steps=0", "sft.eval_examples=0", "sft.checkpoint_steps=0"]
GRPO = ["grpo.max_steps=3", "grpo.checkpoint_steps=0", "grpo.rollout_engine=vanilla", "grpo.prompts_per_step=8"]


def losses(run_dir: Path) -> list[float | None]:
    return [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    out, meshes = Path(sys.argv[1]), sys.argv[2:]
    result = {"devices": jax.device_count(), "meshes": {}}
    start = train_sft(load_config("tiny", SFT_START), out / "start").merged_dir
    for name in meshes:
        fsdp, tp = (int(n) for n in name.split("x"))
        shape = [f"mesh.fsdp={fsdp}", f"mesh.tp={tp}"]
        sft_dir = out / f"sft-{name}"
        train_sft(load_config("tiny", SFT + shape), sft_dir)
        run = GRPORun(load_config("tiny", GRPO + shape + [f"grpo.init={start}"]), out / f"grpo-{name}")
        run.train()
        models = cluster_models(run.cluster)
        actor = models["actor"]
        result["meshes"][name] = {
            "sft_loss": losses(sft_dir),
            "grpo_loss": [r["loss"] for r in run.history],
            "grpo_reward": [r["reward/composite"] for r in run.history],
            "shared_reference": bool(rl_utils.is_sharing_backbone(models["reference"], actor)),
            "shared_rollout": bool(rl_utils.is_sharing_backbone(models["rollout"], actor)),
            # How the actor's embedding is laid out: proof the run used the mesh.
            "embedding_shards": len({str(s.index) for s in actor.embedder.input_embedding.get_value().addressable_shards}),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
