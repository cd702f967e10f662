"""Stage 2: GRPO from the SFT policy with the composite reward.

Tunix's ``GRPOLearner`` and ``RLCluster`` run the algorithm (G completions per
prompt, group-normalised advantages, clipped ratio, KL to the reference). The
reference policy is the SFT model; the actor is LoRA on that same model, so the
two share one backbone in memory. tracetune adds around it:

* the composite reward R = w_c * correctness + w_t * trace + w_k * confidence as
  one reward function (Tunix sums reward functions without weights), the weights
  from config, applied in ``rewards.combine`` only;
* a rollout engine around tracetune's sampler, whose per-token log-probabilities
  (temperature 1) reach the confidence term (Tunix passes reward functions text
  only, so the learner adds ``token_texts`` / ``token_logprobs`` columns);
* a rollout seed per step (Tunix would reuse one key: the same samples each step);
* metrics per step (each reward component, zero-spread groups, truncation, KL,
  lengths) to metrics.jsonl and TensorBoard, samples every N steps, and loud
  warnings for the known failure modes;
* the run guarantees of SFT: same data order on resume, checkpoints every N
  minutes, SIGTERM saves, a non-finite loss or rollout stops the run and names
  the last good checkpoint (non-finite updates are skipped by
  ``optax.apply_if_finite``, never applied).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tunix.rl import utils as rl_utils
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import metrics_logger as tunix_metrics

from tracetune import logprobs
from tracetune import mesh as mesh_lib
from tracetune.config import Config, ConfigError, GRPOConfig, LoraConfig, RewardWeights
from tracetune.data import Example, load_examples
from tracetune.errors import Interrupted, TrainingError
from tracetune.files import atomic_path
from tracetune.format import build_prompt
from tracetune.generate import Generator, SamplingConfig
from tracetune.lora import export_run, lora_on_mesh, merged_tree
from tracetune.models.registry import MODELS, LoadedModel, load_model
from tracetune.models.tokenizer import Tokenizer
from tracetune.rewards import combine, reward_components
from tracetune.runs import (FaultWatch, StopFlag, append_record, check_saves, checkpoint_options, claim_directory, failed_run,
                            is_primary, metrics_options, optimizer, set_aside_damaged_checkpoints, truncate_metrics)

Role, Mode = rl_cluster_lib.Role, rl_cluster_lib.Mode


# --------------------------------------------------------------------- rewards


class CompositeReward:
    """The composite reward as Tunix's one reward function; keeps the last batch's
    components so the learner can log each one."""

    __name__ = "composite"  # Tunix logs rewards/<__name__>

    def __init__(self, weights: RewardWeights):
        self.weights = weights
        self.last: dict[str, list[float]] = {}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        self.last = reward_components(prompts, completions, self.weights, **columns)
        return combine(self.last, self.weights)


# --------------------------------------------------------------------- rollout


class TracetuneRollout(base_rollout.BaseRollout):
    """Tunix rollout engine around tracetune's ``Generator``.

    RLCluster builds it as ``engine(rollout_actor=, tokenizer=, mesh=, rollout_config=)``;
    the actor is the very LoRA module being trained, so its weights are folded
    afresh before every rollout.
    """

    def __init__(self, *, rollout_actor, tokenizer, mesh, rollout_config, tracetune_tokenizer: Tokenizer, lora: LoraConfig):
        self._model = rollout_actor
        self._tokenizer = tracetune_tokenizer
        self._lora = lora
        self._generator = Generator(rollout_actor, tracetune_tokenizer, max_batch=32)
        self.last_generations = []
        self.mesh = None  # keep the cluster's rollout mesh

    def generate(self, prompts, rollout_config, **kwargs):
        self._generator.set_params(merged_tree(self._model, self._lora))
        sampling = SamplingConfig(
            max_new_tokens=rollout_config.max_tokens_to_generate,
            temperature=rollout_config.temperature,
            top_k=rollout_config.top_k or 0,
            top_p=1.0 if rollout_config.top_p is None else rollout_config.top_p,
            seed=0 if rollout_config.seed is None else int(rollout_config.seed),
        )
        generations = self._generator.generate(list(prompts), sampling)
        self.last_generations = generations
        width = rollout_config.max_prompt_length
        prompt_tokens = np.full((len(prompts), width), self._tokenizer.pad_id, np.int32)  # [B, P] left-padded
        for row, prompt in enumerate(prompts):
            ids = self._tokenizer.encode(prompt)
            prompt_tokens[row, width - len(ids) :] = ids
        return base_rollout.RolloutOutput(
            text=[g.text for g in generations],
            logits=None,
            tokens=[np.asarray(g.token_ids, np.int32) for g in generations],
            left_padded_prompt_tokens=prompt_tokens,
            logprobs=[np.asarray(g.token_logprobs, np.float32) for g in generations],
        )

    def get_per_token_logps(self, prompt_tokens, completion_tokens):
        # Only Cluster.get_old_per_token_logps calls this, and it is overridden below
        # with the rollout temperature, as the loss uses; kept for the engine's interface.
        return logprobs.frozen_completion_logprobs(self._model, prompt_tokens, completion_tokens, self.pad_id())

    def update_params(self, params, filter_types=None):
        nnx.update(self._model, params)

    def pad_id(self):
        return self._tokenizer.pad_id

    def eos_id(self):
        return self._tokenizer.eos_id

    def model(self):
        return self._model


class Cluster(rl_cluster_lib.RLCluster):
    """RLCluster that keeps the last rollout (its tokens and log-probs feed the
    rewards) and the wall time of each phase (for logs and bench/grpo.py).

    With ``logprobs="chunked"`` the reference's and the old policy's log-probs come
    from ``logprobs.frozen_completion_logprobs`` (no [B, L, V] logits; the batch's
    all-padding columns cut to a multiple of ``pad_multiple``), at the rollout
    temperature as Tunix's loss uses it; "full" keeps Tunix's own path.
    """

    def __init__(self, *args, logprobs: str = "full", pad_multiple: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_rollout = None
        self.phase_seconds: dict[str, float] = {}
        self.logprob_path = logprobs
        self.pad_multiple = pad_multiple

    def _timed(self, phase: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start
        return out

    def generate(self, *args, **kwargs):
        self.last_rollout = self._timed("rollout", super().generate, *args, **kwargs)
        return self.last_rollout

    def get_ref_per_token_logps(self, prompt_tokens, completion_tokens, pad_id, eos_id, micro_batch_size=None):
        if self.logprob_path == "full":
            return self._timed("reference", super().get_ref_per_token_logps, prompt_tokens, completion_tokens, pad_id, eos_id,
                               micro_batch_size)
        return self._timed("reference", self._frozen_logprobs, Role.REFERENCE, self.inference_worker.get_model("reference"),
                           prompt_tokens, completion_tokens)

    def get_old_per_token_logps(self, prompt_tokens, completion_tokens, micro_batch_size=None):
        if self.logprob_path == "full":
            return super().get_old_per_token_logps(prompt_tokens, completion_tokens, micro_batch_size)
        return self._timed("old_policy", self._frozen_logprobs, Role.ROLLOUT, self.rollout.model(), prompt_tokens, completion_tokens)

    def _frozen_logprobs(self, role, model, prompt_tokens, completion_tokens):
        with self._get_mesh_and_logical_axis_rules_cm(role):
            return logprobs.frozen_completion_logprobs(
                model, prompt_tokens, completion_tokens, self.rollout.pad_id(),
                temperature=self.get_rollout_config(Mode.TRAIN).temperature, multiple=self.pad_multiple)

    def update_actor(self, *args, **kwargs):
        out = self._timed("update", super().update_actor, *args, **kwargs)
        self.share_backbone()
        return out

    def share_backbone(self) -> None:
        """Point the actor's frozen base weights back at the reference's arrays.

        Tunix's train step (``nnx.jit`` over the whole model) hands back new arrays
        for every weight, the untouched base included, so from the first update on
        the actor would hold a second copy of the backbone beside the reference's:
        memory doubles, silently (measured: live arrays grow by exactly one base
        model). Only LoRA parameters are optimised, so the values are the same.
        """
        base = nnx.state(self.inference_worker.get_model("reference"), nnx.Not(nnx.LoRAParam))
        nnx.update(self.actor_trainer.model, base)


class Learner(grpo_learner.GRPOLearner):
    """GRPOLearner with a rollout seed per step, the rollout's tokens and
    log-probabilities as reward columns, and tracetune's per-step metrics."""

    def __init__(self, *args, seed: int, composite: CompositeReward, tokenizer: Tokenizer, **kwargs):
        super().__init__(*args, **kwargs)
        self._seed = seed
        self._composite = composite
        self._tokenizer = tokenizer
        self.step_records: list[dict] = []  # this step's reward facts, read by the metrics hook

    def _generate_and_compute_advantage(self, training_input, mode=Mode.TRAIN):
        # _iter_steps counts micro-batches and is restored on resume, so a resumed run
        # draws the same samples. The rollout of a step comes with its last
        # micro-batch: dividing gives the step, whatever the micro-batching.
        config = self._training_config
        per_step = config.mini_batch_size // (config.train_micro_batch_size or config.mini_batch_size)
        counter = self._iter_steps // per_step if mode == Mode.TRAIN else self._eval_iter_steps
        self.rl_cluster.get_rollout_config(mode).seed = (self._seed * 1_000_003 + 2 * counter + (mode == Mode.EVAL)) % (2**31 - 1)
        example = super()._generate_and_compute_advantage(training_input, mode)
        if self.rl_cluster.logprob_path == "full":
            return example
        # Tunix pads prompts to max_prompt_tokens and completions to max_new_tokens;
        # the update trains on the step's own longest, rounded up to a bucket.
        example = trim_example(example, self.rl_cluster.rollout.pad_id(), self.rl_cluster.pad_multiple)
        if mode == Mode.TRAIN and self.step_records:
            self.step_records[-1]["widths"] = [int(example.prompt_ids.shape[1]), int(example.completion_ids.shape[1])]
        return example

    def _check_finite(self, rollout, engine) -> None:
        """Stop before the step is trained or saved if the rollout's log-probs are not
        finite. A diverged update can leave weights that are finite but huge (Adam's
        step is about +-learning rate whatever the gradient), so apply_if_finite lets
        it through; the next rollout samples from NaN logits, ends at once, and its
        masked loss is a harmless 0. The rollout is where the damage shows first."""
        if isinstance(engine, TracetuneRollout):
            finite = all(g.finite for g in engine.last_generations)
        else:
            finite = all(np.isfinite(np.asarray(lp, np.float32)).all() for lp in rollout.logprobs)
        if finite:
            return
        trainer = self.rl_cluster.actor_trainer
        done = trainer.train_steps  # this rollout sampled from the weights after `done` updates
        manager = trainer.checkpoint_manager._checkpoint_manager
        saved = sorted(manager.all_steps()) if manager is not None else []
        good = [s for s in saved if s < done] if done else saved
        bad = [s for s in saved if s >= done] if done else []
        raise TrainingError(
            f"the policy's log-probabilities are not finite in step {done + 1}'s rollout: the weights after update {done} "
            "diverged, so the run stopped before training or saving further. "
            f"Last good checkpoint: {'step ' + str(good[-1]) if good else 'none'}"
            + (f" (checkpoint {', '.join(map(str, bad))} holds the diverged weights)" if bad else "")
            + ". Lower grpo.learning_rate or grpo.max_grad_norm and start a new run directory."
        )

    def _temperature_one_logprobs(self, rollout, temperature: float) -> list[np.ndarray]:
        """The completion tokens' log-probs at temperature 1, as evaluation scores the
        confidence term. Tunix's samplers report log-probs of logits / temperature;
        at any other temperature they are recomputed with the actor, whose weights
        sampled this rollout."""
        if temperature in (0.0, 1.0):
            return [np.asarray(lp, np.float32) for lp in rollout.logprobs]
        pad = self._tokenizer.pad_id
        width = max(1, max(len(t) for t in rollout.tokens))
        completions = np.full((len(rollout.tokens), width), pad, np.int32)  # [B, C] right-padded
        for row, tokens in enumerate(rollout.tokens):
            completions[row, : len(tokens)] = tokens
        values = np.asarray(logprobs.frozen_completion_logprobs(
            self.rl_cluster.actor_trainer.model, np.asarray(rollout.left_padded_prompt_tokens), completions, pad,
            multiple=self.rl_cluster.pad_multiple))
        return [values[row, : len(tokens)] for row, tokens in enumerate(rollout.tokens)]

    def _compute_rewards(self, prompts, completions, mode, step=None, **kwargs):
        rollout = self.rl_cluster.last_rollout
        engine = self.rl_cluster.rollout
        self._check_finite(rollout, engine)
        config = self.rl_cluster.get_rollout_config(mode)
        if isinstance(engine, TracetuneRollout):  # its log-probs are already at temperature 1
            texts = [g.token_texts for g in engine.last_generations]
            truncated = [g.finish_reason == "length" for g in engine.last_generations]
            token_logprobs = [np.asarray(lp, np.float32) for lp in rollout.logprobs]
        else:
            texts = [self._tokenizer.token_texts(t) for t in rollout.tokens]
            truncated = [len(t) >= config.max_tokens_to_generate for t in rollout.tokens]
            token_logprobs = self._temperature_one_logprobs(rollout, config.temperature)
        kwargs["token_texts"] = texts
        kwargs["token_logprobs"] = [[float(x) for x in lp] for lp in token_logprobs]
        start = time.perf_counter()
        rewards = super()._compute_rewards(prompts, completions, mode, step, **kwargs)
        phases = self.rl_cluster.phase_seconds
        phases["reward"] = phases.get("reward", 0.0) + time.perf_counter() - start
        groups = np.asarray(rewards).reshape(-1, self.algo_config.num_generations)  # [prompts, G]
        self.step_records.append({
            "seed": int(self.rl_cluster.get_rollout_config(mode).seed),
            "components": {k: float(np.mean(v)) for k, v in self._composite.last.items()},
            "composite": float(np.mean(rewards)),
            "zero_spread": float(np.mean(groups.std(axis=1) == 0)),
            "truncated": float(np.mean(truncated)),
            "length": float(np.mean([len(t) for t in rollout.tokens])),
            "samples": [
                {"prompt": p, "completion": c, "reward": float(r), "reference": str(ref),
                 **{k: float(v[i]) for k, v in self._composite.last.items()}}
                for i, (p, c, r, ref) in enumerate(zip(prompts, completions, rewards, kwargs.get("reference", [""] * len(prompts))))
            ],
        })
        return rewards


def trim_example(example, pad_id: int, multiple: int):
    """A GRPO TrainExample with its all-padding columns cut: prompt columns from the
    left (prompts are left-padded), completion columns from the right, down to
    ``logprobs.trimmed_widths``. Every micro-batch of a step shares the shape."""
    P, C = logprobs.trimmed_widths(np.asarray(example.prompt_ids), np.asarray(example.completion_ids), pad_id, multiple)
    per_token = {name: getattr(example, name)[:, :C] for name in ("ref_per_token_logps", "old_per_token_logps")
                 if getattr(example, name) is not None}
    return example.replace(prompt_ids=example.prompt_ids[:, -P:], prompt_mask=example.prompt_mask[:, -P:],
                           completion_ids=example.completion_ids[:, :C], completion_mask=example.completion_mask[:, :C],
                           **per_token)


def vllm_settings(grpo: GRPOConfig, loaded: LoadedModel, mesh: jax.sharding.Mesh) -> dict:
    """RolloutConfig fields for Tunix's vLLM engine: vLLM builds the architecture from
    a Hugging Face id and starts from dummy weights, which Tunix then replaces with
    the actor's before every rollout, on the rollout mesh's (fsdp, tp) layout."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("grpo.rollout_engine=vllm needs vLLM (pip install vllm, on a GPU or TPU host); it is not "
                          "installed here. Use grpo.rollout_engine=vanilla (Tunix's sampler) or tracetune.")
    model = grpo.vllm_model
    if not model:
        base = str(loaded.name).split(" + ")[0]
        spec = MODELS.get(base)
        if spec is None or not spec.hf_repo:
            raise ConfigError(f"grpo.vllm_model: cannot tell which Hugging Face architecture {loaded.name!r} is; "
                              "set it, e.g. --set grpo.vllm_model=google/gemma-3-1b-it")
        model = spec.hf_repo
    return {
        "rollout_vllm_model_version": model,
        "rollout_vllm_hbm_utilization": grpo.vllm_memory_fraction,
        "rollout_vllm_init_with_random_weights": True,
        "tensor_parallel_size": mesh.shape["tp"],
        "data_parallel_size": mesh.shape["fsdp"],
    }


def cluster_models(cluster: rl_cluster_lib.RLCluster) -> dict[str, nnx.Module]:
    """The models the cluster ended up with, by role (it drops its own handles)."""
    return {"actor": cluster.actor_trainer.model, "reference": cluster.inference_worker.get_model("reference"),
            "rollout": cluster.rollout.model()}


def check_shared_backbone(cluster: rl_cluster_lib.RLCluster) -> None:
    """Actor, reference and rollout must hold one copy of the base weights (LoRA
    only differs): with two copies the run still works, at twice the memory, and
    Tunix only logs a warning. Stop instead, before the first step."""
    models = cluster_models(cluster)
    for role in ("reference", "rollout"):
        if not isinstance(models[role], nnx.Module):  # vLLM: its own copy, in its own memory pool
            continue
        if not rl_utils.is_sharing_backbone(models[role], models["actor"]):
            raise TrainingError(f"the actor and the {role} hold separate copies of the base weights (memory doubled): "
                                "build the actor with lora.lora_on_mesh on the reference, all on one mesh")


# ------------------------------------------------------------------------ data


def prompt_examples(config: Config, tokenizer: Tokenizer) -> list[Example]:
    """Training problems whose prompt fits the budget, in file order."""
    data, grpo = config.data, config.grpo
    examples = load_examples(data.source, "train", question_field=data.question_field, answer_field=data.answer_field,
                             skip_invalid=data.skip_invalid).examples
    fitting = [e for e in examples if len(tokenizer.encode(build_prompt(e.question, data.prompt_style))) <= grpo.max_prompt_tokens]
    return fitting[: grpo.train_examples or None]


@dataclass
class PromptBatches:
    """{'prompts', 'reference'} batches (np.arrays, as Tunix needs) in an order fixed by
    the seed; Tunix resumes by re-reading and skipping, and ``stop`` ends the stream."""

    examples: list[Example]
    per_step: int
    seed: int
    prompt_style: str
    stop: StopFlag

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            for start in range(0, len(order) - self.per_step + 1, self.per_step):
                if self.stop.signum is not None:
                    return
                # Every host walks the same global order and keeps its own share.
                rows = [self.examples[i] for i in mesh_lib.host_share(order[start : start + self.per_step])]
                yield {
                    "prompts": np.array([build_prompt(r.question, self.prompt_style) for r in rows]),
                    "reference": np.array([r.reference for r in rows]),
                }
            epoch += 1


# -------------------------------------------------------------------- warnings


def failure_warnings(history: Sequence[dict], window: int) -> dict[str, str]:
    """The known GRPO failure modes over the last ``window`` steps, with numbers.

    history: per-step records with "truncated", "zero_spread" and
    "reward/correctness" / "reward/trace" (means over the step's completions).
    """
    if len(history) < window:
        return {}
    recent = history[-window:]
    out = {}
    truncated = np.mean([h["truncated"] for h in recent])
    if truncated > 0.5:
        out["truncated"] = (f"{truncated:.0%} of completions hit the token budget over the last {window} steps: raise grpo.max_new_tokens or expect little reward")
    spread = np.mean([h["zero_spread"] for h in recent])
    if spread > 0.8:
        out["zero_spread"] = (f"{spread:.0%} of groups had all G rewards equal over the last {window} steps: they carry no gradient (task too hard or too easy, or temperature too low)")
    if len(history) >= 2 * window and "reward/trace" in recent[0] and "reward/correctness" in recent[0]:
        before = history[-2 * window : -window]
        trace_gain = np.mean([h["reward/trace"] for h in recent]) - np.mean([h["reward/trace"] for h in before])
        correct_gain = np.mean([h["reward/correctness"] for h in recent]) - np.mean([h["reward/correctness"] for h in before])
        if trace_gain > 0.05 and correct_gain < -0.05:
            out["trace_gaming"] = (f"trace score rose {trace_gain:+.2f} while correctness fell {correct_gain:+.2f} over the last {window} steps: the policy may be gaming the trace rubric")
    return out


# ------------------------------------------------------------------------- run


@dataclass
class GRPOResult:
    run_dir: Path
    steps: int
    history: list[dict]
    merged_dir: Path
    adapter_dir: Path
    seconds: float


class GRPORun:
    """One GRPO run directory: config.yaml, checkpoints/, metrics.jsonl, tensorboard/,
    samples.jsonl, export/."""

    def __init__(self, config: Config, run_dir: Path, *, init: LoadedModel | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.init = init
        self.started = time.perf_counter()
        self.history: list[dict] = []
        self.warned: set[str] = set()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _append(self, path: Path, record: dict) -> None:
        append_record(path, record)

    def _on_metrics(self, buffer) -> None:
        """Called by RLCluster once per finished step with the step's buffered metrics."""
        if buffer.mode != "train" or not self.learner.step_records:
            return
        records, self.learner.step_records = self.learner.step_records, []
        self.watch.check()  # a writer thread that died (full disk) stops the run here
        check_saves(self.cluster.actor_trainer.checkpoint_manager, self.run_dir / "checkpoints" / "actor")
        step = int(self.cluster.actor_trainer.train_steps)
        logger = self.cluster.actor_trainer.metrics_logger

        def actor_metric(name: str) -> float | None:
            if logger.metric_exists("actor", name, "train"):
                return float(np.asarray(logger.get_metric("actor", name, "train")))
            return None

        # The actor's loss and KL arrive one update late (Tunix buffers them); a
        # non-finite loss was an update that apply_if_finite skipped.
        loss = actor_metric("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at step {step}; the update was skipped and the run stopped. "
                f"Last good checkpoint: step {self.cluster.actor_trainer.checkpoint_manager.latest_step()}. "
                "Lower grpo.learning_rate or grpo.max_grad_norm and start a new run directory."
            )
        record = {
            "step": step,
            "reward/composite": float(np.mean([r["composite"] for r in records])),
            **{f"reward/{k}": float(np.mean([r["components"][k] for r in records])) for k in records[0]["components"]},
            "zero_spread": float(np.mean([r["zero_spread"] for r in records])),
            "truncated": float(np.mean([r["truncated"] for r in records])),
            "completion_length": float(np.mean([r["length"] for r in records])),
            "padded_widths": [r["widths"] for r in records if "widths" in r],  # [prompt, completion] the update trained on
            "rollout_seeds": [r["seed"] for r in records],
            "loss": loss,
            "kl": actor_metric("kl"),
            "seconds": {k: round(v, 3) for k, v in self.cluster.phase_seconds.items()},
            "elapsed_seconds": time.perf_counter() - self.started,
            "reward_weights": self.config.rewards.as_dict(),
        }
        self.cluster.phase_seconds = {}
        self.history.append(record)
        self._append(self.metrics_path, record)
        for key in ("zero_spread", "truncated", "reward/correctness", "reward/trace", "reward/confidence"):
            if key in record:
                logger.log("tracetune", key, record[key], tunix_metrics.Mode.TRAIN, step)
        every = self.config.grpo.sample_every_steps
        if every and (step % every == 0 or step == 1):
            for sample in records[0]["samples"]:
                self._append(self.run_dir / "samples.jsonl", {"step": step, **sample})
        window = self.config.grpo.warn_window
        for kind, warning in failure_warnings(self.history, window).items():
            if kind not in self.warned or step % window == 0:  # loud, but not on every step
                print(f"warning: step {step}: {warning}", file=sys.stderr)
            self.warned.add(kind)
        if not sys.stderr.isatty() and (step % max(1, self.steps // 10) == 0 or step == self.steps):
            parts = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in record.items() if k.startswith("reward/"))
            print(f"step {step}/{self.steps} {parts} zero-spread {record['zero_spread']:.0%} "
                  f"truncated {record['truncated']:.0%}", file=sys.stderr)

    def _init_model(self) -> LoadedModel:
        if self.init is not None:
            return self.init
        grpo = self.config.grpo
        source = grpo.init or str(Path("runs") / self.config.preset / "sft")
        return load_model(source, dtype=grpo.dtype)

    def train(self) -> GRPOResult:
        # From the first metrics logger on (JAX reports compile times to TensorBoard
        # from the trainer's construction), a writer thread that dies stops the run.
        with FaultWatch.for_run(self.run_dir) as self.watch:
            return self._train()

    def _train(self) -> GRPOResult:
        grpo = self.config.grpo
        claim_directory(self.run_dir, self.config, ("data", "rewards", "grpo"))
        loaded = self._init_model()
        tokenizer = loaded.tokenizer
        examples = prompt_examples(self.config, tokenizer)
        if len(examples) < grpo.prompts_per_step:
            raise TrainingError(f"only {len(examples)} training problems fit grpo.max_prompt_tokens={grpo.max_prompt_tokens}")
        self.steps = grpo.max_steps

        batch, micro = grpo.prompts_per_step, grpo.micro_batch_size or grpo.prompts_per_step
        mesh = mesh_lib.make_mesh(self.config.mesh)
        mesh_lib.check_batch(mesh, micro * grpo.num_generations, "grpo.micro_batch_size x grpo.num_generations")
        mesh_lib.check_batch(mesh, batch, "grpo.prompts_per_step")
        mesh_lib.check_heads(mesh, loaded.config.num_heads, loaded.name)
        # One backbone: the reference is the SFT model itself, the actor only adds
        # adapters to it (lora_on_mesh keeps that true on any mesh).
        reference, actor = lora_on_mesh(loaded.model, grpo.lora, grpo.seed, mesh)
        loaded = dataclasses.replace(loaded, model=reference)  # no unsharded copy left behind

        # A damaged newest checkpoint is moved aside before the trainer restores.
        set_aside_damaged_checkpoints(self.run_dir / "checkpoints" / "actor")  # RLCluster saves the actor there
        warmup = int(grpo.warmup_fraction * grpo.max_steps)
        schedule = optax.join_schedules([optax.linear_schedule(0.0, grpo.learning_rate, max(warmup, 1)),
                                         optax.constant_schedule(grpo.learning_rate)], [warmup]) if warmup else grpo.learning_rate
        training = rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer(schedule, grpo.max_grad_norm),
            eval_every_n_steps=1 << 30,
            max_steps=grpo.max_steps,
            mini_batch_size=batch,  # one optimizer update per step
            train_micro_batch_size=micro,  # gradient accumulation over batch // micro passes
            rollout_micro_batch_size=batch,  # one rollout of all batch x G completions
            compute_logps_micro_batch_size=micro,
            checkpoint_root_directory=str((self.run_dir / "checkpoints").resolve()),
            checkpointing_options=checkpoint_options(grpo.checkpoint_minutes, grpo.checkpoint_steps, grpo.keep_checkpoints),
            metrics_logging_options=metrics_options(self.run_dir / "tensorboard", self.watch),
            pbar_description="grpo",
        )
        rollout = base_rollout.RolloutConfig(
            max_tokens_to_generate=grpo.max_new_tokens,
            max_prompt_length=grpo.max_prompt_tokens,
            temperature=grpo.temperature,
            top_p=grpo.top_p,
            top_k=grpo.top_k or None,
            seed=grpo.seed,
            kv_cache_size=grpo.max_prompt_tokens + grpo.max_new_tokens + 32,
            return_logprobs=True,
            eos_tokens=list(tokenizer.stop_ids),
            **(vllm_settings(grpo, loaded, mesh) if grpo.rollout_engine == "vllm" else {}),
        )
        engine = (functools.partial(TracetuneRollout, tracetune_tokenizer=tokenizer, lora=grpo.lora)
                  if grpo.rollout_engine == "tracetune" else grpo.rollout_engine)
        cluster_config = rl_cluster_lib.ClusterConfig(
            role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh},
            rollout_engine=engine,
            offload_to_cpu=False,
            training_config=training,
            rollout_config=rollout,
        )
        self.cluster = Cluster(actor=actor, reference=reference, tokenizer=tokenizer.sp, cluster_config=cluster_config,
                               logprobs=grpo.logprobs, pad_multiple=grpo.pad_multiple)
        check_shared_backbone(self.cluster)
        composite = CompositeReward(self.config.rewards)
        algorithm = grpo_learner.GRPOConfig(num_generations=grpo.num_generations, num_iterations=1, beta=grpo.beta, epsilon=grpo.epsilon,
                                            # logprobs.py registers "tracetune": Tunix's GRPO loss on the chunked path
                                            policy_loss_fn="tracetune" if grpo.logprobs == "chunked" else "grpo")
        self.learner = Learner(rl_cluster=self.cluster, algo_config=algorithm, reward_fns=[composite],
                               seed=grpo.seed, composite=composite, tokenizer=tokenizer)
        resumed = self.cluster.actor_trainer.train_steps
        # The forced final save carries no step metadata: count steps from the trainer.
        self.cluster.global_steps = resumed
        self.history = truncate_metrics(self.metrics_path, resumed)
        truncate_metrics(self.run_dir / "samples.jsonl", resumed)  # redone steps write their samples again
        if resumed:
            print(f"resuming {self.run_dir} from step {resumed}/{self.steps}", file=sys.stderr)
        self.cluster.with_external_metrics_logger(self._on_metrics)
        w = self.config.rewards
        print(f"grpo: {len(examples)} problems, {self.steps} updates of {batch} prompts x G={grpo.num_generations}, "
              f"R = {w.correctness} correctness + {w.trace} trace + {w.confidence} confidence, "
              f"from {loaded.source}, {grpo.rollout_engine} rollouts, {mesh_lib.describe(mesh)}", file=sys.stderr)

        with StopFlag() as stop:
            data = PromptBatches(examples, batch, grpo.seed, self.config.data.prompt_style, stop)
            try:
                if resumed < self.steps:
                    with mesh_lib.active(mesh):
                        self.learner.train(data)
                check_saves(self.cluster.actor_trainer.checkpoint_manager, self.run_dir / "checkpoints" / "actor")
            except BaseException as error:
                failure = failed_run(error, self.run_dir / "checkpoints" / "actor", self.cluster.actor_trainer.checkpoint_manager.close)
                if failure is error:
                    raise
                raise failure from None
        step = self.cluster.actor_trainer.train_steps
        if stop.signum is not None:
            raise Interrupted(stop.signum, step, self.run_dir)
        adapter_dir, merged_dir = export_run(actor, loaded, grpo.lora, self.run_dir, stage="grpo", step=step)
        quarter = max(1, len(self.history) // 4)
        summary = {
            "steps": step,
            "reward_weights": self.config.rewards.as_dict(),
            "first_quarter": _means(self.history[:quarter]),
            "last_quarter": _means(self.history[-quarter:]),
            "seconds": time.perf_counter() - self.started,
            "warnings": sorted(self.warned),
        }
        if is_primary():
            with atomic_path(self.run_dir / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2) + "\n")
        return GRPOResult(self.run_dir, step, self.history, merged_dir, adapter_dir, summary["seconds"])


def _means(records: Sequence[dict]) -> dict[str, float]:
    keys = [k for k in (records[0] if records else {}) if k.startswith("reward/") or k in ("zero_spread", "truncated", "kl")]
    values = {k: [r[k] for r in records if r.get(k) is not None] for k in keys}
    return {k: float(np.mean(v)) for k, v in values.items() if v}


def train_grpo(config: Config, run_dir: Path, *, init: LoadedModel | None = None) -> GRPOResult:
    """Train (or resume) the GRPO stage of ``config`` in ``run_dir``."""
    return GRPORun(config, run_dir, init=init).train()
