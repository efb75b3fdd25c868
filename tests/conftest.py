"""Shared fixtures: Ray without token authentication for every test, and a real local Ray cluster for the
tests that need one."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def ray_without_auth():
    """Every Ray cluster the tests start (here, in fixtures of their own, or in `train`) runs without token
    authentication: Ray 2.60 writes ~/.ray/auth_token on first init, and parallel test modules each start
    their own raylet."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local Ray cluster (4 logical CPUs, no dashboard) for one test module."""
    import ray

    # address="local": always a new cluster, never one another process started on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
