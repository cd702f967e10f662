"""An OpenAI-compatible HTTP endpoint around any tracetune model.

Any OpenAI client (the ``openai`` SDK, ``curl``, an evaluation harness, the
LLM judge in ``tracetune.judge``) can then talk to a tracetune model::

    >>> app = create_app(load_model("tiny"), model_name="tiny")  # doctest: +SKIP
    >>> with running_server(app) as base_url:  # doctest: +SKIP
    ...     httpx.post(f"{base_url}/chat/completions", json={
    ...         "messages": [{"role": "user", "content": "What is 2 + 3?"}], "temperature": 0})

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, without streaming, with one choice per prompt (``n=1``).
Sampling fields: ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (0 is
greedy; OpenAI's default is 1), ``top_p``, ``seed``, ``stop`` (a string or a
list), and three of vLLM's extensions: ``top_k`` (at most 64, see
``generate.CANDIDATES``), ``include_stop_str_in_output`` and ``guided_choice``
(newer vLLM's spelling, ``structured_outputs: {"choice": [...]}``, is accepted
too; see below). Other OpenAI fields (``user``, penalties, ...) are accepted and
ignored. A request naming another model is served anyway (clients send
arbitrary names); the reply names the served model. An invalid request gets a
400 in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``,
never a traceback.

As OpenAI's API does, the returned text stops *before* a stop string, unless the
request sets ``include_stop_str_in_output`` (useful with ``stop: "</answer>"``,
which leaves a tracetune trace complete). ``finish_reason`` is "stop" for a stop
string or the end-of-sequence token and "length" when ``max_tokens`` ran out.

``guided_choice: ["1", "2", ...]`` (1 to ``MAX_CHOICES`` distinct, non-empty
strings) makes the reply exactly one of the choices, whatever the model, with
``finish_reason`` "stop": the LLM judge sends it to get a parseable verdict
(a score, a ranking), even from the tiny random test model. Each choice is
scored by ``log p(choice | prompt)``, the sum of its tokens' log-probs at
temperature 1 (``choice_token_ids`` says how it is tokenised). Temperature 0
returns the most likely choice; temperature T > 0 samples a choice with
probability proportional to ``exp(log p(choice | prompt) / T)``, reproducibly
when ``seed`` is set. This ranks whole choices. vLLM's guided decoding instead
masks the disallowed tokens step by step; greedy, it commits to the likeliest
allowed first token, so of "12" and "3" it can answer "12" where "3" is
likelier as a whole (p("1") > p("3") > p("12"), "12" read as "1" + "2"). ``max_tokens``, ``stop``, ``top_p``, ``top_k`` and
``include_stop_str_in_output`` do not apply to such a request: the reply is
always a whole choice. The usage counts the prompt's tokens and the chosen
choice's.

Generation is serialised: JAX programs and the ``Generator`` are not shared
safely between threads (choice scoring holds the same lock). It runs in a
worker thread so that the event loop keeps answering; greedy requests that wait
with the same settings are decoded together as one batch (greedy rows do not
depend on the rest of their batch, which test_generate checks; sampled rows do,
so a seeded request is always decoded alone and stays reproducible).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tracetune import logprobs
from tracetune.format import PROMPT_TEMPLATE
from tracetune.generate import CANDIDATES, Generation, Generator, SamplingConfig
from tracetune.models.registry import LoadedModel
from tracetune.models.tokenizer import Tokenizer

# Gemma's chat turns (Gemma 3 model card): the shape of format.CHAT_TEMPLATE,
# which is what a system message plus one user message becomes here.
GEMMA_TURN = "<start_of_turn>{role}\n{content}<end_of_turn>\n"
GEMMA_MODEL_TURN = "<start_of_turn>model\n"
SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role
MAX_CHOICES = 1024  # guided_choice: most choices a request may list (each is a row of the scoring pass)
CHOICE_ROWS = 64  # most (prompt, choice) rows per scoring pass (a power of two)
CHOICE_TOKENS = 16384  # and at most about this many tokens: the trunk's attention is [rows, heads, T, T]
# vLLM's structured_outputs constraints other than choice: refused, not ignored (they change the reply)
OTHER_CONSTRAINTS = ("json", "regex", "grammar", "json_object", "structural_tag")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ requests


class ChatMessage(BaseModel):
    """A message; its content a string or OpenAI's list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: object) -> object:
        # One clear message instead of pydantic's error per member of a union.
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ValueError('only text content is supported: a string or a list of {"type": "text", "text": ...} parts')
            return "".join(p["text"] for p in content)
        return content


def _valid_choices(choices: list[str] | None) -> list[str] | None:
    if choices is None:
        return None
    if not 1 <= len(choices) <= MAX_CHOICES:
        raise ValueError(f"must list 1 to {MAX_CHOICES} choices, got {len(choices)}")
    if "" in choices:
        raise ValueError("choices must not be empty strings")
    seen: set[str] = set()
    for choice in choices:
        if choice in seen:
            raise ValueError(f"choices must be distinct; {choice!r} is listed twice")
        seen.add(choice)
    return choices


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``; of its constraints only ``choice`` is served.
    Its options (``disable_fallback``, ``whitespace_pattern``, ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    choice: list[str] | None = None

    @field_validator("choice")
    @classmethod
    def _choices(cls, choices: list[str] | None) -> list[str] | None:
        return _valid_choices(choices)

    @model_validator(mode="after")
    def _only_choice(self) -> StructuredOutputs:
        extra = self.model_extra or {}
        other = [name for name in OTHER_CONSTRAINTS if extra.get(name) not in (None, False)]
        if other:
            raise ValueError(f"only the choice constraint is supported, got {', '.join(other)}")
        return self


class SamplingRequest(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible
    servers commonly do; fields that would change the reply's shape are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=CANDIDATES)  # vLLM's extension; 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    include_stop_str_in_output: bool = False  # vLLM's extension
    guided_choice: list[str] | None = None  # vLLM's extension: the reply is one of these
    structured_outputs: StructuredOutputs | None = None  # newer vLLM's spelling: {"choice": [...]}

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, stream: bool) -> bool:
        if stream:
            raise ValueError("streaming is not supported; send stream=false")
        return stream

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, choices: list[str] | None) -> list[str] | None:
        return _valid_choices(choices)

    @field_validator("structured_outputs")
    @classmethod
    def _one_list_of_choices(cls, value: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        given = info.data.get("guided_choice")
        if value is not None and value.choice is not None and given is not None and value.choice != given:
            raise ValueError("choice differs from guided_choice; send one of them")
        return value

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The choices the reply must be one of, from either spelling; None when unconstrained."""
        if self.guided_choice is not None:
            return tuple(self.guided_choice)
        if self.structured_outputs is not None and self.structured_outputs.choice is not None:
            return tuple(self.structured_outputs.choice)
        return None

    @property
    def choices_param(self) -> str:
        return "guided_choice" if self.guided_choice is not None else "structured_outputs.choice"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, default_max_tokens: int) -> SamplingConfig:
        # No seed: a fresh one, so that sampled replies differ as OpenAI's do.
        seed = self.seed if self.seed is not None else secrets.randbelow(2**31)
        return SamplingConfig(
            max_new_tokens=self.requested_tokens() or default_max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed if self.temperature > 0 else 0,  # greedy ignores it; one batch key
            stop_strings=self.stop_strings,
        )


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt


# ----------------------------------------------------------------- prompts


def chat_prompt(messages: Sequence[ChatMessage], *, chat: bool) -> str:
    """The prompt text for chat ``messages``: the turns in order, then the model's.

    Contents are stripped, as Gemma's own chat template does. System (and
    developer) messages, joined by a blank line, are prepended to the first user
    message (or become it, when there is none): Gemma has no system role.

    ``chat=True`` (instruction-tuned models) gives Gemma's turns::

        <start_of_turn>user\\n{system}\\n\\n{user 1}<end_of_turn>\\n
        <start_of_turn>model\\n{assistant 1}<end_of_turn>\\n
        <start_of_turn>user\\n{user 2}<end_of_turn>\\n
        <start_of_turn>model\\n

    which for one system and one user message is ``format.CHAT_TEMPLATE``'s shape.
    ``chat=False`` (base models and tracetune's fine-tunes) gives the recipe's
    prompt per user turn and each assistant turn on its own line::

        Q: {system}\\n\\n{user 1}\\nA:\\n{assistant 1}\\nQ: {user 2}\\nA:\\n

    so a lone user message is exactly ``format.build_prompt(question)``, the
    prompt a tracetune model was trained on. (Plain text has no turn marker for
    the model: after a final assistant message, the model continues that line.)

    >>> chat_prompt([ChatMessage(role="user", content=" What is 2 + 2? ")], chat=False)
    'Q: What is 2 + 2?\\nA:\\n'
    """
    system = "\n\n".join(m.content.strip() for m in messages if m.role in SYSTEM_ROLES)
    turns = [(m.role, m.content.strip()) for m in messages if m.role not in SYSTEM_ROLES]
    if system:
        if turns and turns[0][0] == "user":
            turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
        else:
            turns.insert(0, ("user", system))
    if chat:
        body = "".join(GEMMA_TURN.format(role="user" if role == "user" else "model", content=text) for role, text in turns)
        return body + GEMMA_MODEL_TURN
    return "".join(PROMPT_TEMPLATE.format(question=text) if role == "user" else f"{text}\n" for role, text in turns)


# ------------------------------------------------------------------ choices


def choice_token_ids(tokenizer: Tokenizer, prompt: str, prompt_ids: Sequence[int], choice: str) -> list[int]:
    """The tokens of ``choice`` after ``prompt``, whose ids (BOS first) are ``prompt_ids``.

    The model's own tokenisation of ``prompt + choice``, past the prompt's tokens.
    Where the two merge at the boundary (the tiny vocabulary reads "Q: h" + "e"
    as "Q: " + "he"), the prompt keeps its own tokens and the choice is tokenised
    alone: every choice is then scored after the same prompt tokens, the ones a
    decoder would continue.

    >>> tok = load_model("tiny").tokenizer  # doctest: +SKIP
    >>> tok.encode("Q: h"), tok.encode("Q: he")  # doctest: +SKIP
    ([2, 955, 933, 281], [2, 955, 933, 316])
    >>> choice_token_ids(tok, "Q: h", tok.encode("Q: h"), "e")  # doctest: +SKIP
    [912]
    """
    prompt_ids = list(prompt_ids)
    joint = tokenizer.encode(prompt + choice)
    if len(joint) > len(prompt_ids) and joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids) :]
    return tokenizer.encode(choice, add_bos=False)


def tokenize_choices(tokenizer: Tokenizer, prompts: Sequence[str],
                     choices: Sequence[str]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(each prompt's ids, each prompt's choices' ids), BOS first in the prompts'."""
    prompt_ids = [tokenizer.encode(prompt) for prompt in prompts]
    return prompt_ids, [[choice_token_ids(tokenizer, prompt, ids, c) for c in choices] for prompt, ids in zip(prompts, prompt_ids)]


def completion_token_logprobs(model: object, pad_id: int, prompt_ids: Sequence[Sequence[int]],
                              completion_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """log p(token | prompt, the completion's earlier tokens) of every completion
    token, at temperature 1 (float32): row i scores ``completion_ids[i]`` after
    ``prompt_ids[i]`` (BOS first, no padding; pad_id never occurs in them).

    The model's trunk runs once over each padded prompt + completion and the head
    only at the completion's positions (``logprobs.frozen_completion_logprobs``, the
    GRPO reference's path: no [B, L, V] logits). Rows go through ``CHOICE_ROWS`` at
    a time, fewer when they are long (``CHOICE_TOKENS``); the batch is padded to a
    power of two and the widths to multiples of 32, so that compiles stay few.
    """
    P = logprobs.bucket(max(map(len, prompt_ids)), 32)
    C = logprobs.bucket(max(map(len, completion_ids)), 32)
    per_pass = min(CHOICE_ROWS, 1 << int(math.log2(max(1, CHOICE_TOKENS // (P + C)))))
    out: list[np.ndarray] = []
    for start in range(0, len(prompt_ids), per_pass):
        prompts, completions = prompt_ids[start : start + per_pass], completion_ids[start : start + per_pass]
        B = 1 << math.ceil(math.log2(len(prompts)))
        prompt_tokens = np.full((B, P), pad_id, np.int32)  # [B, P] left-padded
        completion_tokens = np.full((B, C), pad_id, np.int32)  # [B, C] right-padded
        for row in range(B):
            source = row if row < len(prompts) else 0  # filler rows repeat the first; dropped
            prompt_tokens[row, P - len(prompts[source]) :] = prompts[source]
            completion_tokens[row, : len(completions[source])] = completions[source]
        values = np.asarray(logprobs.frozen_completion_logprobs(model, prompt_tokens, completion_tokens, pad_id))  # [B, C]
        # Padding positions are scored too (their target is pad_id): only a row's own tokens count.
        out.extend(values[row, : len(ids)] for row, ids in enumerate(completions))
    return out


def pick_choice(totals: Sequence[float], temperature: float, rng: np.random.Generator) -> int:
    """The chosen index: at temperature 0 the most likely (the first of equals),
    else a draw with probability proportional to ``exp(total / temperature)``.

    totals: each choice's log p(choice | prompt). NaN (a broken model) raises.

    >>> pick_choice([-3.0, -1.0, -2.0], 0.0, np.random.default_rng(0))
    1
    """
    totals = np.asarray(totals, np.float64)
    if np.isnan(totals).any() or not np.isfinite(totals).any():
        raise ValueError(f"the choices' log-probabilities are not usable: {totals.tolist()}")
    if temperature == 0:
        return int(np.argmax(totals))
    scaled = totals / temperature
    weights = np.exp(scaled - scaled.max())  # the largest is exp(0): no overflow
    return int(rng.choice(len(totals), p=weights / weights.sum()))


# --------------------------------------------------------------- generation


@dataclass(eq=False)
class _Job:
    prompts: list[str]
    sampling: SamplingConfig
    results: list[Generation] | None = None
    error: BaseException | None = None


class Engine:
    """One Generator, used by one thread at a time.

    A request's thread queues its job, then waits for the generation lock. The
    thread that gets the lock decodes its own job and every queued greedy job
    with the same settings (up to ``max_batch`` prompts) as one batch; the
    threads whose jobs it took find their results when they get the lock.
    Choice scoring (``choose``) holds the same lock for its forward passes.
    """

    def __init__(self, generator: Generator, max_batch: int, model: object):
        self.generator = generator
        self.max_batch = max_batch
        self.model = model  # the nnx model, for choice scoring (the Generator holds its own layout)
        self._generating = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Job] = []

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[Generation]:
        job = _Job(list(prompts), sampling)
        with self._queue_lock:
            self._queue.append(job)
        with self._generating:
            if job.results is None and job.error is None:
                self._run(self._take_batch(job))
        if job.error is not None:
            raise job.error
        assert job.results is not None
        return job.results

    def choose(self, prompts: Sequence[str], prompt_ids: Sequence[list[int]], choices: Sequence[str],
               choice_ids: Sequence[Sequence[list[int]]], temperature: float, seed: int) -> list[Generation]:
        """One of ``choices`` per prompt (see ``pick_choice``): every (prompt, choice)
        pair scored in one go, under the generation lock."""
        rows = [(ids, c) for ids, per_prompt in zip(prompt_ids, choice_ids) for c in per_prompt]
        with self._generating:
            scored = completion_token_logprobs(self.model, self.generator.tokenizer.pad_id,
                                               [p for p, _ in rows], [c for _, c in rows])
        rng = np.random.default_rng(seed)
        results = []
        for i, prompt in enumerate(prompts):
            token_logprobs = scored[i * len(choices) : (i + 1) * len(choices)]
            index = pick_choice([float(lp.sum(dtype=np.float64)) for lp in token_logprobs], temperature, rng)
            ids = choice_ids[i][index]
            # "eos": the choice is complete, as a decoder would end it; no stop string to cut.
            results.append(Generation(prompt, choices[index], list(ids), self.generator.tokenizer.token_texts(ids),
                                      token_logprobs[index].tolist(), "eos", len(prompt_ids[i])))
        return results

    def _take_batch(self, job: _Job) -> list[_Job]:
        with self._queue_lock:
            batch, rows = [job], len(job.prompts)
            if job.sampling.temperature == 0:
                for other in self._queue:
                    if other is not job and other.sampling == job.sampling and rows + len(other.prompts) <= self.max_batch:
                        batch.append(other)
                        rows += len(other.prompts)
            self._queue = [j for j in self._queue if j not in batch]
        return batch

    def _run(self, batch: list[_Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        try:
            results = self.generator.generate(prompts, batch[0].sampling)
        except Exception as error:  # every waiting request gets the error, not only this one
            for job in batch:
                job.error = error
            return
        start = 0
        for job in batch:
            job.results, start = results[start : start + len(job.prompts)], start + len(job.prompts)


# -------------------------------------------------------------------- the app


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    messages, params = [], []
    for error in exc.errors():
        if error["type"] == "json_invalid":
            messages.append(f"request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
            params.append(None)
            continue
        loc = [str(part) for part in error["loc"] if part != "body"]
        where = ".".join(loc) or "request body"
        messages.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
        params.append(".".join(loc) or None)
    return error_response(400, "; ".join(messages), param=params[0] if params else None)


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


def _server_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def _choice_text(result: Generation, stops: Sequence[str], include_stop: bool) -> tuple[str, str]:
    """(text, OpenAI finish_reason) of a Generation, whose text keeps its stop string."""
    text = result.text
    if result.finish_reason == "stop" and not include_stop:
        hit = max((s for s in stops if text.endswith(s)), key=len, default="")
        text = text[: len(text) - len(hit)]
    return text, "length" if result.finish_reason == "length" else "stop"


def _usage(results: Sequence[Generation]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(
    loaded: LoadedModel,
    *,
    model_name: str,
    max_batch: int = 8,
    default_max_tokens: int = 256,
    max_context: int = 8192,
) -> FastAPI:
    """The OpenAI-compatible app serving ``loaded`` as ``model_name``.

    max_batch: most prompts decoded together. default_max_tokens: the budget of a
    request that sets none. max_context: prompt plus completion tokens a request
    may ask for (the caches are allocated for it; a larger request gets a 400
    ``context_length_exceeded``).
    """
    engine = Engine(Generator(loaded.model, loaded.tokenizer, max_batch=max_batch), max_batch, loaded.model)
    created = int(time.time())
    app = FastAPI(title=f"tracetune: {model_name}")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

    @app.middleware("http")
    async def json_only(request: Request, call_next):
        # FastAPI would read a form or a bare body as a missing field; name the real cause.
        kind = request.headers.get("content-type")
        if request.method == "POST" and (kind is None or kind.split(";")[0].strip().lower() != "application/json"):
            got = "missing" if kind is None else f"{kind!r}"
            return error_response(415, f"Content-Type is {got}; send the body as JSON with Content-Type: application/json",
                                  param="Content-Type", code="unsupported_media_type")
        return await call_next(request)

    async def generate(prompts: list[str], body: SamplingRequest) -> list[Generation] | JSONResponse:
        if body.model is not None and body.model != model_name:
            return error_response(404, f"The model {body.model!r} does not exist; this server serves {model_name!r}",
                                  param="model", code="model_not_found")
        choices = body.choices
        if choices is not None:
            return await choose(prompts, body, choices)
        sampling = body.sampling(default_max_tokens)
        longest = max(len(loaded.tokenizer.encode(p)) for p in prompts)
        if longest + sampling.max_new_tokens > max_context:
            return error_response(
                400, f"this model serves at most {max_context} tokens; the prompt has {longest} and "
                f"max_tokens asks for {sampling.max_new_tokens} more", param="max_tokens", code="context_length_exceeded",
            )
        try:
            return await run_in_threadpool(engine.generate, prompts, sampling)
        except Exception as error:  # the client gets OpenAI's server_error; the log gets the traceback
            log.exception("generation failed")
            return error_response(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")

    async def choose(prompts: list[str], body: SamplingRequest, choices: tuple[str, ...]) -> list[Generation] | JSONResponse:
        prompt_ids, choice_ids = await run_in_threadpool(tokenize_choices, loaded.tokenizer, prompts, choices)
        # An identity-normalised SentencePiece gives every non-empty string a token; another might not,
        # and a choice of no tokens would have log-probability 0, the largest.
        empty = [c for c, ids in zip(choices, choice_ids[0]) if not ids]
        if empty:
            return error_response(400, f"the choice {empty[0]!r} has no tokens in this model's vocabulary",
                                  param=body.choices_param)
        longest = max(len(ids) + max(map(len, per_prompt)) for ids, per_prompt in zip(prompt_ids, choice_ids))
        if longest > max_context:
            return error_response(400, f"this model serves at most {max_context} tokens; a prompt with its longest "
                                  f"choice has {longest}", param=body.choices_param, code="context_length_exceeded")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        try:
            return await run_in_threadpool(engine.choose, prompts, prompt_ids, choices, choice_ids, body.temperature, seed)
        except Exception as error:  # as generate's
            log.exception("choice scoring failed")
            return error_response(500, f"choice scoring failed: {type(error).__name__}: {error}", type="server_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "tracetune"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> dict | JSONResponse:
        results = await generate([chat_prompt(body.messages, chat=loaded.chat)], body)
        if isinstance(results, JSONResponse):
            return results
        text, finish = _choice_text(results[0], body.stop_strings, body.include_stop_str_in_output)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(results),
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict | JSONResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        results = await generate(prompts, body)
        if isinstance(results, JSONResponse):
            return results
        choices = []
        for index, result in enumerate(results):
            text, finish = _choice_text(result, body.stop_strings, body.include_stop_str_in_output)
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": None})
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": _usage(results),
        }

    return app


# ------------------------------------------------------------------ running it


def serve(
    loaded: LoadedModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_batch: int = 8,
    default_max_tokens: int = 256,
    max_context: int = 8192,
) -> None:
    """Serve ``loaded`` at ``http://HOST:PORT/v1`` as ``model_name`` (default: its
    name) until interrupted (Ctrl-C); see ``create_app`` for the rest."""
    app = create_app(loaded, model_name=model_name or loaded.name, max_batch=max_batch,
                     default_max_tokens=default_max_tokens, max_context=max_context)
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextlib.contextmanager
def running_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL
    ``http://HOST:PORT/v1`` once it listens (port 0: a free port) and stops it on exit.

    >>> with running_server(app) as base_url:  # doctest: +SKIP
    ...     httpx.get(f"{base_url}/models")
    """
    # A slow request still running at exit (a generation, a test's slow reply) gets
    # one second to finish before it is cancelled.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{host}:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port} within {start_timeout:.0f} s")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)
