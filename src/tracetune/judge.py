"""An LLM as judge of reasoning quality, against any OpenAI-compatible chat endpoint.

The harness's metrics check the final number and the trace's shape; whether the
steps themselves make sense needs a reader. The judge reads a seeded sample of
completions and rates each 1-5 by ``RUBRIC``, replying with a JSON object::

    {"score": 4, "rationale": "Correct; step 2 restates step 1."}

A reply that is not such an object (or scores outside 1-5, or not an integer) is
asked again, up to ``retries`` times; HTTP errors and timeouts are retried too,
after a short backoff. A sample still without a score is counted as unscored,
with the reason, never given a default score. Scores are cached in a JSONL file
keyed by (sample id, sha256 of the completion, judge model), so a re-run only
sends what is missing; unscored samples are not cached and are sent again.

>>> config = JudgeConfig.from_env(samples=50)  # doctest: +SKIP
>>> summarize(judge_samples(samples, config, cache_path=Path("judge.jsonl")))  # doctest: +SKIP
{'judge_model': 'gpt-4o-mini', 'n': 50, 'scored': 49, 'unscored': 1, 'mean': 3.2, 'low': 2.9, 'high': 3.5, 'histogram': {...}}
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tracetune.errors import DamagedFile
from tracetune.files import append_jsonl, read_appended, writing
from tracetune.models.errors import ModelError
from tracetune.scoring import mean_ci

ENV_BASE_URL = ("TRACETUNE_JUDGE_BASE_URL", "OPENAI_BASE_URL")  # first set wins
ENV_MODEL = ("TRACETUNE_JUDGE_MODEL",)
ENV_API_KEY = ("TRACETUNE_JUDGE_API_KEY", "OPENAI_API_KEY")

SCORES = (1, 2, 3, 4, 5)

RUBRIC = """\
Rate the QUALITY OF THE REASONING in the model's completion, from 1 to 5:

5 - Every step is correct and necessary, each is clearly explained, and the
    conclusion follows from the steps.
4 - Correct, with minor gaps or redundancy.
3 - Partially correct, or hard to follow.
2 - Major errors, but some of the reasoning is relevant to the question.
1 - No meaningful reasoning: empty, irrelevant, incoherent or looping
    (repeating itself).

Rate the steps, not only the final number: the reference answer is there to
check them. A wrong final answer means some step is wrong, so at most 3; a
right final answer reached through wrong steps is not correct reasoning."""

SYSTEM_PROMPT = f"""\
You grade step-by-step solutions of grade-school math problems.

{RUBRIC}

Reply with ONLY a JSON object, no other text:
{{"score": <an integer from 1 to 5>, "rationale": "<one or two sentences>"}}"""

USER_TEMPLATE = """\
Question:
{question}

Reference answer:
{reference}

Model's completion (between the markers):
=== COMPLETION START ===
{completion}
=== COMPLETION END ===

Rate the reasoning of the completion. Reply with only the JSON object."""

# HTTP statuses worth retrying: the same request may well succeed later.
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
# Statuses that mean every request will fail the same way: a wrong key, URL or model.
FATAL_STATUSES = {401, 403, 404}
REPLY_EXCERPT = 200  # characters of a malformed reply quoted in its error


class JudgeError(ModelError):
    """A judge that cannot be used: not configured, unreachable, or refusing us.
    A ModelError, so the CLI prints it as one line."""


class MalformedReply(ValueError):
    """A judge reply without a valid {"score": 1-5, "rationale": ...} object."""


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """Where the judge is and how to ask it.

    base_url: the OpenAI-compatible API root, with its ``/v1`` (requests go to
      ``{base_url}/chat/completions``).
    model: the judge model's name; part of the cache key.
    api_key: sent as a Bearer token when set (a local server needs none).
    samples: how many completions to judge, chosen with ``seed`` (all if fewer).
    concurrency: requests in flight at most.
    timeout: seconds per request.
    retries: extra attempts per sample after a malformed reply, an HTTP error or a
      timeout; HTTP errors and timeouts wait ``backoff * 2**k`` seconds first.
    temperature, max_tokens: the judge's sampling (0: the same reply each time).
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    samples: int = 50
    seed: int = 42
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 2
    backoff: float = 0.5
    temperature: float = 0.0
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.base_url):
            raise JudgeError(f"judge base URL must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise JudgeError("judge model name is empty")
        for name in ("samples", "concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise JudgeError(f"judge {name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise JudgeError("judge retries and backoff must be >= 0 and timeout > 0")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> JudgeConfig:
        """base_url, model and api_key from the environment unless given; overrides
        that are None are ignored (unset CLI options).

        base_url: TRACETUNE_JUDGE_BASE_URL, else OPENAI_BASE_URL. model:
        TRACETUNE_JUDGE_MODEL. api_key: TRACETUNE_JUDGE_API_KEY, else OPENAI_API_KEY.
        """
        env = os.environ if environ is None else environ
        values = {key: value for key, value in overrides.items() if value is not None}
        for name, variables in (("base_url", ENV_BASE_URL), ("model", ENV_MODEL), ("api_key", ENV_API_KEY)):
            if name not in values:
                found = next((env[v] for v in variables if env.get(v)), None)
                if found is not None:
                    values[name] = found
                elif name != "api_key":
                    raise JudgeError(f"no judge {name}: set {' or '.join(variables)}, or pass {name}")
        return cls(**values)


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one completion; ``score`` None means unscored, and
    ``error`` says why (the last malformed reply, or the HTTP error)."""

    id: str
    score: int | None
    rationale: str
    attempts: int
    error: str | None
    judge_model: str


# ------------------------------------------------------------------- replies


def judge_messages(question: str, reference: str, completion: str) -> list[dict[str, str]]:
    """The chat messages asking for one rating: the rubric, then the sample."""
    user = USER_TEMPLATE.format(question=question.strip(), reference=str(reference).strip(), completion=completion)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_reply(text: str) -> tuple[int, str]:
    """(score, rationale) from a judge's reply: the first JSON object with a "score",
    alone, in ```json fences, or surrounded by text. MalformedReply otherwise.

    >>> parse_reply('Sure. ```json\\n{"score": 4, "rationale": "ok"}\\n```')
    (4, 'ok')
    """
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "score" in value:
            return _checked(value)
    raise MalformedReply("no JSON object with a score")


def _checked(value: dict) -> tuple[int, str]:
    score, rationale = value["score"], value.get("rationale", "")
    # bool is an int in Python; 4.0 and "4" are not the integer the rubric asks for.
    if isinstance(score, bool) or not isinstance(score, int):
        raise MalformedReply(f"score is not an integer: {score!r}")
    if score not in SCORES:
        raise MalformedReply(f"score {score} is outside 1-5")
    if not isinstance(rationale, str):
        raise MalformedReply(f"rationale is not a string: {rationale!r}")
    return score, rationale.strip()


# ------------------------------------------------------------- choosing, cache


def completion_sha256(completion: str) -> str:
    return hashlib.sha256(completion.encode("utf-8")).hexdigest()


def choose_samples(samples: Sequence[dict], n: int, seed: int) -> list[dict]:
    """``n`` samples chosen with ``seed``, in their original order (all if fewer)."""
    if len(samples) <= n:
        return list(samples)
    return [samples[i] for i in sorted(random.Random(seed).sample(range(len(samples)), n))]


def _key(sample_id: str, completion: str, judge_model: str) -> tuple[str, str, str]:
    return str(sample_id), completion_sha256(completion), judge_model


def read_cache(path: Path) -> dict[tuple[str, str, str], Judgement]:
    """Cached judgements by (id, completion sha256, judge model).

    The file is written a line at a time; a last line without its newline was
    cut by a kill, and is dropped from the file so that appends stay whole lines.
    """
    cache: dict[tuple[str, str, str], Judgement] = {}
    try:
        records = read_appended(path)
    except DamagedFile as error:
        raise JudgeError(f"{error}; delete the judge cache to start over") from None
    for number, record in enumerate(records, start=1):
        try:
            key = (record["id"], record["completion_sha256"], record["judge_model"])
            judgement = Judgement(record["id"], record["score"], record["rationale"], record["attempts"], None, record["judge_model"])
        except (KeyError, TypeError) as error:
            raise JudgeError(f"{path}: record {number}: not a judge cache record ({error}); delete the file to start over") from None
        cache[key] = judgement
    return cache


def _append(path: Path, judgement: Judgement, completion: str) -> None:
    record = {k: v for k, v in asdict(judgement).items() if k != "error"}
    record["completion_sha256"] = completion_sha256(completion)
    append_jsonl(path, record)  # one write per line: a kill leaves whole lines and at most one cut


# ------------------------------------------------------------------- judging


@dataclass
class _Outcome:
    """One sample's verdict; ``unanswered``: its last attempt failed with a timeout,
    a refused connection or a retryable status (429, 5xx)."""

    judgement: Judgement
    unanswered: bool = False


class _Endpoint:
    def __init__(self, config: JudgeConfig):
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.Client(headers=headers, timeout=config.timeout)
        self.answered = threading.Event()  # some request got a non-retryable answer: the endpoint is there
        self.stopped = threading.Event()  # the run has ended: workers send nothing more

    def ask(self, messages: list[dict[str, str]]) -> str:
        """The reply's text; httpx.HTTPError (a timeout, a refused connection, a bad
        status) or MalformedReply (a 200 whose body is not a chat completion)."""
        payload = {"model": self.config.model, "messages": messages,
                   "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        response = self.client.post(self.config.url, json=payload)
        if response.status_code in FATAL_STATUSES:
            raise JudgeError(
                f"judge endpoint {self.config.url} answered {response.status_code} {response.reason_phrase}: "
                f"{response.text[:REPLY_EXCERPT]} (check the base URL, the model name {self.config.model!r} and the API key)"
            )
        if response.status_code not in RETRY_STATUSES:
            self.answered.set()
        response.raise_for_status()
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise MalformedReply(f"not a chat completion: {response.text[:REPLY_EXCERPT]!r}") from None
        if not isinstance(content, str):
            raise MalformedReply(f"message content is {content!r}")
        return content

    def judge(self, sample: dict) -> _Outcome:
        config = self.config
        messages = judge_messages(sample["question"], sample["reference"], sample["completion"])
        sample_id = str(sample["id"])
        failure, unanswered, attempts = "run stopped before the first attempt", False, 0
        for attempt in range(1, config.retries + 2):
            if self.stopped.is_set():
                break
            attempts, reply = attempt, None
            try:
                reply = self.ask(messages)
                score, rationale = parse_reply(reply)
                return _Outcome(Judgement(sample_id, score, rationale, attempt, None, config.model))
            except MalformedReply as error:
                shown = f": {reply[:REPLY_EXCERPT]!r}" if reply is not None else ""
                failure, unanswered = f"malformed reply after {attempt} attempts ({error}){shown}", False
            except httpx.HTTPError as error:
                failure = _describe(error, config.url)
                if isinstance(error, httpx.HTTPStatusError) and error.response.status_code not in RETRY_STATUSES:
                    unanswered = False
                    break  # a 400 or 422 about this sample: asking again gets the same answer
                unanswered = True
                if attempt <= config.retries:
                    time.sleep(config.backoff * 2 ** (attempt - 1))
        return _Outcome(Judgement(sample_id, None, "", attempts, failure, config.model), unanswered)

    def close(self) -> None:
        self.client.close()


def _describe(error: httpx.HTTPError, url: str) -> str:
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code} from {url}: {error.response.text[:REPLY_EXCERPT]}"
    if isinstance(error, httpx.TimeoutException):
        return f"timed out ({type(error).__name__}) waiting for {url}"
    return f"cannot reach {url}: {type(error).__name__}: {error}"


def _check_samples(samples: Sequence[dict]) -> None:
    for index, sample in enumerate(samples):
        missing = [k for k in ("id", "question", "reference", "completion") if k not in sample]
        if missing:
            raise JudgeError(f"sample {index} has no {', '.join(missing)}; each needs id, question, reference, completion")


def judge_samples(
    samples: Sequence[dict],
    config: JudgeConfig,
    *,
    cache_path: Path | None,
    progress: Callable[[int], None] | None = None,
) -> list[Judgement]:
    """Judge ``config.samples`` of ``samples`` (chosen with ``config.seed``), in
    their order. Each sample has ``id``, ``question``, ``reference``, ``completion``.

    Cached verdicts are reused and new ones appended as they arrive (a killed run
    keeps them). ``progress(n)``: n more samples finished. Raises JudgeError when
    the endpoint refuses us (401, 403, 404), or when a sample has used up its
    attempts on timeouts, refused connections or 429/5xx before the endpoint has
    answered any request: then it is unreachable, not wrong about one sample.
    """
    _check_samples(samples)
    chosen = choose_samples(samples, config.samples, config.seed)
    cache = read_cache(cache_path) if cache_path is not None else {}
    results: dict[int, Judgement] = {}
    todo = []
    for index, sample in enumerate(chosen):
        cached = cache.get(_key(sample["id"], sample["completion"], config.model))
        if cached is not None:
            results[index] = cached
        else:
            todo.append(index)
    if progress and results:
        progress(len(results))

    endpoint = _Endpoint(config)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="judge")
    try:
        if cache_path is not None and todo:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with writing(cache_path):
                cache_path.touch()
        futures = {pool.submit(endpoint.judge, chosen[i]): i for i in todo}
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            outcome = future.result()  # a JudgeError (401, 403, 404) ends the run
            if outcome.unanswered and not endpoint.answered.is_set():
                raise JudgeError(f"judge endpoint unreachable (no request has been answered): {outcome.judgement.error}")
            results[index] = outcome.judgement
            if cache_path is not None and outcome.judgement.score is not None:
                _append(cache_path, outcome.judgement, chosen[index]["completion"])
            if progress:
                progress(1)
    finally:
        endpoint.stopped.set()  # after an error or Ctrl-C, requests in flight are the last
        pool.shutdown(wait=True, cancel_futures=True)
        endpoint.close()
    return [results[i] for i in range(len(chosen))]


def summarize(judgements: Sequence[Judgement]) -> dict[str, Any]:
    """n, scored, unscored; the mean score with its 95% interval (low, high; None
    when nothing was scored); the histogram of scores, keyed "1".."5" (JSON keys);
    the judge model(s)."""
    scores = [j.score for j in judgements if j.score is not None]
    estimate = mean_ci([float(s) for s in scores], (1.0, 5.0))
    return {
        "judge_model": ", ".join(sorted({j.judge_model for j in judgements})) or None,
        "n": len(judgements),
        "scored": len(scores),
        "unscored": len(judgements) - len(scores),
        "mean": estimate.mean if scores else None,
        "low": estimate.low if scores else None,
        "high": estimate.high if scores else None,
        "histogram": {str(s): scores.count(s) for s in SCORES},
    }
