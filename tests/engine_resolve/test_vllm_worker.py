"""The vLLM worker extensions on stand-in workers that hold real weights: vLLM's own torch model of a
tiny checkpoint, built with vLLM's tensor-parallel layers on the CPU (as a CUDA vLLM worker's model
runner holds it: fused `qkv_proj` / `gate_up_proj`, padded vocabulary), and a pytree of JAX arrays read
by a jitted model function (as tpu-inference's runner does). The extensions are mixed in the way vLLM's
`WorkerWrapperBase.init_worker` does it: appended to the worker class's bases.

The torch operations must equal the transformers backend's on the same checkpoint bit for bit, at
tensor-parallel degree 1 and 2 (gloo, two processes; the tiny model has one key/value head, so the
ranks replicate it)."""

from __future__ import annotations

import multiprocessing
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_resolve import vllm_cpu_model
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM
from vllm.v1.engine import UtilityOutput
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder, UtilityResult
from vllm.v1.worker.worker_base import WorkerBase

from engine.actor import EngineActor
from engine.jax_layout import checkpoint_name
from engine.jax_weights import leaf_names
from engine.model_dir import write_model_dir
from engine.tiny_model import make_tiny_model
from engine.torch_weights import TorchWeights
from engine.vllm_backend import VLLMBackend
from engine.vllm_layout import LayoutError, merge_parts
from engine.vllm_worker import JaxWorkerExtension, RecompilationError, TorchWorkerExtension
from shared.protocol import LoadRequest


def mixed_in(worker_class: type, extension: type) -> type:
    """A fresh copy of `worker_class` with `extension` appended to its bases, after vLLM's own check
    that no extension attribute exists on the worker (WorkerWrapperBase.init_worker)."""
    cls = type(worker_class.__name__, worker_class.__bases__, dict(worker_class.__dict__))
    for attr in dir(extension):
        if not attr.startswith("__"):
            assert not hasattr(cls, attr), attr
    cls.__bases__ = cls.__bases__ + (extension,)
    return cls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=4)


@pytest.fixture(scope="module")
def vllm_model(model_dir):
    return vllm_cpu_model.build(model_dir, port=free_port())


class StandInGpuWorker(WorkerBase):
    """The parts of vLLM's GPU worker the extension uses: `model_runner.get_model()` and
    `model_config.model` (the checkpoint directory). The model starts at the checkpoint's weights."""

    def __init__(self, model, model_dir):
        vllm_cpu_model.load_checkpoint(model, model_dir)
        self.model_runner = SimpleNamespace(get_model=lambda: model)
        self.model_config = SimpleNamespace(model=str(model_dir))


def transformers_weights(model_dir) -> TorchWeights:
    """The transformers backend's ES weights on the same checkpoint (float32, CPU)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return TorchWeights(model)


def assert_equal_tensors(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    differ = [name for name in got if not torch.equal(got[name], expected[name].detach())]
    assert not differ, differ


def test_checkpoint_tensors_are_routed_into_vllms_fused_parameters(vllm_model, model_dir):
    worker = mixed_in(StandInGpuWorker, TorchWorkerExtension)(vllm_model, model_dir)
    worker.es_setup()
    layout = worker._es_layout
    reference = transformers_weights(model_dir)
    # The ES parameters are the transformers model's (the tied lm_head is skipped by vLLM's loader).
    assert sorted(layout.routes) == sorted(reference.params)
    attention = "model.layers.0.self_attn."
    assert {layout.routes[attention + f"{x}_proj.weight"] for x in "qkv"} == {attention + "qkv_proj.weight"}
    assert layout.sources["model.layers.1.mlp.gate_up_proj.weight"] == [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    assert set(layout.sources) == set(dict(vllm_model.named_parameters()))
    # Unfused, unsharded, unpadded parameters draw their noise directly (tensor parallelism 1).
    assert {attention + "o_proj.weight", "model.norm.weight"} <= set(layout.direct)
    fused_or_padded = {attention + "qkv_proj.weight", "model.embed_tokens.weight"}
    assert not fused_or_padded & set(layout.direct)
    # At tensor parallelism 1 every checkpoint tensor lands whole on a contiguous range of its parameter
    # (q, k and v one after another in qkv_proj), so every parameter is perturbed in place.
    assert set(layout.slices) == set(layout.sources)
    qkv = sorted(layout.slices[attention + "qkv_proj.weight"], key=lambda s: s[1])
    assert [name for name, _, _ in qkv] == [attention + f"{x}_proj.weight" for x in "qkv"]
    assert [offset for _, offset, _ in qkv] == [0, qkv[0][2], qkv[0][2] + qkv[1][2]]
    # The loaders are vLLM's own again afterwards.
    assert all(
        getattr(p, "weight_loader", None) is None or "vllm_layout" not in p.weight_loader.__qualname__
        for p in vllm_model.parameters()
    )


def test_es_operations_in_vllms_layout_equal_the_transformers_backends(vllm_model, model_dir):
    engine = vllm_engine_backend(vllm_model, model_dir)
    (setup,) = engine.workers
    assert setup["world_size"] == 1 and setup["parameters"] > 0 and engine.checkpoint_layout
    layout = engine.llm.workers[0]._es_layout
    reference = transformers_weights(model_dir)

    def live() -> dict:
        return merge_parts([layout.to_checkpoint(dict(vllm_model.named_parameters()))])

    assert_equal_tensors(live(), reference.params)
    engine.perturb(7, 0.01)
    reference.perturb(7, 0.01)
    assert_equal_tensors(live(), reference.params)
    assert engine.fingerprint() != setup["fingerprint"]
    engine.restore()
    reference.restore()
    assert engine.fingerprint() == setup["fingerprint"]
    fingerprint = engine.apply_update([(3, 0.5), (9, -0.25)])
    reference.apply_update([(3, 0.5), (9, -0.25)])
    assert fingerprint == engine.fingerprint() != setup["fingerprint"]
    assert_equal_tensors(live(), reference.params)
    assert_equal_tensors(engine.master(), reference.master)


def test_master_moves_in_the_checkpoint_layout(vllm_model, model_dir, tmp_path):
    engine = vllm_engine_backend(vllm_model, model_dir)
    base = engine.fingerprint()
    updated = engine.apply_update([(5, 0.3)])
    master = engine.master()
    # The transformers backend's master, in the same layout, takes the weights back to the base.
    assert engine.load_master(transformers_weights(model_dir).master) == base

    # A resync or resume: an engine at the base weights loads the master and holds the same weights.
    other = vllm_engine_backend(vllm_model, model_dir)
    assert other.fingerprint() == base
    assert other.load_master(master) == updated
    with pytest.raises(LayoutError, match="model.norm.weight"):
        other.load_master({**master, "model.norm.weight": torch.zeros(3)})

    # A checkpoint: a Hugging Face directory that transformers loads, holding the master in its dtype.
    out = write_model_dir(model_dir, master, "bfloat16", tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.bfloat16 and (out / "tokenizer.json").exists()
    assert_equal_tensors(
        dict(loaded.named_parameters()), {name: t.to(torch.bfloat16) for name, t in master.items()}
    )


def test_a_quantized_model_is_refused_by_name(vllm_model, model_dir):
    worker = mixed_in(StandInGpuWorker, TorchWorkerExtension)(vllm_model, model_dir)
    worker.model_config.quantization = "awq"
    with pytest.raises(LayoutError, match=r"quantized weights \(awq\) cannot be perturbed"):
        worker.es_setup()


def test_merge_parts_names_an_element_no_rank_holds():
    values, held = torch.zeros(4), torch.tensor([True, True, False, False])
    other = torch.tensor([False, False, True, False])
    with pytest.raises(LayoutError, match="'w': 1 elements held by no rank"):
        merge_parts([{"w": (values, held)}, {"w": (values, other)}])


def test_tensor_parallel_ranks_perturb_and_update_one_coherent_model(model_dir, tmp_path):
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [
        context.Process(target=vllm_cpu_model.run_es_rank, args=(model_dir, rank, 2, port, tmp_path))
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    assert [process.exitcode for process in ranks] == [0, 0]
    parts = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # Each rank holds a shard of the sharded weights, but all of the replicated key/value head.
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert [bool(part["perturbed"][q][1].all()) for part in parts] == [False, False]
    assert [bool(part["perturbed"][k][1].all()) for part in parts] == [True, True]

    reference = transformers_weights(model_dir)
    reference.perturb(7, 0.01)
    assert_equal_tensors(merge_parts([part["perturbed"] for part in parts]), reference.params)
    reference.restore()
    reference.apply_update([(3, 0.5), (9, -0.25)])
    assert_equal_tensors(merge_parts([part["updated"] for part in parts]), reference.master)


class InProcessLLM:
    """`vllm.LLM.collective_rpc` over workers in this process: the method called on every worker, the
    results in rank order (what VLLMBackend uses of the LLM besides `generate`). Arguments and results
    cross vLLM's engine-core transport (its msgpack encoder and decoder, insecure serialization off), as
    they do between the `LLM` and its engine-core process."""

    def __init__(self, *workers):
        self.workers = workers

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        args, kwargs = transported((args, kwargs or {}))
        results = [getattr(worker, method)(*args, **kwargs) for worker in self.workers]
        return returned(results)


def transported(value):
    """`value` after vLLM's engine-core transport of utility-call arguments: encoded and decoded with
    its msgpack serializers."""
    return MsgpackDecoder().decode(MsgpackEncoder().encode(value))


def returned(result):
    """A utility call's `result` after vLLM's engine-core transport (a `UtilityOutput`)."""
    encoded = MsgpackEncoder().encode(UtilityOutput(call_id=0, result=UtilityResult(result)))
    return MsgpackDecoder(UtilityOutput).decode(encoded).result.result


def vllm_engine_backend(vllm_model, model_dir) -> VLLMBackend:
    """A VLLMBackend over one stand-in worker that holds `model_dir`'s weights in `vllm_model`."""
    worker = mixed_in(StandInGpuWorker, TorchWorkerExtension)(vllm_model, model_dir)
    return VLLMBackend(model_dir, llm=InProcessLLM(worker), check=False)


def test_tensors_do_not_survive_vllms_transport_so_masters_move_as_files():
    decoded = returned({"w": (torch.ones(2), torch.zeros(2, dtype=torch.bool))})
    assert not isinstance(decoded["w"][0], torch.Tensor)
    assert returned(["a1b2", {"rank": 0, "layout": "checkpoint"}]) == [
        "a1b2",
        {"rank": 0, "layout": "checkpoint"},
    ]


def vllm_engine(vllm_model, model_dir, master_path=None) -> tuple[EngineActor, dict]:
    """An engine actor whose vLLM backend runs on a stand-in worker holding `model_dir`'s weights."""
    worker = mixed_in(StandInGpuWorker, TorchWorkerExtension)(vllm_model, model_dir)
    # The stand-in cannot generate: no start-up check.
    actor = EngineActor(
        0, backend_factory=lambda r: VLLMBackend.from_request(r, llm=InProcessLLM(worker), check=False)
    )
    loaded = actor.load_model(
        LoadRequest(str(model_dir), backend="vllm", dtype="bfloat16", master_path=master_path)
    )
    return actor, loaded


def test_engine_actor_checkpoints_resumes_and_resyncs_a_vllm_engine(vllm_model, model_dir, tmp_path):
    actor, loaded = vllm_engine(vllm_model, model_dir)
    updated = actor.apply_update([(5, 0.3)])
    assert updated != loaded.fingerprint
    master = actor.export_master()
    saved = actor.save_checkpoint(str(tmp_path / "checkpoint"))
    assert saved.fingerprint == updated and saved.master
    reference = transformers_weights(model_dir)
    reference.apply_update([(5, 0.3)])
    assert_equal_tensors({name: torch.tensor(a) for name, a in master.items()}, reference.master)
    # The checkpoint's model is a Hugging Face directory of the updated weights, in the engine dtype.
    model = AutoModelForCausalLM.from_pretrained(saved.model, local_files_only=True)
    assert_equal_tensors(
        dict(model.named_parameters()), {name: t.to(torch.bfloat16) for name, t in reference.master.items()}
    )

    resumed, loaded = vllm_engine(vllm_model, saved.model, master_path=saved.master)
    assert loaded.fingerprint == updated
    fresh, loaded = vllm_engine(vllm_model, model_dir)
    assert loaded.fingerprint != updated
    assert fresh.import_master(master) == updated


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
    """A tpu-inference worker over `_JaxRunner`, with the checkpoint its weights were loaded from (the
    leaves under their dotted names, as `engine.jax_layout` maps them) in `model_config.model`."""

    def __init__(self):
        self.model_runner = _JaxRunner()
        directory = Path(tempfile.mkdtemp(prefix="jax-checkpoint-"))
        state = self.model_runner.state
        save_file(
            {
                checkpoint_name(name): np.asarray(leaf)
                for name, leaf in zip(leaf_names(state), jax.tree_util.tree_leaves(state), strict=True)
            },
            str(directory / "model.safetensors"),
        )
        self.model_config = SimpleNamespace(model=str(directory))


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


def test_jax_extension_moves_the_master_by_checkpoint_name(tmp_path):
    worker = mixed_in(StandInTpuWorker, JaxWorkerExtension)()
    base = worker.es_setup()["fingerprint"]
    updated = worker.es_apply_update([(5, 1e-2)])
    master = load_file(worker.es_master(str(tmp_path)))
    assert sorted(master) == ["layer1.bias", "layer1.kernel", "layer2.bias", "layer2.kernel"]
    other = mixed_in(StandInTpuWorker, JaxWorkerExtension)()
    assert other.es_setup()["fingerprint"] == base
    assert other.es_load_master(str(tmp_path / "master.safetensors")) == updated
    x = jnp.ones((4, 16))
    assert np.array_equal(other.model_runner.run(x), worker.model_runner.run(x))
    save_file({"layer1.bias": np.zeros(32, dtype=np.float32)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(LayoutError, match="missing"):
        other.es_load_master(str(tmp_path / "partial.safetensors"))


def test_jax_extension_refuses_weights_that_do_not_map_onto_the_checkpoint():
    worker = mixed_in(StandInTpuWorker, JaxWorkerExtension)()
    path = Path(worker.model_config.model) / "model.safetensors"
    tensors = load_file(str(path))
    tensors["layer2.kernel"] = tensors["layer2.kernel"] + 1
    save_file(tensors, str(path))
    with pytest.raises(LayoutError, match="layer2.kernel: the runner's weights, mapped back, differ"):
        worker.es_setup()
