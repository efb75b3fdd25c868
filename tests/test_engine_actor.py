"""The engine actor's methods for the driver, in-process on a real tiny model."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from engine.actor import EngineActor
from engine.torch_weights import TorchWeights
from shared.countdown import CountdownProblem, make_prompt


def problems() -> list[CountdownProblem]:
    rows = [((44, 19, 35), "98"), ((1, 2, 3), "6"), ((41, 36, 8, 4), "17")]
    return [
        CountdownProblem(id=i, prompt=make_prompt(n, t), numbers=n, target=t) for i, (n, t) in enumerate(rows)
    ]


def test_evaluate_update_fingerprint_and_save(tmp_path):
    engine = EngineActor(engine_id=3)
    model_dir = engine.make_tiny_model(str(tmp_path / "model"), seed=1)
    loaded = engine.load_model(model_dir)
    assert loaded["parameters"] > 0 and engine.fingerprint() == loaded["fingerprint"]

    base = engine.evaluate(problems(), max_new_tokens=6, num_samples=2)
    assert len(base["rewards"]) == 3 and all(0.0 <= r <= 1.1 for r in base["rewards"])
    assert [s["id"] for s in base["samples"]] == [0, 1] and 0 < base["tokens"] <= 18

    perturbed = engine.evaluate(problems(), max_new_tokens=6, seed=123, sigma=0.05)
    assert engine.fingerprint() == loaded["fingerprint"], "evaluate must restore the weights"
    assert perturbed["seconds"]["perturb"] > 0 and perturbed["seconds"]["restore"] > 0

    updated = engine.apply_update([(123, 1e-3)])
    assert updated != loaded["fingerprint"] and updated == engine.fingerprint()

    saved = engine.save(str(tmp_path / "checkpoint"))
    engine.save(saved)  # overwriting an existing checkpoint is atomic too
    reloaded = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True, dtype=torch.float32)
    assert TorchWeights(reloaded).fingerprint() == updated
    assert not list(tmp_path.glob(".checkpoint.*")), "no temporary directories left behind"


def test_restore_modes_master_and_device_give_the_same_members(tmp_path):
    """restore_mode "device" (the GPU option) scores members and applies updates exactly as "master"."""
    engines = [EngineActor(engine_id=i) for i in range(2)]
    model_dir = engines[0].make_tiny_model(str(tmp_path / "model"), seed=1)
    results = []
    for engine, mode in zip(engines, ("master", "device"), strict=True):
        loaded = engine.load_model(model_dir, restore_mode=mode, deterministic=True)
        member = engine.evaluate(problems(), max_new_tokens=6, seed=7, sigma=0.05)
        assert engine.fingerprint() == loaded["fingerprint"]
        results.append((member["rewards"], member["samples"], engine.apply_update([(7, 1e-3)])))
    assert results[0] == results[1]
