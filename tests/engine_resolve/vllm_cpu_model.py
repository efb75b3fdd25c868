"""vLLM's own torch model of a checkpoint, built on the CPU with vLLM's tensor-parallel layers, as a CUDA
vLLM worker builds it, for tests of the ES operations inside workers.

The engine resolve's vLLM is vllm-tpu, whose platform plugin (tpu-inference) registers JAX replacements
of vLLM's layers; `build` clears that registry so that the in-tree torch layers (the ones CUDA vLLM uses)
are built. Tensor parallelism runs over gloo, one process per rank. Test-only: it patches process state.
"""

from __future__ import annotations

from pathlib import Path

import torch

_contexts: list = []


def build(model_dir: str | Path, rank: int = 0, world_size: int = 1, port: int = 29555) -> torch.nn.Module:
    """vLLM's model of the Hugging Face checkpoint in `model_dir` (float32, CPU), its weights loaded with
    vLLM's loader, for tensor-parallel rank `rank` of `world_size` (this process; gloo on `port`).
    Leaves the vLLM config current and the process group initialised for the process's lifetime."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor import custom_op
    from vllm.model_executor.model_loader import get_model_architecture

    # torchax (imported by the TPU platform) renames torch's PrivateUse1 backend to "jax" without
    # registering its hooks, and torch.distributed.barrier asks torch for that accelerator: on this CPU
    # machine the accelerator is the CPU.
    torch._C._get_accelerator = lambda: torch.device("cpu")
    # The TPU platform's communicator needs TPUs; tensor-parallel groups here are gloo groups on the CPU.
    from vllm.platforms import current_platform

    base = "vllm.distributed.device_communicators.base_device_communicator.DeviceCommunicatorBase"
    current_platform.get_device_communicator_cls = lambda: base
    model_config = ModelConfig(
        model=str(model_dir), tokenizer=str(model_dir), dtype="float32", seed=0, max_model_len=256
    )
    config = VllmConfig(model_config=model_config)
    context = set_current_vllm_config(config)
    context.__enter__()
    _contexts.append(context)  # kept: a collected context manager would reset the current config
    init_distributed_environment(
        world_size=world_size,
        rank=rank,
        local_rank=rank,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        backend="gloo",
    )
    initialize_model_parallel(tensor_model_parallel_size=world_size)
    custom_op.op_registry_oot.clear()
    model_class, _ = get_model_architecture(model_config)
    with torch.device("cpu"):
        model = model_class(vllm_config=config)
    load_checkpoint(model, model_dir)
    return model


def load_checkpoint(model: torch.nn.Module, model_dir: str | Path) -> torch.nn.Module:
    """(Re)loads the checkpoint's weights into `model` with vLLM's loader; returns the model."""
    from safetensors.torch import load_file

    weights = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(file))
    model.load_weights(weights.items())
    return model


def run_es_rank(model_dir: str | Path, rank: int, world_size: int, port: int, out_dir: str | Path) -> None:
    """One tensor-parallel rank (a spawned process): builds the model, perturbs it with member 7 (sigma
    0.01) through `TorchWorkerExtension`, restores, applies the update [(3, 0.5), (9, -0.25)], and saves its
    `HFLayout.to_checkpoint` parts of the perturbed weights and of the updated master to
    out_dir/rank{rank}.pt."""
    from types import SimpleNamespace

    from engine.vllm_worker import TorchWorkerExtension

    model = build(model_dir, rank, world_size, port)
    worker = TorchWorkerExtension()
    worker.model_runner = SimpleNamespace(get_model=lambda: model)
    worker.model_config = SimpleNamespace(model=str(model_dir))
    worker.es_setup()
    worker.es_perturb(7, 0.01)
    perturbed = worker._es_layout.to_checkpoint(dict(model.named_parameters()))
    worker.es_restore()
    worker.es_apply_update([(3, 0.5), (9, -0.25)])
    updated = worker._es_layout.to_checkpoint(worker._es_weights.master)
    torch.save({"perturbed": perturbed, "updated": updated}, Path(out_dir) / f"rank{rank}.pt")
