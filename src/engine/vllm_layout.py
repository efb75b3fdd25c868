"""The Hugging Face parameter space inside a vLLM worker: maps tensors named and shaped as in the model's
checkpoint into the worker's parameters (fused, sharded, padded) and back, with the model's own weight
loading.

vLLM stores a checkpoint's weights in its own layout: `q_proj`, `k_proj` and `v_proj` fused into one
`qkv_proj`, `gate_proj` and `up_proj` into `gate_up_proj`, every tensor-parallel rank holding only its
shard (key/value heads replicated where there are fewer than ranks), the vocabulary padded. ES noise
drawn per vLLM parameter would depend on that layout and on the tensor-parallel degree, and replicated
weights would get a different perturbation on every rank (an incoherent model). So the ES operations
draw noise per checkpoint tensor, exactly as the transformers backend does (`engine.torch_weights.noise_like`
with the checkpoint name and shape), and place it where vLLM keeps that tensor: the same perturbation on
every rank, at any tensor-parallel degree, bit-identical to the transformers backend's on the same device.
Checkpoints and resyncs move the fp32 master in the checkpoint's layout too, so a checkpoint is a plain
Hugging Face model directory.

The placing is vLLM's own loading code: `model.load_weights([(name, tensor)])`, the call vLLM's
documented RLHF weight-update pattern makes, with every parameter's `weight_loader` temporarily wrapped
so that it writes into a scratch tensor (or the master) instead of the live weights. Whatever the model's
`load_weights` does (stacked-parameter mapping, sharding, skipping tied or rotary tensors) therefore
applies unchanged; nothing here knows a model architecture.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from engine.torch_weights import noise_like

_ABSENT = object()
# Suffix of the held-elements mask next to each tensor in a rank's master part
# (`engine.vllm_worker.TorchWorkerExtension.es_master_part`, read by `merge_parts`).
HELD = ":held"


class LayoutError(ValueError):
    """The checkpoint and the vLLM model do not map onto each other as this module needs."""


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every tensor in the `*.safetensors` files of a Hugging Face model directory
    (read from the file headers; nothing is loaded).

    Raises:
        LayoutError: the directory holds no safetensors file.
    """
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise LayoutError(f"{model_dir}: no *.safetensors file (the vLLM backend needs safetensors weights)")
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class HFLayout:
    """The map between a checkpoint's tensors and one vLLM worker's parameters.

    Args:
        model: the worker's `torch.nn.Module` (`worker.model_runner.get_model()`), whose `load_weights`
            takes (checkpoint name, tensor) pairs.
        shapes: checkpoint tensor name -> shape (`checkpoint_shapes`). Tensors the model does not load
            (tied `lm_head.weight`, rotary buffers) are dropped.

    Attributes:
        routes: checkpoint name -> the vLLM parameter name it is loaded into, for every tensor the model
            loads (sorted by checkpoint name). These are the ES parameters.
        shapes: checkpoint name -> shape, for the same names.
        sources: vLLM parameter name -> the checkpoint names loaded into it.
        direct: vLLM parameter name -> checkpoint name, for parameters that hold one checkpoint tensor
            element for element (checked by loading its element indices): their noise is `noise_like`
            itself, without a scratch tensor to load it through.
        slices: vLLM parameter name -> [(checkpoint name, offset, count)], for parameters where every
            checkpoint tensor loaded into them lands whole, in order, on the contiguous flat elements
            [offset, offset + count) (fused q/k/v and gate/up projections, the padded vocabulary, and the
            `direct` ones, at tensor parallelism 1); the rest of such a parameter (padding) has no
            noise. `TorchWeights(noise_slices=...)` perturbs them in place, slice by slice.

    Raises:
        LayoutError: a checkpoint tensor is loaded into more than one parameter, or a parameter has a
            `weight_loader` that cannot be wrapped.
    """

    def __init__(self, model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self._names = {id(p): name for name, p in self.params.items()}
        self._into: dict[str, torch.Tensor] = {}
        self._calls: list[str] = []
        routes: dict[str, str] = {}
        with self._wrapped(record=True):
            for name in sorted(shapes):
                self._calls.clear()
                self.model.load_weights([(name, torch.empty(shapes[name], device="meta"))])
                if len(set(self._calls)) > 1:
                    raise LayoutError(
                        f"checkpoint tensor {name!r} is loaded into several parameters: {self._calls}"
                    )
                if self._calls:
                    routes[name] = self._calls[0]
        self.routes = routes
        self.shapes = {name: tuple(shapes[name]) for name in routes}
        self.sources: dict[str, list[str]] = {}
        for name, target in routes.items():
            self.sources.setdefault(target, []).append(name)
        self.slices: dict[str, list[tuple[str, int, int]]] = {}
        for target, names in self.sources.items():
            spans = [self._span(name) for name in names]
            if all(span is not None for span in spans):
                self.slices[target] = [(name, *span) for name, span in zip(names, spans, strict=True)]
        # Parameters that hold exactly one checkpoint tensor, unchanged (not fused, sharded or padded):
        # their noise is drawn directly in place of being loaded into a scratch tensor.
        self.direct: dict[str, str] = {
            target: placed[0][0]
            for target, placed in self.slices.items()
            if len(placed) == 1
            and placed[0][1:] == (0, self.params[target].numel())
            and tuple(self.params[target].shape) == self.shapes[placed[0][0]]
        }

    # ---- the wrapped loaders -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _wrapped(self, record: bool = False, names: Iterable[str] | None = None) -> Iterator[None]:
        """Replaces the `weight_loader` of every parameter (or of `names`) by one that, instead of writing
        the live parameter, records the call (`record`) or runs the original loader with the parameter's
        `.data` swapped for `self._into[name]`."""
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        params = self.params if names is None else {name: self.params[name] for name in names}
        saved = {}
        for name, param in params.items():
            # A property on vLLM's own parameter classes (BasevLLMParameter), a plain attribute otherwise.
            saved[name] = getattr(param, "weight_loader", _ABSENT)
            original = default_weight_loader if saved[name] is _ABSENT else saved[name]
            try:
                param.weight_loader = self._loader(name, original, record)
            except AttributeError as e:
                raise LayoutError(
                    f"parameter {name!r} ({type(param).__name__}): cannot wrap its weight_loader"
                ) from e
        try:
            yield
        finally:
            for name, param in params.items():
                if saved[name] is _ABSENT:
                    del param.weight_loader
                else:
                    param.weight_loader = saved[name]

    def _loader(self, name: str, original, record: bool):
        def loader(param: torch.nn.Parameter, loaded: torch.Tensor, *args, **kwargs) -> None:
            if record:
                self._calls.append(name)
                return
            if name not in self._into:
                raise LayoutError(f"unexpected load into parameter {name!r}")
            live = param.data
            param.data = self._into[name]
            try:
                original(param, loaded, *args, **kwargs)
            finally:
                param.data = live

        return loader

    def _load(self, name: str, tensor: torch.Tensor, into: torch.Tensor) -> None:
        """Runs the model's loading of checkpoint tensor `name` = `tensor` into `into` (a tensor shaped
        like the parameter `routes[name]`) instead of the parameter."""
        self._into = {self.routes[name]: into}
        try:
            self.model.load_weights([(name, tensor)])
        finally:
            self._into = {}

    @torch.no_grad()
    def _positions(self, name: str) -> torch.Tensor:
        """Where checkpoint tensor `name` lands in its parameter: a float64 tensor shaped like the
        parameter `routes[name]`, holding at each element the 1-based flat index of the checkpoint element
        loaded there, 0 where none is (loaders write 0 into what they do not fill: vocabulary padding).
        Found by loading the indices through the model's loader (float64: exact up to 2**53 elements)."""
        target = self.params[self.routes[name]]
        numel = int(torch.Size(self.shapes[name]).numel())
        index = torch.arange(1, numel + 1, dtype=torch.float64, device=target.device).reshape(
            self.shapes[name]
        )
        probe = torch.zeros(target.shape, dtype=torch.float64, device=target.device)
        # vLLM's loader warns of every float64 tensor loaded into a lower-precision parameter.
        with self._wrapped(names=[self.routes[name]]), _quiet("vllm.model_executor.models.utils"):
            self._load(name, index, probe)
        return probe

    def _span(self, name: str) -> tuple[int, int] | None:
        """(offset, count) when checkpoint tensor `name` lands whole and in order on the flat elements
        [offset, offset + count) of its parameter, else None."""
        positions = self._positions(name).reshape(-1)
        count = int(torch.Size(self.shapes[name]).numel())
        filled = torch.nonzero(positions).reshape(-1)
        if filled.numel() != count:
            return None
        offset = int(filled[0]) if count else 0
        expected = torch.arange(1, count + 1, dtype=torch.float64, device=positions.device)
        if not torch.equal(positions[offset : offset + count], expected):
            return None
        return offset, count

    # ---- the operations -------------------------------------------------------------------------------

    @torch.no_grad()
    def noise(self, name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
        """The member's noise for vLLM parameter `name`, float32, shaped and placed like `param`: each
        checkpoint tensor loaded into it gets `noise_like` of its checkpoint name and shape, placed as vLLM
        places that tensor; elements no checkpoint tensor fills (vocabulary padding) get 0. Plugs into
        `TorchWeights(noise=...)`."""
        if name in self.direct:
            return noise_like(param, seed, self.direct[name])
        out = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        # Only this parameter's loader is wrapped (the routes, found with every loader wrapped, send these
        # checkpoint tensors nowhere else): the per-perturbation cost stays one wrap per parameter.
        with self._wrapped(names=[name]):
            for source in self.sources.get(name, ()):
                shape = torch.empty(self.shapes[source], device="meta")
                self._load(source, noise_like(shape, seed, source, device=param.device), out)
        return out

    @torch.no_grad()
    def to_checkpoint(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Gathers vLLM-layout tensors (parameter name -> tensor, e.g. the fp32 master) into the
        checkpoint layout: checkpoint name -> (float32 values of the checkpoint shape, on the CPU; bool
        mask of the elements this worker holds). With tensor parallelism each rank holds part of a
        sharded tensor; `merge_parts` joins the ranks' results.

        The positions are `_positions`.
        """
        out = {}
        for name, shape in self.shapes.items():
            source = tensors[self.routes[name]]
            probe = self._positions(name)
            held = probe > 0
            positions = probe[held].long().cpu() - 1
            numel = int(torch.Size(shape).numel())
            values = torch.zeros(numel, dtype=torch.float32)
            covered = torch.zeros(numel, dtype=torch.bool)
            values[positions] = source.detach().to(device="cpu", dtype=torch.float32)[held.cpu()]
            covered[positions] = True
            out[name] = (values.reshape(shape), covered.reshape(shape))
        return out

    @torch.no_grad()
    def from_checkpoint(self, tensors: Mapping[str, torch.Tensor], into: Mapping[str, torch.Tensor]) -> None:
        """Loads checkpoint-layout tensors (checkpoint name -> tensor of the checkpoint shape) into
        vLLM-layout tensors `into` (parameter name -> tensor, e.g. the fp32 master), in place, with the
        model's loader (so each rank keeps its shard).

        Raises:
            LayoutError: `tensors` lacks a checkpoint tensor or one has another shape.
        """
        missing = sorted(set(self.shapes) - set(tensors))
        if missing:
            raise LayoutError(f"checkpoint tensors missing: {missing[:5]}")
        with self._wrapped():
            for name, shape in self.shapes.items():
                value = torch.as_tensor(tensors[name])
                if tuple(value.shape) != shape:
                    raise LayoutError(
                        f"checkpoint tensor {name!r}: shape {tuple(value.shape)}, expected {shape}"
                    )
                target = into[self.routes[name]]
                self._load(name, value.to(device=target.device, dtype=target.dtype), target)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Raises a logger's level to ERROR for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def merge_parts(
    parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """Joins the ranks' `HFLayout.to_checkpoint` results into full checkpoint tensors (float32).

    Raises:
        LayoutError: an element of a tensor is held by no rank.
    """
    merged = {}
    for name in parts[0]:
        values, covered = parts[0][name][0].clone(), parts[0][name][1].clone()
        for part in parts[1:]:
            other, held = part[name]
            values[held] = other[held]
            covered |= held
        if not bool(covered.all()):
            raise LayoutError(f"checkpoint tensor {name!r}: {int((~covered).sum())} elements held by no rank")
        merged[name] = values
    return merged
