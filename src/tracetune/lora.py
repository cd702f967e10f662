"""LoRA on Gemma 3: adapters on, folded back in, exported. Shared by both stages.

qwix puts the adapters on the projections ``lora.targets`` names (A random, B
zero); ``merged_tree`` folds W + (alpha / rank) * A @ B back into a plain Gemma 3
parameter tree, on the device (GRPO's tracetune rollout engine refolds the live
policy every step); ``export_run`` writes a finished run's adapters and merged
weights. ``lora_on_mesh`` builds the LoRA model on a mesh so that it shares the
base weights (GRPO's actor, reference and rollout hold one backbone).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from jax.interpreters import pxla

from tracetune import lora_vjp, memory
from tracetune import mesh as mesh_lib
from tracetune.config import ConfigError, LoraConfig
from tracetune.errors import DiskFull
from tracetune.models.hf import save_checkpoint
from tracetune.models.params import build_model, flatten, save_safetensors, unflatten, write_json
from tracetune.models.registry import LoadedModel
from tracetune.runs import is_primary

# How each targeted Gemma 3 weight is rebuilt from qwix's factors (A, B):
# delta = einsum(spec, A, B) has the weight's own layout.
MERGE_SPECS = {
    "q_einsum": "dr,rnh->ndh",  # w [N, D, H]; A [D, r], B [r, N, H]
    "kv_einsum": "dr,rckh->ckdh",  # w [2, K, D, H]; A [D, r], B [r, 2, K, H]
    "attn_vec_einsum": "nhr,rd->nhd",  # w [N, H, D]; A [N, H, r], B [r, D]
    "gate_proj": "ir,ro->io",  # kernel [D, F]
    "up_proj": "ir,ro->io",  # kernel [D, F]
    "down_proj": "ir,ro->io",  # kernel [F, D]
}


def apply_lora(model: nnx.Module, lora: LoraConfig, seed: int) -> nnx.Module:
    """The model with LoRA adapters (A random, B zero) on the modules ``lora.targets`` matches."""
    unknown = [name for name in lora.targets.split("|") if name not in MERGE_SPECS]
    if unknown:
        raise ConfigError(f"lora.targets: cannot merge {unknown} back into Gemma 3 weights (known: {', '.join(MERGE_SPECS)})")
    lora_vjp.install()  # the adapters' gradients as plain matmuls (3x faster backward on XLA:CPU)
    provider = qwix.LoraProvider(module_path=f".*({lora.targets})", rank=lora.rank, alpha=lora.alpha)
    tokens = jnp.ones((1, 8), jnp.int32)  # any input: qwix traces one call to find the targeted weights
    positions = jnp.arange(8)[None]
    mask = jnp.tril(jnp.ones((8, 8), bool))[None]
    return qwix.apply_lora_to_model(model, provider, tokens, positions, None, mask, rngs=nnx.Rngs(seed))


def lora_on_mesh(base: nnx.Module, lora: LoraConfig, seed: int, mesh: jax.sharding.Mesh) -> tuple[nnx.Module, nnx.Module]:
    """(base, LoRA model) on ``mesh``, sharing one copy of the base weights.

    The order matters: shard the base first, put the adapters on the sharded base,
    then shard the LoRA model (only the new adapters move). Applied the other way
    round, resharding the LoRA model copies the whole backbone and the reference
    policy and the actor no longer share it: memory doubles, silently.
    """
    base = mesh_lib.shard(base, mesh)
    with jax.set_mesh(mesh):
        model = apply_lora(base, lora, seed)
    return base, mesh_lib.shard(model, mesh)


def adapter_step(train_step: Callable, model: nnx.Module, optimizer: nnx.Optimizer) -> partial:
    """``train_step(model, optimizer, inputs)`` (Tunix's step) as ``step(inputs)``,
    jitted so that its outputs are the adapters and the optimizer state only.

    ``nnx.jit`` over the whole model returns every weight, the frozen base too: a
    new copy of the backbone per step, beside the one the reference policy holds
    (GRPO's actor shares its base with the reference, so it cannot be donated).
    Here the base goes in as a plain argument and never comes out; the adapters
    and the optimizer state are donated and written back into ``model`` and
    ``optimizer``. The arithmetic is Tunix's step, unchanged. Returned as
    ``partial(step)`` with ``step.jitted_fn``: Tunix's trainer reads the compile
    cache through ``train_step.func.jitted_fn`` (see tunix_names).
    """
    return partial(_AdapterStep(train_step, model, optimizer))


def use_adapter_step(trainer) -> None:
    """Make a Tunix ``PeftTrainer`` (SFT's, or GRPO's actor trainer) train through
    ``adapter_step``: Tunix's ``jit_train_and_eval_step`` reuses a step already set.
    Call it with the trainer's mesh active, as Tunix shards the optimizer state
    before its own jit."""
    trainer._shard_optimizer(pxla.thread_resources.env.physical_mesh)
    trainer._jitted_train_step_fn = adapter_step(trainer.create_train_step_fn(), trainer.model, trainer.optimizer)
    trainer._jitted_eval_step_fn = partial(nnx.jit(trainer.create_eval_step_fn()), trainer.model)


class _AdapterStep:
    def __init__(self, train_step: Callable, model: nnx.Module, optimizer: nnx.Optimizer):
        self.model, self.optimizer = model, optimizer

        @partial(jax.jit, donate_argnums=(1, 4))
        def pure(graphdef, adapters, base, opt_graphdef, opt_state, inputs):
            m = nnx.merge(graphdef, adapters, base)
            o = nnx.merge(opt_graphdef, opt_state)
            out = train_step(m, o, inputs)
            return out, nnx.state(m, nnx.LoRAParam), nnx.state(o)

        self.jitted_fn = pure
        self._run = memory.CompileFirst(pure)

    def __call__(self, inputs):
        # The last step's (or rollout's) freed temporaries go back to the system
        # before this step's are allocated: otherwise each peak sits on the last.
        memory.release()
        graphdef, adapters, base = nnx.split(self.model, nnx.LoRAParam, ...)
        opt_graphdef, opt_state = nnx.split(self.optimizer)
        out, adapters, opt_state = self._run(graphdef, adapters, base, opt_graphdef, opt_state, inputs)
        nnx.update(self.model, adapters)
        nnx.update(self.optimizer, opt_state)
        return out


def lora_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The adapters as flat host arrays (``layers.0.attn.q_einsum.w_lora_a`` -> A)."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    return {k: mesh_lib.host_array(v) for k, v in flatten(state).items()}


def set_lora_params(model: nnx.Module, flat: dict[str, np.ndarray]) -> None:
    """Put adapters saved by ``lora_params`` back into ``model``, each on its array's
    own sharding (GRPO's export of the best validated step)."""
    state = nnx.state(model, nnx.LoRAParam)
    live = flatten(nnx.to_pure_dict(state))
    if set(live) != set(flat):
        raise ValueError(f"the saved adapters do not fit this model: {len(set(live) ^ set(flat))} names differ, "
                         f"e.g. {sorted(set(live) ^ set(flat))[:3]}")
    nnx.replace_by_pure_dict(state, unflatten({k: jax.device_put(np.asarray(flat[k], v.dtype), v.sharding) for k, v in live.items()}))
    nnx.update(model, state)


def save_adapter(adapters: dict[str, np.ndarray], loaded: LoadedModel, lora: LoraConfig, out_dir: Path, **facts) -> Path:
    """``out_dir/adapter.safetensors`` + ``adapter.json`` (base, rank, alpha, targets, and ``facts``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(adapters, out_dir / "adapter.safetensors")
    write_json({"base": loaded.name, "base_source": loaded.source, "rank": lora.rank, "alpha": lora.alpha,
                "targets": lora.targets, **facts}, out_dir / "adapter.json")
    return out_dir


def merged_tree(model: nnx.Module, lora: LoraConfig) -> dict:
    """The LoRA model as a plain Gemma 3 parameter tree (no adapters), with
    W + (alpha / rank) * A @ B folded in, in float32 on the device: no host copy,
    so an RL rollout can refold the live policy every step."""
    flat = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # LoRAParam is a Param
    scale = lora.alpha / lora.rank
    for key in [k for k in flat if k.endswith("_lora_a")]:
        weight = key.removesuffix("_lora_a")
        a, b = flat.pop(key), flat.pop(weight + "_lora_b")
        delta = jnp.einsum(MERGE_SPECS[weight.split(".")[-2]], a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        flat[weight] = (flat[weight].astype(jnp.float32) + delta).astype(flat[weight].dtype)
    return unflatten(flat)


def merged_params(model: nnx.Module, lora: LoraConfig) -> dict[str, np.ndarray]:
    """``merged_tree`` as the flat host arrays that loaders and writers take."""
    return {k: mesh_lib.host_array(v) for k, v in flatten(merged_tree(model, lora)).items()}


def export_run(model: nnx.Module, loaded: LoadedModel, lora: LoraConfig, run_dir: Path, *, stage: str, step: int,
               **facts) -> tuple[Path, Path]:
    """``run_dir/export/adapter`` (LoRA weights + adapter.json) and ``run_dir/export/merged``
    (merged weights in the Hugging Face layout, loadable with ``load_model(run_dir)``).
    ``facts`` (e.g. how the step was chosen) go into both. Every host gathers the
    weights; only the first writes them."""
    adapter_dir, merged_dir = run_dir / "export" / "adapter", run_dir / "export" / "merged"
    memory.release()  # the host copies below come on top of what training freed otherwise
    adapter, merged = lora_params(model), merged_params(model, lora)
    if not is_primary():
        return adapter_dir, merged_dir
    save_adapter(adapter, loaded, lora, adapter_dir, stage=stage, step=step, **facts)
    merged_dir = save_checkpoint(
        merged, loaded.config, loaded.tokenizer, merged_dir,
        base=loaded.name, extra={"stage": stage, "step": step, "run": str(run_dir), **facts},
    )
    write_cards(adapter_dir, merged_dir)
    return adapter_dir, merged_dir


def write_cards(*export_dirs: Path) -> None:
    """A README.md model card in each export (card.py). The card is documentation
    written after the weights: one that cannot be written is a warning with its
    reason, never a lost export (``tracetune publish`` writes it again). A full disk
    still stops the run as everywhere else, since the summary after it would fail too."""
    from tracetune.card import write_card

    for directory in export_dirs:
        try:
            write_card(directory)
        except DiskFull:
            raise
        except Exception as error:  # noqa: BLE001 - any card bug: the weights are saved, say why and go on
            print(f"warning: no model card in {directory} ({type(error).__name__}: {error}); "
                  "`tracetune publish` writes it again", file=sys.stderr)


def merged_model(model: nnx.Module, loaded: LoadedModel, lora: LoraConfig) -> nnx.Module:
    return build_model(loaded.config, merged_params(model, lora), f"{loaded.name} + LoRA")


class BestAdapters:
    """The adapters of the best validated step so far, in ``folder`` (adapter.safetensors,
    adapter.json, best.json), for a run that exports its best step instead of its last.

    Steps compare by ``record[prefix + "accuracy"]``, ties by ``prefix + "composite"``
    (SFT's held-out records use "eval/", GRPO's "val/"). A resumed run reads the best
    back; a best step past the resumed one stays, since the redone steps reproduce
    its weights.
    """

    def __init__(self, folder: Path, prefix: str, enabled: bool, records: list[dict] = ()):
        self.folder, self.prefix, self.enabled = folder, prefix, enabled
        path = folder / "best.json"
        scored = [r for r in records if prefix + "accuracy" in r]
        self.record: dict | None = json.loads(path.read_text()) if path.exists() else max(scored, key=self.key, default=None)

    def key(self, record: dict) -> tuple[float, float]:
        return record[self.prefix + "accuracy"], record.get(self.prefix + "composite", 0.0)

    def offer(self, record: dict, model: nnx.Module, loaded: LoadedModel, lora: LoraConfig, stage: str) -> bool:
        """Keep ``record``'s step if it beats the best so far; True if it does."""
        if self.record is not None and self.key(record) <= self.key(self.record):
            return False
        self.record = record
        if self.enabled and is_primary():
            save_adapter(lora_params(model), loaded, lora, self.folder, stage=stage, step=record["step"])
            write_json(record, self.folder / "best.json")
        return True

    def export(self, model: nnx.Module, loaded: LoadedModel, lora: LoraConfig, run_dir: Path, *, stage: str,
               step: int) -> tuple[Path, Path, int]:
        """export/ with the best step's weights (the last step's adapters kept in
        export/last_adapter), or the last step's when selection is off or it is the best.
        Returns (adapter dir, merged dir, exported step). Leaves ``model`` at the exported weights."""
        if not self.enabled or self.record is None or self.record["step"] == step:
            selected = "best validation accuracy" if self.enabled else "last step"
            return (*export_run(model, loaded, lora, run_dir, stage=stage, step=step, selected=selected), step)
        from safetensors.numpy import load_file

        if is_primary():
            save_adapter(lora_params(model), loaded, lora, run_dir / "export" / "last_adapter", stage=stage, step=step)
        set_lora_params(model, load_file(self.folder / "adapter.safetensors"))
        best = self.record["step"]
        print(f"{stage}: exporting step {best} ({self.prefix}accuracy {self.record[self.prefix + 'accuracy']:.1%}, the best "
              f"validated step); step {step}'s adapters are in export/last_adapter", file=sys.stderr)
        return (*export_run(model, loaded, lora, run_dir, stage=stage, step=best, selected="best validation accuracy",
                            last_step=step), best)
