"""Contract tests: the vLLM and tpu-inference call paths and attributes that `engine.vllm_backend` and
`engine.vllm_worker` depend on exist, with the expected signatures, in the locked packages (the engine
resolve: vllm-tpu 0.32.0, which ships vLLM 0.32.0's source including its CUDA worker, and tpu-inference
0.32.0). A version bump that moves one of them fails here, on CPU, instead of on a TPU VM or GPU host.

vLLM itself is imported (it imports on CPU). Worker and model-runner modules that need an accelerator
are read with `ast` from the installed files instead, located through the distribution metadata so that
nothing is imported (importing tpu_inference's workers probes the GCE metadata server)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata as md
import inspect
from pathlib import Path

import pytest
import vllm
from vllm import LLM, EngineArgs
from vllm.outputs import CompletionOutput
from vllm.sampling_params import SamplingType
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.worker.worker_base import WorkerBase, WorkerWrapperBase

from engine import vllm_backend, vllm_worker


def installed_source(distribution: str, relative: str) -> ast.Module:
    """The parsed source of a file of an installed distribution (not imported)."""
    path = Path(md.distribution(distribution).locate_file(relative))
    return ast.parse(path.read_text(), str(path))


def class_def(module: ast.Module, name: str) -> ast.ClassDef:
    found = [n for n in ast.walk(module) if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"class {name} not found"
    return found[0]


def class_attributes(cls: ast.ClassDef) -> set[str]:
    """Methods, class-level names and `self.X = ...` / `self.X: T = ...` attributes of a class."""
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == "self":
                names.add(target.attr)
            elif isinstance(target, ast.Name) and node in cls.body:
                names.add(target.id)
    return names


def extension_attributes(extension: type) -> set[str]:
    return {name for name in dir(extension) if not name.startswith("__")}


def test_llm_accepts_the_arguments_the_backend_passes():
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    passed = {
        "model",
        "tokenizer",
        "dtype",
        "tensor_parallel_size",
        "max_model_len",
        "gpu_memory_utilization",
        "enable_prefix_caching",
        "worker_extension_cls",
        "seed",
        "distributed_executor_backend",
        "kv_cache_memory_bytes",
        "enforce_eager",
    }
    assert passed <= fields, sorted(passed - fields)
    assert inspect.signature(LLM.__init__).parameters.keys() >= {"model", "kwargs"}
    rpc = inspect.signature(LLM.collective_rpc).parameters
    assert list(rpc)[:5] == ["self", "method", "timeout", "args", "kwargs"]
    generate = inspect.signature(LLM.generate).parameters
    assert list(generate)[:3] == ["self", "prompts", "sampling_params"] and "use_tqdm" in generate


def test_sampling_is_greedy_and_outputs_have_the_fields_read():
    params = vllm_backend.sampling_params(16)
    assert params.sampling_type == SamplingType.GREEDY and params.max_tokens == 16
    with pytest.raises(ValueError, match="max_new_tokens"):
        vllm_backend.sampling_params(0)
    fields = {f.name for f in dataclasses.fields(CompletionOutput)}
    assert {"text", "token_ids", "finish_reason"} <= fields
    assert callable(vllm.distributed.get_tensor_model_parallel_rank)
    assert callable(vllm.distributed.get_tensor_model_parallel_world_size)
    from vllm.platforms import current_platform

    assert callable(current_platform.is_tpu)


def test_vllm_mixes_the_named_extension_into_its_worker():
    source = inspect.getsource(WorkerWrapperBase.init_worker)
    assert "worker_extension_cls" in source and "__bases__" in source and "resolve_obj_by_qualname" in source
    assert resolve_obj_by_qualname(vllm_backend.worker_extension(True)) is vllm_worker.JaxWorkerExtension
    assert resolve_obj_by_qualname(vllm_backend.worker_extension(False)) is vllm_worker.TorchWorkerExtension


@pytest.mark.parametrize(
    ("extension", "distribution", "worker_file", "worker_class"),
    [
        (vllm_worker.TorchWorkerExtension, "vllm-tpu", "vllm/v1/worker/gpu_worker.py", "Worker"),
        (vllm_worker.JaxWorkerExtension, "tpu-inference", "tpu_inference/worker/tpu_worker.py", "TPUWorker"),
    ],
)
def test_extension_names_do_not_collide_with_the_worker(extension, distribution, worker_file, worker_class):
    """vLLM asserts that no attribute of the extension exists on the worker class; check it here."""
    worker = class_attributes(class_def(installed_source(distribution, worker_file), worker_class))
    assert "model_runner" in worker, f"{worker_class} no longer has a model_runner"
    base = {name for name in dir(WorkerBase) if not name.startswith("__")}
    clashes = extension_attributes(extension) & (worker | base)
    assert not clashes, clashes


def test_gpu_worker_hands_out_the_torch_model_and_its_checkpoint():
    runner = class_def(installed_source("vllm-tpu", "vllm/v1/worker/gpu_model_runner.py"), "GPUModelRunner")
    get_model = next(n for n in runner.body if isinstance(n, ast.FunctionDef) and n.name == "get_model")
    assert [a.arg for a in get_model.args.args] == ["self"]
    # TorchWorkerExtension.es_setup reads the checkpoint directory from the worker's model config.
    assert "self.model_config = vllm_config.model_config" in inspect.getsource(WorkerBase.__init__)
    from vllm.config import ModelConfig

    assert {"model", "quantization"} <= {f.name for f in dataclasses.fields(ModelConfig)}


def test_cpu_linear_dispatch_is_the_function_engine_vllm_cpu_wraps():
    """`engine.vllm_cpu` replaces `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`,
    which the linear and embedding methods import by name when they process loaded weights (so the
    module attribute is what they call); tests/test_vllm_cpu_engine.py runs the real CPU backend."""
    utils = installed_source("vllm-tpu", "vllm/model_executor/layers/utils.py")
    name = "dispatch_cpu_unquantized_gemm"
    (dispatch,) = (n for n in utils.body if isinstance(n, ast.FunctionDef) and n.name == name)
    assert [a.arg for a in dispatch.args.args] == ["layer", "remove_weight"]
    for relative in ("linear.py", "vocab_parallel_embedding.py"):
        source = ast.unparse(installed_source("vllm-tpu", f"vllm/model_executor/layers/{relative}"))
        assert f"from vllm.model_executor.layers.utils import {name}" in source, relative


def test_tpu_runner_reads_its_weights_from_state_leaves():
    runner = class_def(
        installed_source("tpu-inference", "tpu_inference/runner/tpu_runner.py"), "TPUModelRunner"
    )
    attributes = class_attributes(runner)
    assert {"state", "state_leaves", "refresh_state_leaves", "model_fn"} <= attributes
    calls = [
        node
        for node in ast.walk(runner)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "model_fn"
        and node.args
    ]
    assert calls and all(ast.unparse(call.args[0]) == "self.state_leaves" for call in calls)


def test_the_lora_api_member_adapters_use():
    """`engine.vllm_lora` (low-rank members as LoRA adapters, on the CUDA and CPU engines): the `LLM`
    arguments, the allowed ranks, `LoRARequest`, the worker-side manager calls and the stacked tensors it
    writes, as the locked vLLM 0.32 has them."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks
    from vllm.lora.request import LoRARequest

    from engine import vllm_lora

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(vllm_lora.llm_kwargs(4, 1)) <= fields
    assert get_args(MaxLoRARanks) == vllm_lora.MAX_LORA_RANKS
    assert "lora_request" in inspect.signature(LLM.generate).parameters
    request = LoRARequest("es-member-0", 1, "es-member-0")
    assert (request.lora_int_id, request.lora_name) == (1, "es-member-0")
    mixin = class_def(
        installed_source("vllm-tpu", "vllm/v1/worker/lora_model_runner_mixin.py"), "LoRAModelRunnerMixin"
    )
    assert "lora_manager" in class_attributes(mixin)
    workers = installed_source("vllm-tpu", "vllm/lora/worker_manager.py")
    assert {"add_dummy_lora", "pin_adapter", "_adapter_manager"} <= class_attributes(
        class_def(workers, "WorkerLoRAManager")
    ) | class_attributes(class_def(workers, "LRUCacheWorkerLoRAManager"))
    manager = class_def(installed_source("vllm-tpu", "vllm/lora/model_manager.py"), "LoRAModelManager")
    assert {"lora_index_to_id", "activate_adapter"} <= class_attributes(manager)
    # An adapter takes the first free slot (MemberAdapters pins ids 1..M into slots 0..M-1 in order).
    (activate,) = (n for n in manager.body if isinstance(n, ast.FunctionDef) and n.name == "activate_adapter")
    assert "first_free_slot" in ast.unparse(activate)
    linear = class_def(
        installed_source("vllm-tpu", "vllm/lora/layers/base_linear.py"), "BaseLinearLayerWithLoRA"
    )
    assert {"lora_a_stacked", "lora_b_stacked", "base_layer"} <= class_attributes(linear)
