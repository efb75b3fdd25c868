"""The vLLM worker extensions on stand-in workers that hold real weights: a real tiny transformers model
(as CUDA vLLM's model runner does), and a pytree of JAX arrays read by a jitted model function (as
tpu-inference's runner does). The extensions are mixed in the way vLLM's `WorkerWrapperBase.init_worker`
does it: appended to the worker class's bases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import vllm.distributed
from transformers import AutoModelForCausalLM
from vllm.v1.worker.worker_base import WorkerBase

from engine.tiny_model import make_tiny_model
from engine.torch_weights import TorchWeights
from engine.vllm_worker import JaxWorkerExtension, RecompilationError, TorchWorkerExtension


def mixed_in(worker_class: type, extension: type) -> type:
    """A fresh copy of `worker_class` with `extension` appended to its bases, after vLLM's own check
    that no extension attribute exists on the worker (WorkerWrapperBase.init_worker)."""
    cls = type(worker_class.__name__, worker_class.__bases__, dict(worker_class.__dict__))
    for attr in dir(extension):
        if not attr.startswith("__"):
            assert not hasattr(cls, attr), attr
    cls.__bases__ = cls.__bases__ + (extension,)
    return cls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=4)


class _TorchRunner:
    def __init__(self, model):
        self.model = model

    def get_model(self):
        return self.model


class StandInGpuWorker(WorkerBase):
    def __init__(self, model_dir):
        self.model_runner = _TorchRunner(
            AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.bfloat16)
        )


def tensor_parallel(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: world)


def test_torch_extension_is_the_es_core_on_the_workers_model(model_dir, monkeypatch, tmp_path):
    worker = mixed_in(StandInGpuWorker, TorchWorkerExtension)(model_dir)
    tensor_parallel(monkeypatch, 0, 1)
    setup = worker.es_setup()
    assert setup["world_size"] == 1 and setup["parameters"] > 0

    reference = TorchWeights(StandInGpuWorker(model_dir).model_runner.get_model())
    assert worker.es_fingerprint() == reference.fingerprint() == setup["fingerprint"]
    worker.es_perturb(7, 0.01)
    reference.perturb(7, 0.01)
    assert worker.es_fingerprint() == reference.fingerprint() != setup["fingerprint"]
    worker.es_restore()
    assert worker.es_fingerprint() == setup["fingerprint"]
    reference.restore()
    reference.apply_update([(3, 1e-3)])
    assert worker.es_apply_update([(3, 1e-3)]) == reference.fingerprint()

    saved = worker.es_save_shard(str(tmp_path / "rank-000.safetensors"))
    from safetensors.torch import load_file

    tensors = load_file(saved)
    params = dict(worker.model_runner.get_model().named_parameters())
    assert set(tensors) <= set(params) and all(torch.equal(t, params[n]) for n, t in tensors.items())


def test_tensor_parallel_ranks_get_independent_noise(model_dir, monkeypatch):
    fingerprints = []
    for rank in (0, 1):
        worker = mixed_in(StandInGpuWorker, TorchWorkerExtension)(model_dir)
        tensor_parallel(monkeypatch, rank, 2)
        worker.es_setup()
        worker.es_perturb(11, 0.01)
        fingerprints.append(worker.es_fingerprint())
    single = mixed_in(StandInGpuWorker, TorchWorkerExtension)(model_dir)
    tensor_parallel(monkeypatch, 0, 1)
    single.es_setup()
    single.es_perturb(11, 0.01)
    # Identical shards (here: the same weights) on two ranks are perturbed differently, and both
    # differently from an unsharded engine.
    assert len({*fingerprints, single.es_fingerprint()}) == 3


class _JaxRunner:
    """The parts of tpu-inference's TPUModelRunner the extension uses: `state` (a pytree of the weights:
    a two-layer MLP), `state_leaves` and `refresh_state_leaves()` (as tpu-inference defines them), and a
    compiled model function that takes `state_leaves` as its first input."""

    def __init__(self):
        k1, k2 = jax.random.split(jax.random.key(0))
        state = {
            "layer1": {"kernel": jax.random.normal(k1, (16, 32)), "bias": jnp.zeros(32)},
            "layer2": {"kernel": jax.random.normal(k2, (32, 8)), "bias": jnp.zeros(8)},
        }
        # Committed to a device, as tpu-inference's loader places weights with explicit shardings (jit
        # compiles separately for uncommitted arrays).
        self.state = jax.device_put(state, jax.devices()[0])
        self.refresh_state_leaves()
        treedef = jax.tree_util.tree_structure(self.state)

        @jax.jit
        def model_fn(state_leaves, x):
            w = treedef.unflatten(state_leaves)
            hidden = jnp.tanh(x @ w["layer1"]["kernel"] + w["layer1"]["bias"])
            return hidden @ w["layer2"]["kernel"] + w["layer2"]["bias"]

        self.model_fn = model_fn

    def refresh_state_leaves(self):
        self.state_leaves = tuple(jax.tree_util.tree_leaves(self.state))

    def run(self, x):
        return np.asarray(self.model_fn(self.state_leaves, x))


class StandInTpuWorker(WorkerBase):
    def __init__(self):
        self.model_runner = _JaxRunner()


def test_jax_extension_replaces_the_runners_state_without_recompiling():
    worker = mixed_in(StandInTpuWorker, JaxWorkerExtension)()
    runner = worker.model_runner
    x = jnp.ones((4, 16))
    base = runner.run(x)
    setup = worker.es_setup()
    assert setup["leaves"] == 4 and setup["parameters"] == 16 * 32 + 32 + 32 * 8 + 8

    worker.es_perturb(5, 0.05)
    perturbed = runner.run(x)
    assert not np.array_equal(perturbed, base)
    assert all(
        a is b for a, b in zip(runner.state_leaves, jax.tree_util.tree_leaves(runner.state), strict=True)
    )
    worker.es_restore()
    assert np.array_equal(runner.run(x), base)
    for seed in range(3):  # later perturbations reuse the compiled functions
        worker.es_perturb(seed, 0.05)
        worker.es_restore()
    assert worker.es_compilations() == 1
    assert runner.model_fn._cache_size() == 1, "the model function was compiled again"
    fingerprint = worker.es_apply_update([(5, 1e-3)])
    assert fingerprint == worker.es_fingerprint() != setup["fingerprint"]
    assert not np.array_equal(runner.run(x), base)


def test_jax_extension_fails_loudly_when_a_perturbation_recompiles():
    worker = mixed_in(StandInTpuWorker, JaxWorkerExtension)()
    worker.es_setup()
    worker.es_perturb(1, 0.05)
    worker.es_restore()
    weights = worker._es_weights
    weights._leaves[0] = weights._leaves[0].astype(jnp.bfloat16)  # a leaf whose dtype changed
    with pytest.raises(RecompilationError, match="compiled again"):
        worker.es_perturb(2, 0.05)
