"""Fault injection: torn files, undecodable input, damaged checkpoints, a full disk,
dying writer threads and kills at seeded points. Each fault must give one clear line
and lose nothing. (Kills of SFT and GRPO at seeded points, during a save and after a
damaged checkpoint are in test_sft.py / test_grpo.py beside the runs they compare to.)"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import adapter_weights, finish, start_tracetune, wait_for
from tracetune.data import DataError, load_examples
from tracetune.errors import DamagedFile, DiskFull, TrainingError
from tracetune.files import append_jsonl, atomic_path, read_appended
from tracetune.judge import JudgeError, read_cache
from tracetune.runs import FaultWatch, checkpoint_problem, set_aside_damaged_checkpoints, truncate_metrics
from tracetune.scoring import read_completions

ROW = {"question": "Ann has 2 apples and gets 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"}


# ------------------------------------------------------------ append-only files


@pytest.mark.parametrize("tail", [
    b'{"step": 3, "loss": 1.',          # cut mid-record, no newline: a kill during the write
    b'{"step": 3, "lo\xff\xfe',        # cut inside a multi-byte character
    b'{"step": 3, "loss"\n',            # a whole line that does not parse (a full disk cut it, the newline came later)
    b"\x00\x00\x00\x00",                # zeros: what some filesystems leave after a crash
])
def test_a_torn_last_line_is_cut_with_a_note_and_the_rest_kept(tmp_path, capsys, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n' + tail)
    assert read_appended(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert "torn last line" in capsys.readouterr().err
    assert path.read_bytes() == b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'  # cut, so appends stay whole
    append_jsonl(path, {"step": 3, "loss": 1.0})
    assert [r["step"] for r in read_appended(path)] == [1, 2, 3]


def test_a_torn_line_is_cut_for_every_append_only_file_a_resume_reads(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    assert [r["step"] for r in truncate_metrics(metrics, 2)] == [1, 2]  # the resume's own truncation, torn line first
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
    cache = tmp_path / "judge.jsonl"
    record = {"id": "a", "completion_sha256": "x", "judge_model": "m", "score": 4, "rationale": "ok", "attempts": 1}
    cache.write_text(json.dumps(record) + "\n" + json.dumps(record)[:30])
    assert len(read_cache(cache)) == 1 and cache.read_text().count("\n") == 1


def test_damage_before_the_last_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DamagedFile, match=r"samples.jsonl:2"):
        read_appended(path)
    assert path.read_text() == '{"id": "a"}\nnot json\n{"id": "b"}\n'  # nothing cut


# ----------------------------------------------------------------- input files


def test_bytes_that_are_not_utf8_are_a_row_error_naming_file_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b'\n{"question": "caf\xe9?", "answer": "#### 1"}\n' + json.dumps(ROW).encode() + b"\n")
    with pytest.raises(DataError, match=r"in.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_examples(str(path))
    loaded = load_examples(str(path), skip_invalid=True)
    assert len(loaded.examples) == 2 and [e.line for e in loaded.skipped] == [2]


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n")
    assert load_examples(str(path)).examples[0].reference == "5"


def test_a_key_given_twice_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"question": "a?", "answer": "#### 1", "answer": "#### 2"}\n')
    with pytest.raises(DataError, match=r"dup.jsonl:1: field 'answer': given twice"):
        load_examples(str(path))


def test_an_empty_input_is_an_error(tmp_path):
    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match="holds no rows"):
            load_examples(str(tmp_path / name))
    (tmp_path / "bad.jsonl").write_text('{"completion": "x"}\n')
    with pytest.raises(DataError, match="no valid rows to score"):  # all skipped: no NaN metrics written
        read_completions(tmp_path / "bad.jsonl", skip_invalid=True)


def test_a_missing_local_path_says_so_at_once(tmp_path):
    start = time.perf_counter()
    for source in ("in/nope.jsonl", str(tmp_path / "nope"), "./data/train"):
        with pytest.raises(DataError, match="no such file"):
            load_examples(source)
    assert time.perf_counter() - start < 1  # never tried as a Hugging Face id


READERS = {
    "examples": lambda p: load_examples(str(p), skip_invalid=True),
    "examples_strict": lambda p: load_examples(str(p)),
    "completions": lambda p: read_completions(p, skip_invalid=True),
    "appended": read_appended,
    "judge_cache": read_cache,
}
EXPECTED = (DataError, DamagedFile, JudgeError)

jsonl_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.just(json.dumps(ROW)), st.text(max_size=40), st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
                       st.dictionaries(st.sampled_from(["question", "answer", "completion", "reference", "id"]),
                                       st.one_of(st.text(max_size=20), st.integers(), st.none(), st.floats())).map(json.dumps)),
             max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
).flatmap(lambda data: st.tuples(st.just(data), st.integers(0, len(data)), st.sampled_from(["utf-8", "utf-16", "latin-1"])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=jsonl_bytes)
def test_random_bytes_into_every_reader_give_a_clear_error_or_a_result(tmp_path, case):
    data, cut, encoding = case
    if encoding != "utf-8":  # the same rows in another encoding
        data = data.decode("utf-8", "replace").encode(encoding, "replace")
    data = data[:cut] if cut % 3 == 0 else data  # sometimes truncated mid-row
    for name, read in READERS.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        try:
            read(path)
        except EXPECTED as error:
            assert str(error) and "\n" not in str(error).strip(), (name, str(error))


# ----------------------------------------------------------------- checkpoints


def save_steps(root: Path, steps=(1, 2, 3)) -> None:
    """Real orbax checkpoints in Tunix's layout (model_params + optimizer_state)."""
    import orbax.checkpoint as ocp

    handlers = {"model_params": ocp.PyTreeCheckpointHandler(), "optimizer_state": ocp.PyTreeCheckpointHandler()}
    with ocp.CheckpointManager(root, item_handlers=handlers) as manager:
        for step in steps:
            tree = {"w": np.full((64, 64), step, np.float32), "b": np.arange(8, dtype=np.float32)}
            manager.save(step, args=ocp.args.Composite(model_params=ocp.args.PyTreeSave(tree),
                                                       optimizer_state=ocp.args.PyTreeSave({"mu": tree})))
        manager.wait_until_finished()


def truncate_largest(step_dir: Path, item: str = "model_params") -> None:
    biggest = max((f for f in (step_dir / item).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 3)


@pytest.mark.parametrize("damage", [
    lambda d: truncate_largest(d),                                   # a kill or a bad disk mid-write
    lambda d: truncate_largest(d, "optimizer_state"),
    lambda d: (d / "model_params" / "_METADATA").unlink(),
    lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    lambda d: shutil.rmtree(d / "model_params"),
], ids=["truncated-params", "truncated-optimizer", "no-_METADATA", "no-_CHECKPOINT_METADATA", "no-model_params"])
def test_a_damaged_latest_checkpoint_is_set_aside_in_one_line(tmp_path, capfd, damage):
    root = tmp_path / "checkpoints"
    save_steps(root)
    assert checkpoint_problem(root / "3") is None
    damage(root / "3")
    capfd.readouterr()
    assert set_aside_damaged_checkpoints(root) == [3]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint 3 is damaged" in err[0] and "resuming from step 2" in err[0], err
    assert sorted(p.name for p in root.iterdir()) == ["1", "2"]
    assert (tmp_path / "checkpoints.damaged" / "3").is_dir()  # moved, never deleted
    assert set_aside_damaged_checkpoints(root) == []  # step 2 is intact: nothing more to do


def test_intact_checkpoints_under_a_relative_path_are_kept(tmp_path, monkeypatch):
    """`make run` names its run directory relatively (runs/cpu-demo): orbax's metadata
    reader sees no tree under a relative path, and every resume set all steps aside."""
    save_steps(tmp_path / "checkpoints")
    monkeypatch.chdir(tmp_path)
    assert checkpoint_problem(Path("checkpoints") / "3") is None
    assert set_aside_damaged_checkpoints(Path("checkpoints")) == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_two_damaged_steps_fall_back_to_the_newest_intact_one(tmp_path, capfd):
    root = tmp_path / "checkpoints"
    save_steps(root)
    truncate_largest(root / "3")
    (root / "2" / "_CHECKPOINT_METADATA").unlink()
    assert set_aside_damaged_checkpoints(root) == [3, 2]
    assert [p.name for p in root.iterdir()] == ["1"]


# -------------------------------------------------------- full disk, in process


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_in_an_append_names_the_file_and_keeps_what_was_written(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    monkeypatch.setattr(Path, "open", enospc)
    with pytest.raises(DiskFull, match=r"disk full writing .*metrics.jsonl .*free there.*re-run the same command"):
        append_jsonl(path, {"step": 2})
    monkeypatch.undo()
    assert read_appended(path) == [{"step": 1}]


def test_a_full_disk_in_an_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(DiskFull, match="summary.json"):
        with atomic_path(path) as tmp:
            tmp.write_text("new, half")
            enospc()
    assert path.read_text() == "old" and not (tmp_path / "summary.json.tmp").exists()


def test_a_writer_thread_that_dies_wakes_a_main_thread_blocked_on_its_queue(tmp_path):
    """TensorBoard's writer on a full disk: its thread dies, its queue fills, and the
    main thread's next put would block for ever. The watch raises DiskFull instead."""
    queue = multiprocessing.Queue(maxsize=1)
    with FaultWatch({"test_faults": tmp_path / "tensorboard"}, tmp_path) as watch:
        def writer():
            time.sleep(0.5)
            raise OSError(errno.ENOSPC, "No space left on device")

        threading.Thread(target=writer, name="event-writer").start()
        queue.put(1)
        start = time.perf_counter()
        with pytest.raises(DiskFull, match="tensorboard"):
            queue.put(2)  # blocks: nobody reads
            queue.put(3)
        assert time.perf_counter() - start < 5
        assert isinstance(watch.error, DiskFull)


def test_any_other_dying_thread_is_reported_too(tmp_path):
    with FaultWatch({}, tmp_path) as watch:
        thread = threading.Thread(target=lambda: 1 / 0, name="metrics")
        with pytest.raises(TrainingError, match=r"writer thread \(metrics\).*ZeroDivisionError"):
            thread.start()
            thread.join()  # woken by the watch
            time.sleep(1)
        with pytest.raises(TrainingError):
            watch.check()  # and at the loop's own checkpoints


# --------------------------------------------------- small faults, by the CLI


def tracetune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetune.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def test_undecodable_input_to_score_is_one_line_and_skippable(tmp_path):
    path = tmp_path / "c.jsonl"
    good = json.dumps({"question": "2+3?", "reference": "5", "completion": "<reasoning>Step 1: 2 + 3 = 5.\nTherefore, the answer is 5.</reasoning>\n<answer>5</answer>"})
    path.write_bytes(good.encode() + b"\n\xff\xfe\x00bad\n")
    result = tracetune("score", str(path))
    assert result.returncode == 2 and "c.jsonl:2: not UTF-8" in result.stderr and "Traceback" not in result.stderr, result.stderr
    skipped = tracetune("score", str(path), "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    metrics = json.loads((tmp_path / "c.scores" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert metrics["accuracy"]["n"] == 1


def test_serve_refuses_a_port_out_of_range():
    result = tracetune("serve", "--model", "tiny", "--port", "70000")
    assert result.returncode == 2 and "--port" in result.stderr and "65535" in result.stderr, result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr


def test_serve_names_unknown_models_and_wrong_content_types():
    import httpx

    from tracetune.models.registry import load_model
    from tracetune.serve import create_app, running_server

    with running_server(create_app(load_model("tiny"), model_name="tiny-served", default_max_tokens=4)) as url:
        body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
        assert "tiny-served" in reply.json()["error"]["message"]
        reply = httpx.post(f"{url}/chat/completions", content=json.dumps(body), timeout=60)
        assert reply.status_code == 415 and "Content-Type is missing" in reply.json()["error"]["message"]
        reply = httpx.post(f"{url}/chat/completions", content=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=60)
        assert reply.status_code == 415 and "'text/plain'" in reply.json()["error"]["message"]
        body["model"] = "tiny-served"
        assert httpx.post(f"{url}/chat/completions", json=body, timeout=60).status_code == 200


def test_an_emptied_config_is_named_as_such(tmp_path):
    from tracetune.config import load_config
    from tracetune.runs import claim_directory

    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(TrainingError, match="config.yaml is empty"):
        claim_directory(tmp_path, load_config("tiny"), ("data", "sft"))


# ------------------------------------------------------- a real full disk (slow)


@pytest.fixture
def small_disk(tmp_path):
    """A 900 KB tmpfs: room for the tiny SFT run's config, metrics and one checkpoint,
    not for its second (the TensorBoard writer runs out about then too)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); the in-process full-disk tests still run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


SFT = ["sft.max_steps=30", "sft.checkpoint_steps=10", "sft.eval_every_steps=0", "sft.eval_examples=0"]


@pytest.mark.slow
def test_a_full_disk_stops_sft_in_one_line_and_a_rerun_resumes_to_the_same_weights(tmp_path, small_disk):
    reference = finish(start_tracetune("sft", tmp_path / "straight", "--preset", "tiny", settings=SFT), timeout=600)
    assert reference.returncode == 0, reference.stderr
    run = small_disk / "run"
    start = time.perf_counter()
    full = finish(start_tracetune("sft", run, "--preset", "tiny", settings=SFT), timeout=300)
    assert full.returncode == 74, full.stderr  # EX_IOERR: distinct from a crash (1) and a user error (2)
    lines = [line for line in full.stderr.splitlines() if not line.startswith(("step ", "sft:", "WARNING:absl:Metric"))]
    assert len(lines) == 1 and lines[0].startswith("error: disk full writing ") and "free" in lines[0], full.stderr
    assert time.perf_counter() - start < 120  # it stopped, it did not hang
    assert read_appended(run / "metrics.jsonl", repair=False)  # what was written before is valid
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = finish(start_tracetune("sft", run, "--preset", "tiny", settings=SFT), timeout=600)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    expected, actual = adapter_weights(tmp_path / "straight"), adapter_weights(run)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    losses = lambda d: [r["loss"] for r in read_appended(d / "metrics.jsonl", repair=False)]  # noqa: E731
    assert losses(run) == losses(tmp_path / "straight")


# ------------------------------------------------------ kills of eval (slow)


@pytest.mark.slow
def test_an_evaluation_killed_at_seeded_points_resumes_to_the_same_results(tmp_path):
    args = ["eval", "--model", "tiny", "--preset", "tiny", "--limit", "24", "--set", "eval.batch_size=4"]
    whole = tracetune(*args, "--out", str(tmp_path / "whole"), timeout=600)
    assert whole.returncode == 0, whole.stderr
    rng = random.Random(17)
    out = tmp_path / "killed"
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-m", "tracetune.cli", *args, "--out", str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(out / "samples.jsonl", process, timeout=300)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
    again = tracetune(*args, "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr
    records = lambda d: [(r["id"], r["completion"]) for r in read_appended(d / "samples.jsonl", repair=False)]  # noqa: E731
    assert sorted(records(out)) == sorted(records(tmp_path / "whole"))  # every problem once, the same completions
    assert (json.loads((out / "metrics.json").read_text())["metrics"]
            == json.loads((tmp_path / "whole" / "metrics.json").read_text())["metrics"])


# ------------------------------------- a full disk at each writer of a run (slow)


def failing_open(name_part: str):
    real = Path.open

    def open_(self, mode="r", *args, **kwargs):
        if name_part in str(self) and any(m in mode for m in "wa"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, mode, *args, **kwargs)

    return open_


def _patch_tensorboard(monkeypatch):
    """The file's first event is written in the main thread; the later ones fail in
    TensorBoard's writer thread, which dies (the hang of issue 17 without the watch)."""
    from tensorboardX import event_file_writer

    real, calls = event_file_writer.EventsWriter._write_serialized_event, []

    def write(self, event):
        calls.append(threading.current_thread().name)
        if len(calls) > 1:
            assert threading.current_thread() is not threading.main_thread()
            enospc()
        return real(self, event)

    monkeypatch.setattr(event_file_writer.EventsWriter, "_write_serialized_event", write)


WRITERS = {
    "metrics": (lambda mp: mp.setattr(Path, "open", failing_open("metrics.jsonl")), "metrics.jsonl"),
    "samples": (lambda mp: mp.setattr(Path, "open", failing_open("step_000002")), "samples/step_000002.jsonl"),
    "tensorboard": (_patch_tensorboard, "tensorboard"),
    "export": (lambda mp: mp.setattr(Path, "open", failing_open("adapter.safetensors")), "adapter.safetensors"),
}


@pytest.mark.slow
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_at_each_writer_stops_the_run_naming_it(tmp_path, monkeypatch, writer):
    from tracetune.config import load_config
    from tracetune.models.registry import load_model
    from tracetune.sft import train_sft

    patch, named = WRITERS[writer]
    config = load_config("tiny", ["sft.max_steps=6", "sft.checkpoint_steps=2", "sft.eval_every_steps=2", "sft.eval_examples=4"])
    loaded = load_model("tiny")
    patch(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(DiskFull) as caught:
        train_sft(config, tmp_path / "run", loaded=loaded)
        time.sleep(5)  # a thread's failure may arrive just after the last step
    assert named in str(caught.value.path / "") or named in str(caught.value), str(caught.value)
    assert time.perf_counter() - start < 120
    monkeypatch.undo()
    read_appended(tmp_path / "run" / "metrics.jsonl", repair=False)  # what was written is valid
