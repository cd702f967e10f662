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
list), and two of vLLM's extensions: ``top_k`` (at most 64, see
``generate.CANDIDATES``) and ``include_stop_str_in_output``. Other OpenAI fields
(``user``, penalties, ...) are accepted and ignored. A request naming another
model is served anyway (clients send arbitrary names); the reply names the
served model. An invalid request gets a 400 in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``, never a traceback.

As OpenAI's API does, the returned text stops *before* a stop string, unless the
request sets ``include_stop_str_in_output`` (useful with ``stop: "</answer>"``,
which leaves a tracetune trace complete). ``finish_reason`` is "stop" for a stop
string or the end-of-sequence token and "length" when ``max_tokens`` ran out.

Generation is serialised: JAX programs and the ``Generator`` are not shared
safely between threads. It runs in a worker thread so that the event loop keeps
answering; greedy requests that wait with the same settings are decoded together
as one batch (greedy rows do not depend on the rest of their batch, which
test_generate checks; sampled rows do, so a seeded request is always decoded
alone and stays reproducible).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tracetune.format import PROMPT_TEMPLATE
from tracetune.generate import CANDIDATES, Generation, Generator, SamplingConfig
from tracetune.models.registry import LoadedModel

# Gemma's chat turns (Gemma 3 model card): the shape of format.CHAT_TEMPLATE,
# which is what a system message plus one user message becomes here.
GEMMA_TURN = "<start_of_turn>{role}\n{content}<end_of_turn>\n"
GEMMA_MODEL_TURN = "<start_of_turn>model\n"
SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role

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
    """

    def __init__(self, generator: Generator, max_batch: int):
        self.generator = generator
        self.max_batch = max_batch
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
    engine = Engine(Generator(loaded.model, loaded.tokenizer, max_batch=max_batch), max_batch)
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
