"""What a checkpoint holds, which checkpoints are kept, and how one is restored by replaying updates.

ES needs far less than a model directory per checkpoint: the weights after k updates are a pure function
of the base weights and the update history, the (seed, coefficient) pairs of every update (Salimans et
al. 2017, Sec. 2.1; Qiu et al. 2025, Alg. 1), which the strategy state in es_state.json already holds.
So there are two kinds (`shared.run_layout.FULL`, `COMPACT`):

- compact: es_state.json alone. The ES state, the weights' fingerprint, the base model's identity (path
  and `model_digest`), the noise version (`shared.seeds.NOISE_VERSION`), the device type, and its
  anchor: the updates of the newest full checkpoint before it (0: the base model). The driver writes it
  without any engine, in milliseconds, which is what a stop or a preemption notice leaves time for.
- full: the same plus the model directory (and the fp32 master) that engine 0 writes; every
  --full-checkpoint-every iterations and at the end.

Restoring a compact checkpoint loads its anchor and replays the updates since onto it (`restore_plan`).
The engines regenerate every update's noise from its seeds, exactly as during the run, so the replayed
weights are bit-identical to the run's; the caller checks that against the recorded fingerprint. Replay
is refused, naming why, when the noise version, the device type or the base model's files differ.

Retention (`prune`, --keep-full N) keeps the newest N full checkpoints and every compact checkpoint
whose anchor is kept or is the base model, so it never deletes the newest full checkpoint or anything a
kept compact checkpoint needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.run_layout import COMPACT, FULL, RunDir, checkpoint_files
from shared.seeds import NOISE_VERSION


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the run stops; earlier checkpoints are intact) or cannot be
    restored (the message names the checkpoint and why)."""


@dataclass(frozen=True)
class Anchor:
    """Weights an engine can be loaded from: a model directory (plus fp32 master) after `updates`."""

    updates: int
    model_dir: str
    master_path: str | None = None


@dataclass(frozen=True)
class Restore:
    """How to bring engines to a checkpoint's weights: load `anchor`, then apply `updates` (one list of
    (seed, coefficient) pairs per ES update, oldest first); the weights then have `fingerprint` (None: a
    plain model directory, whose fingerprint is whatever it loads as)."""

    anchor: Anchor
    updates: list[list[tuple[int, float]]]
    fingerprint: str | None


def model_digest(model_dir: str | Path) -> str:
    """SHA-256 (hex) over the relative path, size and bytes of every file under `model_dir` (hidden names
    skipped), in path order: the identity of a base model that compact checkpoints replay onto.

    Raises:
        OSError: `model_dir` is not a readable directory.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a model directory")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}|{path.stat().st_size}|".encode())
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def full_due(updates: int, iterations: int, full_every: int) -> bool:
    """True when the checkpoint after `updates` must be full: at the end of the run or every
    `full_every` updates (0: only at the end)."""
    return updates >= iterations or bool(full_every and updates % full_every == 0)


def es_state(
    *,
    kind: str,
    updates: int,
    anchor: int,
    fingerprint: str,
    strategy: dict[str, Any],
    problems_digest: str,
    has_master: bool,
    base_model: dict[str, str] | None,
    device: str,
) -> dict[str, Any]:
    """The es_state.json of a checkpoint after `updates` updates (see the module docstring). `anchor` is
    the updates of the full checkpoint (0: base model) a compact one replays onto; for a full one,
    `updates` itself. `base_model` is {"path", "digest"}."""
    return {
        "kind": kind,
        "updates": updates,
        "anchor": anchor,
        "fingerprint": fingerprint,
        "strategy": strategy,
        "problems_digest": problems_digest,
        "has_master": has_master,
        "base_model": base_model,
        "noise": {"version": NOISE_VERSION, "device": device},
    }


def _replay_refusal(state: dict[str, Any], device: str) -> str | None:
    """Why the updates of a compact checkpoint cannot be replayed here, or None."""
    noise = state.get("noise") or {}
    if noise.get("version") != NOISE_VERSION:
        return (
            f"it was written with noise version {noise.get('version')}, this code draws noise version "
            f"{NOISE_VERSION}: its updates would replay to other weights"
        )
    if noise.get("device") != device:
        return (
            f"it was written by engines on {noise.get('device')}, this run's engines use {device}, whose "
            "random number generators draw other noise from the same seeds"
        )
    base = state.get("base_model") or {}
    try:
        digest = model_digest(base.get("path", ""))
    except OSError as e:
        return f"its base model {base.get('path')} is not readable: {e}"
    if digest != base.get("digest"):
        return (
            f"its base model {base.get('path')} changed since (files digest {digest[:12]}, "
            f"recorded {str(base.get('digest'))[:12]})"
        )
    return None


def restore_plan(run_dir: RunDir, updates: int, state: dict[str, Any], device: str) -> Restore:
    """How to restore the checkpoint after `updates` updates of `run_dir`, whose es_state.json is `state`.

    A full checkpoint (or one written before compact checkpoints existed, without "kind") loads its model
    directory and master; a compact one loads its anchor and replays `state`'s update history since it.

    Args:
        device: the device type of the engines that will replay ("cpu", "cuda").

    Raises:
        CheckpointError: a compact checkpoint's noise version, device type or base model differ, or its
            anchor checkpoint is missing.
    """
    path = run_dir.checkpoint_path(updates)
    if state.get("kind", FULL) == FULL:
        files = checkpoint_files(path)
        master = str(files.master) if state.get("has_master") else None
        return Restore(Anchor(updates, str(files.model), master), [], state["fingerprint"])
    if state["kind"] != COMPACT:
        raise CheckpointError(f"{checkpoint_files(path).es_state}: unknown checkpoint kind {state['kind']!r}")
    why = _replay_refusal(state, device)
    if why is not None:
        raise CheckpointError(f"{path} is a compact checkpoint that cannot be replayed here: {why}")
    start = int(state["anchor"])
    if start == 0:
        anchor = Anchor(0, state["base_model"]["path"])
    else:
        files = checkpoint_files(run_dir.checkpoint_path(start))
        if not files.model.is_dir():
            raise CheckpointError(
                f"{path} replays onto the full checkpoint {files.root}, which is missing or incomplete"
            )
        has_master = run_dir.read_checkpoint_state(files.root).get("has_master")
        anchor = Anchor(start, str(files.model), str(files.master) if has_master else None)
    history = state["strategy"]["history"][start:updates]
    pairs = [[(int(s), float(c)) for s, c in record["update"]] for record in history]
    return Restore(anchor, pairs, state["fingerprint"])


def prune(run_dir: RunDir, keep_full: int) -> list[int]:
    """Applies the retention policy (module docstring) to `run_dir`'s checkpoints; `keep_full` 0 keeps
    every checkpoint. Returns the updates of the checkpoints deleted."""
    if keep_full <= 0:
        return []
    kinds = {updates: run_dir.read_checkpoint_state(path) for updates, path in run_dir.list_checkpoints()}
    full = [u for u, state in kinds.items() if state.get("kind", FULL) == FULL]
    kept_full = set(full[-keep_full:])
    doomed = [
        u
        for u, state in kinds.items()
        if (u not in kept_full if state.get("kind", FULL) == FULL else state["anchor"] not in kept_full | {0})
    ]
    for updates in doomed:
        run_dir.remove_checkpoint(updates)
    return doomed
