"""Every private name of Tunix (google-tunix 0.1.7), and of qwix's LoRA, that
tracetune overrides, reads or calls, and the internal conventions it relies on,
in one list.

Tunix renames things between releases (0.1.8 has ``RLEngine`` for ``RLCluster``).
A name here that an upgrade removes would otherwise fail late, or worse, silently:
an override of a method nobody calls any more is just dead code, and the
behaviour it added (per-step rollout seeds, trimmed padding, the NaN stop) is
gone. ``missing()`` checks them all; ``tests/test_tunix_names.py`` fails naming
each one that is gone.

How each is checked:

* ``method``: the class still has that attribute (what we override or call);
* ``attribute``: the class's source still assigns ``self.NAME`` (instance
  attributes do not exist on the class);
* ``source``: the function's source still contains the text (a convention such
  as the name under which Gemma 3 sows its hidden states).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Name:
    owner: str  # "module:Class" or "module:function"
    name: str
    kind: str  # "method" | "attribute" | "source"
    use: str  # where and why tracetune touches it


NAMES = (
    # GRPO (grpo.py)
    Name("tunix.rl.rl_learner:RLLearner", "_generate_and_compute_advantage", "method",
         "grpo.Learner replaces it: rollout seed, StepRollout, trimmed batch, reference pass, rewards, advantages"),
    Name("tunix.rl.rl_learner:RLLearner._process_accumulated_batches", "self._generate_and_compute_advantage(", "source",
         "grpo.Learner's step is reached only through this call"),
    Name("tunix.rl.rl_learner:RLLearner", "_compute_logps_micro_batch_size", "attribute",
         "grpo.Learner reads it: the micro-batch of Tunix's reference / old-policy passes"),
    Name("tunix.rl.grpo.grpo_learner:GRPOLearner._generate_and_compute_advantage", "get_advantage_estimator(", "source",
         "grpo.Learner computes advantages through the same registry, with the configured estimator"),
    Name("tunix.rl.rl_learner:RLLearner", "_iter_steps", "attribute",
         "grpo.Learner reads it: the step counter behind the rollout seed (restored on resume)"),
    Name("tunix.rl.rl_learner:RLLearner", "_eval_iter_steps", "attribute", "grpo.Learner reads it: the eval rollout seed"),
    Name("tunix.rl.rl_learner:RLLearner", "_training_config", "attribute",
         "grpo.Learner reads it: micro-batches per step, to turn _iter_steps into steps"),
    Name("tunix.rl.rl_cluster:RLCluster", "_get_mesh_and_logical_axis_rules_cm", "method",
         "grpo.Cluster calls it around the chunked reference / old-policy log-probs, as Tunix's own passes do"),
    Name("tunix.rl.rl_cluster:RLCluster", "get_ref_per_token_logps", "method", "grpo.Cluster overrides it (public)"),
    Name("tunix.rl.rl_cluster:RLCluster", "get_old_per_token_logps", "method", "grpo.Cluster overrides it (public)"),
    Name("tunix.rl.rl_cluster:RLCluster", "_anchor_policy_state", "attribute",
         "grpo.Cluster replaces Tunix's snapshot of the whole actor by one that shares the frozen base"),
    Name("tunix.rl.rl_cluster:RLCluster", "sync_weights", "method",
         "grpo.Cluster overrides it (public): Tunix's steps with grpo.Cluster._anchor's snapshot"),
    Name("tunix.rl.rl_cluster:RLCluster.sync_weights", "self.global_steps += 1", "source",
         "grpo.Cluster.sync_weights repeats what Tunix's does: the adapters to the rollout, the anchor, the step count"),
    Name("tunix.rl.rl_cluster:RLCluster.get_actor_per_token_logps", "self._anchor_policy_state", "source",
         "the one reader of the anchor grpo.Cluster sets (Tunix's agentic learner; tracetune's never calls it)"),
    Name("tunix.rl.rl_cluster:RLCluster", "inference_worker", "method", "grpo: the reference model (a property), for the shared backbone"),
    Name("tunix.rl.algo_core:grpo_loss_fn", "compute_per_token_logps(", "source",
         "logprobs.tracetune_grpo_loss mirrors this loss; its equality test compares the two"),
    Name("tunix.rl.algo_core:grpo_loss_fn", "loss_agg_mode", "source", "logprobs.tracetune_grpo_loss reads the same options"),
    # SFT (sft.py)
    Name("tunix.sft.peft_trainer:PeftTrainer", "_post_process_train_step", "method",
         "sft.Trainer overrides it: a non-finite loss stops the run before the step is saved"),
    Name("tunix.sft.peft_trainer:PeftTrainer", "_tqdm_train_metrics", "method", "sft.Trainer overrides it: tokens/s in the bar"),
    Name("tunix.sft.peft_trainer:PeftTrainer", "_jitted_train_step_fn", "attribute",
         "lora.use_adapter_step sets it before Tunix's jit: lora.adapter_step, which returns the adapters only"),
    Name("tunix.sft.peft_trainer:PeftTrainer", "_jitted_eval_step_fn", "attribute", "lora.use_adapter_step sets it beside the train step"),
    Name("tunix.sft.peft_trainer:PeftTrainer", "_shard_optimizer", "method",
         "lora.use_adapter_step calls it (for sft.Trainer and grpo.Cluster), as Tunix does before its jit"),
    Name("tunix.sft.peft_trainer:PeftTrainer.train", "train_step.func.jitted_fn._cache_size()", "source",
         "lora.adapter_step returns partial(step) with step.jitted_fn for this read"),
    Name("tunix.sft.peft_trainer:PeftTrainer", "create_train_step_fn", "method",
         "lora.adapter_step wraps Tunix's own step (public, listed because the wrapping relies on its signature)"),
    Name("tunix.sft.peft_trainer:PeftTrainer.jit_train_and_eval_step", "self._jitted_train_step_fn is None", "source",
         "sft.Trainer relies on Tunix reusing a step already set"),
    # checkpoints (runs.py, grpo.py)
    Name("tunix.sft.checkpoint_manager:CheckpointManager", "_checkpoint_manager", "attribute",
         "runs.check_saves and grpo read orbax's manager: failed async saves, the saved steps"),
    Name("tunix.sft.peft_trainer:PeftTrainer", "_lora_enabled", "attribute",
         "grpo.GRPORun saves after a judge outage as Tunix's own final save does (adapters only with LoRA)"),
    # the model (logprobs.py)
    Name("tunix.models.gemma3.model:Gemma3", "__call__", "method", "logprobs.hidden_states calls it with output_hidden_states=True"),
    Name("tunix.models.gemma3.model:Gemma3.__call__", "'all_hidden_states'", "source",
         "logprobs.hidden_states pops the final-norm hidden states it sows under this name"),
    Name("tunix.models.gemma3.model:Gemma3.__call__", "self.embedder.decode(x)", "source",
         "logprobs applies the tied head itself: the logits must be the embedding times the sown states, no soft-cap"),
    Name("tunix.models.gemma3.model:Embedder", "input_embedding", "attribute", "logprobs.embedding: the tied head [V, D]"),
    # qwix's LoRA (lora_vjp.py): the adapters' deltas go through lora_vjp.delta_2d
    Name("qwix._src.providers:lora", "_compute_lora_delta", "method",
         "lora_vjp.install replaces it (the MLP's nnx.Linear path); its fallback calls the original"),
    Name("qwix._src.providers.lora:LoraProvider.dot_general", "_compute_lora_delta(", "source",
         "the MLP's delta is computed by the module function lora_vjp replaces"),
    Name("qwix._src.providers.lora:LoraProvider.einsum", "jax.numpy.einsum(lora_einsum_str", "source",
         "lora_vjp.install routes the attention's delta through the module's jax name to lora_vjp.lora_einsum"),
)


def _resolve(owner: str):
    module, _, path = owner.partition(":")
    target = importlib.import_module(module)
    for part in path.split("."):
        target = getattr(target, part)
    return target


def missing(names=NAMES) -> list[Name]:
    """The names an installed Tunix no longer has (empty when all is well)."""
    gone = []
    for entry in names:
        try:
            owner = _resolve(entry.owner)
        except (ImportError, AttributeError):
            gone.append(entry)
            continue
        if entry.kind == "method":
            ok = hasattr(owner, entry.name)
        else:
            source = inspect.getsource(owner)
            ok = (f"self.{entry.name} =" in source or f"self.{entry.name}:" in source) if entry.kind == "attribute" else entry.name in source
        if not ok:
            gone.append(entry)
    return gone
