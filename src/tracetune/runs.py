"""What every training stage's run shares: the saved config that a resumed run must
match, metrics that a resume truncates, the checkpoint policy, damaged checkpoints
set aside on resume, the optimizer, the signal flag that stops at the next update,
and the watch that turns a writer thread's death (a full disk under TensorBoard, a
failed async checkpoint save) into an error of the main loop instead of a silent
hang."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from tracetune.config import Config, load_config, save_config
from tracetune.errors import DiskFull, TrainingError
from tracetune.files import append_jsonl, atomic_path, is_disk_full, read_appended, rewrite_jsonl, writing


def optimizer(learning_rate: float | optax.Schedule, max_grad_norm: float) -> optax.GradientTransformation:
    """The optimizer of both stages: clip the global norm, then AdamW without weight
    decay (on the LoRA adapters only). A non-finite gradient skips the update
    instead of writing NaN weights that a checkpoint could then keep; the stage's
    own check (a non-finite loss) then stops the run and names the last good
    checkpoint.

    The update runs on the adapters concatenated into one vector
    (``optax.flatten``): per tensor it would be written out for each of the 252
    adapters of the 270M (7 projections x A, B x 18 layers), 28,000 of the update
    program's 85,000 HLO lines, and XLA:CPU keeps about 2.5 KB resident per line of
    every compiled program for the life of the run (about 37 MB per update shape:
    README, "Where GRPO's peak memory is"). The arithmetic is the same."""
    return optax.flatten(optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(learning_rate, weight_decay=0.0)),
        max_consecutive_errors=1 << 30,
    ))


class StopFlag:
    """The first SIGTERM / SIGINT is recorded (the run stops at the next update and
    saves); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the next update, then stopping "
              "(Ctrl-C again to quit without saving)", file=sys.stderr)

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _diff(a: dict, b: dict, prefix: str = "") -> Iterator[str]:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            yield f"{prefix}{key}"


def is_primary() -> bool:
    """Whether this process writes the run directory's own files (config, metrics,
    samples, summary, export): on a multi-host run only the first host does. Orbax
    writes checkpoints from every host itself."""
    return jax.process_index() == 0


def claim_directory(run_dir: Path, config: Config, sections: Sequence[str]) -> None:
    """Save the resolved config in ``run_dir``, or check that a resumed run has the
    same one. Only ``sections`` (what shapes this stage) are compared: a later
    stage's settings may change freely."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.exists() and not path.read_text(encoding="utf-8", errors="replace").strip():
        raise TrainingError(f"{path} is empty (a damaged or emptied file): restore it, or move the run directory away to start over")
    if not path.exists():
        if not is_primary():
            return
        with atomic_path(path) as tmp:
            save_config(config, tmp)
        return
    saved = {k: v for k, v in load_config(path).to_dict().items() if k in sections}
    ours = {k: v for k, v in config.to_dict().items() if k in sections}
    diff = sorted(_diff(saved, ours))
    if diff:
        raise TrainingError(f"{path} was written for another config (differs in {', '.join(diff)}); use a new run directory or the same settings")


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop records logged after the checkpoint a run resumes from (they will be
    redone), and a torn last line (a kill or a full disk mid-append); return the
    records kept. Used for metrics.jsonl and GRPO's samples.jsonl alike."""
    records = read_appended(path, repair=is_primary())
    kept = [r for r in records if r.get("step", 0) <= step]
    if not is_primary() or not path.exists() or len(kept) == len(records):  # read-only on the other hosts
        return kept
    rewrite_jsonl(path, kept)
    return kept


def append_record(path: Path, record: dict) -> None:
    """One metrics or samples record, from the primary host only."""
    if is_primary():
        append_jsonl(path, record)


def checkpoint_options(minutes: float, steps: int, keep: int) -> ocp.CheckpointManagerOptions:
    """Save when either is due (0 = off); with both off, only the final and signal
    saves (forced) happen."""
    policies = []
    if minutes > 0:
        policies.append(ocp.checkpoint_managers.ContinuousCheckpointingPolicy(minimum_interval_secs=int(minutes * 60)))
    if steps > 0:
        policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(steps))
    policy = ocp.checkpoint_managers.AnySavePolicy(policies) if policies else ocp.checkpoint_managers.SpecificStepsPolicy(steps=[])
    return ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=keep)


# ---------------------------------------------------------------- checkpoints


def _restore_args(tree):
    """RestoreArgs as numpy arrays for every leaf of an orbax metadata tree."""
    if isinstance(tree, dict):
        return {k: _restore_args(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_restore_args(v) for v in tree)
    return ocp.RestoreArgs(restore_type=np.ndarray)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Orbax and asyncio log a page per damaged file; the caller reports one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    hook = threading.excepthook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None
    try:
        yield
    finally:
        threading.excepthook = hook
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def checkpoint_problem(step_dir: Path) -> str | None:
    """Why a saved step cannot be restored (None: it can). Orbax's own reader reads
    every array of every item back (as numpy: no device memory, any mesh), so a
    truncated or missing file is found here, not in the trainer's restore.
    The path is made absolute first: orbax's metadata reader finds no tree under a
    relative one (`make run`'s ``runs/cpu-demo``), which made every step look damaged."""
    step_dir = Path(step_dir).resolve()
    if not (step_dir / "_CHECKPOINT_METADATA").exists():
        return "_CHECKPOINT_METADATA is missing"
    items = [d for d in ("model_params", "optimizer_state") if (step_dir / d).is_dir()]
    if "model_params" not in items:
        return "model_params/ is missing"
    with _quiet():
        for item in items:
            try:
                with ocp.PyTreeCheckpointer() as reader:
                    metadata = reader.metadata(step_dir / item)
                    tree = metadata.item_metadata.tree if metadata is not None and metadata.item_metadata is not None else None
                    if tree is None:
                        return f"{item}/_METADATA is missing or unreadable"
                    reader.restore(step_dir / item, restore_args=_restore_args(tree))
            except Exception as error:  # any failure of orbax's reader means: not restorable
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                return f"{item} does not read back ({first[:160]})"
    return None


def saved_steps(root: Path) -> list[int]:
    """The steps saved under a checkpoint root (orbax's directories named by step), oldest first."""
    root = Path(root)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()) if root.is_dir() else []


@contextlib.contextmanager
def restoring(root: Path) -> Iterator[None]:
    """Around a trainer's construction, where Tunix restores the newest checkpoint
    under ``root``: a checkpoint whose trees do not fit this version's model and
    optimizer stops with one line naming it, instead of orbax's page of mismatched
    trees. (Runs saved before 2026-12-04 keep Adam's moments per adapter; the
    optimizer now keeps them as one vector, ``optimizer``.)"""
    try:
        yield
    except ValueError as error:
        text = str(error)
        if "tree structures do not match" not in text:
            raise
        steps = saved_steps(root)
        where = Path(root) / str(steps[-1]) if steps else Path(root)
        first = next((line.strip().rstrip(":") for line in text.splitlines()[1:] if line.strip() and not line[0].isspace()), "?")
        raise TrainingError(f"{where} does not fit this version's model and optimizer (first difference: {first}; runs "
                            "saved before 2026-12-04 keep Adam's moments per adapter): resume it with the tracetune that "
                            "saved it, or start a new run directory") from None


def set_aside_damaged_checkpoints(root: Path) -> list[int]:
    """Check the newest saved steps under ``root`` and move each damaged one (a kill
    during a save, a bad disk) to ``<root>.damaged/<step>``, never deleting it, until
    an intact step is found; the trainer then resumes from that one. Returns the steps
    set aside, each reported in one line."""
    root = Path(root)
    steps = saved_steps(root)[::-1]
    moved = []
    for step in steps:
        problem = checkpoint_problem(root / str(step))
        if problem is None:
            break
        moved.append(step)
        if not is_primary():
            continue
        target = root.with_name(root.name + ".damaged") / str(step)
        if target.exists():
            target = target.with_name(f"{step}-{int(time.time())}")
        target.parent.mkdir(parents=True, exist_ok=True)
        (root / str(step)).rename(target)
        intact = [s for s in steps if s < step]
        print(f"warning: checkpoint {step} is damaged ({problem}); moved it to {target} and resuming from "
              f"{'step ' + str(intact[0]) if intact else 'the start'}", file=sys.stderr)
    return moved


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


def checkpoint_failure(error: BaseException, root: Path) -> BaseException:
    """The error to stop with when a run failed on its disk: ``DiskFull`` naming the
    file (or the checkpoint directory) and the room a resumed run needs (two
    checkpoints: orbax writes the next before it deletes the oldest), or for a failed
    save, a one-line TrainingError."""
    root = Path(root)
    steps = saved_steps(root)
    need = 2 * directory_bytes(root / str(steps[-1])) if steps else None
    if isinstance(error, DiskFull):
        return error if error.needed_bytes or error.reported else DiskFull(error.path, need)
    if is_disk_full(error):
        return DiskFull(root, need)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TrainingError(f"saving a checkpoint in {root} failed: {first[:300]}")


def failed_run(error: BaseException, root: Path, *close: Callable[[], None]) -> BaseException:
    """What a stage stopping on ``error`` raises, after closing its writers (in-flight
    checkpoint saves finish; the failed step is not saved): a full disk as DiskFull
    with the room a resumed run needs, anything else unchanged. On a full disk the
    closing fails too; that is the same fault, not a second one."""
    for fn in close:
        try:
            fn()
        except Exception:  # noqa: BLE001 - already stopping for `error`
            pass
    return checkpoint_failure(error, root) if is_disk_full(error) else error


def check_saves(tunix_manager, root: Path) -> None:
    """Raise now if an asynchronous checkpoint save has failed (orbax only logs it and
    training would carry on without checkpoints). ``tunix_manager`` is Tunix's
    CheckpointManager; its orbax manager is the private ``_checkpoint_manager``."""
    manager = getattr(tunix_manager, "_checkpoint_manager", None)
    if manager is None:
        return
    try:
        manager.check_for_errors()
    except Exception as error:  # orbax re-raises whatever its save thread hit
        raise checkpoint_failure(error, root) from None


# --------------------------------------------------------- threads that die


def _teardown_noise(text: str) -> bool:
    """What orbax's save threads print after a failed save, once its event loop closed."""
    return "Event loop is closed" in text


def _quiet_disk_full(record: logging.LogRecord) -> bool:
    """A logging filter: orbax and asyncio log a page per array a full disk refused;
    tracetune reports the full disk itself, in one line."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += " " + str(record.exc_info[1])
    return not ("No space left on device" in text or "RESOURCE_EXHAUSTED" in text or _teardown_noise(text)
                or "Save Finalize thread" in text or "Handler Commit operations" in text)


_QUIETED = False


def _quiet_orbax_noise() -> None:
    """Once per process, for good: orbax's save threads keep printing after the run
    has stopped (while the process exits), so the filters cannot end with the watch."""
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_quiet_disk_full)
    # tensorstore's callbacks report as "unraisable" (pybind11) or through
    # sys.excepthook (PyErr_Print), not through threading's hook.
    previous = sys.excepthook
    sys.excepthook = lambda kind, value, tb: None if _teardown_noise(str(value)) else previous(kind, value, tb)
    unraisable = sys.unraisablehook
    sys.unraisablehook = lambda args: None if _teardown_noise(str(args.exc_value)) else unraisable(args)


class FaultWatch:
    """Every thread's uncaught exception, reported to the main loop.

    A writer thread that dies (TensorBoard's event writer on a full disk) would
    otherwise leave the main thread blocked on its full queue for ever. The watch
    records the error, and wakes the main thread with SIGUSR1 so that even a blocked
    put raises it; ``check`` raises it at the loop's own checkpoints.
    """

    @classmethod
    def for_run(cls, run_dir: Path) -> FaultWatch:
        """A training run's watch: errors in TensorBoard's or orbax's threads name those directories."""
        return cls({"tensorboard": run_dir / "tensorboard", "orbax": run_dir / "checkpoints"}, run_dir)

    def __init__(self, paths: dict[str, Path], default: Path):
        self.paths, self.default = paths, Path(default)  # frames whose file names contain a key -> that path
        self.error: BaseException | None = None
        self.active = False
        self._previous = None

    def _where(self, tb) -> Path:
        files = " ".join(frame.filename for frame in traceback.extract_tb(tb))
        return next((path for key, path in self.paths.items() if key in files), self.default)

    def _excepthook(self, args) -> None:
        if args.exc_type is SystemExit or _teardown_noise(str(args.exc_value)):
            return
        error = args.exc_value
        where = self._where(args.exc_traceback)
        if is_disk_full(error):
            error = DiskFull(where)
        else:
            error = TrainingError(f"a writer thread ({args.thread.name if args.thread else '?'}) failed writing {where}: "
                                  f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        if self.error is None or (isinstance(error, DiskFull) and not isinstance(self.error, DiskFull)):
            first = self.error is None
            self.error = error  # a full disk is the cause whatever else failed beside it
            if first and threading.current_thread() is not threading.main_thread():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _wake(self, signum, frame) -> None:
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> FaultWatch:
        self._previous = threading.excepthook
        threading.excepthook = self._excepthook
        self.active = True
        self._previous_signal = signal.signal(signal.SIGUSR1, self._wake)
        _quiet_orbax_noise()
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        release_listeners()
        threading.excepthook = self._previous
        signal.signal(signal.SIGUSR1, self._previous_signal)


class WatchedTensorboard:
    """metrax's TensorBoard backend that stops writing once the watch has an error
    (its writer thread is dead, so its queue would block the next write for ever)."""

    live: list[WatchedTensorboard] = []  # those Tunix may have registered with jax.monitoring

    def __init__(self, log_dir: str, flush_every_n_steps: int, watch: FaultWatch):
        from metrax import logging as metrax_logging

        with writing(log_dir):  # the first event is written here, in this thread
            self._backend = metrax_logging.TensorboardBackend(log_dir=log_dir, flush_every_n_steps=flush_every_n_steps)
        self._log_dir = log_dir
        self._watch = watch
        WatchedTensorboard.live.append(self)

    def log_scalar(self, event: str, value, **kwargs) -> None:
        if self._watch.error is not None:
            if self._watch.active:
                self._watch.check()
            return  # a finished run's listener that was never cleared
        with writing(self._log_dir):  # a flush writes in this thread
            self._backend.log_scalar(event, value, **kwargs)

    def close(self) -> None:
        if self._watch.error is None:
            self._backend.close()


class CompileClock:
    """XLA compiles in this process while it is open, counted and timed from JAX's own
    ``/jax/core/compile/backend_compile_duration`` events: a run logs, per step, how
    many programs it compiled and how long that took (new padded shapes cost a
    compile once each; a count that keeps growing means shapes are not bucketed)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        self._taken = (0, 0.0)

    def _listen(self, event: str, seconds: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += seconds

    def take(self) -> dict[str, float]:
        """Compiles since the last take: {"count", "seconds"}."""
        count, seconds = self.count - self._taken[0], self.seconds - self._taken[1]
        self._taken = (self.count, self.seconds)
        return {"count": count, "seconds": round(seconds, 3)}

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        try:
            jax.monitoring.unregister_event_duration_listener(self._listen)
        except AssertionError:  # already gone: Tunix's MetricsLogger.close clears the duration listeners
            pass


def release_listeners() -> None:
    """Unregister every TensorBoard writer of ours from ``jax.monitoring``."""
    while WatchedTensorboard.live:
        writer = WatchedTensorboard.live.pop()
        try:
            jax.monitoring.unregister_scalar_listener(writer.log_scalar)
        except (AssertionError, ValueError):  # never registered (not the primary host) or already gone
            pass


def metrics_options(log_dir: Path, watch: FaultWatch, flush_every_n_steps: int = 10):
    """Tunix MetricsLoggerOptions whose only backend is the watched TensorBoard writer.

    Tunix registers every backend as a process-wide ``jax.monitoring`` scalar
    listener, and nothing removes it: its close calls ``clear_event_listeners``, which
    in JAX 0.10.2 leaves the scalar listeners in place (it assigns a local). An
    earlier run in this process (a test, a notebook) would leave its writer listening,
    and once that writer's thread is gone the next event blocks on its queue. So a run
    starts, and ends (``FaultWatch``), with none of ours.
    """
    from tunix.sft import metrics_logger as tunix_metrics

    release_listeners()
    factory = lambda: WatchedTensorboard(str(log_dir), flush_every_n_steps, watch)  # noqa: E731
    return tunix_metrics.MetricsLoggerOptions(log_dir=str(log_dir), flush_every_n_steps=flush_every_n_steps,
                                              backend_kwargs={"custom_backend": [factory]})
