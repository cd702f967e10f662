"""Stage 2: GRPO from the SFT policy with the composite reward.

Tunix's ``GRPOLearner`` and ``RLCluster`` run the algorithm (G completions per
prompt, group-normalised advantages, clipped ratio, KL to the reference). The
reference policy is the SFT model; the actor is LoRA on that same model, so the
two share one backbone in memory. tracetune adds around it:

* the step as values: every engine's rollout becomes one ``rollout.StepRollout``
  (texts, tokens, temperature-1 log-probs, finish reasons), which the learner
  scores and hands to the run's metrics as one ``StepFacts``;
* the composite reward R = sum_k w_k * component_k over rewards.REWARDS (weights: config.RewardWeights),
  the weights from config, applied in ``rewards.combine`` only, with each
  component kept for the logs; the confidence term reads the rollout's
  temperature-1 log-probs, as evaluation scores it;
* the update's batch cut to the step's own widths (``train_batch``) before the
  reference pass, and the chunked log-prob path (``logprobs.py``);
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

import collections
import dataclasses
import functools
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.rl import function_registry
from tunix.rl import utils as rl_utils
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import utils as sft_utils
from tunix.sft import metrics_logger as tunix_metrics

from tracetune import logprobs
from tracetune import mesh as mesh_lib
from tracetune.config import Config, ConfigError, GRPOConfig, RewardWeights
from tracetune.data import Example, held_out_split, load_mix, mix_label, mix_problems
from tracetune.errors import Interrupted, TrainingError
from tracetune.files import atomic_path
from tracetune.format import build_prompt
from tracetune.evaluate import generate_and_score
from tracetune.generate import Generator
from tracetune.judge import JudgeError, RewardJudge, RewardScores
from tracetune.lora import BestAdapters, lora_on_mesh, merged_tree, use_adapter_step
from tracetune.models.registry import MODELS, LoadedModel, load_model
from tracetune.models.tokenizer import Tokenizer
from tracetune.rewards import REWARDS, combine, make_composite_reward, reward_components
from tracetune.rollout import StepRollout, TracetuneRollout, TunixEngineRollout
from tracetune.scoring import aggregate
from tracetune.runs import (CompileClock, FaultWatch, StopFlag, append_record, check_saves, checkpoint_options, claim_directory, failed_run,
                            is_primary, metrics_options, optimizer, restoring, set_aside_damaged_checkpoints, truncate_metrics)

Role, Mode = rl_cluster_lib.Role, rl_cluster_lib.Mode


# ------------------------------------------------------------------ one step


@dataclass(frozen=True)
class Scored:
    """A rollout with its batch columns (repeated G times, as Tunix lays them out),
    each reward component and the composite, per completion."""

    rollout: StepRollout
    columns: dict[str, list]
    components: dict[str, list[float]]
    rewards: np.ndarray  # [B]; nan where excluded
    excluded: np.ndarray | None = None  # [B] bool: the judge gave no score, so the completion has no reward and trains nothing

    def __post_init__(self) -> None:
        if self.excluded is None:
            object.__setattr__(self, "excluded", np.zeros(len(self.rewards), bool))

    def take(self, rows: Sequence[int]) -> Scored:
        return Scored(self.rollout.take(rows), {k: [v[i] for i in rows] for k, v in self.columns.items()},
                      {k: [v[i] for i in rows] for k, v in self.components.items()}, self.rewards[list(rows)],
                      self.excluded[list(rows)])

    @staticmethod
    def concat(parts: Sequence[Scored], pad_id: int) -> Scored:
        return Scored(StepRollout.concat([p.rollout for p in parts], pad_id),
                      # Tunix's own columns (trajectory_ids, ...) come with the step's batch only
                      {k: [x for p in parts for x in p.columns[k]] for k in parts[0].columns
                       if all(k in p.columns for p in parts)},
                      {k: [x for p in parts for x in p.components[k]] for k in parts[0].components},
                      np.concatenate([p.rewards for p in parts]), np.concatenate([p.excluded for p in parts]))

    def spread(self, on: str, G: int) -> np.ndarray:
        """[groups] whether a group's G values of ``on`` ("reward": the composite, or
        a component) differ: a group without spread has zero advantage."""
        if on in ("reward", "off"):
            values = np.asarray(self.rewards, np.float64)
        else:  # a component undefined for a row's kind (None: an open row's correctness) has no spread
            values = np.asarray([math.nan if v is None else v for v in self.components[on]], np.float64)
        values = np.where(self.excluded, math.nan, values).reshape(-1, G)  # [B / G, G]
        # over the completions that have a value (fmax/fmin skip nan); a nan never compares > 0
        return np.fmax.reduce(values, axis=1) - np.fmin.reduce(values, axis=1) > 0  # [B / G]


def fill_with_spread(first: Scored, sample: Callable[[int], Scored], on: str, G: int, rounds: int, pad_id: int) -> tuple[Scored, Scored]:
    """DAPO's dynamic sampling (Yu et al., 2025): a step's groups whose G values of
    ``on`` are all equal carry no gradient; they are replaced by groups with spread
    from ``sample(round)`` (a whole step's fresh prompts: a full batch decodes
    fastest), for up to ``rounds`` rounds. Groups still missing after the cap
    are the first rollout's, trained as sampled. Returns (trained, everything sampled):
    the trained step has as many groups as ``first``, those with spread first."""
    wanted = len(first.rewards) // G

    def groups(scored: Scored, keep: np.ndarray) -> list[Scored]:
        return [scored.take(range(g * G, (g + 1) * G)) for g in np.flatnonzero(keep)]

    spread = first.spread(on, G)
    kept, spare, sampled = groups(first, spread), groups(first, ~spread), [first]
    for round in range(1, rounds + 1):
        if len(kept) >= wanted:
            break
        extra = sample(round)
        sampled.append(extra)
        kept += groups(extra, extra.spread(on, G))
    if len(sampled) == 1:
        return first, first
    return Scored.concat((kept + spare)[:wanted], pad_id), Scored.concat(sampled, pad_id)


def sample_rounds(batch: dict[str, list], refills: Sequence[dict[str, list]], sample: Callable[[dict[str, list], int], Scored],
                  on: str, G: int, each: int, pad_id: int) -> tuple[Scored, Scored]:
    """A step's prompts (``batch``) and the dynamic-sampling filter's ``refills``
    (one batch of rows a round), rolled out ``each`` rounds a rollout by
    ``sample(rows, call)`` (0: every round in the first, one batch), until the step
    has its groups with spread or the rounds are spent; then ``fill_with_spread``.
    Returns (trained, everything sampled).

    A decode step costs far less than twice as much at twice the rows
    (bench/generate.py: 112 tok/s at B=8, 173 at B=32), so a rollout's rounds are
    sampled together and count as the filter's spend whether or not they are used.
    Where groups with spread are rare (the 270M after SFT: about one group in ten),
    rollouts that stop once they are found buy more of them per minute than a fixed
    batch of rounds."""
    each = each or len(refills)
    calls = [[batch, *refills[:each]]] + [list(refills[i : i + each]) for i in range(each, len(refills), each)]
    wanted = len(batch["prompts"]) // G
    pieces: list[Scored] = []
    rollouts: list[Scored] = []
    found = 0  # groups with spread so far
    for call, parts in enumerate(calls):
        shared = [k for k in parts[0] if all(k in part for part in parts)]  # not Tunix's own (trajectory_ids)
        together = sample({k: [x for part in parts for x in part[k]] for k in shared}, call)
        rollouts.append(together)
        bounds = np.cumsum([0] + [len(part["prompts"]) for part in parts])
        pieces += [together.take(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        found += int(together.spread(on, G).sum())  # a rollout's groups are its pieces' groups
        if found >= wanted:
            break
    trained, _ = fill_with_spread(pieces[0], lambda round: pieces[round], on, G, len(pieces) - 1, pad_id)
    return trained, rollouts[0] if len(rollouts) == 1 else Scored.concat(rollouts, pad_id)


def group_advantages(rewards: np.ndarray, excluded: np.ndarray, G: int, estimator: str) -> np.ndarray:
    """[B] advantages by Tunix's registered ``estimator``, each group of G on its
    own. A completion without a reward (the judge gave it no score) is left out:
    its group's advantages are the estimator's over the k completions that have
    one (k >= 2; else the group carries no gradient), and its own is 0."""
    estimate = function_registry.get_advantage_estimator(estimator)
    if not excluded.any():
        return np.asarray(estimate(rewards=rewards, num_generations=G))
    advantages = np.zeros(len(rewards), np.float32)  # [B]
    for start in range(0, len(rewards), G):
        kept = start + np.flatnonzero(~excluded[start : start + G])  # [k]
        if len(kept) >= 2:
            advantages[kept] = np.asarray(estimate(rewards=np.asarray(rewards[kept]), num_generations=len(kept)))
    return advantages


class JudgeOutage(TrainingError):
    """More of a step's completions went unscored by the judge than
    ``judge.max_unscored`` allows: the run stops (with a checkpoint) rather than
    train on a reward that is mostly missing."""


@dataclass(frozen=True)
class StepFacts:
    """What one GRPO step's rollout and scoring produced, handed to the run's
    metrics as one value: the trained rollout, each reward component and the
    composite per trained completion, the widths the update trains on, the rollout
    seed, and the seconds of each phase the learner ran (the update's come from the
    cluster). ``sampled`` is everything the step sampled, the completions the
    dynamic-sampling filter set aside included (the policy's own rewards), and
    ``spread_on`` the signal whose spread the filter asks for."""

    trained: Scored
    sampled: Scored
    widths: tuple[int, int]  # [prompt, completion] columns of the TrainExample
    seed: int
    seconds: dict[str, float]
    num_generations: int
    spread_on: str = "reward"
    judge: RewardScores | None = None  # what the judge was asked this step (every sampled completion)

    @property
    def rollout(self) -> StepRollout:
        return self.trained.rollout

    def record(self) -> dict:
        """The step's entries of metrics.jsonl: rewards are means over every sampled
        completion; ``groups_with_spread`` is the share of trained groups with spread,
        ``filter_rollouts`` the completions the filter sampled beyond the step's own."""
        G, sampled, trained = self.num_generations, self.sampled, self.trained
        return {
            "reward/composite": float(np.nanmean(sampled.rewards)) if not sampled.excluded.all() else None,
            # over the completions a component is defined for (an open row has no correctness);
            # a component defined for none of them is left out
            **{f"reward/{k}": float(np.mean(d)) for k, v in sampled.components.items() if (d := [x for x in v if x is not None])},
            "zero_spread": float(np.mean(~sampled.spread(self.spread_on, G))),
            "groups_with_spread": float(np.mean(trained.spread(self.spread_on, G))),
            "filter_rollouts": len(sampled.rewards) - len(trained.rewards) if sampled is not trained else 0,
            "truncated": float(np.mean(trained.rollout.truncated)),
            "completion_length": float(np.mean(trained.rollout.lengths)),
            "padded_widths": [list(self.widths)],
            "rollout_seeds": [self.seed],
            "groups": [list(g) for g in self.groups()],
            **(self.judge.record() if self.judge is not None else {}),
        }

    def groups(self) -> list[tuple[str, bool]]:
        """(problem id, whether its G completions differed in the filter's signal) of
        every group the step sampled: the pass-rate curriculum's observations."""
        ids = self.sampled.columns.get("id")
        if ids is None:
            return []
        G = self.num_generations
        return [(str(ids[g * G]), bool(spread)) for g, spread in enumerate(self.sampled.spread(self.spread_on, G))]

    def samples(self) -> list[dict]:
        rollout, trained = self.trained.rollout, self.trained
        references = trained.columns.get("reference", [""] * len(rollout.prompts))
        return [{"prompt": p, "completion": c, "reward": None if math.isnan(r) else float(r), "reference": str(ref),
                 "finish_reason": why,
                 **{k: None if v[i] is None else float(v[i]) for k, v in trained.components.items()}}
                for i, (p, c, r, ref, why) in enumerate(zip(rollout.prompts, rollout.texts, trained.rewards, references,
                                                            rollout.finish_reasons))]


def train_batch(rollout: StepRollout, pad_id: int, budget: tuple[int, int], multiple: int | None, prompt_width: int = 0):
    """(prompt_ids [B, P], completion_ids [B, C]) of a step's update.

    budget: (max_prompt_tokens, max_new_tokens), the widths Tunix pads to. With
    ``multiple`` the batch is cut to its own longest prompt and longest completion,
    each rounded up to a multiple (``logprobs.trimmed_widths``); every micro-batch
    of the step shares that shape, so compiles stay bounded by the buckets.
    """
    prompt_ids = rollout.prompt_tokens  # [B, budget P] left-padded
    completion_ids = rollout.completion_tokens(pad_id, budget[1])  # [B, budget C] right-padded
    if multiple is None:
        return prompt_ids, completion_ids
    P, C = logprobs.trimmed_widths(prompt_ids, completion_ids, pad_id, multiple, prompt_width)
    return prompt_ids[:, -P:], completion_ids[:, :C]


class Cluster(rl_cluster_lib.RLCluster):
    """RLCluster that hands the learner each rollout as a ``StepRollout`` and times
    the update (for logs and bench/grpo.py).

    With ``logprobs="chunked"`` the reference's and the old policy's log-probs come
    from ``logprobs.frozen_completion_logprobs`` (no [B, L, V] logits), at the
    rollout temperature as Tunix's loss uses it; "full" keeps Tunix's own path.
    """

    def __init__(self, *args, logprobs: str = "full", pad_multiple: int = 32, prompt_width: int = 0, tokenizer_tt: Tokenizer,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.logprob_path = logprobs
        self.pad_multiple = pad_multiple
        self.prompt_width = prompt_width
        self.update_seconds = 0.0  # the wall time of the updates since the last take_update_seconds()
        engine = self.rollout
        # tracetune's engine reports everything a step needs itself; Tunix's engines
        # are normalised (token texts from the tokenizer, temperature-1 log-probs).
        self.rollouts = engine if isinstance(engine, TracetuneRollout) else TunixEngineRollout(
            engine, tokenizer_tt, policy=lambda: self.actor_trainer.model, pad_multiple=pad_multiple)
        if sft_utils.is_lora_enabled(self.actor_trainer.model):
            self._anchor_policy_state = self._anchor()  # Tunix's own is a whole model's copy: freed here

    def _anchor(self) -> nnx.State:
        """The actor's weights at the start of a step (Tunix's "anchor"; only
        ``get_actor_per_token_logps`` reads it, which Tunix's agentic learner calls
        and tracetune's learner does not).

        Tunix snapshots the whole actor onto the host memory kind at every step: on
        an accelerator that is host RAM, on a CPU a second copy of the model in the
        same memory (1.1 GB for the 270M), live through every update (measured:
        unique live buffers 2.22 GB in a GRPO update, 1.09 GB of them the model).
        Only the adapters change during GRPO, so this snapshot shares the frozen
        base and copies the adapters alone (the update donates the live ones)."""
        model = self.actor_trainer.model
        adapters, base = nnx.state(model, nnx.LoRAParam, ...)
        return nnx.merge_state(jax.tree.map(jnp.copy, adapters), base)

    def sync_weights(self):
        """Tunix's ``sync_weights`` (the rollout engine gets the new adapters, the
        step count advances) with ``_anchor``'s snapshot instead of a whole copy."""
        model = self.actor_trainer.model
        if not sft_utils.is_lora_enabled(model):  # every weight trains: the copy is the snapshot
            return super().sync_weights()
        self.rollout.update_params(nnx.state(model, nnx.LoRAParam), (nnx.LoRAParam,))
        self._anchor_policy_state = self._anchor()
        self.global_steps += 1

    def rollout_step(self, prompts: list[str], mode: Mode) -> StepRollout:
        """All of a step's completions, sampled in one batch on the rollout mesh."""
        with self._get_mesh_and_logical_axis_rules_cm(Role.ROLLOUT):
            return self.rollouts.step_rollout(prompts, self.get_rollout_config(mode))

    def get_ref_per_token_logps(self, prompt_tokens, completion_tokens, pad_id, eos_id, micro_batch_size=None):
        if self.logprob_path == "full":
            return super().get_ref_per_token_logps(prompt_tokens, completion_tokens, pad_id, eos_id, micro_batch_size)
        return self._frozen_logprobs(Role.REFERENCE, self.inference_worker.get_model("reference"), prompt_tokens, completion_tokens)

    def get_old_per_token_logps(self, prompt_tokens, completion_tokens, micro_batch_size=None):
        if self.logprob_path == "full":
            return super().get_old_per_token_logps(prompt_tokens, completion_tokens, micro_batch_size)
        return self._frozen_logprobs(Role.ROLLOUT, self.rollout.model(), prompt_tokens, completion_tokens)

    def _frozen_logprobs(self, role, model, prompt_tokens, completion_tokens):
        with self._get_mesh_and_logical_axis_rules_cm(role):
            return logprobs.frozen_completion_logprobs(
                model, prompt_tokens, completion_tokens, self.rollout.pad_id(),
                temperature=self.get_rollout_config(Mode.TRAIN).temperature, multiple=self.pad_multiple,
                prompt_width=self.prompt_width)

    def update_actor(self, *args, **kwargs):
        trainer = self.actor_trainer
        if trainer._jitted_train_step_fn is None:  # Tunix clears it whenever the loss is set
            # Tunix's step (nnx.jit over the whole model) hands back new arrays for
            # every weight, the untouched base included: a second copy of the backbone
            # beside the reference's, live during every update (measured: live arrays
            # grow by exactly one base model). This step returns the adapters only.
            with self._get_mesh_and_logical_axis_rules_cm(Role.ACTOR):
                use_adapter_step(trainer)
        start = time.perf_counter()
        out = jax.block_until_ready(super().update_actor(*args, **kwargs))
        # one call per micro-batch: a step of several accumulates them all
        self.update_seconds += time.perf_counter() - start
        return out

    def take_update_seconds(self) -> float:
        """The updates' seconds since the last call (one step's, called once per step)."""
        seconds, self.update_seconds = self.update_seconds, 0.0
        return seconds


class Learner(grpo_learner.GRPOLearner):
    """GRPOLearner whose step (Tunix's ``_generate_and_compute_advantage``) passes the
    rollout along as one value: a rollout seed per step, one ``StepRollout`` from any
    engine, the update's batch cut to its own widths before the reference pass, the
    composite reward with its components (``rewards.reward_components`` and
    ``combine``, the same arithmetic as the reward function Tunix holds), and a
    ``StepFacts`` handed to ``on_step`` for the run's metrics."""

    def __init__(self, *args, seed: int, weights: RewardWeights, on_step: Callable[[StepFacts], None],
                 refill: Callable[[int, int], dict[str, np.ndarray]] | None = None, spread_on: str = "off",
                 max_filter_rounds: int = 0, rounds_per_rollout: int = 0, mask_truncated: bool = False,
                 judge: RewardJudge | None = None, max_unscored: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._judge = judge  # asked for the "judge" component's column before the pure rewards run
        self._max_unscored = max_unscored
        self._judged: list[RewardScores] = []  # this step's judge calls (the filter's rounds included)
        self._seed = seed
        self._weights = weights
        self._on_step = on_step
        self._refill = refill  # (step, round) -> a fresh batch of prompts, for the dynamic-sampling filter
        self._spread_on = spread_on
        self._max_filter_rounds = max_filter_rounds
        self._rounds_per_rollout = rounds_per_rollout
        self._mask_truncated = mask_truncated

    def _rollout_step(self, mode) -> int:
        # _iter_steps counts micro-batches and is restored on resume, so a resumed run
        # draws the same samples. The rollout of a step comes with its last
        # micro-batch: dividing gives the step, whatever the micro-batching.
        config = self._training_config
        per_step = config.mini_batch_size // (config.train_micro_batch_size or config.mini_batch_size)
        return self._iter_steps // per_step if mode == Mode.TRAIN else self._eval_iter_steps

    def _rollout_seed(self, mode) -> int:
        counter = self._rollout_step(mode)
        return (self._seed * 1_000_003 + 2 * counter + (mode == Mode.EVAL)) % (2**31 - 1)

    def _sample(self, batch: dict[str, list], mode, call: int = 0) -> Scored:
        """Roll out ``batch`` (prompts repeated G times) and score every completion;
        ``call`` counts the step's rollouts (the filter's later ones), each its own seed."""
        self.rl_cluster.get_rollout_config(mode).seed = (self._rollout_seed(mode) + 7919 * call) % (2**31 - 1)
        prompts = [str(p) for p in batch["prompts"]]
        rollout = self.rl_cluster.rollout_step(prompts, mode)
        if not rollout.finite:
            raise self._diverged()
        columns = {k: list(v) for k, v in batch.items() if k != "prompts"}
        excluded = np.zeros(len(prompts), bool)  # [B]
        if self._judge is not None:
            judged = self._ask_judge(columns, rollout.texts)
            columns["judge_score"] = judged.scores
            excluded = np.array([s is None for s in judged.scores])
        components = reward_components(prompts, rollout.texts, self._weights, **columns, **rollout.reward_columns())
        rewards = np.full(len(prompts), np.nan, np.float32)  # [B]; an unscored completion has no reward
        kept = np.flatnonzero(~excluded)
        if len(kept):
            rewards[kept] = combine({k: [v[i] for i in kept] for k, v in components.items()}, self._weights)
        return Scored(rollout, columns, components, rewards, excluded)

    def _ask_judge(self, columns: dict[str, list], texts: Sequence[str]) -> RewardScores:
        """The judge's scores for a rollout (columns as the batch lays them out, G
        rows per prompt); a judge that refuses us (401, 403, 404) is an outage too."""
        rows = [{"id": i, "question": q, "reference": r, "kind": k, "completion": c}
                for i, q, r, k, c in zip(columns["id"], columns["question"], columns["reference"], columns["kind"], texts, strict=True)]
        try:
            judged = self._judge.score(rows, self.algo_config.num_generations)
        except JudgeError as error:
            raise JudgeOutage(f"the judge refused the reward's requests: {error}") from None
        self._judged.append(judged)
        return judged

    def _with_spread(self, batch: dict[str, list], mode) -> tuple[Scored, Scored]:
        """The step's prompts and its refill rounds (see ``sample_rounds``)."""
        G = self.algo_config.num_generations
        step = self._rollout_step(mode)
        refills = [{k: list(np.repeat(np.asarray(v), G)) for k, v in self._refill(step, round).items()}
                   for round in range(1, self._max_filter_rounds + 1)]
        return sample_rounds(batch, refills, lambda rows, call: self._sample(rows, mode, call), self._spread_on, G,
                             self._rounds_per_rollout, self.rl_cluster.rollout.pad_id())

    def _generate_and_compute_advantage(self, training_input, mode=Mode.TRAIN):
        cluster, algo = self.rl_cluster, self.algo_config
        G = algo.num_generations
        config = cluster.get_rollout_config(mode)
        seed = self._rollout_seed(mode)
        start = time.perf_counter()
        self._judged = []
        batch = {k: list(v) for k, v in training_input.items()}
        if mode == Mode.TRAIN and self._spread_on != "off" and self._refill is not None and self._max_filter_rounds:
            trained, sampled = self._with_spread(batch, mode)
        else:
            trained = sampled = self._sample(batch, mode)
        rollout = trained.rollout
        seconds = {"rollout": sampled.rollout.seconds, "reward": time.perf_counter() - start - sampled.rollout.seconds}
        judged = RewardScores.total(self._judged) if self._judged else None
        if judged is not None:
            seconds["judge"] = judged.seconds
            if trained.excluded.mean() > self._max_unscored:
                raise self._outage(trained, judged)
        pad = cluster.rollout.pad_id()
        # Tunix pads prompts to max_prompt_tokens and completions to max_new_tokens;
        # the chunked path trains on the step's own longest, rounded up to a bucket.
        prompt_ids, completion_ids = train_batch(
            rollout, pad, (config.max_prompt_length, config.max_tokens_to_generate),
            cluster.pad_multiple if cluster.logprob_path == "chunked" else None, cluster.prompt_width)
        prompt_ids, completion_ids = jnp.asarray(prompt_ids), jnp.asarray(completion_ids)
        reference = old = None
        if algo.beta != 0.0:
            start = time.perf_counter()
            reference = jax.block_until_ready(cluster.get_ref_per_token_logps(
                prompt_tokens=prompt_ids, completion_tokens=completion_ids, pad_id=pad, eos_id=cluster.rollout.eos_id(),
                micro_batch_size=self._compute_logps_micro_batch_size * G))
            seconds["reference"] = time.perf_counter() - start
        if algo.num_iterations > 1:
            start = time.perf_counter()
            old = jax.block_until_ready(cluster.get_old_per_token_logps(
                prompt_tokens=prompt_ids, completion_tokens=completion_ids,
                micro_batch_size=self._compute_logps_micro_batch_size * G))
            seconds["old_policy"] = time.perf_counter() - start
        advantages = group_advantages(trained.rewards, trained.excluded, G, algo.advantage_estimator)  # [B]
        completion_mask = completion_ids != pad  # [B, C]
        if self._mask_truncated:  # DAPO's overlong filtering: a cut completion trains nothing
            completion_mask = completion_mask & ~jnp.asarray(rollout.truncated)[:, None]
        if trained.excluded.any():  # unscored by the judge: no reward, so no loss either
            completion_mask = completion_mask & ~jnp.asarray(trained.excluded)[:, None]
        cluster.buffer_metrics({"rewards/score/mean": (np.nanmean(sampled.rewards), np.mean),
                                "completions/mean_length": (np.mean(rollout.lengths), np.mean)}, mode=mode)
        if mode == Mode.TRAIN:
            self._on_step(StepFacts(trained, sampled, (int(prompt_ids.shape[1]), int(completion_ids.shape[1])), seed,
                                    seconds, G, "reward" if self._spread_on == "off" else self._spread_on, judged))
        return grpo_learner.TrainExample(
            prompt_ids=prompt_ids, prompt_mask=prompt_ids != pad,
            completion_ids=completion_ids, completion_mask=completion_mask,
            ref_per_token_logps=reference, old_per_token_logps=old, advantages=jax.device_put(advantages))

    def _outage(self, trained: Scored, judged: RewardScores) -> JudgeOutage:
        done = self.rl_cluster.actor_trainer.train_steps
        reasons = "; ".join(f"{count} x {reason}" for reason, count in sorted(judged.reasons.items(), key=lambda kv: -kv[1]))
        return JudgeOutage(
            f"the judge left {int(trained.excluded.sum())} of step {done + 1}'s {len(trained.excluded)} completions unscored "
            f"({trained.excluded.mean():.0%} > judge.max_unscored={self._max_unscored:g}): {reasons or 'no reason given'}. "
            "The run stopped before training on them")

    def _diverged(self) -> TrainingError:
        """Stop before the step is trained or saved if the rollout's log-probs are not
        finite. A diverged update can leave weights that are finite but huge (Adam's
        step is about +-learning rate whatever the gradient), so apply_if_finite lets
        it through; the next rollout samples from NaN logits, ends at once, and its
        masked loss is a harmless 0. The rollout is where the damage shows first."""
        trainer = self.rl_cluster.actor_trainer
        done = trainer.train_steps  # this rollout sampled from the weights after `done` updates
        manager = trainer.checkpoint_manager._checkpoint_manager
        saved = sorted(manager.all_steps()) if manager is not None else []
        good = [s for s in saved if s < done] if done else saved
        bad = [s for s in saved if s >= done] if done else []
        return TrainingError(
            f"the policy's log-probabilities are not finite in step {done + 1}'s rollout: the weights after update {done} "
            "diverged, so the run stopped before training or saving further. "
            f"Last good checkpoint: {'step ' + str(good[-1]) if good else 'none'}"
            + (f" (checkpoint {', '.join(map(str, bad))} holds the diverged weights)" if bad else "")
            + ". Lower grpo.learning_rate or grpo.max_grad_norm and start a new run directory."
        )


def reward_judge(config: Config, run_dir: Path) -> RewardJudge | None:
    """The judge behind the ``judge`` reward component (None at weight 0): the
    evaluation's endpoint with the ``judge`` section's mode, rubric and limits,
    its verdicts cached in ``run_dir/judge/cache.jsonl``."""
    from tracetune.evaluate import judge_settings

    if not config.rewards.judge:
        return None
    endpoint = judge_settings(config)
    if endpoint is None:
        raise ConfigError(f"rewards.judge={config.rewards.judge:g} needs a judge endpoint: pass --judge-url, or set "
                          "eval.judge_base_url or TRACETUNE_JUDGE_BASE_URL (and the judge model)")
    judge = config.judge
    endpoint = dataclasses.replace(endpoint, concurrency=judge.concurrency, timeout=judge.timeout, retries=judge.retries)
    return RewardJudge(endpoint, judge.mode, run_dir / "judge" / "cache.jsonl")


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


def prompt_examples(config: Config, tokenizer: Tokenizer) -> tuple[list[Example], list[Example]]:
    """(training problems whose prompt fits the budget, validation problems), in file
    order. The validation problems are the ones SFT holds out (``held_out_split``:
    with ``data.val_fraction`` and ``data.seed``): GRPO never trains on them, so they
    can choose its checkpoint. With ``data.mix``, every source (open ones too) is
    held out on its own and the training problems are drawn by weight, in the
    seeded order of ``data.mix_problems``."""
    data, grpo = config.data, config.grpo

    def fits(example: Example) -> bool:
        return len(tokenizer.encode(build_prompt(example.question, data.prompt_style, example.kind))) <= grpo.max_prompt_tokens

    if data.mix:
        parts = load_mix(data, "train", skip_invalid=data.skip_invalid)
        fitting, validation = mix_problems(parts, data.val_fraction, data.seed, keep=fits)
    else:
        train, validation = held_out_split(data)
        fitting = [e for e in train if fits(e)]
    return fitting[: grpo.train_examples or None], validation


def reference_steps(example: Example) -> int:
    """The reference solution's number of steps (GSM8K: its lines), the curriculum's
    difficulty; a problem without a solution counts as the hardest."""
    lines = [line for line in example.solution.splitlines() if line.strip()]
    return len(lines) if lines else 1 << 20


@dataclass
class PromptBatches:
    """{'prompts', 'id', 'reference', 'question', 'solution', 'kind', 'choices'} batches (np.arrays, as Tunix
    needs) in an order fixed by the seed; Tunix resumes by re-reading and skipping,
    and ``stop`` ends the stream. ``curriculum="steps"`` orders each epoch from the
    fewest reference steps to the most (a seeded shuffle within a step count).

    ``curriculum="paced"`` paces difficulty over the run's own ``steps`` instead
    (competence-based, Platanios et al., 2019): step k draws its prompts and its
    refills from the easiest ``competence(k)`` share of the problems, from
    ``start`` at step 0 to all of them at the last step (a square-root schedule).

    ``revisit`` > 0 adds a pass-rate curriculum: every sampled group is ``observe``d
    as (problem id, whether its G completions differed), and a problem whose latest
    group had spread comes back first in later refill rounds, until it has been
    sampled 1 + ``revisit`` times or a group of it has no spread. The queue is a
    pure function of the observations in order, which each step's metrics record
    keeps ("groups"), so a resumed run rebuilds it and refills the same way."""

    examples: list[Example]
    per_step: int
    seed: int
    prompt_style: str
    stop: StopFlag
    curriculum: str = "none"
    revisit: int = 0
    steps: int = 0  # the run's updates, which "paced" spreads the difficulty over
    start: float = 0.25  # "paced": the share of problems step 0 draws from, the easiest

    def __post_init__(self) -> None:
        self._observed: list[tuple[str, bool]] = []  # (problem id, group had spread) of every sampled group, in order
        self._index = {e.id: i for i, e in enumerate(self.examples)}

    def observe(self, groups: Iterable[tuple[str, bool]]) -> int:
        """Record sampled groups as (problem id, spread); returns how many were of
        problems sampled before (revisits, or a problem met again in a new epoch)."""
        groups = [(str(i), bool(spread)) for i, spread in groups]
        seen = {i for i, _ in self._observed}
        self._observed += groups
        return sum(i in seen for i, _ in groups)

    def due(self) -> list[int]:
        """Example indices to revisit, most recently observed first: problems whose
        latest group had spread and that have been sampled at most ``revisit`` times."""
        if not self.revisit:
            return []
        counts = collections.Counter(i for i, _ in self._observed)
        latest = {i: (position, spread) for position, (i, spread) in enumerate(self._observed)}
        ranked = sorted(latest.items(), key=lambda item: -item[1][0])
        return [self._index[i] for i, (_, spread) in ranked if spread and counts[i] <= self.revisit and i in self._index]

    def competence(self, step: int) -> float:
        """The share of problems, easiest first, that step ``step`` draws from under
        "paced": sqrt(start^2 + (1 - start^2) k / (steps - 1)), 1 from the last step on."""
        done = min(1.0, step / max(1, self.steps - 1))
        return math.sqrt(self.start**2 + (1 - self.start**2) * done)

    def pool(self, step: int) -> np.ndarray:
        """Example indices step ``step`` may draw under "paced": the easiest
        ``competence(step)`` share by reference steps (a seeded shuffle within a step count)."""
        return self._easiest[: max(self.per_step, math.ceil(self.competence(step) * len(self._easiest)))]

    @functools.cached_property
    def _easiest(self) -> np.ndarray:
        """[N] example indices, fewest reference steps first (epoch 0's "steps" order)."""
        return self._by_difficulty(0)

    def _by_difficulty(self, epoch: int) -> np.ndarray:
        """[N] example indices, fewest reference steps first, a shuffle seeded by ``epoch`` within a step count."""
        shuffled = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        difficulty = np.array([reference_steps(self.examples[i]) for i in shuffled])
        return shuffled[np.argsort(difficulty, kind="stable")]

    def order(self, epoch: int) -> np.ndarray:
        if self.curriculum == "steps":
            return self._by_difficulty(epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        # Every host walks the same global order and keeps its own share.
        rows = [self.examples[i] for i in mesh_lib.host_share(np.asarray(indices))]
        choices = np.empty(len(rows), dtype=object)  # [B] of dicts: np.array would unpack pairs into a matrix
        choices[:] = [dict(r.choices) for r in rows]
        return {
            "prompts": np.array([build_prompt(r.question, self.prompt_style, r.kind) for r in rows]),
            "id": np.array([r.id for r in rows]),
            "reference": np.array([r.reference for r in rows]),
            "question": np.array([r.question for r in rows]),
            "solution": np.array([r.solution for r in rows]),
            "kind": np.array([r.kind for r in rows]),
            "choices": choices,
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.curriculum == "paced":  # step k: a seeded draw from its pool
            step = 0
            while self.stop.signum is None:
                pool = self.pool(step)
                yield self.batch(np.random.default_rng([self.seed, 2 << 20, step]).choice(pool, self.per_step, replace=False))
                step += 1
            return
        epoch = 0
        while True:
            order = self.order(epoch)
            for start in range(0, len(order) - self.per_step + 1, self.per_step):
                if self.stop.signum is not None:
                    return
                yield self.batch(order[start : start + self.per_step])
            epoch += 1

    def refill(self, step: int, round: int) -> dict[str, np.ndarray]:
        """Fresh prompts for the dynamic-sampling filter's ``round`` in ``step``: a
        seeded draw fixed by (seed, step, round), so a resumed run refills the same
        way. Under "steps", only problems no harder than the step's own; under
        "paced", the step's pool.
        Problems due for a revisit (``due``) take the rounds' places first, round 1
        the most recent."""
        rng = np.random.default_rng([self.seed, 1 << 20, step, round])
        revisits = self.due()[(round - 1) * self.per_step : round * self.per_step]
        candidates = np.arange(len(self.examples))
        if self.curriculum == "paced":
            candidates = self.pool(step)
        elif self.curriculum == "steps":
            position = step * self.per_step
            order = self.order(position // len(self.examples))
            hardest = reference_steps(self.examples[order[(position + self.per_step - 1) % len(order)]])
            candidates = np.array([i for i in candidates if reference_steps(self.examples[i]) <= hardest])
        if revisits:
            candidates = np.setdiff1d(candidates, revisits)
        fresh = rng.choice(candidates, min(self.per_step - len(revisits), len(candidates)), replace=False)
        return self.batch([*revisits, *fresh])


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
    # (a step of open rows only has no correctness: the check needs it in every step)
    if len(history) >= 2 * window and all("reward/trace" in h and "reward/correctness" in h for h in history[-2 * window :]):
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
        self.pending: list[StepFacts] = []  # the facts of the step being trained, from the learner
        self.revisited = 0  # groups of problems sampled before, in the step being trained
        self.warned: set[str] = set()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _append(self, path: Path, record: dict) -> None:
        append_record(path, record)

    def _on_step(self, facts: StepFacts) -> None:
        """Called by the learner with each training step's facts, before its update
        (and before the next step's refill rounds, which may revisit these groups)."""
        self.pending.append(facts)
        self.revisited += self.data.observe(facts.groups())

    def _on_metrics(self, buffer) -> None:
        """Called by RLCluster once per finished step (after its update) with the step's buffered metrics."""
        if buffer.mode != "train" or not self.pending:
            return
        facts, self.pending, revisited, self.revisited = self.pending, [], self.revisited, 0
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
        records = [f.record() for f in facts]  # one per rollout of the step (one unless Tunix splits it)
        record = {"step": step, **{k: float(np.mean([r[k] for r in records])) for k in records[0]
                                   if k not in ("padded_widths", "rollout_seeds", "groups")}}
        phases = {}
        for f in facts:
            for phase, seconds in f.seconds.items():
                phases[phase] = phases.get(phase, 0.0) + seconds
        phases["update"] = self.cluster.take_update_seconds()
        record.update({
            "padded_widths": [w for r in records for w in r["padded_widths"]],  # [prompt, completion] the update trained on
            "rollout_seeds": [s for r in records for s in r["rollout_seeds"]],
            "groups": [g for r in records for g in r["groups"]],  # (problem id, spread) of every sampled group
            "revisited_groups": revisited,  # of problems sampled before (grpo.revisit)
            "loss": loss,
            "kl": actor_metric("kl"),
            "seconds": {k: round(v, 3) for k, v in phases.items()},
            "compiles": self.compiles.take(),  # XLA compiles during this step (new padded widths), and their seconds
            "elapsed_seconds": time.perf_counter() - self.started,
            "reward_weights": self.config.rewards.as_dict(),
        })
        self.history.append(record)
        self._append(self.metrics_path, record)
        every = self.config.grpo.val_every_steps
        if every and (step % every == 0 or step == self.steps):
            self.validate(step)
        for key in ("zero_spread", "truncated", *(k for k in record if k.startswith("reward/"))):
            if key in record:
                logger.log("tracetune", key, record[key], tunix_metrics.Mode.TRAIN, step)
        every = self.config.grpo.sample_every_steps
        if every and (step % every == 0 or step == 1):
            for sample in facts[0].samples():
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

    def validate(self, step: int) -> dict | None:
        """Greedy completions of the validation problems under the evaluation
        harness (its prompt, budget and scoring), from the live policy with its
        adapters folded in; the record goes to metrics.jsonl, and with
        ``select=best`` a step better than the best so far (accuracy, then
        composite) saves its adapters to best/."""
        grpo = self.config.grpo
        if not self.validation:
            return None
        if getattr(self, "_validator", None) is None:
            batch = min(self.config.eval.batch_size, len(self.validation))  # decoded as the harness decodes
            self._validator = Generator(self.actor, self.loaded.tokenizer, max_batch=batch, with_weights=False)
        self._validator.set_params(merged_tree(self.actor, grpo.lora))
        before = self._validator.stats.seconds  # the validator's stats add up over the run
        try:
            scored = generate_and_score(self._validator, self.validation,
                                        max_new_tokens=grpo.val_max_new_tokens or self.config.eval.max_new_tokens,
                                        prompt_style=self.config.data.prompt_style, weights=self.config.rewards)
        finally:
            self._validator.drop_params()
        scores = [score for score, _ in scored]
        metrics = aggregate(scores)  # the harness's own aggregation, as `tracetune eval` reports it
        result = {"step": step, **{f"val/{m}": metrics[m].mean for m in ("accuracy", "format_rate", "trace", "composite")},
                  "val/examples": len(scores), "val/batch_size": self._validator.max_batch,
                  "val/seconds": round(self._validator.stats.seconds - before, 3)}
        self.validations.append(result)
        self._append(self.metrics_path, result)
        better = self.best.offer(result, self.actor, self.loaded, grpo.lora, "grpo")
        print(f"step {step}: validation accuracy {result['val/accuracy']:.1%}, format rate {result['val/format_rate']:.0%} "
              f"on {len(scores)} problems{' (best so far)' if better else ''}", file=sys.stderr)
        return result

    def _save_after_outage(self) -> str:
        """Save every update trained so far (the judge failed in the next step's
        rollout; the updates before it are good) and say where a re-run resumes."""
        trainer = self.cluster.actor_trainer
        manager = trainer.checkpoint_manager
        step = int(trainer.train_steps)
        saved = sorted(manager._checkpoint_manager.all_steps()) if manager._checkpoint_manager is not None else []
        if step and step not in saved:
            try:
                manager.save(step, trainer.model, trainer.optimizer, save_only_lora_params=trainer._lora_enabled, force=True)
                saved.append(step)
            except Exception as error:  # noqa: BLE001 - the run is stopping for the judge; say what is kept
                return (f"Saving step {step} failed ({type(error).__name__}: {error}); last good checkpoint: "
                        f"{'step ' + str(saved[-1]) if saved else 'none'}. Re-run the same command to resume once the judge answers")
        return (f"Checkpoint saved: step {saved[-1]}. Re-run the same command to resume from it once the judge answers"
                if saved else "No update was trained yet. Re-run the same command once the judge answers")

    def _init_model(self) -> LoadedModel:
        if self.init is not None:
            return self.init
        grpo = self.config.grpo
        source = grpo.init or str(Path("runs") / self.config.preset / "sft")
        return load_model(source, dtype=grpo.dtype)

    def train(self) -> GRPOResult:
        # From the first metrics logger on (JAX reports compile times to TensorBoard
        # from the trainer's construction), a writer thread that dies stops the run.
        with FaultWatch.for_run(self.run_dir) as self.watch, CompileClock() as self.compiles:
            return self._train()

    def _train(self) -> GRPOResult:
        grpo = self.config.grpo
        claim_directory(self.run_dir, self.config, ("data", "rewards", "grpo"))
        loaded = self._init_model()
        tokenizer = loaded.tokenizer
        examples, self.validation = prompt_examples(self.config, tokenizer)
        self.validation = self.validation[: grpo.val_examples] if grpo.val_every_steps else []
        spread_on = grpo.dynamic_sampling
        if spread_on not in ("off", "reward") and spread_on not in REWARDS:
            raise ConfigError(f"grpo.dynamic_sampling must be 'off', 'reward' or a reward component "
                              f"({', '.join(REWARDS)}), got {spread_on!r}")
        if grpo.select == "best" and not self.validation:
            raise ConfigError(f"grpo.select=best: no validation problems in {mix_label(self.config.data.mix) if self.config.data.mix else self.config.data.source!r} "
                              f"(data.val_fraction={self.config.data.val_fraction})")
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
        with restoring(self.run_dir / "checkpoints" / "actor"):  # the actor's trainer restores in here
            self.cluster = Cluster(actor=actor, reference=reference, tokenizer=tokenizer.sp, cluster_config=cluster_config,
                                   logprobs=grpo.logprobs, pad_multiple=grpo.pad_multiple,
                                   prompt_width=grpo.prompt_width, tokenizer_tt=tokenizer)
        check_shared_backbone(self.cluster)
        algorithm = algorithm_config(grpo)
        self.data = PromptBatches(examples, batch, grpo.seed, self.config.data.prompt_style, StopFlag(), grpo.curriculum,
                                  grpo.revisit, grpo.max_steps, grpo.curriculum_start)
        # Tunix holds the composite as its reward function; the learner scores with the
        # same arithmetic itself, to keep each component (see Learner).
        self.learner = Learner(rl_cluster=self.cluster, algo_config=algorithm,
                               reward_fns=[make_composite_reward(self.config.rewards)],
                               seed=grpo.seed, weights=self.config.rewards, on_step=self._on_step,
                               refill=self.data.refill, spread_on=spread_on, max_filter_rounds=grpo.max_filter_rounds,
                               rounds_per_rollout=grpo.rounds_per_rollout, mask_truncated=grpo.mask_truncated, judge=reward_judge(self.config, self.run_dir),
                               max_unscored=self.config.judge.max_unscored)
        self.actor, self.loaded = actor, loaded
        resumed = self.cluster.actor_trainer.train_steps
        # The forced final save carries no step metadata: count steps from the trainer.
        self.cluster.global_steps = resumed
        # without a checkpoint the run starts over: step 0's validation is redone, not kept
        kept = truncate_metrics(self.metrics_path, resumed if resumed else -1)
        self.history = [r for r in kept if "reward/composite" in r]
        self.validations = [r for r in kept if "val/accuracy" in r]
        for record in self.history:  # the pass-rate curriculum's queue, as it stood
            self.data.observe(map(tuple, record.get("groups", [])))
        self.best = BestAdapters(self.run_dir / "best", "val/", grpo.select == "best", self.validations)
        truncate_metrics(self.run_dir / "samples.jsonl", resumed)  # redone steps write their samples again
        if resumed:
            print(f"resuming {self.run_dir} from step {resumed}/{self.steps}", file=sys.stderr)
        self.cluster.with_external_metrics_logger(self._on_metrics)
        formula = str(self.config.rewards)
        print(f"grpo: {len(examples)} problems, {self.steps} updates of {batch} prompts x G={grpo.num_generations}, "
              f"R = {formula}, "
              f"from {loaded.source}, {grpo.rollout_engine} rollouts, {mesh_lib.describe(mesh)}", file=sys.stderr)

        with self.data.stop as stop:
            try:
                if resumed < self.steps:
                    with mesh_lib.active(mesh):
                        if not resumed:
                            self.validate(0)  # the start: select=best may keep it
                        self.learner.train(self.data)
                check_saves(self.cluster.actor_trainer.checkpoint_manager, self.run_dir / "checkpoints" / "actor")
            except BaseException as error:
                # after a judge outage the updates trained so far are good: keep them
                stopped = JudgeOutage(f"{error}. {self._save_after_outage()}") if isinstance(error, JudgeOutage) else error
                failure = failed_run(stopped, self.run_dir / "checkpoints" / "actor", self.cluster.actor_trainer.checkpoint_manager.close)
                if failure is error:
                    raise
                raise failure from None
        step = self.cluster.actor_trainer.train_steps
        if stop.signum is not None:
            raise Interrupted(stop.signum, step, self.run_dir)
        adapter_dir, merged_dir, exported = self.best.export(actor, loaded, grpo.lora, self.run_dir, stage="grpo", step=step)
        quarter = max(1, len(self.history) // 4)
        summary = {
            "steps": step,
            "exported_step": exported,
            "select": grpo.select,
            "best": self.best.record,
            "validations": self.validations,
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


class AlgorithmConfig(grpo_learner.GRPOConfig):
    """Tunix's GRPOConfig with the fields its losses read when present:
    ``epsilon_high`` (clip-higher), ``loss_norm`` (the constant of
    "sequence-mean-token-scale": the token budget, not the trimmed batch's width)
    and ``rows_per_pass`` / ``row_gradients`` (read by ``logprobs.tracetune_grpo_loss``)."""

    def __init__(self, *, epsilon_high: float, loss_norm: int, rows_per_pass: int = 0, row_gradients: str = "recompute",
                 **kwargs):
        super().__init__(**kwargs)
        self.epsilon_high = epsilon_high
        self.loss_norm = loss_norm
        self.rows_per_pass = rows_per_pass
        self.row_gradients = row_gradients


def algorithm_config(grpo: GRPOConfig) -> AlgorithmConfig:
    return AlgorithmConfig(
        num_generations=grpo.num_generations, num_iterations=1, beta=grpo.beta, epsilon=grpo.epsilon,
        epsilon_high=grpo.epsilon_high or grpo.epsilon, loss_norm=grpo.max_new_tokens, rows_per_pass=grpo.rows_per_pass,
        row_gradients=grpo.row_gradients,
        advantage_estimator=grpo.advantage_estimator, loss_agg_mode=grpo.loss_agg_mode,
        kl_loss_mode=grpo.kl_loss_mode, loss_algo=grpo.loss_algo,
        # logprobs.py registers "tracetune": Tunix's GRPO loss on the chunked path
        policy_loss_fn="tracetune" if grpo.logprobs == "chunked" else "grpo")


def _means(records: Sequence[dict]) -> dict[str, float]:
    keys = [k for k in (records[0] if records else {}) if k.startswith("reward/") or k in ("zero_spread", "truncated", "kl")]
    values = {k: [r[k] for r in records if r.get(k) is not None] for k in keys}
    return {k: float(np.mean(v)) for k, v in values.items() if v}


def train_grpo(config: Config, run_dir: Path, *, init: LoadedModel | None = None) -> GRPOResult:
    """Train (or resume) the GRPO stage of ``config`` in ``run_dir``."""
    return GRPORun(config, run_dir, init=init).train()
