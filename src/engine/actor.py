"""The engine that `shared.engine_host.EngineHost` hosts inside each engine actor: `shared.protocol.Engine`.

It runs in the engine PEX's environment (vLLM, JAX, libtpu, torch, transformers). The driver reaches it
only through the host's Ray actor methods, sending `shared.protocol` requests (seeds, scalars,
the problem records of a `shared.tasks.Task`) and receiving its results. The model and its weight
operations live in one backend (`engine.backend.Backend`): transformers or vLLM.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.backend import Backend
from engine.machine import machine_report
from shared.protocol import (
    REPORTED_MODULES,
    CheckpointResult,
    LoadRequest,
    LoadResult,
    RolloutRequest,
    RolloutResult,
    RolloutSeconds,
    Sample,
)
from shared.run_layout import atomic_dir, checkpoint_files
from shared.tasks import load_task


def open_backend(request: LoadRequest) -> Backend:
    """The backend `request.backend` names, with `request`'s model loaded (and its master, if any).

    Raises:
        OSError: the model directory lacks files. ValueError: an unsupported setting or master.
    """
    if request.backend == "vllm":
        from engine.vllm_backend import VLLMBackend

        return VLLMBackend.from_request(request)
    from engine.hf_backend import TransformersBackend

    return TransformersBackend(request)


def _quiet_transformers() -> None:
    """Turns off transformers' progress bars (weights loading/saving), which Ray would forward to the
    driver's terminal as noise between its own progress lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class EngineActor:
    """One rollout engine: a model, its in-place ES weight operations, and the tasks' scoring.

    Args:
        engine_id: index of this engine in the pool (0-based), used in logs and reports.
        backend_factory: opens the backend of a `LoadRequest` (default `open_backend`;
            tests pass one that builds vLLM over a stand-in).
    """

    def __init__(
        self, engine_id: int = 0, backend_factory: Callable[[LoadRequest], Backend] = open_backend
    ) -> None:
        self.engine_id = engine_id
        self.backend: Backend | None = None
        self._backend_factory = backend_factory
        self._update_seconds = {"update": 0.0, "fingerprint": 0.0}

    def module_versions(self, modules: tuple[str, ...] = REPORTED_MODULES) -> dict[str, str | None]:
        """Imports each module and returns module -> `__version__` as a plain str (None where it has none).

        Raises:
            ImportError: a module is missing, i.e. the engine PEX is not the engine resolve.
        """
        versions = {}
        for name in modules:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", None)
            # str(): torch's __version__ is a str subclass from torch, which the driver cannot unpickle.
            versions[name] = None if version is None else str(version)
        return versions

    def ping(self) -> dict[str, Any]:
        """Returns {"engine_id": int}; a cheap liveness probe."""
        return {"engine_id": self.engine_id}

    def make_tiny_model(self, out_dir: str, seed: int = 0, warm_start_steps: int = 0) -> str:
        """Creates the tiny model (`engine.tiny_model.make_tiny_model`) at `out_dir` unless it already
        holds one; returns the path. Written to a temporary sibling and renamed, so a crash leaves none."""
        from engine.tiny_model import make_tiny_model

        _quiet_transformers()
        out = Path(out_dir)
        if not (out / "config.json").exists():
            with atomic_dir(out) as tmp:
                make_tiny_model(tmp, seed=seed, warm_start_steps=warm_start_steps)
        return str(out)

    def import_model(self, name: str, out_dir: str, dtype: str = "bfloat16") -> str:
        """Imports a packaged pretrained model (`shared.protocol.PACKAGED_MODELS`, e.g.
        "smollm2-135m-instruct") as a Hugging Face directory at `out_dir` unless it already holds one;
        returns the path.

        Raises:
            KeyError: unknown name. FileNotFoundError: this engine environment does not ship the model
            (only the engine-cpu PEX does).
        """
        from engine.gguf_import import import_gguf, packaged_gguf

        _quiet_transformers()
        return str(import_gguf(packaged_gguf(name), out_dir, dtype=dtype))

    def load_model(self, request: LoadRequest) -> LoadResult:
        """Loads `request`'s model into a new backend, closing the previous one first (one vLLM engine
        per actor: its processes are freed before the next starts). See `shared.protocol.Engine`.

        Raises:
            OSError: the directory lacks model or tokenizer files. ValueError: the master does not match,
            or an unsupported setting.
        """
        _quiet_transformers()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.backend = self._backend_factory(request)
        return LoadResult(
            fingerprint=self.backend.fingerprint(),
            parameters=self.backend.parameters,
            machine=machine_report(request.device),
        )

    def _model(self) -> Backend:
        if self.backend is None:
            raise RuntimeError(f"engine {self.engine_id}: no model loaded; call load_model first")
        return self.backend

    @staticmethod
    def _prompts(backend: Backend, task: Any, problems: list[Any], request: RolloutRequest) -> list[str]:
        """The prompts of `problems`, through the chat template if `request.chat_template`."""
        prompts = [task.prompt(p) for p in problems]
        return backend.chat_prompts(prompts) if request.chat_template else prompts

    @staticmethod
    def _scored(
        task: Any,
        problems: list[Any],
        completions: list[Any],
        request: RolloutRequest,
        perturb_s: float,
        generate_s: float,
        restore_s: float,
    ) -> RolloutResult:
        """The `RolloutResult` of `completions` (one per problem), scored with the task's reward."""
        start = time.perf_counter()
        scored = [task.reward(p, c.text, c.finished) for p, c in zip(problems, completions, strict=True)]
        score_s = time.perf_counter() - start
        return RolloutResult(
            rewards=[s.total for s in scored],
            components={name: [s.components[name] for s in scored] for name in task.components},
            tokens=sum(c.num_tokens for c in completions),
            samples=[
                Sample(id=p.id, completion=c.text, reward=s.total)
                for p, c, s in list(zip(problems, completions, scored, strict=True))[: request.num_samples]
            ],
            seconds=RolloutSeconds(perturb=perturb_s, generate=generate_s, restore=restore_s, score=score_s),
        )

    def evaluate(self, problems: list[Any], request: RolloutRequest) -> RolloutResult:
        """Scores the model on `problems` of `request.task`, perturbed by `request.member` if given.

        Renders the prompts (through the chat template if `request.chat_template`), perturbs in place,
        generates greedily, restores the weights (also when generation fails), and scores each completion
        with the task's reward.

        Raises:
            shared.tasks.TaskError: the task cannot be loaded in this engine PEX.
            ValueError: the request carries `members` (`evaluate_members` takes those).
        """
        if request.members:
            raise ValueError("a request with members goes to evaluate_members")
        backend = self._model()
        task = load_task(request.task)
        prompts = self._prompts(backend, task, problems, request)
        member = request.member
        start = time.perf_counter()
        if member is not None:
            backend.perturb(member.seed, member.sigma, member.sign)
        perturb_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            completions = backend.generate(prompts, request.max_new_tokens, request.batch_size)
            generate_s = time.perf_counter() - start
        finally:
            start = time.perf_counter()
            backend.restore()
            restore_s = time.perf_counter() - start
        return self._scored(task, problems, completions, request, perturb_s, generate_s, restore_s)

    def evaluate_members(self, problems: list[Any], request: RolloutRequest) -> list[RolloutResult]:
        """Scores each of `request.members` on `problems`; one result per member, in order.

        A backend with member slots (`engine.vllm_backend.VLLMBackend` with LoRA member adapters)
        generates every member's completions in one batch, and each result's phase seconds are the batch's
        shared evenly (so that they still add up to the engine's time); any other backend scores the
        members one at a time with `evaluate`.

        Raises:
            as `evaluate`; ValueError: more members than the backend's slots.
        """
        backend = self._model()
        members = list(request.members)
        if not getattr(backend, "member_slots", 0):
            return [self.evaluate(problems, replace(request, members=(), member=m)) for m in members]
        task = load_task(request.task)
        prompts = self._prompts(backend, task, problems, request)
        start = time.perf_counter()
        per_member = backend.generate_members(prompts, members, request.max_new_tokens)
        generate_s = (time.perf_counter() - start) / max(len(members), 1)
        return [self._scored(task, problems, c, request, 0.0, generate_s, 0.0) for c in per_member]

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """Applies an ES update ((seed, coefficient) pairs); returns the new weights' fingerprint. The
        seconds of each part add up in `take_update_seconds()`."""
        backend = self._model()
        start = time.perf_counter()
        backend.update(pairs)
        updated = time.perf_counter()
        fingerprint = backend.fingerprint()
        self._update_seconds["update"] += updated - start
        self._update_seconds["fingerprint"] += time.perf_counter() - updated
        return fingerprint

    def take_update_seconds(self) -> dict[str, float]:
        """{"update": s, "fingerprint": s} spent in `apply_update` since the last call; resets them."""
        seconds, self._update_seconds = self._update_seconds, {"update": 0.0, "fingerprint": 0.0}
        return seconds

    def fingerprint(self) -> str:
        """SHA-256 of the current weights (see `engine.backend.Backend.fingerprint`)."""
        return self._model().fingerprint()

    def export_master(self) -> dict[str, Any]:
        """The fp32 master weights, name -> float32 numpy array (to resync another engine of the same
        backend): transformers parameter names, or with vLLM `VLLMBackend.master()` names."""
        return {name: t.float().numpy().copy() for name, t in self._model().master().items()}

    def import_master(self, master: dict[str, Any]) -> str:
        """Replaces the weights with `export_master()` output of another engine; returns the fingerprint.

        Raises:
            ValueError: the master does not match this model (names or shapes).
        """
        import torch

        backend = self._model()
        # torch.tensor copies: arrays from Ray's object store are read-only.
        return backend.load_master({name: torch.tensor(array) for name, array in master.items()})

    def save_checkpoint(self, checkpoint_dir: str) -> CheckpointResult:
        """Writes the model files of the checkpoint directory `checkpoint_dir`
        (`shared.run_layout.CheckpointFiles`: model/ and, where needed, the fp32 master)."""
        return self._model().save_checkpoint(checkpoint_files(checkpoint_dir))
