"""ES learns: on a tiny model on CPU, a short seeded run raises a simple reward on generated text, and
a broken update (wrong sign, or none) does not."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import torch

from driver.strategy import Strategy, StrategyConfig
from engine.hf_backend import HFBackend
from engine.tiny_model import make_tiny_model
from engine.torch_weights import TorchWeights

ITERATIONS = 15
CONFIG = StrategyConfig(population=16, sigma=0.01, alpha=0.03)
PROMPTS = [
    f"{a} {op} {b}" for a, op, b in ((random.Random(i).randint(1, 99), "+-*/"[i % 4], i) for i in range(48))
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def run(model_dir, mode: str) -> tuple[list[float], float]:
    """Runs ES; returns (population mean reward per iteration, final unperturbed reward).

    Reward: the share of prompts whose greedy first generated token is the chosen token, the base
    model's second most frequent first token (so the base scores between 0 and 1).
    """
    torch.manual_seed(0)
    backend = HFBackend(model_dir)
    weights = TorchWeights(backend.model)

    def first_tokens() -> list[int]:
        completions = backend.generate(PROMPTS, max_new_tokens=1, batch_size=len(PROMPTS))
        return [
            (backend.tokenizer(c.text, add_special_tokens=False)["input_ids"] or [-1])[0] for c in completions
        ]

    chosen = collections.Counter(first_tokens()).most_common(2)[1][0]

    def reward() -> float:
        return float(np.mean([t == chosen for t in first_tokens()]))

    strategy = Strategy(CONFIG, root_seed=0)
    means = []
    for _ in range(ITERATIONS):
        rewards = []
        for member in strategy.ask():
            weights.perturb(member.seed, CONFIG.sigma, member.sign)
            rewards.append(reward())
            weights.restore()
        means.append(float(np.mean(rewards)))
        update = strategy.tell(rewards)
        if mode == "right":
            weights.apply_update(update)
        elif mode == "wrong-sign":
            weights.apply_update([(seed, -c) for seed, c in update])
    return means, reward()


def test_es_raises_the_reward(model_dir):
    means, final = run(model_dir, "right")
    print("population mean reward per iteration:", [round(m, 3) for m in means], "final:", final)
    assert np.mean(means[-3:]) >= means[0] + 0.3
    assert final >= means[0] + 0.3


@pytest.mark.parametrize("mode", ["wrong-sign", "no-update"])
def test_a_broken_update_does_not(model_dir, mode):
    means, final = run(model_dir, mode)
    print(mode, "population mean reward per iteration:", [round(m, 3) for m in means], "final:", final)
    assert np.mean(means[-3:]) < means[0] + 0.3 and final < means[0] + 0.3
