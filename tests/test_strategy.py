"""The ES strategy: seeds, shaping and update coefficients equal their closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from driver.strategy import Strategy, StrategyConfig, shape
from shared.seeds import member_seed, noise_seed


def test_paper_defaults():
    config = StrategyConfig()
    assert (config.population, config.sigma, config.alpha, config.shaping, config.antithetic) == (
        30,
        0.001,
        0.0005,
        "zscore",
        False,
    )


def test_ask_is_reproducible_and_distinct():
    a, b = Strategy(root_seed=5), Strategy(root_seed=5)
    assert a.ask(3) == b.ask(3)
    assert a.ask(3) != a.ask(4) and a.ask(3) != Strategy(root_seed=6).ask(3)
    seeds = [m.seed for m in a.ask(0)]
    assert len(set(seeds)) == 30 and seeds[7] == member_seed(5, 0, 7)
    assert all(m.sign == 1 for m in a.ask(0))


def test_zscore_shaping_closed_form():
    r = np.array([1.0, 2.0, 3.0, 6.0])
    mean, std = 3.0, np.sqrt(((r - 3.0) ** 2).mean())
    np.testing.assert_allclose(shape(r, "zscore"), (r - mean) / (std + 1e-8))
    assert np.all(shape(np.full(5, 0.7), "zscore") == 0.0)  # no signal, no update
    # ... exactly, also where the mean rounds (0.1 * 3 / 3 != 0.1 in binary: -1.4e-9 each before).
    assert np.all(shape(np.full(3, 0.1), "zscore") == 0.0)


def test_centered_rank_shaping_closed_form():
    np.testing.assert_allclose(shape(np.array([10.0, -1.0, 3.0]), "centered_rank"), [0.5, -0.5, 0.0])


def test_centered_rank_gives_tied_rewards_their_average_rank():
    """Before: ties got distinct ranks in index order, so a full tie gave a full-size update of pure noise
    ([-0.5, -0.17, 0.17, 0.5] for four equal rewards)."""
    assert np.all(shape(np.full(4, 0.01), "centered_rank") == 0.0)
    np.testing.assert_allclose(shape(np.array([1.0, 0.0, 1.0, 2.0]), "centered_rank"), [0.0, -0.5, 0.0, 0.5])
    strategy = Strategy(StrategyConfig(population=4, shaping="centered_rank"), root_seed=3)
    assert all(c == 0.0 for _, c in strategy.tell([0.0, 0.0, 0.0, 0.0]))


def test_tell_coefficients_are_alpha_over_n_times_z():
    strategy = Strategy(StrategyConfig(population=4, alpha=0.01), root_seed=1)
    members = strategy.ask()
    rewards = np.array([0.0, 1.0, 0.5, 0.5])
    update = strategy.tell(rewards)
    z = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    assert [s for s, _ in update] == [m.seed for m in members]
    np.testing.assert_allclose([c for _, c in update], 0.01 / 4 * z)
    assert strategy.iteration == 1 and strategy.ask()[0].seed == member_seed(1, 1, 0)


def test_antithetic_pairs_share_seeds_and_cancel():
    strategy = Strategy(StrategyConfig(population=4, antithetic=True, alpha=0.02), root_seed=2)
    members = strategy.ask()
    assert [m.sign for m in members] == [1, -1, 1, -1]
    assert members[0].seed == members[1].seed != members[2].seed == members[3].seed
    # Equal rewards within a pair cancel: that direction gets no update.
    update = dict(strategy.tell([1.0, 1.0, 3.0, 0.0]))
    r = np.array([1.0, 1.0, 3.0, 0.0])
    z = (r - r.mean()) / (r.std() + 1e-8)
    assert update[members[0].seed] == pytest.approx(0.0, abs=1e-15)
    assert update[members[2].seed] == pytest.approx(0.02 / 4 * (z[2] - z[3]))


def test_state_round_trips_through_json():
    strategy = Strategy(StrategyConfig(population=6, shaping="centered_rank"), root_seed=9)
    strategy.tell(np.arange(6.0))
    restored = Strategy.from_state_dict(json.loads(json.dumps(strategy.state_dict())))
    assert restored == strategy and restored.ask() == strategy.ask()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"population": 0}, "population"),
        ({"population": 3, "antithetic": True}, "even"),
        ({"sigma": 0.0}, "sigma"),
        ({"alpha": -1.0}, "alpha"),
        ({"shaping": "rank"}, "shaping"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StrategyConfig(**kwargs)


def test_tell_rejects_bad_rewards():
    strategy = Strategy(StrategyConfig(population=3))
    with pytest.raises(ValueError, match="expected 3 rewards"):
        strategy.tell([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        strategy.tell([1.0, float("nan"), 2.0])


def test_noise_seeds_differ_per_parameter_name():
    assert noise_seed(7, "layers.0.weight") != noise_seed(7, "layers.1.weight")
    assert noise_seed(7, "layers.0.weight") == noise_seed(7, "layers.0.weight") < 2**63
