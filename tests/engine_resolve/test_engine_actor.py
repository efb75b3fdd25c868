"""The engine actor's methods for the driver, in-process on a real tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.actor import EngineActor
from engine.torch_weights import TorchWeights
from shared.countdown import CountdownProblem, make_prompt
from shared.protocol import LoadRequest, Member, RolloutRequest
from shared.tasks import ConcisenessTask, Task, TaskReward


def problems() -> list[CountdownProblem]:
    rows = [((44, 19, 35), "98"), ((1, 2, 3), "6"), ((41, 36, 8, 4), "17")]
    return [
        CountdownProblem(id=i, prompt=make_prompt(n, t), numbers=n, target=t) for i, (n, t) in enumerate(rows)
    ]


def test_evaluate_update_fingerprint_and_save(tmp_path):
    engine = EngineActor(engine_id=3)
    model_dir = engine.make_tiny_model(str(tmp_path / "model"), seed=1)
    loaded = engine.load_model(LoadRequest(model_dir))
    assert loaded.parameters > 0 and engine.fingerprint() == loaded.fingerprint

    base = engine.evaluate(problems(), RolloutRequest(max_new_tokens=6, num_samples=2))
    assert len(base.rewards) == 3 and all(0.0 <= r <= 1.1 for r in base.rewards)
    assert [s.id for s in base.samples] == [0, 1] and 0 < base.tokens <= 18

    perturbed = engine.evaluate(
        problems(), RolloutRequest(max_new_tokens=6, member=Member(seed=123, sigma=0.05))
    )
    assert engine.fingerprint() == loaded.fingerprint, "evaluate must restore the weights"
    assert perturbed.seconds.perturb > 0 and perturbed.seconds.restore > 0

    updated = engine.apply_update([(123, 1e-3)])
    assert updated != loaded.fingerprint and updated == engine.fingerprint()

    saved = engine.save_checkpoint(str(tmp_path / "checkpoint"))
    assert engine.save_checkpoint(str(tmp_path / "checkpoint")) == saved  # overwriting is atomic too
    assert saved.master is None  # float32: the model holds the exact weights
    reloaded = AutoModelForCausalLM.from_pretrained(saved.model, local_files_only=True, dtype=torch.float32)
    assert TorchWeights(reloaded).fingerprint() == updated
    leftovers = [p for p in (tmp_path / "checkpoint").iterdir() if p.name.startswith(".")]
    assert not leftovers, "no temporary directories left behind"


def test_restore_modes_master_and_device_give_the_same_members(tmp_path):
    """restore_mode "device" (the GPU option) scores members and applies updates exactly as "master"."""
    engines = [EngineActor(engine_id=i) for i in range(2)]
    model_dir = engines[0].make_tiny_model(str(tmp_path / "model"), seed=1)
    results = []
    for engine, mode in zip(engines, ("master", "device"), strict=True):
        loaded = engine.load_model(LoadRequest(model_dir, restore_mode=mode, deterministic=True))
        member = engine.evaluate(
            problems(), RolloutRequest(max_new_tokens=6, member=Member(seed=7, sigma=0.05))
        )
        assert engine.fingerprint() == loaded.fingerprint
        results.append((member.rewards, member.samples, engine.apply_update([(7, 1e-3)])))
    assert results[0] == results[1]


class CountDigits(Task):
    """A user task defined in a test module: the reward is the number of digits in the completion."""

    name = "count-digits"
    components = ("digits", "any_digit")
    accuracy = "any_digit"

    def reward(self, problem, completion, finished):
        digits = float(sum(ch.isdigit() for ch in completion))
        return TaskReward(total=digits, components={"digits": digits, "any_digit": float(digits > 0)})


def test_tasks_through_the_engine(tmp_path):
    """A user task (by class path) and conciseness run through the engine: the rewards are the task's own
    function of the returned completions, the components are reported per problem, and a perturbed
    member changes them while the weights come back exactly."""
    engine = EngineActor()
    model_dir = engine.make_tiny_model(str(tmp_path / "model"), seed=1)
    loaded = engine.load_model(LoadRequest(model_dir))
    user = RolloutRequest(
        max_new_tokens=8, task="engine_resolve.test_engine_actor:CountDigits", num_samples=3
    )
    result = engine.evaluate(problems(), user)
    assert set(result.components) == {"digits", "any_digit"}
    assert result.rewards == [float(sum(ch.isdigit() for ch in s.completion)) for s in result.samples]
    assert result.components["digits"] == result.rewards

    questions = ConcisenessTask().generate(6, seed=0)
    request = RolloutRequest(max_new_tokens=12, task="conciseness", num_samples=6)
    base = engine.evaluate(questions, request)
    assert base.rewards == [
        -abs(len(s.completion.strip()) - len(q.answer)) for q, s in zip(questions, base.samples, strict=True)
    ]
    assert base.components["length_diff"] == [-r for r in base.rewards]
    perturbed = engine.evaluate(
        questions,
        RolloutRequest(
            max_new_tokens=12, task="conciseness", member=Member(seed=5, sigma=0.05), num_samples=6
        ),
    )
    # sigma 0.05 is 2.5x the tiny model's weight scale (init std 0.02): some greedy completion changes on
    # any CPU's kernels (a smaller sigma may flip none on one CPU kind and some on another).
    assert [s.completion for s in perturbed.samples] != [s.completion for s in base.samples]
    assert engine.fingerprint() == loaded.fingerprint
    # The tiny model's tokenizer has no chat template: a clear error, not a silent raw prompt.
    with pytest.raises(ValueError, match="no chat template; run with --no-chat-template"):
        engine.evaluate(questions, RolloutRequest(max_new_tokens=4, task="conciseness", chat_template=True))
