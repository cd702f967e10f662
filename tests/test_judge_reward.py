"""The LLM judge as a reward component: per-kind rubrics, absolute and
group-relative scoring against a scripted judge on loopback whose verdict
depends on the completion, faults that leave completions unscored (never a
silent 0), and advantages that leave them out."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tracetune.config import ConfigError, load_config
from tracetune.judge import (
    JudgeConfig,
    JudgeError,
    RewardJudge,
    RewardScores,
    group_messages,
    judge_messages,
    load_rubrics,
    parse_ranking,
    parse_reply,
    shipped_rubric,
)
from tracetune.serve import running_server

TIMEOUT = 0.5


class Judge:
    """A scripted judge: an absolute request scores 5 when the completion names
    the keyword "blue" and 1 otherwise; a group request ranks the responses by how
    often they say "blue" (ties: in order). Completions holding MALFORMED, SLOW or
    ERROR get a reply that is not a verdict, outlasts the timeout, or a 500."""

    def __init__(self):
        self.requests: list[dict] = []
        self.refuse = False

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.refuse:
                return JSONResponse({"error": {"message": "Incorrect API key"}}, status_code=401)
            user = body["messages"][-1]["content"]
            responses = re.findall(r"=== RESPONSE \d+ START ===\n(.*?)\n=== RESPONSE \d+ END ===", user, re.S)
            texts = responses or [user.split("=== COMPLETION START ===\n")[1].split("\n=== COMPLETION END ===")[0]]
            if any("SLOW" in t for t in texts):
                await asyncio.sleep(TIMEOUT * 1.6)
            if any("ERROR" in t for t in texts):
                return JSONResponse({"error": {"message": "scripted 500"}}, status_code=500)
            if any("MALFORMED" in t for t in texts):
                reply = "I would say it is decent."
            elif responses:
                order = sorted(range(len(texts)), key=lambda i: (-texts[i].count("blue"), i))
                reply = json.dumps({"ranking": [i + 1 for i in order], "rationale": "more blue"})
            else:
                reply = json.dumps({"score": 5 if "blue" in texts[0] else 1, "rationale": "keyword"})
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(reply.split())}}

        return app


@pytest.fixture(scope="module")
def judge_server():
    judge = Judge()
    with running_server(judge.app()) as base_url:
        yield judge, base_url


def rows(completions, G, kind="open"):
    return [{"id": f"q{i // G}", "question": f"Describe the sky {i // G}.", "reference": "", "kind": kind, "completion": c}
            for i, c in enumerate(completions)]


def config(base_url, **overrides):
    return JudgeConfig(base_url=base_url, model="scripted", timeout=TIMEOUT, retries=1, backoff=0.0, **overrides)


def test_absolute_mode_maps_each_score_to_the_unit_interval_and_caches(judge_server, tmp_path):
    judge, base_url = judge_server
    judge.requests.clear()
    reward = RewardJudge(config(base_url), "absolute", tmp_path / "cache.jsonl")
    completions = ["a blue sky", "grey clouds", "blue", "nothing"]
    scored = reward.score(rows(completions, 2), G=2)
    assert scored.scores == [1.0, 0.0, 1.0, 0.0]  # 5 -> (5 - 1) / 4 = 1, 1 -> 0
    assert scored.requests == 4 and len(judge.requests) == 4  # one request per completion
    assert scored.prompt_tokens > 0 and scored.completion_tokens > 0 and scored.unscored == 0
    assert "You grade a model's response to an open-ended task" in judge.requests[0]["messages"][0]["content"]
    assert "Reference answer" not in judge.requests[0]["messages"][1]["content"]  # an open row has none
    again = RewardJudge(config(base_url), "absolute", tmp_path / "cache.jsonl").score(rows(completions, 2), G=2)
    assert again.scores == scored.scores and again.requests == 0 and again.cached == 4  # a resumed run asks nothing
    record = scored.record()
    assert record["judge/requests"] == 4 and record["judge/unscored_share"] == 0.0 and record["judge/seconds"] >= 0


def test_group_mode_sends_one_request_per_group_and_its_ranking_orders_the_advantages(judge_server):
    from tracetune.grpo import group_advantages

    judge, base_url = judge_server
    judge.requests.clear()
    completions = ["blue", "blue blue blue", "none", "blue blue",  # group 1: ranked 2 > 4 > 1 > 3
                   "x", "blue", "y", "z"]  # group 2: 2 > 1 > 3 > 4 (ties in order)
    scored = RewardJudge(config(base_url), "group").score(rows(completions, 4), G=4)
    assert len(judge.requests) == 2  # one per group of G = 4, not one per completion
    assert scored.scores == pytest.approx([1 / 3, 1.0, 0.0, 2 / 3, 2 / 3, 1.0, 1 / 3, 0.0])  # rank r -> 1 - r / 3
    advantages = group_advantages(np.asarray(scored.scores, np.float32), np.zeros(8, bool), 4, "grpo")
    assert list(np.argsort(-advantages[:4])) == [1, 3, 0, 2]  # the judge's ranking, best first
    assert list(np.argsort(-advantages[4:])) == [1, 0, 2, 3]


@pytest.mark.parametrize("fault, reason", [
    ("MALFORMED", "malformed reply after 2 attempts"),
    ("SLOW", "timed out"),
    ("ERROR", "HTTP 500"),
])
def test_a_fault_leaves_the_completion_unscored_and_counted_never_a_zero(judge_server, fault, reason):
    judge, base_url = judge_server
    scored = RewardJudge(config(base_url)).score(rows(["blue", f"blue {fault}", "grey", "blue"], 2), G=2)
    assert scored.scores == [1.0, None, 0.0, 1.0]
    assert scored.unscored == 1 and sum(scored.reasons.values()) == 1
    assert next(iter(scored.reasons)).startswith(reason), scored.reasons
    grouped = RewardJudge(config(base_url), "group").score(rows(["blue", f"blue {fault}", "grey", "blue"], 2), G=2)
    assert grouped.scores[:2] == [None, None] and grouped.scores[2:] == [0.0, 1.0]  # the whole group's one request


def test_a_closed_port_leaves_every_completion_unscored_and_a_refusal_raises(judge_server):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scored = RewardJudge(config(f"http://127.0.0.1:{port}/v1")).score(rows(["a", "b"], 2), G=2)
    assert scored.scores == [None, None] and next(iter(scored.reasons)).startswith("cannot reach")
    judge, base_url = judge_server
    judge.refuse = True
    try:
        with pytest.raises(JudgeError, match="401"):
            RewardJudge(config(base_url)).score(rows(["a", "b"], 2), G=2)
    finally:
        judge.refuse = False


def test_unscored_completions_are_left_out_of_their_groups_advantages():
    from tunix.rl.function_registry import get_advantage_estimator

    from tracetune.grpo import group_advantages

    rewards = np.array([1.0, 0.0, 0.5, np.nan, 0.2, np.nan, np.nan, np.nan], np.float32)
    excluded = np.isnan(rewards)
    advantages = group_advantages(rewards, excluded, 4, "grpo")
    kept = get_advantage_estimator("grpo")(rewards=rewards[:3], num_generations=3)  # group 1 as if G were 3
    np.testing.assert_allclose(advantages[:3], kept, rtol=1e-6)
    assert advantages[3] == 0 and list(advantages[4:]) == [0, 0, 0, 0]  # group 2: one scored completion, no comparison
    whole = np.array([1.0, 0.0, 0.5, 0.25], np.float32)
    np.testing.assert_array_equal(group_advantages(whole, np.zeros(4, bool), 4, "rloo"),
                                  get_advantage_estimator("rloo")(rewards=whole, num_generations=4))


def test_rankings_and_constrained_replies_parse():
    assert parse_ranking('Sure: {"ranking": [3, 1, 2], "rationale": "x"}', 3) == [3, 1, 2]
    assert parse_ranking("2>3>1", 3) == [2, 3, 1]
    assert parse_reply("4") == (4, "")  # a guided_choice reply is the score alone
    for bad in ('{"ranking": [1, 1, 2]}', '{"ranking": [1, 2]}', '{"ranking": ["1", "2", "3"]}', "1>2", "no idea"):
        with pytest.raises(ValueError):
            parse_ranking(bad, 3)


def test_guided_requests_list_every_allowed_reply(judge_server):
    judge, base_url = judge_server
    judge.requests.clear()
    RewardJudge(config(base_url, guided=True)).score(rows(["blue", "x"], 2), G=2)
    assert judge.requests[0]["guided_choice"] == ["1", "2", "3", "4", "5"]
    judge.requests.clear()
    RewardJudge(config(base_url, guided=True), "group").score(rows(["blue", "x", "y"], 3), G=3)
    assert sorted(judge.requests[0]["guided_choice"]) == ["1>2>3", "1>3>2", "2>1>3", "2>3>1", "3>1>2", "3>2>1"]
    with pytest.raises(JudgeError, match="permutation"):
        RewardJudge(config(base_url, guided=True), "group").score(rows(["a"] * 6, 6), G=6)


def test_each_kind_has_a_rubric_and_a_user_file_or_folder_replaces_them(tmp_path):
    rubrics = load_rubrics()
    assert set(rubrics) == {"numeric", "choice", "text", "open"} and len(set(rubrics.values())) == 4
    assert "grade-school math" in rubrics["numeric"] and "no reference" in rubrics["open"].lower()
    mine = tmp_path / "mine.md"
    mine.write_text("Rate the haiku-ness of the answer.\n")
    assert set(load_rubrics(mine).values()) == {"Rate the haiku-ness of the answer."}
    folder = tmp_path / "rubrics"
    folder.mkdir()
    (folder / "open.md").write_text("Open rubric.")
    assert load_rubrics(folder)["open"] == "Open rubric." and load_rubrics(folder)["numeric"] == shipped_rubric("numeric")
    (tmp_path / "empty.md").write_text("  \n")
    for bad, why in ((tmp_path / "missing.md", "no such rubric"), (tmp_path / "empty.md", "empty"), (tmp_path, "at least one of")):
        with pytest.raises(JudgeError, match=why):
            load_rubrics(bad)
    numeric = judge_messages("What is 2 + 3?", "5", "<answer>5</answer>")
    assert "Reference answer:\n5" in numeric[1]["content"] and numeric[0]["content"].startswith(shipped_rubric("numeric"))
    group = group_messages("Q?", "", ["one", "two"], "open", "R")
    assert group[0]["content"].startswith("R\n\n") and '"ranking"' in group[0]["content"] and "RESPONSE 2 START" in group[1]["content"]


def test_the_judge_section_is_checked_and_a_judge_weight_needs_an_endpoint(tmp_path, monkeypatch):
    from tracetune.grpo import reward_judge

    cfg = load_config("tiny", ["rewards.judge=0.5", "judge.mode=group", "judge.max_unscored=0.1"])
    assert (cfg.judge.mode, cfg.judge.max_unscored, cfg.rewards.judge) == ("group", 0.1, 0.5)
    for bad in ("judge.mode=pairwise", "judge.max_unscored=1.5", "judge.concurrency=0"):
        with pytest.raises(ConfigError, match="judge"):
            load_config("tiny", [bad])
    for name in ("TRACETUNE_JUDGE_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="needs a judge endpoint"):
        reward_judge(cfg, tmp_path)
    assert reward_judge(load_config("tiny"), tmp_path) is None  # weight 0: no judge is asked
    judge = reward_judge(load_config("tiny", ["rewards.judge=0.5", "eval.judge_base_url=http://127.0.0.1:9/v1",
                                              "eval.judge_model=m", "judge.timeout=3"]), tmp_path)
    assert judge.mode == "absolute" and judge.config.timeout == 3 and judge.cache_path == tmp_path / "judge" / "cache.jsonl"


def test_reward_scores_add_up_over_a_steps_calls():
    total = RewardScores.total([RewardScores([1.0, None], {"timed out": 1}, 2, 10, 3, 0, 0.5),
                                RewardScores([None, 0.0], {"timed out": 1}, 1, 5, 1, 1, 0.25)])
    assert total.scores == [1.0, None, None, 0.0] and total.reasons == {"timed out": 2}
    assert (total.requests, total.prompt_tokens, total.completion_tokens, total.cached, total.seconds) == (3, 15, 4, 1, 0.75)
    assert total.record()["judge/unscored_share"] == 0.5
