"""What every training stage's run directory shares: the saved config that a
resumed run must match, metrics that a resume truncates, and the checkpoint policy."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from tracetune.config import Config, load_config, save_config
from tracetune.errors import TrainingError
from tracetune.files import atomic_path


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
    """Drop metrics logged after the checkpoint a run resumes from (they will be
    redone); return the records kept."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in records if r.get("step", 0) <= step]
    if not is_primary():  # read-only on the other hosts
        return kept
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    return kept


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
