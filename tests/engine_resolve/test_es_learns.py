"""ES learns: on a tiny model on CPU, a short seeded run raises a reward on generated text, and a broken
update (wrong sign, or none) does not. Two rewards: a simple one on the first generated token, and the
conciseness task's (`shared.tasks.ConcisenessTask`, the paper's Sec. 4.3) on its generated questions."""

from __future__ import annotations

import collections
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from driver.strategy import Strategy, StrategyConfig
from engine.hf_backend import HFGenerator
from engine.lowrank import LowRankWeights
from engine.tiny_model import make_tiny_model
from engine.torch_weights import TorchWeights
from shared.tasks import load_task

ITERATIONS = 15
CONFIG = StrategyConfig(population=16, sigma=0.01, alpha=0.03)
PROMPTS = [
    f"{a} {op} {b}" for a, op, b in ((random.Random(i).randint(1, 99), "+-*/"[i % 4], i) for i in range(48))
]
CONCISENESS = load_task("conciseness")
# The conciseness task's reward on its generated questions, with references as long as a sentence ("The
# answer is 14"): the random tiny model's CONCISE_TOKENS-token replies are a few characters long, so the
# reward (minus the length difference) rises only as ES moves their length towards the references'.
# (With the one-word references, 2-token replies are already within ~1 character of them, and 8-token
# replies, ~6 characters off, did not get shorter in 15 iterations: measured when this test was written.)
QUESTIONS = [replace(q, answer=f"The answer is {q.answer}") for q in CONCISENESS.generate(24, seed=0)]
CONCISE_TOKENS = 4
CONCISE_GAIN = 2.0  # characters of the mean length difference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def first_token_reward(backend: HFGenerator):
    """The share of prompts whose greedy first generated token is the chosen token, the base model's
    second most frequent first token (so the base scores between 0 and 1)."""

    def first_tokens() -> list[int]:
        completions = backend.generate(PROMPTS, max_new_tokens=1, batch_size=len(PROMPTS))
        return [
            (backend.tokenizer(c.text, add_special_tokens=False)["input_ids"] or [-1])[0] for c in completions
        ]

    chosen = collections.Counter(first_tokens()).most_common(2)[1][0]
    return lambda: float(np.mean([t == chosen for t in first_tokens()]))


def conciseness_reward(backend: HFGenerator):
    """The conciseness task's mean reward over QUESTIONS: greedy, CONCISE_TOKENS new tokens at most."""

    def reward() -> float:
        completions = backend.generate([q.prompt for q in QUESTIONS], CONCISE_TOKENS, len(QUESTIONS))
        return float(
            np.mean(
                [
                    CONCISENESS.reward(q, c.text, c.finished).total
                    for q, c in zip(QUESTIONS, completions, strict=True)
                ]
            )
        )

    return reward


def run(
    model_dir, mode: str, make_reward=first_token_reward, make_weights=TorchWeights
) -> tuple[list[float], float]:
    """Runs ES with the reward `make_reward(backend)` returns, perturbing through `make_weights(model)`;
    returns (population mean reward per iteration, final unperturbed reward). `mode`: "right",
    "wrong-sign" (the update's negative) or "no-update"."""
    torch.manual_seed(0)
    backend = HFGenerator(model_dir)
    weights = make_weights(backend.model)
    reward = make_reward(backend)
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


@pytest.mark.parametrize("mode", ["right", "wrong-sign", "no-update"])
def test_es_raises_the_conciseness_reward_only_with_the_right_update(model_dir, mode):
    """The conciseness task's reward through the same loop: the right update shortens the tiny model's
    replies towards the answers' lengths; the negated update or none does not."""
    means, final = run(model_dir, mode, conciseness_reward)
    print(mode, "conciseness reward per iteration:", [round(m, 2) for m in means], "final:", round(final, 2))
    gained = np.mean(means[-3:]) >= means[0] + CONCISE_GAIN and final >= means[0] + CONCISE_GAIN
    assert gained == (mode == "right")


@pytest.mark.parametrize("mode", ["right", "wrong-sign"])
def test_es_raises_the_reward_with_low_rank_members_only_with_the_right_update(model_dir, mode):
    """`--perturbation lowrank` (rank 1, the attention and MLP matrices only; `engine.lowrank`) through
    the same loop: the right update raises the first-token reward as full-rank members do, the negated
    one does not."""
    means, final = run(model_dir, mode, make_weights=lambda model: LowRankWeights(model, rank=1))
    print(mode, "low-rank: population mean reward per iteration:", [round(m, 3) for m in means], final)
    raised = np.mean(means[-3:]) >= means[0] + 0.3 and final >= means[0] + 0.3
    assert raised == (mode == "right")
