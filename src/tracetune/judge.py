"""An LLM as judge of reasoning quality, against any OpenAI-compatible chat endpoint.

The harness's metrics check the final number and the trace's shape; whether the
steps themselves make sense needs a reader. The judge reads a seeded sample of
completions and rates each 1-5 by the rubric of its task kind (``rubrics/<kind>.md``,
replaceable: ``load_rubrics``), replying with a JSON object::

    {"score": 4, "rationale": "Correct; step 2 restates step 1."}

A reply that is not such an object (or scores outside 1-5, or not an integer) is
asked again, up to ``retries`` times; HTTP errors and timeouts are retried too,
after a short backoff. A sample still without a score is counted as unscored,
with the reason, never given a default score. Scores are cached in a JSONL file
keyed by (sample id, sha256 of the completion, judge model, rubric), so a re-run
only sends what is missing; unscored samples are not cached and are sent again.

The same client is GRPO's ``judge`` reward component (``RewardJudge``): each
completion rated alone, or a prompt's G completions ranked in one request
(group-relative), mapped to [0, 1]; what it could not score stays None, for the
learner to leave out of the advantage and count.

>>> config = JudgeConfig.from_env(samples=50)  # doctest: +SKIP
>>> summarize(judge_samples(samples, config, cache_path=Path("judge.jsonl")))  # doctest: +SKIP
{'judge_model': 'gpt-4o-mini', 'n': 50, 'scored': 49, 'unscored': 1, 'mean': 3.2, 'low': 2.9, 'high': 3.5, 'histogram': {...}}
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
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
from tracetune.format import KINDS
from tracetune.files import append_jsonl, read_appended, writing
from tracetune.models.errors import ModelError
from tracetune.scoring import mean_ci

ENV_BASE_URL = ("TRACETUNE_JUDGE_BASE_URL", "OPENAI_BASE_URL")  # first set wins
ENV_MODEL = ("TRACETUNE_JUDGE_MODEL",)
ENV_API_KEY = ("TRACETUNE_JUDGE_API_KEY", "OPENAI_API_KEY")

SCORES = (1, 2, 3, 4, 5)

# One rubric per task kind (format.KINDS), shipped as text files a user can
# replace: ``load_rubrics(path)``. The reply format is tracetune's, not the
# rubric's: the parser depends on it.
REPLY_FORMAT = """\
Reply with ONLY a JSON object, no other text:
{"score": <an integer from 1 to 5>, "rationale": "<one or two sentences>"}"""

GROUP_REPLY_FORMAT = """\
You are shown {G} responses to the same task, numbered 1 to {G}. Rank them from
best to worst by the rubric above. Reply with ONLY a JSON object, no other text:
{{"ranking": [<the {G} response numbers, best first, each exactly once>], "rationale": "<one or two sentences>"}}"""

USER_TEMPLATE = """\
Question:
{question}
{reference}
Model's completion (between the markers):
=== COMPLETION START ===
{completion}
=== COMPLETION END ===

Rate the reasoning of the completion. Reply with only the JSON object."""

GROUP_TEMPLATE = """\
Question:
{question}
{reference}
{responses}

Rank the {G} responses, best first. Reply with only the JSON object."""

REFERENCE_TEMPLATE = "\nReference answer:\n{reference}\n"

# Constrained replies (vLLM's ``guided_choice``, served by ``tracetune serve``):
# rankings are sent as every permutation, so only small groups can ask for them.
MAX_GUIDED_GROUP = 5


def shipped_rubric(kind: str) -> str:
    """The rubric tracetune ships for a task kind (``rubrics/<kind>.md``)."""
    from importlib import resources

    if kind not in KINDS:
        raise JudgeError(f"no rubric for task kind {kind!r}; kinds: {', '.join(KINDS)}")
    return resources.files("tracetune.rubrics").joinpath(f"{kind}.md").read_text(encoding="utf-8").strip()


def load_rubrics(path: str | Path = "") -> dict[str, str]:
    """kind -> rubric text. ``path`` "" gives the shipped rubrics; a file, that
    rubric for every kind; a directory, its ``<kind>.md`` files, the shipped
    rubric for a kind without one. A rubric that cannot be read or is empty is a
    JudgeError naming the file."""
    rubrics = {kind: shipped_rubric(kind) for kind in KINDS}
    if not str(path):
        return rubrics
    path = Path(path).expanduser()
    if path.is_dir():
        files = {kind: path / f"{kind}.md" for kind in KINDS if (path / f"{kind}.md").exists()}
        if not files:
            raise JudgeError(f"{path}: a rubric directory needs at least one of {', '.join(f'{k}.md' for k in KINDS)}")
    elif path.exists():
        files = dict.fromkeys(KINDS, path)
    else:
        raise JudgeError(f"{path}: no such rubric file or directory")
    for kind, file in files.items():
        try:
            text = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise JudgeError(f"{file}: cannot read the rubric: {error}") from None
        if not text:
            raise JudgeError(f"{file}: the rubric is empty")
        rubrics[kind] = text
    return rubrics


RUBRIC = shipped_rubric("numeric")
SYSTEM_PROMPT = f"{RUBRIC}\n\n{REPLY_FORMAT}"


def rubric_sha256(rubric: str) -> str:
    return hashlib.sha256(rubric.encode("utf-8")).hexdigest()[:16]


def _reference_block(reference: Any, kind: str) -> str:
    """The reference, for the kinds that have one (an open row is judged on its own)."""
    text = str(reference).strip()
    return REFERENCE_TEMPLATE.format(reference=text) if kind != "open" and text else ""


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
    rubric: "" for the shipped rubric of each task kind, or a file (every kind)
      or directory (``<kind>.md``) replacing them (``load_rubrics``).
    guided: send vLLM's ``guided_choice`` with the allowed replies ("1".."5", or
      every ranking "2>1>3"), so that any served model's reply parses: for
      endpoints that support it (vLLM, ``tracetune serve``).
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
    rubric: str = ""
    guided: bool = False

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


def judge_messages(question: str, reference: str, completion: str, kind: str = "numeric",
                   rubric: str | None = None) -> list[dict[str, str]]:
    """The chat messages asking for one rating: the kind's rubric, then the sample."""
    rubric = rubric if rubric is not None else shipped_rubric(kind)
    user = USER_TEMPLATE.format(question=question.strip(), reference=_reference_block(reference, kind), completion=completion)
    return [{"role": "system", "content": f"{rubric}\n\n{REPLY_FORMAT}"}, {"role": "user", "content": user}]


def group_messages(question: str, reference: str, completions: Sequence[str], kind: str = "numeric",
                   rubric: str | None = None) -> list[dict[str, str]]:
    """The chat messages asking to rank a prompt's G completions (group-relative mode)."""
    rubric = rubric if rubric is not None else shipped_rubric(kind)
    G = len(completions)
    responses = "\n".join(f"=== RESPONSE {i} START ===\n{c}\n=== RESPONSE {i} END ===" for i, c in enumerate(completions, 1))
    user = GROUP_TEMPLATE.format(question=question.strip(), reference=_reference_block(reference, kind), responses=responses, G=G)
    return [{"role": "system", "content": f"{rubric}\n\n{GROUP_REPLY_FORMAT.format(G=G)}"}, {"role": "user", "content": user}]


def parse_reply(text: str) -> tuple[int, str]:
    """(score, rationale) from a judge's reply: the first JSON object with a "score",
    alone, in ```json fences, or surrounded by text. MalformedReply otherwise.

    >>> parse_reply('Sure. ```json\\n{"score": 4, "rationale": "ok"}\\n```')
    (4, 'ok')

    A reply that is only the score ("4": a constrained reply, ``guided_choice``) is accepted.
    """
    if re.fullmatch(r"\s*[1-5]\s*", text):
        return int(text), ""
    return _checked(_object_with(text, "score"))


def _object_with(text: str, key: str) -> dict:
    """The first JSON object in ``text`` that has ``key``: alone, in ```json fences,
    or surrounded by prose (judges add both). MalformedReply when there is none."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and key in value:
            return value
    raise MalformedReply(f"no JSON object with a {key}")


def parse_ranking(text: str, G: int) -> list[int]:
    """The ranking of G responses (their 1-based numbers, best first) from a reply:
    a JSON object with "ranking", or only the ranking written "2>1>4>3" (a
    constrained reply). Each number exactly once; MalformedReply otherwise.

    >>> parse_ranking('{"ranking": [2, 1, 3], "rationale": "2 is clearest"}', 3)
    [2, 1, 3]
    >>> parse_ranking(" 3>1>2 ", 3)
    [3, 1, 2]
    """
    if re.fullmatch(r"\s*\d+(\s*>\s*\d+)*\s*", text):
        ranking: Any = [int(part) for part in text.split(">")]
    else:
        ranking = _object_with(text, "ranking")["ranking"]
    if not isinstance(ranking, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking):
        raise MalformedReply(f"ranking is not a list of response numbers: {ranking!r}")
    if sorted(ranking) != list(range(1, G + 1)):
        raise MalformedReply(f"ranking {ranking} is not each of the responses 1-{G} exactly once")
    return ranking


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


def _key(sample_id: str, completion: str, judge_model: str, rubric: str = RUBRIC) -> tuple[str, str, str, str]:
    """A verdict is reused only for the same completion, judge and rubric."""
    return str(sample_id), completion_sha256(completion), judge_model, rubric_sha256(rubric)


def read_cache(path: Path) -> dict[tuple[str, str, str, str], Judgement]:
    """Cached judgements by (id, completion sha256, judge model, rubric sha256); a
    record from before rubrics were keyed was made with the numeric rubric.

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
            key = (record["id"], record["completion_sha256"], record["judge_model"],
                   record.get("rubric_sha256", rubric_sha256(RUBRIC)))
            judgement = Judgement(record["id"], record["score"], record["rationale"], record["attempts"], None, record["judge_model"])
        except (KeyError, TypeError) as error:
            raise JudgeError(f"{path}: record {number}: not a judge cache record ({error}); delete the file to start over") from None
        cache[key] = judgement
    return cache


def _append(path: Path, judgement: Judgement, completion: str, rubric: str) -> None:
    record = {k: v for k, v in asdict(judgement).items() if k != "error"}
    record["completion_sha256"] = completion_sha256(completion)
    record["rubric_sha256"] = rubric_sha256(rubric)
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
        self.rubrics = load_rubrics(config.rubric)
        self._lock = threading.Lock()
        self.usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}  # as the endpoint reports them

    def ask(self, messages: list[dict[str, str]], choices: Sequence[str] | None = None) -> str:
        """The reply's text; httpx.HTTPError (a timeout, a refused connection, a bad
        status) or MalformedReply (a 200 whose body is not a chat completion)."""
        payload = {"model": self.config.model, "messages": messages,
                   "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        if choices is not None and self.config.guided:
            payload["guided_choice"] = list(choices)
        with self._lock:
            self.usage["requests"] += 1
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
            body = response.json()
            content = body["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise MalformedReply(f"not a chat completion: {response.text[:REPLY_EXCERPT]!r}") from None
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            with self._lock:
                for key in ("prompt_tokens", "completion_tokens"):
                    if isinstance(usage.get(key), int):
                        self.usage[key] += usage[key]
        if not isinstance(content, str):
            raise MalformedReply(f"message content is {content!r}")
        return content

    def attempt(self, messages: list[dict[str, str]], parse: Callable[[str], Any],
                choices: Sequence[str] | None = None) -> tuple[Any, int, str | None, bool]:
        """(parsed reply or None, attempts, why it failed, unanswered): asks again
        after a malformed reply, an HTTP error or a timeout, up to ``retries`` times."""
        config = self.config
        failure, unanswered, attempts = "run stopped before the first attempt", False, 0
        for attempt in range(1, config.retries + 2):
            if self.stopped.is_set():
                break
            attempts, reply = attempt, None
            try:
                reply = self.ask(messages, choices)
                return parse(reply), attempt, None, False
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
        return None, attempts, failure, unanswered

    def judge(self, sample: dict) -> _Outcome:
        kind = sample.get("kind") or "numeric"
        messages = judge_messages(sample["question"], sample["reference"], sample["completion"], kind, self.rubrics[kind])
        value, attempts, failure, unanswered = self.attempt(messages, parse_reply, [str(s) for s in SCORES])
        score, rationale = value if value is not None else (None, "")
        return _Outcome(Judgement(str(sample["id"]), score, rationale, attempts, failure, self.config.model), unanswered)

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
    their order. Each sample has ``id``, ``question``, ``reference``, ``completion``,
and optionally ``kind`` (its task kind, for the rubric; numeric without it).

    Cached verdicts are reused and new ones appended as they arrive (a killed run
    keeps them). ``progress(n)``: n more samples finished. Raises JudgeError when
    the endpoint refuses us (401, 403, 404), or when a sample has used up its
    attempts on timeouts, refused connections or 429/5xx before the endpoint has
    answered any request: then it is unreachable, not wrong about one sample.
    """
    _check_samples(samples)
    chosen = choose_samples(samples, config.samples, config.seed)
    cache = read_cache(cache_path) if cache_path is not None else {}
    rubrics = load_rubrics(config.rubric)
    results: dict[int, Judgement] = {}
    todo = []
    for index, sample in enumerate(chosen):
        cached = cache.get(_key(sample["id"], sample["completion"], config.model, rubrics[sample.get("kind") or "numeric"]))
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
                _append(cache_path, outcome.judgement, chosen[index]["completion"], rubrics[chosen[index].get("kind") or "numeric"])
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


# ------------------------------------------------------------ judge as a reward

JUDGE_MODES = ("absolute", "group")


@dataclass
class RewardScores:
    """The judge's reward for one batch of completions (G per prompt, consecutive).

    scores: per completion, in [0, 1], or None when the judge gave none (then
      ``reasons`` counts why). Absolute mode maps a 1-5 score s to (s - 1) / 4;
      group mode maps the rank r (0 = best) of G to 1 - r / (G - 1).
    requests / prompt_tokens / completion_tokens: what this batch cost, as the
      endpoint reports its usage (tokens stay 0 where it reports none).
    """

    scores: list[float | None]
    reasons: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: int = 0
    seconds: float = 0.0

    @property
    def unscored(self) -> int:
        return sum(s is None for s in self.scores)

    def record(self) -> dict[str, Any]:
        """The step's ``judge/*`` entries of metrics.jsonl."""
        n = len(self.scores)
        return {"judge/requests": self.requests, "judge/prompt_tokens": self.prompt_tokens,
                "judge/completion_tokens": self.completion_tokens, "judge/cached": self.cached,
                "judge/seconds": round(self.seconds, 3), "judge/unscored": self.unscored,
                "judge/unscored_share": self.unscored / n if n else 0.0}

    @staticmethod
    def total(parts: Sequence[RewardScores]) -> RewardScores:
        reasons: dict[str, int] = {}
        for part in parts:
            for reason, count in part.reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
        return RewardScores([s for p in parts for s in p.scores], reasons,
                            *(sum(getattr(p, k) for p in parts) for k in ("requests", "prompt_tokens", "completion_tokens", "cached", "seconds")))


def _short(reason: str) -> str:
    """A failure's kind, to count reasons without one entry per reply text:
    "HTTP 503", "timed out", "cannot reach URL", "malformed reply after 3 attempts"."""
    return re.split(r": | \(| from https?://", reason)[0][:120]


class RewardJudge:
    """The LLM judge as the ``judge`` component of GRPO's reward.

    Absolute mode asks for each completion's 1-5 score alone (one request per
    completion). Group mode shows a prompt's G completions together and asks for
    their ranking (one request per group; a comparison, which a judge makes more
    reliably than a calibrated score, and the form GRPO's group-relative
    advantage uses anyway). Verdicts are cached in ``cache_path`` by (prompt id,
    completion(s) sha256, judge model, rubric sha256, mode), so a resumed run
    that redoes a step gets the same reward without asking again.

    A completion the judge could not score (a malformed reply after the retries,
    a timeout, a refused connection, a 5xx; in group mode the whole group) has
    no score: the learner leaves it out of its group's advantage and counts it.
    Only a judge that refuses us (401, 403, 404) raises JudgeError.
    """

    def __init__(self, config: JudgeConfig, mode: str = "absolute", cache_path: Path | None = None):
        if mode not in JUDGE_MODES:
            raise JudgeError(f"judge mode must be one of {', '.join(JUDGE_MODES)}, got {mode!r}")
        self.config, self.mode, self.cache_path = config, mode, cache_path
        self.rubrics = load_rubrics(config.rubric)
        self._cache: dict[tuple, Any] = {}
        if cache_path is not None and cache_path.exists():
            try:
                records = read_appended(cache_path)
            except DamagedFile as error:
                raise JudgeError(f"{error}; delete the judge cache to start over") from None
            for record in records:
                self._cache[tuple(record["key"])] = record["value"]

    def _cache_key(self, row: dict, completions: Sequence[str]) -> tuple:
        text = "\x00".join(completions)
        return (self.mode, str(row["id"]), completion_sha256(text), self.config.model,
                rubric_sha256(self.rubrics[row.get("kind") or "numeric"]))

    def _remember(self, key: tuple, value: Any) -> None:
        self._cache[key] = value
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.cache_path, {"key": list(key), "value": value})

    def score(self, rows: Sequence[dict], G: int) -> RewardScores:
        """Scores for ``rows`` (dicts with id, question, reference, kind, completion;
        each prompt's G completions consecutive)."""
        if len(rows) % G:
            raise ValueError(f"{len(rows)} completions are not groups of G={G}")
        if self.mode == "group" and self.config.guided and G > MAX_GUIDED_GROUP:
            raise JudgeError(f"a constrained (guided) group ranking lists every permutation: G={G} > {MAX_GUIDED_GROUP} is too many")
        start = time.perf_counter()
        units = ([(i, i + 1) for i in range(len(rows))] if self.mode == "absolute"
                 else [(g, g + G) for g in range(0, len(rows), G)])
        scores: list[float | None] = [None] * len(rows)
        reasons: dict[str, int] = {}
        todo = []
        cached = 0
        for lo, hi in units:
            key = self._cache_key(rows[lo], [r["completion"] for r in rows[lo:hi]])
            if key in self._cache:
                scores[lo:hi] = self._cache[key]
                cached += hi - lo
            else:
                todo.append((lo, hi, key))
        endpoint = _Endpoint(self.config)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge-reward")
        try:
            futures = {pool.submit(self._ask, endpoint, rows[lo:hi]): (lo, hi, key) for lo, hi, key in todo}
            for future in concurrent.futures.as_completed(futures):
                lo, hi, key = futures[future]
                values, failure = future.result()  # a JudgeError (401, 403, 404) ends the run
                if values is None:
                    reasons[_short(failure)] = reasons.get(_short(failure), 0) + (hi - lo)
                    continue
                scores[lo:hi] = values
                self._remember(key, values)
        finally:
            endpoint.stopped.set()
            pool.shutdown(wait=True, cancel_futures=True)
            endpoint.close()
        return RewardScores(scores, reasons, endpoint.usage["requests"], endpoint.usage["prompt_tokens"],
                            endpoint.usage["completion_tokens"], cached, time.perf_counter() - start)

    def _ask(self, endpoint: _Endpoint, rows: Sequence[dict]) -> tuple[list[float] | None, str | None]:
        first = rows[0]
        kind = first.get("kind") or "numeric"
        rubric = self.rubrics[kind]
        if self.mode == "absolute":
            messages = judge_messages(first["question"], first["reference"], first["completion"], kind, rubric)
            value, _, failure, _ = endpoint.attempt(messages, parse_reply, [str(s) for s in SCORES])
            return ([(value[0] - 1) / (len(SCORES) - 1)] if value is not None else None), failure
        G = len(rows)
        messages = group_messages(first["question"], first["reference"], [r["completion"] for r in rows], kind, rubric)
        choices = [">".join(map(str, p)) for p in itertools.permutations(range(1, G + 1))] if self.config.guided else None
        ranking, _, failure, _ = endpoint.attempt(messages, lambda text: parse_ranking(text, G), choices)
        if ranking is None:
            return None, failure
        values = [0.0] * G
        for rank, number in enumerate(ranking):
            values[number - 1] = 1 - rank / (G - 1)
        return values, None
