"""What a checkpoint holds, which checkpoints are kept, and how one is loaded by replaying updates.

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

Loading a compact checkpoint loads its anchor and replays the updates since onto it (`load_plan`).
The engines regenerate every update's noise from its seeds, exactly as during the run, so the replayed
weights are bit-identical to the run's; the caller checks that against the recorded fingerprint. Replay
is refused, naming why, when the noise version, the device type or the base model's files differ.

Retention (`prune`, --keep-full N) keeps the newest N full checkpoints and every compact checkpoint
whose anchor is kept or is the base model, so it never deletes the newest full checkpoint or anything a
kept compact checkpoint needs.

Verification (`verify`, `resume_point`): copies from buckets and disks that fill up leave partial files.
A full checkpoint records the sha256 and size of each of its files in es_state.json ("files"), so a
truncated or missing shard is found before any engine starts; `--resume` takes the newest checkpoint that
verifies, says which newer ones it skipped and why, and never deletes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.manifest import sha256_file
from driver.strategy import Strategy
from shared.protocol import Perturbation
from shared.run_layout import COMPACT, ES_STATE, EVAL, FULL, RunDir, checkpoint_files
from shared.seeds import NOISE_VERSION

# The perturbation record of full-rank members, and of checkpoints written before low-rank ones existed.
FULL_NOISE: dict[str, Any] = Perturbation().record()
# es_state.json keys every checkpoint has, and those a compact one adds.
REQUIRED = ("updates", "fingerprint", "strategy", "problems_digest")
REQUIRED_COMPACT = ("anchor", "base_model", "noise")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the run stops; earlier checkpoints are intact) or cannot be
    loaded (the message names the checkpoint and why)."""


@dataclass(frozen=True)
class Anchor:
    """Weights an engine can be loaded from: a model directory (plus fp32 master) after `updates`."""

    updates: int
    model_dir: str
    master_path: str | None = None


@dataclass(frozen=True)
class LoadPlan:
    """How to bring engines to a checkpoint's weights: load `anchor`, then apply `updates` (one list of
    (seed, coefficient) pairs per ES update, oldest first); the weights then have `fingerprint` (None: a
    plain model directory, whose fingerprint is whatever it loads as)."""

    anchor: Anchor
    updates: list[list[tuple[int, float]]]
    fingerprint: str | None


def is_full(state: dict[str, Any]) -> bool:
    """True for the es_state.json of a full checkpoint (also one written before compact checkpoints
    existed, without "kind")."""
    return state.get("kind", FULL) == FULL


def _files(root: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every file under `root`, in path order, without hidden names and
    the top-level names in `skip`."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if not any(part.startswith(".") for part in relative.parts) and relative.as_posix() not in skip:
            found.append((relative.as_posix(), path))
    return found


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
    for relative, path in _files(root):
        digest.update(f"{relative}|{path.stat().st_size}|".encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def weight_files(checkpoint: str | Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size" (bytes), "sha256" (hex)}} of the files engine 0 wrote into a checkpoint
    directory (model/ and the master; not es_state.json or eval.json): what es_state.json records as
    "files" and `verify` checks.

    Raises:
        OSError: a file is unreadable.
    """
    return {
        relative: {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for relative, path in _files(Path(checkpoint), skip=(ES_STATE, EVAL))
    }


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
    files: dict[str, dict[str, Any]] | None = None,
    perturbation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The es_state.json of a checkpoint after `updates` updates (see the module docstring). `anchor` is
    the updates of the full checkpoint (0: base model) a compact one replays onto; for a full one,
    `updates` itself. `base_model` is {"path", "digest"}; `files` (full checkpoints) is `weight_files`;
    `perturbation` is `shared.protocol.Perturbation.record()` (default: full)."""
    return {
        "kind": kind,
        "updates": updates,
        "anchor": anchor,
        "fingerprint": fingerprint,
        "strategy": strategy,
        "problems_digest": problems_digest,
        "has_master": has_master,
        "base_model": base_model,
        "noise": {"version": NOISE_VERSION, "device": device, "perturbation": perturbation or FULL_NOISE},
        **({"files": files} if files is not None else {}),
    }


def _replay_refusal(state: dict[str, Any], device: str, perturbation: dict[str, Any]) -> str | None:
    """Why the updates of a compact checkpoint cannot be replayed here, or None."""
    noise = state.get("noise") or {}
    recorded = noise.get("perturbation", FULL_NOISE)  # written before low-rank members existed: full
    if recorded != perturbation:
        return (
            f"its updates are of perturbation {recorded}, this run's engines apply {perturbation}: "
            "they would replay to other weights"
        )
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
    return _base_refusal(state)


def _base_refusal(state: dict[str, Any]) -> str | None:
    """Why the base model a compact checkpoint replays onto is not the one it was trained from, or None."""
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


def load_plan(
    run_dir: RunDir,
    updates: int,
    state: dict[str, Any],
    device: str,
    perturbation: dict[str, Any] | None = None,
) -> LoadPlan:
    """How to load the checkpoint after `updates` updates of `run_dir`, whose es_state.json is `state`.

    A full checkpoint (or one written before compact checkpoints existed, without "kind") loads its model
    directory and master; a compact one loads its anchor and replays `state`'s update history since it.

    Args:
        device: the device type of the engines that will replay ("cpu", "cuda").
        perturbation: how they apply updates (`shared.protocol.Perturbation.record()`; default full).

    Raises:
        CheckpointError: a compact checkpoint's noise version, device type, perturbation or base model
            differ, or its anchor checkpoint is missing.
    """
    path = run_dir.checkpoint_path(updates)
    if is_full(state):
        files = checkpoint_files(path)
        master = str(files.master) if state.get("has_master") else None
        return LoadPlan(Anchor(updates, str(files.model), master), [], state["fingerprint"])
    if state["kind"] != COMPACT:
        raise CheckpointError(f"{checkpoint_files(path).es_state}: unknown checkpoint kind {state['kind']!r}")
    why = _replay_refusal(state, device, perturbation or FULL_NOISE)
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
    return LoadPlan(anchor, pairs, state["fingerprint"])


def prune(run_dir: RunDir, keep_full: int) -> list[int]:
    """Applies the retention policy (module docstring) to `run_dir`'s checkpoints; `keep_full` 0 keeps
    every checkpoint. Returns the updates of the checkpoints deleted."""
    if keep_full <= 0:
        return []
    kinds = {}
    for updates, path in run_dir.list_checkpoints():
        try:
            kinds[updates] = verify(path, run_dir, read_bytes=False)
        except CheckpointError:
            continue  # a damaged checkpoint is never deleted, nor counted as kept
    full = [u for u, state in kinds.items() if is_full(state)]
    kept_full = set(full[-keep_full:])
    doomed = [
        u
        for u, state in kinds.items()
        if (u not in kept_full if is_full(state) else state["anchor"] not in kept_full | {0})
    ]
    for updates in doomed:
        run_dir.remove_checkpoint(updates)
    return doomed


def _damage(files: Any, root: Path, state: dict[str, Any], read_bytes: bool) -> str | None:
    """What is wrong with a full checkpoint's weight files, or None. `files` is its recorded
    `weight_files` (None for checkpoints written before they were recorded: then only their presence is
    checked); without `read_bytes` only their presence and sizes are."""
    model = checkpoint_files(root).model
    if files is None:
        if not (model / "config.json").is_file():
            return f"{model / 'config.json'} is missing"
        if not any(model.glob("*.safetensors")):
            return f"{model} holds no *.safetensors file"
        if state.get("has_master") and not checkpoint_files(root).master.is_file():
            return f"{checkpoint_files(root).master} is missing"
        return None
    if not isinstance(files, dict) or not files:
        return f'{root / ES_STATE}: "files" is not a table of the weight files'
    for relative, meta in sorted(files.items()):
        path = root / relative
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != meta.get("size"):
            return f"{path} has {size} bytes, recorded {meta.get('size')} (truncated or replaced)"
        if read_bytes and sha256_file(path) != meta.get("sha256"):
            return f"{path}: sha256 differs from the recorded one (damaged or replaced)"
    return None


def verify(path: str | Path, run_dir: RunDir | None = None, read_bytes: bool = True) -> dict[str, Any]:
    """Checks that the checkpoint directory `path` can be loaded; returns its es_state.json.

    es_state.json must parse and be complete (its updates those of the directory's name, a strategy state
    with that many updates of history). A full checkpoint's model files and master must match the sizes
    and sha256 it recorded (sizes only without `read_bytes`: what retention checks, cheaply, after every
    checkpoint); a compact one's anchor must be a full checkpoint of `run_dir` that verifies, or the base
    model with the recorded digest.

    Raises:
        CheckpointError: the message names the file and what is wrong with it.
    """
    root = Path(path)
    es_file = checkpoint_files(root).es_state
    try:
        state = json.loads(es_file.read_text())
    except OSError as e:
        raise CheckpointError(f"{es_file}: unreadable: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{es_file}: not valid JSON (truncated?): {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{es_file}: expected a JSON object, found {type(state).__name__}")
    kind = state.get("kind", FULL)
    if kind not in (FULL, COMPACT):
        raise CheckpointError(f'{es_file}: "kind" is {kind!r}, expected {FULL!r} or {COMPACT!r}')
    missing = [key for key in REQUIRED + (REQUIRED_COMPACT if kind == COMPACT else ()) if key not in state]
    if missing:
        raise CheckpointError(f"{es_file}: incomplete, no {', '.join(map(repr, missing))}")
    updates = state["updates"]
    named = run_dir.checkpoint_updates(root) if run_dir is not None else None
    if isinstance(updates, bool) or not isinstance(updates, int) or (named is not None and updates != named):
        raise CheckpointError(f'{es_file}: "updates" is {updates!r}, expected {named} (the directory name)')
    try:
        strategy = Strategy.from_state_dict(state["strategy"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f'{es_file}: "strategy" is not a complete strategy state ({e!r})') from e
    if strategy.iteration != updates or len(strategy.history) < updates:
        raise CheckpointError(
            f'{es_file}: "strategy" holds {len(strategy.history)} updates of history at iteration '
            f"{strategy.iteration}, expected {updates}"
        )
    for number, record in enumerate(strategy.history[:updates]):
        try:
            [(int(seed), float(coefficient)) for seed, coefficient in record["update"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f'{es_file}: "strategy" history entry {number} has no list of (seed, coefficient) '
                f'pairs under "update" ({e!r})'
            ) from e
    if kind == FULL:
        why = _damage(state.get("files"), root, state, read_bytes)
    elif state["anchor"] == 0:
        why = _base_refusal(state)
    elif run_dir is None:
        why = f"it replays onto checkpoint {state['anchor']} of its run directory, which is unknown here"
    else:
        anchor = run_dir.checkpoint_path(int(state["anchor"]))
        try:
            anchor_state = verify(anchor, run_dir, read_bytes)
        except CheckpointError as e:
            why = f"its anchor {anchor.name} does not verify: {e}"
        else:
            why = None if is_full(anchor_state) else f"its anchor {anchor.name} is not a full checkpoint"
    if why is not None:
        raise CheckpointError(f"{root}: {why}")
    return state


@dataclass(frozen=True)
class ResumePoint:
    """Where `--resume` goes on: the newest checkpoint that verifies (`updates`, `path`, its es_state.json
    `state`) and the newer ones it skipped, each (path, why)."""

    updates: int
    path: Path
    state: dict[str, Any]
    skipped: list[tuple[Path, str]]


def resume_point(run_dir: RunDir, read_bytes: bool = True) -> ResumePoint | None:
    """The newest checkpoint of `run_dir` that verifies (`verify`; file sizes only without `read_bytes`),
    or None when it has no checkpoint.

    Raises:
        CheckpointError: it has checkpoints and none verifies (each named with why).
    """
    skipped = []
    for updates, path in reversed(run_dir.list_checkpoints()):
        try:
            return ResumePoint(updates, path, verify(path, run_dir, read_bytes), skipped)
        except CheckpointError as e:
            skipped.append((path, str(e)))
    if skipped:
        raise CheckpointError(
            f"no checkpoint of {run_dir.root} verifies:\n"
            + "\n".join(f"  {why}" for _, why in skipped)
            + "\nRepair or move them aside (to start the run over, move aside its whole directory)"
        )
    return None
