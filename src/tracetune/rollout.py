"""One GRPO step's rollout as one value, whatever engine sampled it.

The rewards and the metrics need more than Tunix's ``RolloutOutput`` carries: the
text of each token (to find the answer's tokens), their log-probabilities at
temperature 1 (the confidence term, scored as evaluation scores it), why each
completion ended, and whether the policy's log-probs were finite. Every engine's
output is normalised here into a ``StepRollout``, which the learner passes on to
the rewards and to the step's metrics record: no engine-specific branches after
this module, and an engine that cannot give what a reward needs fails here.

Two engines:

* ``TracetuneRollout``: tracetune's sampler (``generate.Generator``) behind Tunix's
  ``BaseRollout`` interface; it reports temperature-1 log-probs, token texts and
  finish reasons itself;
* any Tunix engine (``vanilla``: Tunix's sampler; ``vllm``) through
  ``TunixEngineRollout``: token texts from the tokenizer, a completion as long as the
  budget counts as cut by it, and, when the rollout temperature is not 1, the
  temperature-1 log-probs recomputed with the policy that sampled them (Tunix's
  samplers report log-probs of logits / temperature).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flax import nnx
from tunix.rl.rollout import base_rollout

from tracetune import logprobs
from tracetune.config import LoraConfig
from tracetune.generate import Generator, SamplingConfig
from tracetune.lora import merged_tree
from tracetune.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class StepRollout:
    """The completions of one step (B = prompts x G rows), the same for every engine.

    prompt_tokens [B, P] left-padded with the pad id (P: the prompt budget);
    tokens[i] [C_i] the completion's ids without the stop token; token_texts[i]
    concatenate to texts[i]; logprobs[i] [C_i] log p(token) at temperature 1;
    finish_reasons[i] "stop" (a stop string), "eos" or "length" (the budget).
    """

    prompts: list[str]
    prompt_tokens: np.ndarray
    tokens: list[np.ndarray]
    texts: list[str]
    token_texts: list[list[str]]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]
    finite: bool  # every sampled token's log-prob (the stop token's included) was finite
    seconds: float

    def __post_init__(self) -> None:
        n = len(self.prompts)
        sizes = {len(self.tokens), len(self.texts), len(self.token_texts), len(self.logprobs), len(self.finish_reasons),
                 self.prompt_tokens.shape[0]}
        if sizes != {n}:
            raise ValueError(f"a rollout of {n} prompts came back with {sorted(sizes)} rows")

    @property
    def truncated(self) -> list[bool]:
        return [reason == "length" for reason in self.finish_reasons]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def completion_tokens(self, pad_id: int, width: int) -> np.ndarray:
        """[B, width] right-padded completion ids."""
        return right_padded(self.tokens, pad_id, width)

    def take(self, rows: Sequence[int]) -> StepRollout:
        """The rollout of ``rows`` only, in that order (seconds stay the whole rollout's)."""
        return StepRollout(
            prompts=[self.prompts[i] for i in rows], prompt_tokens=self.prompt_tokens[list(rows)],
            tokens=[self.tokens[i] for i in rows], texts=[self.texts[i] for i in rows],
            token_texts=[self.token_texts[i] for i in rows], logprobs=[self.logprobs[i] for i in rows],
            finish_reasons=[self.finish_reasons[i] for i in rows], finite=self.finite, seconds=self.seconds)

    @staticmethod
    def concat(parts: Sequence[StepRollout], pad_id: int) -> StepRollout:
        """One rollout of several (a step that sampled more than once), prompts
        left-padded to the widest part; seconds add up."""
        width = max(p.prompt_tokens.shape[1] for p in parts)
        prompt_tokens = np.concatenate([
            np.pad(p.prompt_tokens, ((0, 0), (width - p.prompt_tokens.shape[1], 0)), constant_values=pad_id)
            for p in parts])  # [sum B, width]
        return StepRollout(
            prompts=[x for p in parts for x in p.prompts], prompt_tokens=prompt_tokens,
            tokens=[x for p in parts for x in p.tokens], texts=[x for p in parts for x in p.texts],
            token_texts=[x for p in parts for x in p.token_texts], logprobs=[x for p in parts for x in p.logprobs],
            finish_reasons=[x for p in parts for x in p.finish_reasons], finite=all(p.finite for p in parts),
            seconds=sum(p.seconds for p in parts))

    def reward_columns(self) -> dict[str, list]:
        """The columns the reward functions read beside the batch's own."""
        return {"token_texts": self.token_texts, "token_logprobs": [[float(x) for x in lp] for lp in self.logprobs]}


def right_padded(tokens: Sequence[np.ndarray], pad_id: int, width: int) -> np.ndarray:
    """[B, width] completion ids, right-padded (as Tunix lays completions out)."""
    out = np.full((len(tokens), width), pad_id, np.int32)
    for row, ids in enumerate(tokens):
        out[row, : len(ids)] = ids[:width]
    return out


def left_padded(tokenizer: Tokenizer, prompts: Sequence[str], width: int) -> np.ndarray:
    """[B, width] prompt ids, left-padded (as Tunix lays prompts out)."""
    out = np.full((len(prompts), width), tokenizer.pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        out[row, width - len(ids) :] = ids
    return out


class TracetuneRollout(base_rollout.BaseRollout):
    """Tunix rollout engine around tracetune's ``Generator``.

    RLCluster builds it as ``engine(rollout_actor=, tokenizer=, mesh=, rollout_config=)``;
    the actor is the very LoRA module being trained, so its weights are folded
    afresh before every rollout and dropped after it: the folded copy in the
    decoder's layout (one model's worth of memory) exists only while sampling, not
    during the update that follows.
    """

    def __init__(self, *, rollout_actor, tokenizer, mesh, rollout_config, tracetune_tokenizer: Tokenizer, lora: LoraConfig):
        self._model = rollout_actor
        self._tokenizer = tracetune_tokenizer
        self._lora = lora
        # Prompts padded to the step's own longest, in buckets of 64: at most
        # budget / 64 decode programs (3 for cpu-demo's 192), each compiled once, where
        # padding every step to the budget cost the 270M's B=8 rollout 1.4x in decode
        # steps over the longer caches and prefill over pad positions (148 vs 104 ms
        # a step at 192 vs 128 tokens, measured 2026-12-03).
        self._generator = Generator(rollout_actor, tracetune_tokenizer, max_batch=32, with_weights=False)
        self.mesh = None  # keep the cluster's rollout mesh

    def step_rollout(self, prompts: Sequence[str], rollout_config: base_rollout.RolloutConfig) -> StepRollout:
        start = time.perf_counter()
        sampling = SamplingConfig(
            max_new_tokens=rollout_config.max_tokens_to_generate,
            temperature=rollout_config.temperature,
            top_k=rollout_config.top_k or 0,
            top_p=1.0 if rollout_config.top_p is None else rollout_config.top_p,
            seed=0 if rollout_config.seed is None else int(rollout_config.seed),
        )
        self._generator.set_params(merged_tree(self._model, self._lora))
        try:
            generations = self._generator.generate(list(prompts), sampling)  # its log-probs are at temperature 1
        finally:
            self._generator.drop_params()
        return StepRollout(
            prompts=list(prompts),
            prompt_tokens=left_padded(self._tokenizer, prompts, rollout_config.max_prompt_length),
            tokens=[np.asarray(g.token_ids, np.int32) for g in generations],
            texts=[g.text for g in generations],
            token_texts=[g.token_texts for g in generations],
            logprobs=[np.asarray(g.token_logprobs, np.float32) for g in generations],
            finish_reasons=[g.finish_reason for g in generations],
            finite=all(g.finite for g in generations),
            seconds=time.perf_counter() - start,
        )

    def generate(self, prompts, rollout_config, **kwargs):
        """Tunix's interface (RLCluster.generate); tracetune's learner calls ``step_rollout``."""
        rollout = self.step_rollout(prompts, rollout_config)
        return base_rollout.RolloutOutput(text=rollout.texts, logits=None, tokens=rollout.tokens,
                                          left_padded_prompt_tokens=rollout.prompt_tokens, logprobs=rollout.logprobs)

    def get_per_token_logps(self, prompt_tokens, completion_tokens):
        # grpo.Cluster computes the old policy's log-probs itself, at the rollout
        # temperature as the loss uses them; kept for the engine's interface.
        return logprobs.frozen_completion_logprobs(self._model, prompt_tokens, completion_tokens, self.pad_id())

    def update_params(self, params, filter_types=None):
        nnx.update(self._model, params)

    def pad_id(self):
        return self._tokenizer.pad_id

    def eos_id(self):
        return self._tokenizer.eos_id

    def model(self):
        return self._model


@dataclass
class TunixEngineRollout:
    """A ``StepRollout`` from any Tunix engine's ``RolloutOutput``.

    ``policy()`` returns the model whose weights sampled the rollout (the actor):
    at a rollout temperature other than 0 or 1 the completion's temperature-1
    log-probs are recomputed with it.
    """

    engine: base_rollout.BaseRollout
    tokenizer: Tokenizer
    policy: Callable[[], nnx.Module]
    pad_multiple: int = 32

    def step_rollout(self, prompts: Sequence[str], rollout_config: base_rollout.RolloutConfig) -> StepRollout:
        start = time.perf_counter()
        output = self.engine.generate(list(prompts), rollout_config)
        if output.logprobs is None:
            raise ValueError("the rollout engine returned no log-probabilities: the confidence reward and the NaN check "
                             "need them (RolloutConfig.return_logprobs=True)")
        tokens = [np.asarray(t, np.int32) for t in output.tokens]
        sampled = [np.asarray(lp, np.float32)[: len(t)] for lp, t in zip(output.logprobs, tokens)]
        finite = all(np.isfinite(lp).all() for lp in sampled)
        prompt_tokens = np.asarray(output.left_padded_prompt_tokens)
        temperature = rollout_config.temperature
        if temperature in (0.0, 1.0) or not finite:
            at_one = sampled
        else:
            at_one = self._temperature_one(prompt_tokens, tokens)
        budget = rollout_config.max_tokens_to_generate
        return StepRollout(
            prompts=list(prompts),
            prompt_tokens=prompt_tokens,
            tokens=tokens,
            texts=list(output.text),
            token_texts=[self.tokenizer.token_texts(t) for t in tokens],
            logprobs=at_one,
            finish_reasons=["length" if len(t) >= budget else "eos" for t in tokens],
            finite=finite,
            seconds=time.perf_counter() - start,
        )

    def _temperature_one(self, prompt_tokens: np.ndarray, tokens: list[np.ndarray]) -> list[np.ndarray]:
        pad = self.tokenizer.pad_id
        completions = right_padded(tokens, pad, max(1, max(len(t) for t in tokens)))  # [B, C]
        values = np.asarray(logprobs.frozen_completion_logprobs(self.policy(), prompt_tokens, completions, pad,
                                                                multiple=self.pad_multiple))
        return [values[row, : len(ids)] for row, ids in enumerate(tokens)]
