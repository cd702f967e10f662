"""Frozen, keyword-only config dataclasses; YAML presets only override their defaults.

A preset (``presets/<name>.yaml``) is a nested mapping of section -> field -> value.
Command-line overrides use dotted keys (``data.seed=7``). Unknown sections or
fields are errors that name the file and the key, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tracetune.format import KINDS


class ConfigError(ValueError):
    """A preset, config file or override that cannot be applied."""


def reward_defaults() -> dict[str, float]:
    """The registered reward components -> their default weights, in registry order.

    Read from ``rewards.REWARDS`` when asked, not at import: rewards imports this
    module, and the registry is the one list of components.
    """
    from tracetune.rewards import REWARDS

    return {name: reward.default_weight for name, reward in REWARDS.items()}


class RewardWeights:
    """The weight w_k of each component k of R = sum_k w_k * component_k.

    One weight per registered reward (``rewards.REWARDS``, in its order); a name not
    given takes its registered default: the recipe's correctness 0.6, trace 0.25 and
    confidence 0.15, and 0 for a component the recipe does not have (arithmetic).
    An ablation sets a weight to 0. Immutable, compared and hashed by its weights;
    a preset's ``rewards:`` section and ``rewards.<name>=`` overrides build it.

    >>> RewardWeights(trace=0).as_dict()
    {'correctness': 0.6, 'trace': 0.0, 'confidence': 0.15, 'arithmetic': 0.0, 'judge': 0.0, 'sound': 0.0, 'progress': 0.0}
    >>> RewardWeights().trace, str(RewardWeights(arithmetic=0.2))
    (0.25, '0.6 correctness + 0.25 trace + 0.15 confidence + 0.2 arithmetic')
    """

    __slots__ = ("_weights",)

    def __init__(self, weights: Mapping[str, float] | None = None, /, **named: float) -> None:
        given = {**(weights or {}), **named}
        defaults = reward_defaults()
        if unknown := [name for name in given if name not in defaults]:
            raise ConfigError(f"unknown reward {', '.join(map(repr, unknown))} (known: {', '.join(defaults)})")
        values = {name: float(given.get(name, default)) for name, default in defaults.items()}
        if not all(math.isfinite(v) and v >= 0 for v in values.values()) or sum(values.values()) <= 0:
            raise ConfigError(f"reward weights must be >= 0 and not all 0, got {values}")
        object.__setattr__(self, "_weights", values)

    def __getattr__(self, name: str) -> float:
        if not name.startswith("_") and name in self._weights:
            return self._weights[name]
        raise AttributeError(f"{type(self).__name__!r} has no weight {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to {name!r}: reward weights are immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RewardWeights) and self._weights == other._weights

    def __hash__(self) -> int:
        return hash(tuple(self._weights.items()))

    def __reduce__(self) -> tuple[Any, ...]:  # copy, deepcopy and pickle
        return (RewardWeights, (dict(self._weights),))

    def __repr__(self) -> str:
        return f"RewardWeights({', '.join(f'{k}={v!r}' for k, v in self._weights.items())})"

    def __str__(self) -> str:
        """The composite as a formula of its weighted terms, for logs and reports."""
        return " + ".join(f"{v:g} {k}" for k, v in self._weights.items() if v)

    def as_dict(self) -> dict[str, float]:
        """Every registered component's weight, zeros included, in registry order."""
        return dict(self._weights)

    @classmethod
    def parse(cls, text: str) -> RewardWeights:
        """The command line's form, by name or by position::

            "correctness=0.6,trace=0.25,confidence=0.15,arithmetic=0"   by name
            "0.6,0,0.15"                                                by position

        By name, a component not named weighs 0: the option states the whole
        composite, as the three numbers always did. By position, the numbers are
        the registry's components in order (correctness, trace, confidence, then
        arithmetic), at least the recipe's three; the rest weigh 0.
        """
        parts = [p.strip() for p in text.split(",")]
        defaults = reward_defaults()
        if all("=" in p for p in parts):
            pairs = [tuple(s.strip() for s in p.split("=", 1)) for p in parts]
            names = [name for name, _ in pairs]
            if duplicates := sorted({n for n in names if names.count(n) > 1}):
                raise ConfigError(f"reward weights name {', '.join(duplicates)} twice in {text!r}")
            if unknown := [n for n in names if n not in defaults]:
                raise ConfigError(f"unknown reward {', '.join(map(repr, unknown))} in {text!r} (known: {', '.join(defaults)})")
            try:
                named = {name: float(value) for name, value in pairs}
            except ValueError:
                raise ConfigError(f"reward weights must be name=number pairs, got {text!r}") from None
            return cls({name: 0.0 for name in defaults} | named)
        recipe = [name for name, default in defaults.items() if default]
        usage = (f"reward weights must be name=number pairs ({','.join(f'{n}={d:g}' for n, d in defaults.items())}) "
                 f"or {len(recipe)} to {len(defaults)} numbers in the order {','.join(defaults)}, got {text!r}")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(usage) from None
        if not len(recipe) <= len(values) <= len(defaults):
            raise ConfigError(usage)
        return cls({name: 0.0 for name in defaults} | dict(zip(defaults, values)))

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str) -> RewardWeights:
        """A preset's or saved config's ``rewards:`` section; names not given keep their defaults."""
        defaults = reward_defaults()
        if unknown := [name for name in values if name not in defaults]:
            raise ConfigError(f"{where}: unknown reward {', '.join(map(repr, unknown))} (known: {', '.join(defaults)})")
        weights = {name: _coerce(value, float, f"{where}.{name}") for name, value in values.items()}
        try:
            return cls(weights)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None


class FieldError(ConfigError):
    """A field's value out of range, raised by a config entry that does not know
    where it sits; ``_build`` names it in full (``data.mix[1].weight: ...``)."""

    def __init__(self, field_name: str, message: str):
        self.field, self.message = field_name, message
        super().__init__(f"{field_name}: {message}")


@dataclass(frozen=True, kw_only=True)
class MixSource:
    """One source of a data mix (``DataConfig.mix``); an empty field takes data's.

    source: as ``data.source`` (shipped name, JSONL path, Hugging Face id).
    weight: its share of the drawn training examples, relative to the other
      entries' (> 0; normalised over the entries a stage uses).
    kind, question_field, answer_field: "" = ``data.kind`` / ``data.question_field``
      / ``data.answer_field``.
    split: the split training reads ("train"); eval_split: the one the harness
      scores ("" = ``eval.split``).
    domain: for rows without a ``domain`` field of their own ("" = the source's
      short name: "gsm8k", a file's stem, a dataset id's last part).
    """

    source: str = ""
    weight: float = 1.0
    kind: str = ""
    split: str = "train"
    eval_split: str = ""
    question_field: str = ""
    answer_field: str = ""
    domain: str = ""

    def __post_init__(self) -> None:
        if not self.source:
            raise FieldError("source", "missing (a shipped name, a JSONL file or a Hugging Face dataset id)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise FieldError("weight", f"must be > 0, got {self.weight}")
        if self.kind and self.kind not in KINDS:
            raise FieldError("kind", f"must be one of {', '.join(KINDS)} (or empty for data.kind), got {self.kind!r}")
        if not self.split:
            raise FieldError("split", "must name the training split, e.g. 'train'")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where examples come from and how SFT traces are curated.

    source: "gsm8k" (shipped with tracetune), a path to a JSONL file, or a Hugging
      Face dataset id (needs network).
    kind: the source's task kind (numeric, choice, text, open; ``format.KINDS``),
      for rows without a ``kind`` field of their own.
    val_fraction: share of the train split held out for validation (seeded split).
    max_tokens: traces longer than this (prompt + completion) are dropped once a
      tokenizer is available; the recipe's sequence budget.
    mix: several sources in one run, each a ``MixSource`` with a weight (YAML only:
      a list of mappings, see ``data.py``); empty = ``source`` alone. With a mix,
      ``source`` is not read. Each source is held out (``val_fraction``, ``seed``)
      on its own; training examples are then drawn by weight (``data.mixed``),
      as many as the sources hold together. SFT draws only from the sources whose
      rows curate into traces, GRPO from all; the harness scores each source's
      evaluation split, the first ``eval.limit`` of each. Ids become
      ``<short name>/<row id>``; kind, fields and domain default to data's.
    """

    source: str = "gsm8k"
    kind: str = "numeric"
    question_field: str = "question"
    answer_field: str = "answer"
    val_fraction: float = 0.05
    seed: int = 42
    max_tokens: int = 1400
    prompt_style: str = "plain"
    skip_invalid: bool = False
    mix: tuple[MixSource, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mix", tuple(self.mix))  # a list given in code: keep the config hashable
        if bad := [i for i, entry in enumerate(self.mix) if not isinstance(entry, MixSource)]:
            raise ConfigError(f"data.mix[{bad[0]}]: expected a MixSource, got {self.mix[bad[0]]!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.prompt_style not in ("plain", "chat"):
            raise ConfigError(f"data.prompt_style must be 'plain' or 'chat', got {self.prompt_style!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"data.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


LORA_TARGETS = "q_einsum|kv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj"  # Gemma 3's attention and MLP projections


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA (Hu et al., 2021): each targeted weight W becomes W + (alpha / rank) * A @ B,
    with B = 0 at the start so training begins from the base model exactly.

    targets: a regex over module paths (qwix's ``module_path``), matched anywhere.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: str = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")


LOGPROB_PATHS = ("chunked", "full")
# Tunix 0.1.7's registered advantage estimators and loss aggregations (rl/algo_core.py, rl/common.py).
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "drgrpo")
LOSS_AGG_MODES = ("sequence-mean-token-mean", "token-mean", "sequence-mean-token-scale", "seq-mean-token-sum",
                  "sequence-mean-token-sum-norm")
CURRICULA = ("none", "steps", "paced")
SELECTIONS = ("last", "best")
ROW_GRADIENTS = ("recompute", "accumulate")  # grpo.row_gradients


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Stage 1: LoRA fine-tuning on curated traces. Defaults are the recipe's
    (Gemma 3 1B, LR 1e-5, 2 epochs, effective batch 32, seed 42).

    batch_size: examples per optimizer update; micro_batch_size examples go through
      the model at once and batch_size / micro_batch_size micro-batches are
      accumulated (derived: ``grad_accum``).
    max_steps: optimizer updates; 0 means ``epochs`` passes over the training traces.
    warmup_fraction: share of the updates with linear warm-up, then cosine decay to 0.
    train_examples: use only the first N curated training traces (0 = all).
    pad_multiple: sequences are padded to a multiple of this; batches are built from
      examples of similar length, so padding stays small and few shapes compile.
    pack_tokens: 0 (off), or pack whole traces, first-fit, into rows of this many
      tokens (at least ``data.max_tokens``), each trace attending only to itself and
      positioned from 0 as if alone (``sft.pack_batch``). Every micro-batch then has
      one shape, so one program compiles instead of one per padded length, and
      little is padding. ``batch_size`` and ``micro_batch_size`` then count rows,
      not traces (as TRL's packing does): an update of 4 rows of 352 tokens holds
      about 8 GSM8K traces (``cpu-demo``).
    checkpoint_minutes / checkpoint_steps: save when either is due (0 = off); always
      at the end and on SIGTERM / Ctrl-C.
    conclusion_weight: the loss weight of the conclusion line's tokens ("Therefore,
      ..." through </answer> and EOS) relative to the steps' (1 = a plain mean). A
      small model learns to write steps before it learns when to stop; a weight > 1
      makes closing the trace count for more.
    loop_share: the share of training traces (0-1) given a repetition loop that the
      loss skips: 1-2 steps written again 1-2 times, then the true next step, which
      is trained. It teaches leaving a loop instead of continuing it, the greedy
      failure of small models (``data.with_loop``). The choice is fixed by the seed.
    eval_every_steps: every N updates, greedy generations on ``eval_examples``
      held-out traces give the format rate and accuracy (0 = only at the end).
    logprobs: "chunked" (the tied head only at completion positions, a chunk at a
      time: ``logprobs.py``; 1.5x+ faster and far less memory on the 270M) or
      "full" (logits at every position, then cross-entropy: the path before it,
      kept for comparison and the equality tests).
    select: "last" exports the last update's adapters; "best" the held-out
      evaluation's best step (accuracy, ties: composite; needs eval_every_steps),
      with the last step's kept in export/last_adapter.
    """

    model: str = "gemma3-1b-it"
    weights: str = ""
    dtype: str = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)
    learning_rate: float = 1e-5
    warmup_fraction: float = 0.05
    epochs: float = 2.0
    max_steps: int = 0
    batch_size: int = 32
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    train_examples: int = 0
    pad_multiple: int = 64
    pack_tokens: int = 0
    conclusion_weight: float = 1.0
    loop_share: float = 0.0
    checkpoint_minutes: float = 30.0
    checkpoint_steps: int = 0
    keep_checkpoints: int = 3
    eval_every_steps: int = 100
    eval_examples: int = 50
    eval_max_new_tokens: int = 320
    logprobs: str = "chunked"
    select: str = "last"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.logprobs not in LOGPROB_PATHS:
            raise ConfigError(f"sft.logprobs must be one of {', '.join(LOGPROB_PATHS)}, got {self.logprobs!r}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"sft.select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.select == "best" and not (self.eval_every_steps and self.eval_examples):
            raise ConfigError("sft.select=best needs the held-out evaluation: set sft.eval_every_steps and sft.eval_examples > 0")
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigError(f"sft.batch_size ({self.batch_size}) must be a multiple of sft.micro_batch_size ({self.micro_batch_size})")
        if self.learning_rate <= 0:
            raise ConfigError(f"sft.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"sft.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ConfigError("sft.max_steps must be > 0, or sft.epochs > 0 when max_steps is 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"sft.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.conclusion_weight <= 0:
            raise ConfigError(f"sft.conclusion_weight must be > 0, got {self.conclusion_weight}")
        if not 0 <= self.loop_share <= 1:
            raise ConfigError(f"sft.loop_share must be in [0, 1], got {self.loop_share}")
        if self.pad_multiple < 1:
            raise ConfigError(f"sft.pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.pack_tokens < 0:
            raise ConfigError(f"sft.pack_tokens must be 0 (off) or a row width in tokens, got {self.pack_tokens}")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Stage 2: GRPO (Shao et al., 2024, DeepSeekMath) from the SFT policy. Defaults
    are the recipe's (G = 4, LR 3e-6, beta = 0.03, epsilon = 0.2, 2000 updates,
    effective batch 32 = 8 prompts x G, 1400-token sequences, seed 42).

    init: the SFT run directory (or any model) to start from; it is also the
      reference policy of the KL term. "" means runs/<preset>/sft.
    num_generations: G, completions sampled per prompt; advantages are rewards
      normalised within each group of G.
    beta: weight of the KL penalty to the reference policy.
    epsilon: the PPO-style clip range of the probability ratio.
    prompts_per_step: prompts per update (each gives G completions).
    micro_batch_size: prompts per forward/backward pass; gradients accumulate up to
      prompts_per_step (0 = all at once). Rollouts still sample the whole step
      together. Memory scales with it (the trunk's activations; with
      ``logprobs=full`` also the logits, G x (prompt + completion) x 262k floats
      per prompt).
    max_prompt_tokens + max_new_tokens: the sequence budget (prompts longer than
      max_prompt_tokens are skipped, completions are cut at max_new_tokens).
    rollout_engine: "vanilla" (Tunix's sampler, the default: it samples from the
      actor itself, so rollout shares the backbone), "vllm" (Tunix's vLLM engine,
      where vLLM is installed: GPU or TPU hosts) or "tracetune" (tracetune's
      sampler: 1.9x the vanilla sampler's tokens/s on a 2-core CPU, so the CPU
      presets use it; it folds LoRA into a merged copy of the weights for each
      rollout, one more backbone's worth of memory while it samples).
    vllm_model / vllm_memory_fraction: for "vllm", the Hugging Face id of the
      architecture ("" = the base model's, from the registry) and the share of
      accelerator memory vLLM may take.
    sample_every_steps: every N updates, prompts, completions and rewards go to
      samples.jsonl.
    logprobs: "chunked" (policy, old-policy and reference log-probs with the tied
      head only at completion positions, a chunk at a time, on the step's batch
      with its padding cut to a multiple of ``pad_multiple``: ``logprobs.py``) or
      "full" (Tunix's own ``compute_per_token_logps`` and GRPO loss on the whole
      padded budget: for comparison and the equality tests).
    pad_multiple: with "chunked", a step's prompts and completions are padded to
      the longest in the step rounded up to this, so few shapes compile.
    prompt_width: with "chunked", 0 or the one prompt width the update and the
      reference pass train at whenever a step's prompts fit it (the budget when
      not): a second width compiles the 270M's update and reference programs again
      (about 18 s on a 2-core CPU), while padding a step of short prompts to it
      costs about 1.5 s, so a short run is faster on one width and a long one on
      ``pad_multiple``'s buckets. The rollout keeps its own buckets either way.
    rows_per_pass: with "chunked", the policy's forward/backward pass takes the
      micro-batch's completions this many at a time (0 = all at once), each pass
      recomputed in the backward pass (``logprobs._row_passes``): the update keeps
      one pass's activations instead of the micro-batch's, for about one more
      forward pass. Must divide micro_batch_size x num_generations.
    row_gradients: how rows_per_pass's passes get their gradient: "recompute"
      (each pass under ``jax.checkpoint``, its forward run again in the backward
      pass) or "accumulate" (each pass's gradient taken in its own forward pass and
      summed, ``logprobs._accumulated_loss``: the same memory bound without the
      second forward pass; cpu-demo's, measured 2026-12-06 13.9 s against 16.9 s
      per update for the 270M: README).

    Loss options Tunix 0.1.7 implements (defaults: the recipe's GRPO):
    advantage_estimator: "grpo" (group mean and std), "rloo" (leave-one-out mean)
      or "drgrpo" (group mean only: Dr. GRPO, Liu et al., 2025).
    loss_agg_mode: "sequence-mean-token-mean" (GRPO: each completion's token mean,
      then the mean over completions), "token-mean" (DAPO: every token of the step
      counts once), "sequence-mean-token-scale" (Dr. GRPO: token sums over the
      constant max_new_tokens, so length does not scale the gradient),
      "seq-mean-token-sum" or "sequence-mean-token-sum-norm".
    epsilon_high: the upper clip of the ratio, 1 + epsilon_high (DAPO's clip-higher,
      0.28 there); 0 means epsilon.
    kl_loss_mode: Tunix's estimator of the KL term ("kl", "mse_kl", "low_var_kl", ...).
    loss_algo: "grpo" or "gspo-token" (GSPO's sequence-level ratio).
    mask_truncated: completions cut by max_new_tokens carry no loss (DAPO's
      overlong filtering): an unfinished answer is not evidence either way.

    Prompts (DAPO's dynamic sampling and a curriculum):
    dynamic_sampling: "off", "reward" or a reward component's name (DAPO filters
      on "correctness"). A group whose G values of it are all equal has zero
      advantage and no gradient; such groups are replaced by groups of fresh
      prompts, from ``max_filter_rounds`` extra rounds of ``prompts_per_step``
      prompts, in order, until the step has ``prompts_per_step`` groups with
      spread (what is still missing after the cap trains as sampled).
    rounds_per_rollout: how many refill rounds each of the step's rollouts
      samples. 0: all of them in the step's own rollout, as one batch (faster
      than one rollout after another), so each step spends all of them. k > 0:
      the step's prompts and k rounds in its first rollout, then k rounds a
      rollout while groups with spread are missing and rounds are left: a high
      cap then costs only where the groups are hard to find.
    curriculum: "none" (a seeded shuffle per epoch) or "steps" (each epoch from the
      problems with the fewest reference solution steps to the most, seeded
      shuffle within a step count: the small model meets problems it can solve
      first, where its groups have spread), or "paced": the run's own
      ``max_steps`` go from the easiest ``curriculum_start`` share of the problems
      (by reference steps) at the first update to all of them at the last, on a
      square-root schedule (competence-based, Platanios et al., 2019); each step's
      prompts and refills are a seeded draw from its share. "steps" walks a whole
      epoch, so a run shorter than an epoch only ever meets the easiest problems
      (15 updates of the 270M: one-step problems only, and shorter traces).
    curriculum_start: "paced"'s share at the first update, in (0, 1].
    revisit: a pass-rate curriculum on top of the filter: a problem whose group
      had spread in the filter's signal (the policy solved it sometimes, on
      correctness) comes back in the refill rounds of later steps, up to
      ``revisit`` more times, most recent first, before any fresh prompt; it
      leaves the queue when a revisit's group has no spread (its pass rate
      measured at 0 or 1). Needs dynamic_sampling and max_filter_rounds >= 1
      (0 = off). At a pass rate near 2%, most groups of G=4 are all wrong, and a
      problem with one right completion in four is where the next group most
      likely differs again.

    Checkpoint selection by validation (never the test split):
    val_every_steps: every N updates, greedy completions of the first
      ``val_examples`` problems of the validation split (``data.val_fraction``,
      the split SFT holds out), scored by the evaluation harness (0 = off).
    val_max_new_tokens: their token budget (0 = ``eval.max_new_tokens``).
    select: "best" exports the adapters of the validated step with the highest
      accuracy (ties: composite), "last" the last step's. With "best" the last
      step's adapters are kept beside it (export/last_adapter).
    """

    init: str = ""
    dtype: str = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)
    num_generations: int = 4
    learning_rate: float = 3e-6
    warmup_fraction: float = 0.0
    beta: float = 0.03
    epsilon: float = 0.2
    max_steps: int = 2000
    prompts_per_step: int = 8
    micro_batch_size: int = 0
    max_grad_norm: float = 1.0
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_tokens: int = 256
    max_new_tokens: int = 1144
    rollout_engine: str = "vanilla"
    vllm_model: str = ""
    vllm_memory_fraction: float = 0.4
    train_examples: int = 0
    checkpoint_minutes: float = 30.0
    checkpoint_steps: int = 0
    keep_checkpoints: int = 3
    sample_every_steps: int = 10
    warn_window: int = 10
    logprobs: str = "chunked"
    pad_multiple: int = 32
    prompt_width: int = 0
    rows_per_pass: int = 0
    row_gradients: str = "recompute"
    advantage_estimator: str = "grpo"
    loss_agg_mode: str = "sequence-mean-token-mean"
    epsilon_high: float = 0.0
    kl_loss_mode: str = "kl"
    loss_algo: str = "grpo"
    mask_truncated: bool = False
    dynamic_sampling: str = "off"
    max_filter_rounds: int = 2
    rounds_per_rollout: int = 0
    curriculum: str = "none"
    curriculum_start: float = 0.25
    revisit: int = 0
    val_every_steps: int = 0
    val_examples: int = 50
    val_max_new_tokens: int = 0
    select: str = "last"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.logprobs not in LOGPROB_PATHS:
            raise ConfigError(f"grpo.logprobs must be one of {', '.join(LOGPROB_PATHS)}, got {self.logprobs!r}")
        for name, value, known in (("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS),
                                   ("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES),
                                   ("loss_algo", self.loss_algo, ("grpo", "gspo-token")),
                                   ("curriculum", self.curriculum, CURRICULA), ("select", self.select, SELECTIONS)):
            if value not in known:
                raise ConfigError(f"grpo.{name} must be one of {', '.join(known)}, got {value!r}")
        if self.epsilon_high < 0 or self.max_filter_rounds < 0 or self.rounds_per_rollout < 0 or self.val_every_steps < 0 or self.val_examples < 0 or self.val_max_new_tokens < 0:
            raise ConfigError("grpo.epsilon_high, max_filter_rounds, rounds_per_rollout, val_every_steps, val_examples and val_max_new_tokens must be >= 0")
        if not 0 < self.curriculum_start <= 1:
            raise ConfigError(f"grpo.curriculum_start must be in (0, 1], got {self.curriculum_start}")
        if self.revisit < 0:
            raise ConfigError(f"grpo.revisit must be >= 0, got {self.revisit}")
        if self.revisit and (self.dynamic_sampling == "off" or not self.max_filter_rounds):
            raise ConfigError("grpo.revisit draws into the dynamic-sampling filter's refill rounds: "
                              "set grpo.dynamic_sampling and grpo.max_filter_rounds >= 1, or grpo.revisit=0")
        if self.select == "best" and not (self.val_every_steps and self.val_examples):
            raise ConfigError("grpo.select=best needs validation: set grpo.val_every_steps and grpo.val_examples > 0")
        if self.pad_multiple < 1:
            raise ConfigError(f"grpo.pad_multiple must be >= 1, got {self.pad_multiple}")
        if not 0 <= self.prompt_width <= self.max_prompt_tokens:
            raise ConfigError(f"grpo.prompt_width must be 0 (off) or at most grpo.max_prompt_tokens "
                              f"({self.max_prompt_tokens}), got {self.prompt_width}")
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations (G) must be >= 2 to compare completions, got {self.num_generations}")
        if self.learning_rate <= 0 or self.max_steps < 1 or self.prompts_per_step < 1:
            raise ConfigError("grpo.learning_rate, grpo.max_steps and grpo.prompts_per_step must be > 0")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.prompts_per_step % self.micro_batch_size):
            raise ConfigError(f"grpo.micro_batch_size must divide grpo.prompts_per_step={self.prompts_per_step}, got {self.micro_batch_size}")
        rows = (self.micro_batch_size or self.prompts_per_step) * self.num_generations
        if self.rows_per_pass < 0 or (self.rows_per_pass and rows % self.rows_per_pass):
            raise ConfigError(f"grpo.rows_per_pass must divide the {rows} completions of a micro-batch "
                              f"(grpo.micro_batch_size x grpo.num_generations), got {self.rows_per_pass}")
        if self.row_gradients not in ROW_GRADIENTS:
            raise ConfigError(f"grpo.row_gradients must be one of {', '.join(ROW_GRADIENTS)}, got {self.row_gradients!r}")
        if self.row_gradients == "accumulate" and not self.rows_per_pass:
            raise ConfigError("grpo.row_gradients=accumulate sums the gradients of grpo.rows_per_pass's passes: set grpo.rows_per_pass >= 1")
        if self.rows_per_pass and self.logprobs != "chunked":
            raise ConfigError("grpo.rows_per_pass needs grpo.logprobs=chunked (Tunix's own loss takes the whole micro-batch)")
        if self.prompt_width and self.logprobs != "chunked":
            raise ConfigError("grpo.prompt_width needs grpo.logprobs=chunked (Tunix's own loss pads every prompt to "
                              "grpo.max_prompt_tokens): set grpo.prompt_width=0")
        if self.beta < 0 or not 0 < self.epsilon < 1:
            raise ConfigError(f"grpo.beta must be >= 0 and grpo.epsilon in (0, 1), got {self.beta}, {self.epsilon}")
        if self.rollout_engine not in ("vanilla", "vllm", "tracetune"):
            raise ConfigError(f"grpo.rollout_engine must be 'vanilla', 'vllm' or 'tracetune', got {self.rollout_engine!r}")
        if not 0 < self.vllm_memory_fraction <= 1:
            raise ConfigError(f"grpo.vllm_memory_fraction must be in (0, 1], got {self.vllm_memory_fraction}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"grpo.dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The fixed evaluation harness: every variant (zero-shot, SFT, GRPO, ablations)
    gets the same problems, prompt (``data.prompt_style``), greedy decoding and
    token budget, so their numbers can sit side by side.

    split / limit: problems of ``data.source`` to score (limit 0 = the whole split).
    max_new_tokens: the token budget per completion.
    batch_size: prompts decoded together; samples are saved after each batch, so a
      killed evaluation resumes at the batch it was in. SFT's held-out evaluation
      and GRPO's validation decode in batches of this size too (the decoder's cache
      and activations grow with it: GRPO's stage peak is its validation).
    judge_*: the LLM judge (any OpenAI-compatible chat endpoint). An empty
      ``judge_base_url`` falls back to TRACETUNE_JUDGE_BASE_URL / OPENAI_BASE_URL;
      with none set, ``tracetune run`` skips the judge and the report says so.
    shots: worked examples written before every question: the first ``shots`` SFT
      traces of the training data (never a held-out or test problem), each its
      prompt, its target completion and a blank line. 0 (the default) is the plain
      harness. A base model's fair baseline: zero-shot it has never seen the trace
      format and scores nothing, so ``--shots 4`` asks what it can do once shown it.
    """

    split: str = "test"
    limit: int = 0
    max_new_tokens: int = 400
    shots: int = 0
    batch_size: int = 32
    dtype: str = "float32"
    judge_samples: int = 50
    judge_concurrency: int = 4
    judge_base_url: str = ""
    judge_model: str = ""

    def __post_init__(self) -> None:
        if self.limit < 0 or self.shots < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("eval.limit and eval.shots must be >= 0, eval.max_new_tokens and eval.batch_size >= 1")
        if self.judge_samples < 0 or self.judge_concurrency < 1:
            raise ConfigError("eval.judge_samples must be >= 0 and eval.judge_concurrency >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"eval.dtype must be float32 or bfloat16, got {self.dtype!r}")


JUDGE_MODES = ("absolute", "group")


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """The LLM judge's rubric and, where ``rewards.judge`` > 0, how GRPO asks it
    for the ``judge`` reward component. The endpoint is the evaluation's
    (``eval.judge_base_url`` / ``eval.judge_model``, else the environment, as
    ``tracetune eval --judge``): one judge per run.

    rubric: "" for the rubric tracetune ships for each task kind
      (``tracetune/rubrics/<kind>.md``), or a file (every kind) or a directory
      (``<kind>.md`` files; the shipped one for a kind without) replacing them:
      ``--set judge.rubric=my_rubric.md``. Evaluation and reward read the same.
    mode: "absolute" (each completion rated 1-5 alone: G requests per prompt) or
      "group" (a prompt's G completions shown together and ranked: one request
      per prompt, a comparison instead of a calibration).
    max_unscored: the largest share of a step's completions the judge may leave
      unscored (each is left out of its group's advantage and counted); past it
      the run stops, saving a checkpoint, and a re-run resumes.
    concurrency / timeout / retries: requests in flight, seconds per request, and
      extra attempts after a malformed reply, a timeout or a 5xx.
    guided: send vLLM's ``guided_choice`` with the allowed replies, so that any
      model served by vLLM or ``tracetune serve`` replies in a form that parses.
    """

    rubric: str = ""
    mode: str = "absolute"
    max_unscored: float = 0.25
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 2
    guided: bool = False

    def __post_init__(self) -> None:
        if self.mode not in JUDGE_MODES:
            raise ConfigError(f"judge.mode must be one of {', '.join(JUDGE_MODES)}, got {self.mode!r}")
        if not 0 <= self.max_unscored <= 1:
            raise ConfigError(f"judge.max_unscored must be in [0, 1], got {self.max_unscored}")
        if self.concurrency < 1 or self.timeout <= 0 or self.retries < 0:
            raise ConfigError("judge.concurrency must be >= 1, judge.timeout > 0 and judge.retries >= 0")


MESH_AXES = ("fsdp", "tp")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """How the devices are arranged (a JAX mesh with axes ``fsdp`` x ``tp``) and
    whether this process joins a multi-host run. Training and evaluation shard
    batches over ``fsdp`` (data parallel, with the weights sharded along it too)
    and attention heads / MLP columns over ``tp`` (tensor parallel).

    fsdp, tp: the mesh shape; fsdp = -1 takes every device that tp leaves. A mesh
      smaller than the machine uses the first fsdp x tp devices. tp must divide the
      model's attention heads (Gemma 3 270M and 1B have 4, 4B has 8).
    distributed: "auto" joins a multi-host run when the environment describes one
      (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID, a TPU pod
      slice, Slurm or Open MPI with more than one task); "on" always calls
      ``jax.distributed.initialize``; "off" never does.
    """

    fsdp: int = 1
    tp: int = 1
    distributed: str = "auto"

    def __post_init__(self) -> None:
        if self.fsdp == 0 or self.fsdp < -1 or self.tp < 1:
            raise ConfigError(f"mesh.fsdp must be >= 1 or -1 (all devices) and mesh.tp >= 1, got fsdp={self.fsdp}, tp={self.tp}")
        if self.distributed not in ("auto", "on", "off"):
            raise ConfigError(f"mesh.distributed must be 'auto', 'on' or 'off', got {self.distributed!r}")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run's configuration: what a preset resolves to."""

    preset: str = "default"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardWeights = field(default_factory=RewardWeights)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        if self.sft.pack_tokens and self.sft.pack_tokens < self.data.max_tokens:
            raise ConfigError(f"sft.pack_tokens ({self.sft.pack_tokens}) must be at least data.max_tokens ({self.data.max_tokens}): "
                              "a trace is never split across rows")

    def to_dict(self) -> dict[str, Any]:
        # YAML's safe dumper writes lists, not tuples (data.mix's entries)
        return {**_tuples_to_lists(dataclasses.asdict(self)), "rewards": self.rewards.as_dict()}  # weights by name, every component


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _tuples_to_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(item) for item in value]
    return value


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("tracetune.presets").iterdir() if p.name.endswith(".yaml"))


def mesh_preset_names() -> list[str]:
    """Hardware presets (``presets/mesh/<name>.yaml``): a ``mesh`` section laid over any run preset."""
    folder = resources.files("tracetune.presets").joinpath("mesh")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return tree


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check or convert a YAML / command-line value to the field's declared type."""
    kind = annotation if isinstance(annotation, type) else typing.get_origin(annotation)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif kind is int:
        try:
            if not isinstance(value, bool) and float(value) == int(float(value)):
                return int(float(value))
        except (TypeError, ValueError):
            pass
    elif kind is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind in (types.UnionType, typing.Union):
        return value
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown field {key!r} (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) or hint is RewardWeights:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping of fields, got {value!r}")
            if hint is RewardWeights:  # its fields are the reward registry's names
                kwargs[key] = RewardWeights.from_config(value, f"{where}.{key}")
            else:
                kwargs[key] = _build(hint, value, f"{where}.{key}")
        elif (entry := _entry_type(hint)) is not None:
            kwargs[key] = _build_entries(entry, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except FieldError as error:
        raise ConfigError(f"{where}.{error.field}: {error.message}") from None
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _entry_type(hint: Any) -> type | None:
    """The entry dataclass of a ``tuple[Entry, ...]`` field (``data.mix``), else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build_entries(entry: type, value: Any, where: str) -> tuple[Any, ...]:
    """A YAML list of mappings -> a tuple of ``entry``, each error naming its index."""
    if value is None:  # "mix:" with every entry commented out
        return ()
    if isinstance(value, str):
        raise ConfigError(f"{where}: is a list of mappings, which --set cannot give; write it in a YAML file "
                          "(a preset or a run's config.yaml) and pass that with --preset")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of mappings (one per entry), got {value!r}")
    out = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}[{index}]: expected a mapping of fields, got {item!r}")
        out.append(_build(entry, item, f"{where}[{index}]"))
    return tuple(out)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    tree[leaf] = value


def load_config(preset: str | Path = "default", overrides: dict[str, Any] | list[str] | None = None,
                mesh: str | None = None) -> Config:
    """Resolve a preset name (or a YAML file, e.g. a run's saved config), then a mesh
    preset's ``mesh`` section (hardware: v5e-8, gpu-1, gpu-8, ...), then overrides.

    >>> load_config("default", ["data.seed=7"]).data.seed
    7
    >>> load_config("recipe-1b", mesh="v5e-8").mesh.fsdp
    8
    """
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text, where, name = path.read_text(), str(path), path.stem
    else:
        name = str(preset)
        if name not in preset_names():
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
        text = resources.files("tracetune.presets").joinpath(f"{name}.yaml").read_text()
        where = f"preset {name}"
    tree = _read_yaml(text, where)
    tree.setdefault("preset", name)
    if mesh:
        if mesh not in mesh_preset_names():
            raise ConfigError(f"unknown mesh preset {mesh!r}; known: {', '.join(mesh_preset_names())}")
        mesh_where = f"mesh preset {mesh}"
        layer = _read_yaml(resources.files("tracetune.presets").joinpath("mesh", f"{mesh}.yaml").read_text(), mesh_where)
        if set(layer) != {"mesh"}:
            raise ConfigError(f"{mesh_where}: only a 'mesh' section is allowed, got {', '.join(sorted(layer))}")
        tree["mesh"] = {**(tree.get("mesh") or {}), **layer["mesh"]}
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.field=value")
            key, value = item.split("=", 1)
            pairs[key.strip()] = value.strip()
        overrides = pairs
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return _build(Config, tree, where)


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config; ``load_config(path)`` reproduces it exactly."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
