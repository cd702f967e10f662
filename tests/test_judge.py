"""The LLM judge against a scripted OpenAI-compatible server on loopback, and against
the tiny model served by tracetune.serve."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections import Counter
from dataclasses import replace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tracetune.judge import (
    JudgeConfig,
    JudgeError,
    Judgement,
    MalformedReply,
    choose_samples,
    judge_samples,
    parse_reply,
    read_cache,
    summarize,
)
from tracetune.models.registry import load_model
from tracetune.serve import create_app, running_server

VALID = '{"score": 4, "rationale": "Correct, one redundant step."}'

# question -> the replies to its 1st, 2nd, ... request (the last repeats);
# an int is an HTTP status, "slow" outlasts the client's timeout.
SCRIPTS = {
    "valid": [VALID],
    "fenced": ['Here is my verdict:\n```json\n{"score": 5, "rationale": "Clear."}\n```\nThanks.'],
    "malformed-then-valid": ["The reasoning is fine, I'd say 4/5.", '{"score": 3, "rationale": "Hard to follow."}'],
    "malformed": ["Score: 4"],
    "out-of-range": ['{"score": 7, "rationale": "Great!"}'],
    "error-then-valid": [500, '{"score": 2, "rationale": "Step 2 is wrong."}'],
    "slow": ["slow"],
    "bad-request": [400],  # about this sample: not retried
    "down": [503],
}
TIMEOUT = 0.5


class Script:
    """What the scripted judge saw: requests per question, and the most in flight at once."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0


def scripted_judge(state: dict) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if request.headers.get("authorization") == "Bearer wrong":
            return JSONResponse({"error": {"message": "Incorrect API key provided"}}, status_code=401)
        script: Script = state["script"]  # this request's script, even if a test swaps it meanwhile
        body = await request.json()
        question = re.search(r"Question:\n(\S+)", body["messages"][-1]["content"]).group(1)
        script.requests[question] += 1
        replies = SCRIPTS.get(question, [VALID])
        reply = replies[min(script.requests[question], len(replies)) - 1]
        script.in_flight += 1
        script.max_in_flight = max(script.max_in_flight, script.in_flight)
        try:
            await asyncio.sleep(TIMEOUT * 1.6 if reply == "slow" else script.delay)
        finally:
            script.in_flight -= 1
        if isinstance(reply, int):
            return JSONResponse({"error": {"message": f"scripted {reply}"}}, status_code=reply)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

    return app


@pytest.fixture(scope="module")
def judge_server():
    state = {"script": Script()}
    with running_server(scripted_judge(state)) as base_url:
        yield base_url, state


@pytest.fixture
def judge(judge_server):
    """(config, script): a fresh script per test."""
    base_url, state = judge_server
    state["script"] = Script()
    config = JudgeConfig(base_url=base_url, model="judge-x", timeout=TIMEOUT, backoff=0.01, concurrency=4)
    return config, state["script"]


def sample(question: str, id: str | None = None, completion: str = "<reasoning>Step 1: 2 + 2 = 4.</reasoning>\n<answer>4</answer>") -> dict:
    return {"id": id or question, "question": question, "reference": "4", "completion": completion}


# --------------------------------------------------------------- parsing replies


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"score": 4, "rationale": "ok"}', (4, "ok")),
        ('```json\n{"score": 5, "rationale": "clear"}\n```', (5, "clear")),  # fenced
        ('My rating: {"score": 1, "rationale": "loops"} -- done', (1, "loops")),  # surrounded by text
        ('{"score": 3}', (3, "")),  # the rationale is optional
        ('{"score": 2, "rationale": "uses {braces}", "extra": [1]}', (2, "uses {braces}")),
        ('{"note": "first"} then {"score": 5, "rationale": "x"}', (5, "x")),  # the first object *with a score*
    ],
)
def test_parse_reply_accepts(reply, expected):
    assert parse_reply(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "Score: 4",  # no JSON at all
        '{"score": "4"}',  # a string, not an integer
        '{"score": 4.0}',  # a float, even a whole one
        '{"score": 3.5}',
        '{"score": true}',  # bool is an int subclass in Python
        '{"score": 0}',  # outside 1-5
        '{"score": 6}',
        '{"score": 4, "rationale": 12}',  # the rationale must be text
        '{"rating": 4}',  # no score key
        '{"score": 4',  # cut off
    ],
)
def test_parse_reply_rejects(reply):
    with pytest.raises(MalformedReply):
        parse_reply(reply)


# ---------------------------------------------------------------- judging


def test_scripted_replies_retries_and_unscored_samples(judge):
    config, script = judge
    questions = [q for q in SCRIPTS if q != "down"]
    results = {j.id: j for j in judge_samples([sample(q) for q in questions], config, cache_path=None)}
    got = {q: (j.score, j.attempts) for q, j in results.items()}
    assert got == {
        "valid": (4, 1),
        "fenced": (5, 1),
        "malformed-then-valid": (3, 2),
        "malformed": (None, 3),  # retries=2: three attempts, then unscored
        "out-of-range": (None, 3),
        "error-then-valid": (2, 2),  # the 500 is retried
        "slow": (None, 3),
        "bad-request": (None, 1),  # a 400 would be the same again
    }
    assert results["fenced"].rationale == "Clear." and results["valid"].error is None
    assert results["malformed"].error == "malformed reply after 3 attempts (no JSON object with a score): 'Score: 4'"
    assert "outside 1-5" in results["out-of-range"].error
    assert results["slow"].error.startswith("timed out") and config.url in results["slow"].error
    assert results["bad-request"].error.startswith(f"HTTP 400 from {config.url}")
    assert all(j.judge_model == "judge-x" for j in results.values())
    assert script.requests == {"valid": 1, "fenced": 1, "malformed-then-valid": 2, "malformed": 3, "out-of-range": 3,
                               "error-then-valid": 2, "slow": 3, "bad-request": 1}


def test_concurrency_never_exceeds_the_bound(judge):
    config, script = judge
    script.delay = 0.3  # long enough for every worker to have a request in flight
    results = judge_samples([sample("valid", id=f"s{i}") for i in range(9)], replace(config, concurrency=3),
                            cache_path=None)
    assert [j.score for j in results] == [4] * 9
    assert script.max_in_flight == 3


def test_cache_resends_only_what_is_missing(judge, tmp_path):
    config, script = judge
    cache = tmp_path / "judge.jsonl"
    samples = [sample(q) for q in ("valid", "fenced", "malformed")]
    ticks = []
    first = judge_samples(samples, config, cache_path=cache, progress=ticks.append)
    assert sum(ticks) == 3
    assert len(cache.read_text().splitlines()) == 2  # the unscored sample is not cached
    assert script.requests == {"valid": 1, "fenced": 1, "malformed": 3}

    script.requests.clear()
    ticks.clear()
    second = judge_samples(samples, config, cache_path=cache, progress=ticks.append)
    assert script.requests == {"malformed": 3}  # zero requests for the scored samples
    assert [(j.id, j.score, j.rationale, j.attempts) for j in second] == [(j.id, j.score, j.rationale, j.attempts) for j in first]
    assert sum(ticks) == 3

    # the key is (id, sha256 of the completion, judge model): a new completion or judge is sent again
    script.requests.clear()
    changed = [sample("valid", completion="<reasoning>Step 1: 4.</reasoning>\n<answer>4</answer>"), samples[1]]
    judge_samples(changed, config, cache_path=cache)
    assert script.requests == {"valid": 1}
    script.requests.clear()
    judge_samples(samples[:2], replace(config, model="judge-y"), cache_path=cache)
    assert script.requests == {"valid": 1, "fenced": 1}


def test_a_cut_last_cache_line_is_dropped_and_appends_stay_whole(judge, tmp_path):
    config, script = judge
    cache = tmp_path / "judge.jsonl"
    judge_samples([sample("valid")], config, cache_path=cache)
    with cache.open("a") as handle:
        handle.write('{"id": "fenced", "score": 5, "ratio')  # a kill in the middle of a line
    assert [j.score for j in read_cache(cache).values()] == [4]
    assert cache.read_text().endswith("\n")
    judge_samples([sample("valid"), sample("fenced")], config, cache_path=cache)
    assert [json.loads(line)["id"] for line in cache.read_text().splitlines()] == ["valid", "fenced"]


def test_sample_choice_is_seeded_and_stable(judge):
    config, script = judge
    samples = [sample("valid", id=f"s{i:03d}") for i in range(100)]
    ids = [s["id"] for s in choose_samples(samples, 10, seed=42)]
    assert ids == [s["id"] for s in choose_samples(samples, 10, seed=42)] and ids == sorted(ids)  # kept in order
    assert ids != [s["id"] for s in choose_samples(samples, 10, seed=7)]
    assert choose_samples(samples[:5], 10, seed=42) == samples[:5]  # fewer than asked: all of them
    judged = judge_samples(samples, replace(config, samples=10), cache_path=None)
    assert [j.id for j in judged] == ids and script.requests == {"valid": 10}


def test_summary_numbers():
    def verdict(score):
        return Judgement("x", score, "", 1, None if score else "malformed", "j")

    summary = summarize([verdict(s) for s in (4, 5, 3, None, 2, None)])
    # mean (4 + 5 + 3 + 2) / 4 = 3.5; sample sd sqrt((0.25 + 2.25 + 0.25 + 2.25) / 3) = sqrt(5/3);
    # half-width 1.959964 * 1.290994 / 2 = 1.265152
    assert summary["n"] == 6 and summary["scored"] == 4 and summary["unscored"] == 2
    assert summary["mean"] == 3.5
    assert summary["low"] == pytest.approx(3.5 - 1.265152, abs=1e-6) and summary["high"] == pytest.approx(3.5 + 1.265152, abs=1e-6)
    assert summary["histogram"] == {"1": 0, "2": 1, "3": 1, "4": 1, "5": 1}
    assert summary["judge_model"] == "j"
    assert summarize([verdict(None)]) == {"judge_model": "j", "n": 1, "scored": 0, "unscored": 1, "mean": None, "low": None, "high": None,
                                          "histogram": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0}}


# ------------------------------------------------------------ configuration errors


def test_config_from_the_environment():
    env = {"TRACETUNE_JUDGE_BASE_URL": "http://judge:1/v1/", "TRACETUNE_JUDGE_MODEL": "m", "OPENAI_API_KEY": "sk-secret"}
    config = JudgeConfig.from_env(env, samples=10, api_key=None)  # None: an unset option
    assert (config.base_url, config.model, config.api_key, config.samples) == ("http://judge:1/v1", "m", "sk-secret", 10)
    assert config.url == "http://judge:1/v1/chat/completions" and "sk-secret" not in repr(config)
    fallback = JudgeConfig.from_env({"OPENAI_BASE_URL": "https://api.example/v1", "TRACETUNE_JUDGE_MODEL": "m"}, model="other")
    assert (fallback.base_url, fallback.model, fallback.api_key) == ("https://api.example/v1", "other", None)
    with pytest.raises(JudgeError, match="TRACETUNE_JUDGE_MODEL"):
        JudgeConfig.from_env({"OPENAI_BASE_URL": "http://x/v1"})
    with pytest.raises(JudgeError, match="TRACETUNE_JUDGE_BASE_URL or OPENAI_BASE_URL"):
        JudgeConfig.from_env({})
    with pytest.raises(JudgeError, match="http"):
        JudgeConfig(base_url="judge:1/v1", model="m")


def test_a_wrong_api_key_stops_the_run_naming_url_and_status(judge):
    config, _ = judge
    with pytest.raises(JudgeError, match=re.escape(config.url) + ".*401"):
        judge_samples([sample("valid")], replace(config, api_key="wrong"), cache_path=None)


def test_an_endpoint_that_answers_nothing_but_errors_stops_the_run(judge):
    config, script = judge
    with pytest.raises(JudgeError, match=f"unreachable.*HTTP 503 from {re.escape(config.url)}"):
        judge_samples([sample("down")], config, cache_path=None)
    assert script.requests == {"down": 3}
    # a 400 is an answer about one sample, not a dead endpoint
    assert judge_samples([sample("bad-request")], config, cache_path=None)[0].error.startswith("HTTP 400")


def test_an_unreachable_endpoint_names_the_url():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", backoff=0.01, timeout=TIMEOUT)
    with pytest.raises(JudgeError, match=f"unreachable.*127.0.0.1:{port}"):
        judge_samples([sample("valid", id=f"s{i}") for i in range(3)], config, cache_path=None)


# ------------------------------------------------------ tracetune serve as the judge


def test_the_tiny_model_served_by_tracetune_as_judge(tmp_path):
    app = create_app(load_model("tiny"), model_name="tiny")
    with running_server(app) as base_url:
        config = JudgeConfig(base_url=base_url, model="tiny", samples=2, retries=1, max_tokens=16, timeout=120)
        results = judge_samples([sample("valid", id=f"s{i}") for i in range(3)], config, cache_path=tmp_path / "j.jsonl")
    # a random model's replies are gibberish: every sample unscored, after retries + 1 attempts
    assert len(results) == 2
    assert all(j.score is None and j.attempts == 2 and j.error.startswith("malformed reply after 2 attempts") for j in results)
    assert not (tmp_path / "j.jsonl").read_text()
    assert summarize(results)["unscored"] == 2
