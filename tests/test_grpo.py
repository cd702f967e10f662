"""Stage 2: config, prompt order, warnings, and GRPO runs
on the tiny model (slow: resume equality; CI runs them)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import adapter_weights, finish, start_tracetune, wait_for, wait_for_save_in_flight
from tracetune.config import ConfigError, load_config
from tracetune.data import Example
from tracetune.grpo import PromptBatches, Scored, StepFacts, algorithm_config, failure_warnings, fill_with_spread, reference_steps, sample_rounds
from tracetune.rollout import StepRollout
from tracetune.runs import StopFlag

def test_grpo_config_checks_its_symbols():
    with pytest.raises(ConfigError, match="num_generations"):
        load_config("tiny", ["grpo.num_generations=1"])
    with pytest.raises(ConfigError, match="rollout_engine"):
        load_config("tiny", ["grpo.rollout_engine=vllm-on-cpu"])
    with pytest.raises(ConfigError, match="micro_batch_size must divide"):
        load_config("tiny", ["grpo.micro_batch_size=3"])
    recipe = load_config("recipe-1b").grpo
    assert (recipe.num_generations, recipe.learning_rate, recipe.beta, recipe.epsilon, recipe.max_steps) == (4, 3e-6, 0.03, 0.2, 2000)
    assert recipe.prompts_per_step * recipe.num_generations == 32  # effective batch 32
    assert recipe.max_prompt_tokens + recipe.max_new_tokens == 1400


def test_prompt_batches_are_fixed_by_the_seed_and_stop_on_a_signal():
    examples = [Example(id=str(i), question=f"q{i}", reference=str(i)) for i in range(10)]
    stop = StopFlag()
    first = [b["reference"].tolist() for b, _ in zip(PromptBatches(examples, 4, 42, "plain", stop), range(5))]
    again = [b["reference"].tolist() for b, _ in zip(PromptBatches(examples, 4, 42, "plain", stop), range(5))]
    assert first == again and len({tuple(b) for b in first}) > 1
    batch = next(iter(PromptBatches(examples, 4, 42, "plain", stop)))
    assert isinstance(batch["prompts"], np.ndarray) and batch["prompts"][0].startswith("Q: q")  # Tunix needs arrays
    stop.signum = signal.SIGTERM
    assert list(PromptBatches(examples, 4, 42, "plain", stop)) == []


def test_grpo_loss_and_prompt_options_are_checked_and_reach_tunix():
    with pytest.raises(ConfigError, match="loss_agg_mode must be one of"):
        load_config("tiny", ["grpo.loss_agg_mode=mean"])
    with pytest.raises(ConfigError, match="advantage_estimator"):
        load_config("tiny", ["grpo.advantage_estimator=ppo"])
    with pytest.raises(ConfigError, match="select=best needs validation"):
        load_config("tiny", ["grpo.select=best"])
    with pytest.raises(ConfigError, match="sft.select=best needs the held-out evaluation"):
        load_config("tiny", ["sft.select=best", "sft.eval_every_steps=0"])
    recipe = load_config("recipe-1b").grpo  # the recipe's GRPO is Tunix's default GRPO
    algo = algorithm_config(recipe)
    assert (algo.advantage_estimator, algo.loss_agg_mode, algo.epsilon_high, algo.loss_algo) == ("grpo", "sequence-mean-token-mean", 0.2, "grpo")
    assert (recipe.dynamic_sampling, recipe.curriculum, recipe.mask_truncated, recipe.select) == ("off", "none", False, "last")
    dr = algorithm_config(load_config("tiny", ["grpo.advantage_estimator=drgrpo", "grpo.loss_agg_mode=sequence-mean-token-scale",
                                               "grpo.epsilon_high=0.28"]).grpo)
    assert (dr.advantage_estimator, dr.epsilon_high, dr.loss_norm) == ("drgrpo", 0.28, 48)  # the budget, not the batch's width


def scored(values, G=2, start=0):
    """A scripted step: completions named by number, correctness = the given values."""
    texts = [f"c{start + i}" for i in range(len(values))]
    rollout = StepRollout(prompts=[f"p{(start + i) // G}" for i in range(len(values))], prompt_tokens=np.zeros((len(values), 4), np.int32),
                          tokens=[np.ones(2, np.int32)] * len(values), texts=texts, token_texts=[[t] for t in texts],
                          logprobs=[np.zeros(2, np.float32)] * len(values), finish_reasons=["stop"] * len(values),
                          finite=True, seconds=1.0)
    return Scored(rollout, {"reference": ["1"] * len(values)}, {"correctness": list(values)}, np.asarray(values, np.float32))


def test_dynamic_sampling_replaces_exactly_the_groups_without_spread_within_its_cap():
    G = 2
    first = scored([1, 0, 0, 0, 1, 1, 0, 1])  # groups: spread, none, none, spread
    fresh = iter([scored([0, 0, 1, 0, 1, 1, 0, 0], start=100), scored([1, 0, 0, 1, 1, 0, 0, 1], start=200)])
    calls = []

    def sample(round):
        calls.append(round)
        return next(fresh)

    trained, sampled = fill_with_spread(first, sample, "correctness", G, rounds=1, pad_id=0)
    assert calls == [1]  # the cap: one extra rollout, though a group is still missing
    # kept: first's groups 0 and 3, the fresh rollout's group 1; then first's group 1 as sampled
    assert trained.rollout.texts == ["c0", "c1", "c6", "c7", "c102", "c103", "c2", "c3"]
    assert len(sampled.rewards) == 16
    facts = StepFacts(trained, sampled, (4, 2), 7, {}, G, "correctness")
    record = facts.record()
    assert record["filter_rollouts"] == 8  # one extra step's completions
    assert record["groups_with_spread"] == 0.75 and record["zero_spread"] == 5 / 8  # 2 + 3 of 8 sampled groups had none
    assert record["reward/correctness"] == np.mean([1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0])  # the policy's, unfiltered
    fresh, calls = iter([scored([0, 0, 1, 0, 1, 1, 0, 0], start=100), scored([1, 0, 0, 1, 1, 0, 0, 1], start=200)]), []
    trained, _ = fill_with_spread(first, sample, "correctness", G, rounds=5, pad_id=0)
    assert trained.rollout.texts == ["c0", "c1", "c6", "c7", "c102", "c103", "c200", "c201"]
    assert calls == [1, 2]  # stops once the step is full, well within the cap
    whole = scored([1, 0, 0, 1])
    assert fill_with_spread(whole, lambda r: pytest.fail("sampled"), "correctness", G, 3, 0) == (whole, whole)


def test_filter_rollouts_sample_rounds_a_few_at_a_time_until_the_step_has_its_groups_with_spread():
    G = 2
    # each prompt's G correctness values: p0, p3 and p6 have spread
    script = {"p0": [1, 0], "p1": [0, 0], "p2": [0, 0], "p3": [1, 0], "p4": [1, 1], "p5": [0, 0], "p6": [0, 1], "p7": [0, 0]}
    rows = lambda *names: {"prompts": [n for n in names for _ in range(G)], "id": [n for n in names for _ in range(G)]}
    batch, refills = rows("p0", "p1"), [rows("p2", "p3"), rows("p4", "p5"), rows("p6", "p7")]
    calls = []

    def sample(batch, call):
        calls.append((call, batch["prompts"][::G]))
        values = [v for p in batch["prompts"][::G] for v in script[p]]
        done = scored(values, G)
        done.rollout.prompts[:] = batch["prompts"]
        done.columns["id"] = batch["id"]
        return done

    trained, sampled = sample_rounds(batch, refills, sample, "correctness", G, each=1, pad_id=0)
    assert calls == [(0, ["p0", "p1", "p2", "p3"])]  # p0 and p3: the step is full after its first rollout
    assert trained.rollout.prompts == ["p0", "p0", "p3", "p3"] and len(sampled.rewards) == 8
    calls.clear()
    batch = rows("p1", "p2")
    trained, sampled = sample_rounds(batch, refills, sample, "correctness", G, each=1, pad_id=0)
    assert [c for c, _ in calls] == [0, 1, 2] and calls[2][1] == ["p6", "p7"]  # one round a rollout, each its own seed
    assert trained.rollout.prompts == ["p3", "p3", "p6", "p6"] and len(sampled.rewards) == 16
    assert StepFacts(trained, sampled, (4, 2), 7, {}, G, "correctness").record()["filter_rollouts"] == 12
    calls.clear()
    trained, _ = sample_rounds(rows("p1", "p5"), refills[1:2], sample, "correctness", G, each=1, pad_id=0)
    assert len(calls) == 1 and trained.rollout.prompts == ["p1", "p1", "p5", "p5"]  # the cap: trained as sampled
    calls.clear()
    sample_rounds(rows("p1", "p2"), refills, sample, "correctness", G, each=0, pad_id=0)
    assert calls == [(0, ["p1", "p2", "p2", "p3", "p4", "p5", "p6", "p7"])]  # 0: every round in one batch


def test_the_curriculum_starts_with_the_fewest_reference_steps_and_refills_no_harder():
    examples = [Example(id=str(i), question=f"q{i}", reference=str(i), solution="\n".join(["s"] * (1 + i % 4))) for i in range(40)]
    batches = PromptBatches(examples, 4, 42, "plain", StopFlag(), curriculum="steps")
    order = batches.order(0)
    steps = [reference_steps(examples[i]) for i in order]
    assert steps == sorted(steps) and sorted(order) == list(range(40))
    assert not np.array_equal(order, batches.order(1))  # a new shuffle within a step count each epoch
    first = next(iter(batches))
    assert set(first) == {"prompts", "id", "reference", "question", "solution", "kind", "choices"}
    assert first["kind"].tolist() == ["numeric"] * 4 and first["choices"].tolist() == [{}] * 4  # per row, for the rewards
    extra = batches.refill(step=0, round=1)
    assert extra["reference"].tolist() == batches.refill(step=0, round=1)["reference"].tolist()  # fixed by the seed
    assert all(reference_steps(examples[int(r)]) == 1 for r in extra["reference"])  # step 0 trains 1-step problems
    assert extra["reference"].tolist() != batches.refill(step=0, round=2)["reference"].tolist()


def test_the_paced_curriculum_spreads_difficulty_over_the_runs_own_steps():
    examples = [Example(id=str(i), question=f"q{i}", reference=str(i), solution="\n".join(["s"] * (2 + i % 8))) for i in range(800)]
    batches = PromptBatches(examples, 2, 42, "plain", StopFlag(), curriculum="paced", steps=15, start=0.25)
    assert batches.competence(0) == 0.25 and batches.competence(14) == batches.competence(30) == 1.0
    assert all(batches.competence(k) < batches.competence(k + 1) for k in range(14))
    hardest = lambda indices: max(reference_steps(examples[int(i)]) for i in indices)
    assert hardest(batches.pool(0)) == 3 and len(batches.pool(0)) == 200  # the easiest quarter: 2 and 3 lines
    assert hardest(batches.pool(14)) == 9 and len(batches.pool(14)) == 800
    drawn = [next(b for b, _ in zip(iter(batches), range(1)))["reference"].tolist()]
    again = [next(b for b, _ in zip(iter(PromptBatches(examples, 2, 42, "plain", StopFlag(), "paced", 0, 15)), range(1)))["reference"].tolist()]
    assert drawn == again  # fixed by the seed, so a resumed run re-reads the same steps
    steps = [b for b, _ in zip(iter(batches), range(15))]
    assert all(int(r) in set(batches.pool(k).tolist()) for k, b in enumerate(steps) for r in b["reference"])
    assert max(reference_steps(examples[int(r)]) for b in steps[10:] for r in b["reference"]) > 3  # harder problems come in
    refill = batches.refill(step=0, round=1)["reference"].tolist()
    assert all(int(r) in set(batches.pool(0).tolist()) for r in refill)  # refills from the step's own pool
    with pytest.raises(ConfigError, match="curriculum_start"):
        load_config("tiny", ["grpo.curriculum_start=0"])
    assert load_config("tiny", ["grpo.curriculum=paced"]).grpo.curriculum == "paced"


def test_the_pass_rate_curriculum_revisits_problems_whose_groups_had_spread_first():
    examples = [Example(id=f"e{i}", question=f"q{i}", reference=str(i)) for i in range(30)]
    plain = PromptBatches(examples, 2, 42, "plain", StopFlag())
    batches = PromptBatches(examples, 2, 42, "plain", StopFlag(), revisit=2)
    # nothing observed yet: the same seeded draw as without the curriculum
    assert batches.refill(3, 1)["id"].tolist() == plain.refill(3, 1)["id"].tolist()
    assert batches.observe([("e1", True), ("e2", False), ("e3", True)]) == 0
    assert batches.due() == [3, 1]  # most recent first; e2 had no spread
    first, second = batches.refill(4, 1)["id"].tolist(), batches.refill(4, 2)["id"].tolist()
    assert first == ["e3", "e1"] and second[0] not in ("e1", "e3")  # round 2: fresh prompts only
    assert batches.refill(4, 1)["id"].tolist() == first  # a pure function of the observations
    assert batches.observe([("e3", True), ("e1", False), ("e5", True)]) == 2
    assert batches.due() == [5, 3]  # e1's revisit had no spread: it leaves
    batches.observe([("e3", True)])  # sampled 3 times = 1 + revisit: done
    assert batches.due() == [5]
    refill = batches.refill(5, 1)["id"].tolist()
    assert refill[0] == "e5" and refill[1] != "e5"  # the rest of the round is a fresh draw, never a repeat
    assert plain.observe([("e1", True)]) == 0 and plain.due() == []  # revisit=0: off

    # rebuilt from the metrics records of a resumed run, the queue is the same
    again = PromptBatches(examples, 2, 42, "plain", StopFlag(), revisit=2)
    for groups in ([["e1", True], ["e2", False], ["e3", True]], [["e3", True], ["e1", False], ["e5", True]], [["e3", True]]):
        again.observe(map(tuple, groups))
    assert again.due() == batches.due() and again.refill(5, 1)["id"].tolist() == refill


def test_the_pass_rate_curriculum_needs_the_filters_rounds():
    with pytest.raises(ConfigError, match="grpo.revisit draws into the dynamic-sampling filter"):
        load_config("tiny", ["grpo.revisit=1"])
    with pytest.raises(ConfigError, match="grpo.revisit must be >= 0"):
        load_config("tiny", ["grpo.revisit=-1"])
    assert load_config("tiny", ["grpo.revisit=1", "grpo.dynamic_sampling=correctness", "grpo.max_filter_rounds=1"]).grpo.revisit == 1


def step(truncated=0.0, zero_spread=0.0, correctness=0.5, trace=0.5):
    return {"truncated": truncated, "zero_spread": zero_spread, "reward/correctness": correctness, "reward/trace": trace}


def test_failure_modes_are_named_with_their_numbers():
    assert failure_warnings([step()] * 9, window=10) == {}  # not enough history yet
    assert failure_warnings([step()] * 20, window=10) == {}
    warned = failure_warnings([step(truncated=0.9, zero_spread=0.95)] * 10, window=10)
    assert "90% of completions hit the token budget" in warned["truncated"]
    assert "95% of groups had all G rewards equal" in warned["zero_spread"]
    gaming = [step(correctness=0.5, trace=0.4)] * 10 + [step(correctness=0.3, trace=0.6)] * 10
    assert "trace score rose +0.20 while correctness fell -0.20" in failure_warnings(gaming, window=10)["trace_gaming"]


# ------------------------------------------------------------------ tiny runs

TINY = ["sft.max_steps=60", "sft.eval_every_steps=0", "sft.eval_examples=0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A short tiny SFT run to start GRPO from."""
    from tracetune.sft import train_sft

    run = tmp_path_factory.mktemp("sft")
    train_sft(load_config("tiny", TINY), run)
    return run


@pytest.fixture(scope="module")
def shortcut_sft(tmp_path_factory) -> Path:
    """SFT on traces that stop early half the time (noisy labels): a policy that is
    right, and writes its calculation, only part of the time. Shared by the learning tests."""
    from tracetune.sft import train_sft

    out = tmp_path_factory.mktemp("shortcut") / "sft"
    return train_sft(load_config("tiny", ["data.source=addition-shortcut", "sft.max_steps=800", "sft.eval_every_steps=0",
                                          "sft.eval_examples=0", "sft.checkpoint_steps=0"]), out).merged_dir


def held_out_evaluation(model_dir: Path, count: int):
    """The fixed harness on the first ``count`` problems of the clean addition test
    split at the tiny preset's evaluation budget."""
    from tracetune.evaluate import evaluate, problems
    from tracetune.models.registry import load_model

    config = load_config("tiny", ["data.source=addition", f"eval.limit={count}"])
    # One directory per count: the harness refuses to mix settings in one directory,
    # and the learning tests share the SFT start.
    return evaluate(load_model(str(model_dir)), problems(config), model_dir.parent / f"eval-{count}", config)


def held_out_scores(model_dir: Path, count: int = 128) -> dict[str, float]:
    """Greedy accuracy, format rate and arithmetic score on held-out problems."""
    result = held_out_evaluation(model_dir, count)
    return {name: result.metrics[name].mean for name in ("accuracy", "format_rate", "arithmetic")}


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_over_the_sft_start(tmp_path, shortcut_sft):
    """GRPO from the shortcut SFT policy, rewarded against the true answers, must
    raise greedy accuracy on held-out problems by 10+ points, format intact."""
    from tracetune.grpo import train_grpo

    before = held_out_scores(shortcut_sft)
    grpo = train_grpo(load_config("tiny", ["data.source=addition", "grpo.checkpoint_steps=0",
                                           f"grpo.init={shortcut_sft}"]), tmp_path / "grpo")
    after = held_out_scores(grpo.merged_dir)
    assert after["accuracy"] >= before["accuracy"] + 0.10, (before, after)
    # Format intact: at most one problem in 64 lost (a greedy completion can flip).
    assert after["format_rate"] >= before["format_rate"] - 1 / 64, (before, after)
    # The run's own reward curve agrees: correctness rose from the first to the last quarter.
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["last_quarter"]["reward/correctness"] > summary["first_quarter"]["reward/correctness"], summary


@pytest.mark.slow
def test_the_arithmetic_reward_alone_moves_the_policy(tmp_path, shortcut_sft):
    """GRPO rewarded by the arithmetic component alone (no correctness, no trace)
    raises the held-out arithmetic score (true, grounded claims for the problem's
    steps) over its SFT start: the component moves the policy, not just the metric."""
    from tracetune.grpo import train_grpo

    before = held_out_scores(shortcut_sft)
    grpo = train_grpo(load_config("tiny", ["data.source=addition", "grpo.checkpoint_steps=0", "grpo.max_steps=30",
                                           "rewards.correctness=0", "rewards.trace=0", "rewards.confidence=0",
                                           "rewards.arithmetic=1", f"grpo.init={shortcut_sft}"]), tmp_path / "grpo")
    after = held_out_scores(grpo.merged_dir)
    assert after["arithmetic"] >= before["arithmetic"] + 0.10, (before, after)
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["reward_weights"]["arithmetic"] == 1 and summary["reward_weights"]["correctness"] == 0
    assert summary["last_quarter"]["reward/arithmetic"] > summary["first_quarter"]["reward/arithmetic"], summary


def grpo_process(run_dir: Path, init: Path, *overrides: str, compile_cache: bool = True) -> subprocess.Popen:
    settings = ["grpo.max_steps=8", "grpo.checkpoint_steps=4", "grpo.temperature=0.6", "grpo.top_k=8", *overrides]
    return start_tracetune("grpo", run_dir, "--preset", "tiny", "--init", str(init), settings=settings, compile_cache=compile_cache)


def finish_grpo(process: subprocess.Popen) -> subprocess.CompletedProcess:
    return finish(process, timeout=900)


@pytest.mark.slow
def test_grpo_run_logs_components_varies_seeds_and_records_weights(tmp_path, sft_run):
    """Also the prompt and checkpoint options: the dynamic-sampling filter on
    correctness, the curricula (reference steps, revisits), masked truncations, clip-higher, token-mean, and
    validation every 2 steps (in the harness's batches) with the best step
    exported. Killed once after its first validation, before any checkpoint: the
    re-run starts over without recording step 0's validation twice."""
    settings = ("grpo.max_steps=4", "grpo.dynamic_sampling=correctness", "grpo.max_filter_rounds=2", "grpo.rounds_per_rollout=1",
                "grpo.curriculum=steps",
                "grpo.mask_truncated=true", "grpo.epsilon_high=0.28", "grpo.loss_agg_mode=token-mean",
                "grpo.val_every_steps=2", "grpo.val_examples=8", "grpo.select=best", "eval.batch_size=4", "grpo.revisit=1")
    first = grpo_process(tmp_path / "run", sft_run, *settings, compile_cache=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(metrics, first, timeout=600)
    while not metrics.read_text().strip():
        assert first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    result = finish_grpo(grpo_process(tmp_path / "run", sft_run, *settings, compile_cache=False))  # it counts compiles
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in lines if "val/accuracy" in r]
    records = [r for r in lines if "val/accuracy" not in r]
    assert [v["step"] for v in validations] == [0, 2, 4] and all(v["val/examples"] == 8 for v in validations)
    assert all(v["val/batch_size"] == 4 for v in validations)  # decoded eval.batch_size at a time, as the harness
    # each validation's own seconds, not the validator's running total
    assert 0 < validations[2]["val/seconds"] < validations[0]["val/seconds"] + validations[1]["val/seconds"]
    for record in records:  # a round is a whole step of prompts; the first sampled with the step's own, the second only if needed
        rounds = record["filter_rollouts"] // (16 * 8)
        assert record["filter_rollouts"] == rounds * 16 * 8 and rounds in (1, 2) and 0 <= record["groups_with_spread"] <= 1
        # every sampled group (the step's 16 prompts and each round's 16) is observed for the pass-rate curriculum
        assert len(record["groups"]) == 16 * (1 + rounds) and all(isinstance(spread, bool) for _, spread in record["groups"])
        assert 0 <= record["revisited_groups"] <= 16 * (1 + rounds)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = max(validations, key=lambda v: (v["val/accuracy"], v["val/composite"]))
    assert summary["exported_step"] == summary["best"]["step"] == best["step"]
    adapter = json.loads((tmp_path / "run" / "export" / "adapter" / "adapter.json").read_text())
    assert adapter["step"] == best["step"] and adapter["selected"] == "best validation accuracy"
    if best["step"] != 4:
        assert json.loads((tmp_path / "run" / "export" / "last_adapter" / "adapter.json").read_text())["step"] == 4
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for key in ("reward/composite", "reward/correctness", "reward/trace", "reward/confidence", "reward/sound",  # weighted or not
                    "zero_spread", "truncated", "completion_length"):
            assert record[key] is not None, key
    # Tunix writes the actor's loss and KL one update late: present from step 2 on.
    assert all(r["kl"] is not None and r["loss"] is not None for r in records[1:])
    assert all(set(r["seconds"]) == {"rollout", "reward", "reference", "update"} for r in records)
    assert records[0]["compiles"]["count"] > 0 and records[0]["compiles"]["seconds"] > 0  # the first step compiles
    assert all(r["compiles"]["count"] >= 0 for r in records)
    seeds = [s for r in records for s in r["rollout_seeds"]]
    assert len(set(seeds)) == len(seeds)  # a new rollout key every step
    assert records[0]["reward_weights"] == {"correctness": 0.6, "trace": 0.25, "confidence": 0.15, "arithmetic": 0.0, "judge": 0.0,
                                            "sound": 0.0, "progress": 0.0}
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "correctness", "trace", "confidence"} <= set(samples[0])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and "reward/composite" in summary["last_quarter"]
    assert (tmp_path / "run" / "export" / "merged" / "tracetune.json").exists()


@pytest.mark.slow
def test_a_killed_or_stopped_grpo_run_resumes_to_the_same_weights(tmp_path, sft_run):
    reference = finish_grpo(grpo_process(tmp_path / "straight", sft_run))
    assert reference.returncode == 0, reference.stderr
    killed = grpo_process(tmp_path / "killed", sft_run)
    wait_for_save_in_flight(tmp_path / "killed" / "checkpoints" / "actor", 4, killed)
    killed.send_signal(signal.SIGKILL)  # mid-save of checkpoint 4
    killed.wait()
    killed = grpo_process(tmp_path / "killed", sft_run)
    wait_for(tmp_path / "killed" / "checkpoints" / "actor" / "4" / "commit_success.txt", killed, timeout=600)
    time.sleep(random.Random(11).uniform(0.0, 5.0))  # then at a seeded point of steps 5-8
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = finish_grpo(grpo_process(tmp_path / "killed", sft_run))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    stopped = grpo_process(tmp_path / "stopped", sft_run)
    wait_for(tmp_path / "stopped" / "checkpoints" / "actor" / "4" / "commit_success.txt", stopped, timeout=600)
    stopped.send_signal(signal.SIGTERM)
    result = finish_grpo(stopped)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "checkpoint saved" in result.stderr and "Traceback" not in result.stderr
    saved = max(int(p.name) for p in (tmp_path / "stopped" / "checkpoints" / "actor").iterdir() if p.name.isdigit())
    assert 4 <= saved < 8
    assert finish_grpo(grpo_process(tmp_path / "stopped", sft_run)).returncode == 0
    expected = adapter_weights(tmp_path / "straight")
    for run in ("killed", "stopped"):
        actual = adapter_weights(tmp_path / run)
        assert expected.keys() == actual.keys()
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"{run}: {name}")
    straight = [json.loads(line)["reward/composite"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line)["reward/composite"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert again == straight  # the same samples and rewards, step by step


@pytest.mark.slow
def test_micro_batches_accumulate_to_the_same_update(tmp_path, sft_run):
    """grpo.micro_batch_size and grpo.rows_per_pass trade memory for passes: same
    rollouts and rewards, and the accumulated gradient of micro-batches, each taken
    two checkpointed rows at a time, gives the same weights as one pass."""
    whole = finish_grpo(grpo_process(tmp_path / "whole", sft_run, "grpo.max_steps=3"))
    split = finish_grpo(grpo_process(tmp_path / "split", sft_run, "grpo.max_steps=3", "grpo.micro_batch_size=4",
                                     "grpo.rows_per_pass=2"))
    assert whole.returncode == 0 and split.returncode == 0, whole.stderr + split.stderr
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("whole", "split")}
    assert [r["rollout_seeds"] for r in records["split"]] == [r["rollout_seeds"] for r in records["whole"]]
    assert [r["reward/composite"] for r in records["split"]] == [r["reward/composite"] for r in records["whole"]]
    expected, actual = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "split")
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-3, err_msg=name)



@pytest.mark.slow
def test_the_chunked_and_tunix_logprob_paths_train_the_same_weights(tmp_path, sft_run):
    """grpo.logprobs=chunked (trimmed padding, the tied head at completion positions,
    the "tracetune" loss) against Tunix's own path: the same rollouts and rewards, and
    the same adapters to float32 noise after 3 updates."""
    runs = {path: finish_grpo(grpo_process(tmp_path / path, sft_run, "grpo.max_steps=3", f"grpo.logprobs={path}",
                                           "grpo.pad_multiple=8"))
            for path in ("chunked", "full")}
    assert all(r.returncode == 0 for r in runs.values()), "".join(r.stderr for r in runs.values())
    records = {path: [json.loads(line) for line in (tmp_path / path / "metrics.jsonl").read_text().splitlines()] for path in runs}
    assert [r["reward/composite"] for r in records["chunked"]] == [r["reward/composite"] for r in records["full"]]
    widths = [w for r in records["chunked"] for w in r["padded_widths"]]
    # the tiny preset's budget is 64 prompt + 48 completion tokens; the steps train on less, in multiples of 8
    assert widths and all(p <= 64 and c <= 48 and p % 8 == 0 for p, c in widths), widths
    assert any(p < 64 or c < 48 for p, c in widths), widths
    expected, actual = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "chunked")
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_a_diverging_grpo_run_stops_with_the_last_good_checkpoint(tmp_path, sft_run):
    """A learning rate of 1e30 gives finite but absurd weights (Adam steps are about
    +-LR), which apply_if_finite cannot catch; the next rollout must stop the run
    before anything else is trained, saved or exported."""
    result = finish_grpo(grpo_process(tmp_path / "run", sft_run, "grpo.learning_rate=1e30", "grpo.checkpoint_steps=1",
                                      "grpo.warmup_fraction=0"))
    assert result.returncode == 2, result.stderr
    assert "not finite" in result.stderr and "Last good checkpoint" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "export").exists()
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints" / "actor").iterdir() if p.name.isdigit()]
    assert saved and max(saved) <= 2, saved  # update 1 diverged; step 2's rollout stopped the run


# ------------------------------------------------------------ the judge as reward


class NumbersJudge:
    """A scripted LLM judge on loopback: 5 when the completion's reasoning names
    every number of the question (the keywords of an addition problem), else 1.
    From the request numbered ``down_from`` on it answers 503 (an outage)."""

    def __init__(self, down_from: int | None = None):
        self.requests = 0
        self.down_from = down_from

    def app(self):
        import re

        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI()

        @app.post("/v1/chat/completions")
        def chat(body: dict):
            self.requests += 1
            if self.down_from is not None and self.requests >= self.down_from:
                return JSONResponse({"error": {"message": "scripted outage"}}, status_code=503)
            user = body["messages"][-1]["content"]
            question = user.split("Question:\n")[1].split("\n")[0]
            completion = user.split("=== COMPLETION START ===\n")[1].split("\n=== COMPLETION END ===")[0]
            reasoning = completion.split("</reasoning>")[0]
            named = all(re.search(rf"\b{n}\b", reasoning) for n in re.findall(r"\d+", question))
            return {"choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": json.dumps({"score": 5 if named else 1})}}]}

        return app


def held_out_judge_score(model_dir: Path, base_url: str, count: int = 64) -> float:
    """The judge's mean reward on greedy completions of held-out problems (the
    clean addition test split), under the fixed harness."""
    from tracetune.judge import JudgeConfig, RewardJudge

    result = held_out_evaluation(model_dir, count)
    rows = [{"id": r["id"], "question": r["question"], "reference": r["reference"], "kind": "numeric",
             "completion": r["completion"]} for r in result.records]
    scores = RewardJudge(JudgeConfig(base_url=base_url, model="scripted")).score(rows, G=1).scores
    assert None not in scores
    return float(np.mean(scores))


@pytest.mark.slow
def test_the_judge_reward_alone_moves_the_policy(tmp_path, shortcut_sft):
    """GRPO whose reward is the judge term alone raises that judge's mean score on
    held-out problems over the SFT start: the judge moves the policy, through real
    HTTP, the per-step metrics say what it cost, and nothing went unscored."""
    from tracetune.grpo import train_grpo
    from tracetune.serve import running_server

    judge = NumbersJudge()
    with running_server(judge.app()) as base_url:
        before = held_out_judge_score(shortcut_sft, base_url)
        train_grpo(load_config("tiny", ["data.source=addition", "grpo.checkpoint_steps=0", "grpo.max_steps=20",
                                        "rewards.correctness=0", "rewards.trace=0", "rewards.confidence=0", "rewards.judge=1",
                                        f"eval.judge_base_url={base_url}", "eval.judge_model=scripted",
                                        f"grpo.init={shortcut_sft}"]), tmp_path / "grpo")
        after = held_out_judge_score(tmp_path / "grpo" / "export" / "merged", base_url)
    print(f"held-out judge reward: SFT start {before:.3f}, after 20 judge-only GRPO updates {after:.3f}")
    assert after >= before + 0.10, (before, after)
    records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/judge" in r]
    assert len(steps) == 20 and all(r["judge/unscored"] == 0 for r in steps)
    assert all(r["judge/requests"] == 16 * 8 for r in steps)  # absolute mode: one request per completion
    assert np.mean([r["reward/judge"] for r in steps[-5:]]) > np.mean([r["reward/judge"] for r in steps[:5]])


@pytest.mark.slow
def test_a_judge_outage_stops_with_a_checkpoint_and_the_rerun_resumes_to_the_same_weights(tmp_path, sft_run):
    """The judge goes down in step 3 (every request 503): the step's completions
    are all unscored, past judge.max_unscored, so the run stops, saving the two
    updates it trained; re-run with the judge back, it finishes with the same
    weights and rewards as a run the judge never failed."""
    from tracetune.errors import TrainingError
    from tracetune.grpo import train_grpo
    from tracetune.serve import running_server

    def config(base_url):
        return load_config("tiny", ["grpo.max_steps=4", "grpo.checkpoint_steps=0", "grpo.prompts_per_step=4",
                                    "grpo.num_generations=4", "rewards.judge=0.5", "judge.retries=0",
                                    f"eval.judge_base_url={base_url}", "eval.judge_model=scripted", f"grpo.init={sft_run}"])

    with running_server(NumbersJudge().app()) as base_url:
        train_grpo(config(base_url), tmp_path / "straight")
    with running_server(NumbersJudge(down_from=2 * 16 + 1).app()) as base_url:  # 16 completions a step
        with pytest.raises(TrainingError, match=r"(?s)unscored.*max_unscored=0.25.*Checkpoint saved: step 2"):
            train_grpo(config(base_url), tmp_path / "outage")
    assert (tmp_path / "outage" / "checkpoints" / "actor" / "2").is_dir()
    with running_server(NumbersJudge().app()) as base_url:
        train_grpo(config(base_url), tmp_path / "outage")
    expected, actual = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "outage")
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)

    def rewards(run):
        return [r["reward/composite"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "reward/composite" in r]

    assert rewards("outage") == rewards("straight")


def test_a_grpo_update_holds_one_copy_of_the_model(tmp_path, monkeypatch):
    """Tunix snapshots the whole actor every step (its "anchor"); on a CPU that is a
    second copy of the model beside the one actor, reference and rollout share.
    grpo.Cluster's snapshot shares the frozen base: during each update every base
    weight is one buffer."""
    import jax

    from tracetune import lora
    from tracetune.grpo import GRPORun
    from tracetune.models.registry import load_model

    shape = load_model("tiny").model.embedder.input_embedding.get_value().shape
    # Arrays other tests of this process left alive are held, so no buffer of this
    # run can reuse their addresses, and are not counted.
    before = [a for a in jax.live_arrays() if a.shape == shape]
    copies: list[int] = []
    real = lora._AdapterStep.__call__

    def call(self, inputs):
        others = {a.unsafe_buffer_pointer() for a in before}
        copies.append(len({a.unsafe_buffer_pointer() for a in jax.live_arrays() if a.shape == shape} - others))
        return real(self, inputs)

    monkeypatch.setattr(lora._AdapterStep, "__call__", call)
    config = load_config("tiny", ["grpo.init=tiny", "grpo.max_steps=2", "grpo.checkpoint_steps=0", "grpo.val_every_steps=0",
                                  "grpo.select=last", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.max_new_tokens=8"])
    run = GRPORun(config, tmp_path / "grpo")
    run.train()
    assert len(copies) >= 2 and set(copies) == {1}, copies
