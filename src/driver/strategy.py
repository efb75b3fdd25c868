"""The ES strategy on the driver: population seeds out (`ask`), rewards in (`tell`), update as seeds.

Method: Qiu et al. 2025, "Evolution Strategies at Scale" (Alg. 1). Each member n perturbs the weights
in place as theta + sigma * s_n * eps_n, where eps_n ~ N(0, I) is regenerated from the member's seed
(`shared.seeds`) and s_n = +1 (or -1 for the mirrored half of an antithetic pair); rewards are shaped
(z-score by default) and the update is

    theta <- theta + (alpha / N) * sum_n z_n * s_n * eps_n          (no 1/sigma, as in the paper)

so `tell` returns it as (seed, coefficient) pairs with coefficient = (alpha / N) * sum of z_n * s_n over
the members that share the seed. Paper defaults: N = 30, sigma = 0.001, alpha = 0.0005, z-score
shaping, no antithetic sampling. The API follows evosax's ask/tell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared.seeds import member_seed

SHAPINGS = ("zscore", "centered_rank")


@dataclass(frozen=True)
class Candidate:
    """One population member as `Strategy.ask` draws it: perturb with `sign * sigma * eps(seed)` (the
    engines receive it as a `shared.protocol.Member`)."""

    index: int
    seed: int
    sign: int = 1


@dataclass(frozen=True)
class StrategyConfig:
    """ES hyper-parameters (defaults: the paper's).

    Attributes:
        population: N, members per iteration (even when antithetic).
        sigma: perturbation scale (weights units).
        alpha: learning rate of the update `(alpha / N) * sum z_n eps_n`.
        shaping: "zscore" ((r - mean) / (std + 1e-8), population std) or "centered_rank" (ranks mapped
            to [-0.5, 0.5], Salimans et al. 2017).
        antithetic: mirrored pairs (seed, +1) and (seed, -1).
    """

    population: int = 30
    sigma: float = 0.001
    alpha: float = 0.0005
    shaping: str = "zscore"
    antithetic: bool = False

    def __post_init__(self) -> None:
        if self.population < 1:
            raise ValueError(f"population must be >= 1, got {self.population}")
        if self.antithetic and self.population % 2:
            raise ValueError(f"population must be even with antithetic sampling, got {self.population}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}, got {self.shaping!r}")


def shape(rewards: np.ndarray, method: str) -> np.ndarray:
    """Fitness shaping of a population's rewards (float64 array of shape (N,)) -> shaped (N,) float64.

    zscore: (r - mean) / (std + 1e-8) with the population std (ddof=0), as the paper's z-scoring; all
        zeros when every reward is equal (exactly: float rounding in the mean would otherwise leave
        residues of ~1e-10 that move the weights by an amount that depends on the CPU's arithmetic).
    centered_rank: rank / (N - 1) - 0.5 (Salimans et al. 2017, Sec. 2.2), tied rewards getting their
        average rank, so that members that tie get the same weight and a full tie gives all zeros; all
        zeros for N == 1.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if method == "zscore":
        if r.size and r.min() == r.max():
            return np.zeros(r.size)
        return (r - r.mean()) / (r.std() + 1e-8)
    if method == "centered_rank":
        if r.size == 1:
            return np.zeros(1)
        ranks = np.empty(r.size, dtype=np.float64)
        ranks[np.argsort(r, kind="stable")] = np.arange(r.size)
        _, tie_group = np.unique(r, return_inverse=True)
        average = np.bincount(tie_group, weights=ranks) / np.bincount(tie_group)
        return average[tie_group] / (r.size - 1) - 0.5
    raise ValueError(f"unknown shaping {method!r}; expected one of {SHAPINGS}")


@dataclass
class Strategy:
    """Ask/tell ES strategy. Deterministic in (root_seed, iteration): the same run asks the same seeds.

    Attributes:
        config: hyper-parameters.
        root_seed: the run's root seed.
        iteration: the next iteration to `tell` (advanced by `tell`).
        history: per told iteration, {"iteration", "update": [[seed, coefficient], ...], "reward_mean"}.
    """

    config: StrategyConfig = field(default_factory=StrategyConfig)
    root_seed: int = 0
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def ask(self, iteration: int | None = None) -> list[Candidate]:
        """The members of `iteration` (default: the current one). Antithetic: (seed, +1), (seed, -1) pairs."""
        it = self.iteration if iteration is None else iteration
        n = self.config.population
        if self.config.antithetic:
            seeds = [member_seed(self.root_seed, it, k) for k in range(n // 2)]
            return [Candidate(2 * k + j, seed, 1 - 2 * j) for k, seed in enumerate(seeds) for j in (0, 1)]
        return [Candidate(k, member_seed(self.root_seed, it, k), 1) for k in range(n)]

    def tell(self, rewards: list[float] | np.ndarray) -> list[tuple[int, float]]:
        """Takes the rewards of the current iteration's members (in `ask` order) and returns the update
        as (seed, coefficient) pairs, coefficient = (alpha / N) * sum over the seed's members of z * sign.
        Advances `iteration` and records the update in `history`.

        Raises:
            ValueError: wrong number of rewards, or a non-finite reward.
        """
        r = np.asarray(rewards, dtype=np.float64)
        members = self.ask()
        if r.shape != (len(members),):
            raise ValueError(f"expected {len(members)} rewards (one per member), got shape {r.shape}")
        if not np.all(np.isfinite(r)):
            raise ValueError(f"rewards must be finite, got {r.tolist()}")
        z = shape(r, self.config.shaping)
        scale = self.config.alpha / len(members)
        coefficients: dict[int, float] = {}
        for member, z_n in zip(members, z, strict=True):
            coefficients[member.seed] = coefficients.get(member.seed, 0.0) + scale * float(z_n) * member.sign
        update = list(coefficients.items())
        self.history.append(
            {
                "iteration": self.iteration,
                "update": [[s, c] for s, c in update],
                "reward_mean": float(r.mean()),
            }
        )
        self.iteration += 1
        return update

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (config, root seed, iteration, history) for checkpoints."""
        return {
            "config": asdict(self.config),
            "root_seed": self.root_seed,
            "iteration": self.iteration,
            "history": self.history,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Strategy:
        """Rebuilds a strategy from `state_dict()` output. Raises KeyError/ValueError on a bad state."""
        return cls(
            config=StrategyConfig(**state["config"]),
            root_seed=int(state["root_seed"]),
            iteration=int(state["iteration"]),
            history=list(state["history"]),
        )
