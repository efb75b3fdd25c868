"""The layout of tpu-inference's JAX weights against the Hugging Face checkpoint they were loaded from.

tpu-inference's loader (`models.jax.utils.weight_utils`) puts each checkpoint tensor into a leaf of the
runner's state (`TPUModelRunner.state`) under the same dotted name, reshaped and transposed for its
einsum kernels: a linear layer's weight is stored (in, out) rather than torch's (out, in), and attention
projections keep their heads as an axis: q/k/v weights (hidden, heads, head_dim), biases (heads,
head_dim), o_proj (heads, head_dim, hidden). No value changes, only positions, so the fp32 master moves
between the layouts exactly: `to_checkpoint` for checkpoints that transformers loads, `from_checkpoint`
to resume or resync an engine from one.

The rules are checked, not trusted: `JaxLayout` maps the weights the runner loaded back onto the
checkpoint file and requires them bit for bit (`check`) before ES touches them, so a model whose layout
differs fails at start with the tensor named.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from engine.vllm_layout import LayoutError, checkpoint_shapes

_PART = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(value)$")


def checkpoint_name(leaf_name: str) -> str:
    """The checkpoint tensor name of a runner leaf (`jax_weights.leaf_names` spelling):
    "['model']['layers'][0]['mlp']['up_proj']['weight'].value" -> "model.layers.0.mlp.up_proj.weight".

    Raises:
        LayoutError: the name is not a path of keys and indices.
    """
    parts, end = [], 0
    for match in _PART.finditer(leaf_name):
        if match.start() != end:
            break
        end = match.end()
        if match.group(3) is None:
            parts.append(match.group(1) if match.group(1) is not None else match.group(2))
    if end != len(leaf_name) or not parts:
        raise LayoutError(f"runner leaf {leaf_name!r} is not a path of keys and indices")
    return ".".join(parts)


def _is_linear(name: str) -> bool:
    return name.endswith("proj.weight") or name == "lm_head.weight"


def to_checkpoint(name: str, leaf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A runner leaf in the checkpoint tensor's layout (`shape`): linear weights transposed back to
    (out, in), heads folded into the feature axis.

    Raises:
        LayoutError: no rule maps the leaf's shape onto `shape` (names both).
    """
    shape = tuple(shape)
    if _is_linear(name):
        if leaf.ndim == 2:
            out = leaf.T
        elif leaf.ndim == 3 and shape == (leaf.shape[1] * leaf.shape[2], leaf.shape[0]):
            out = leaf.reshape(leaf.shape[0], -1).T  # q/k/v: (hidden, heads, head_dim)
        elif leaf.ndim == 3 and shape == (leaf.shape[2], leaf.shape[0] * leaf.shape[1]):
            out = leaf.reshape(-1, leaf.shape[2]).T  # o_proj: (heads, head_dim, hidden)
        else:
            out = leaf
    elif leaf.ndim == 2 and len(shape) == 1:
        out = leaf.reshape(-1)  # q/k/v biases: (heads, head_dim)
    else:
        out = leaf
    if out.shape != shape:
        raise LayoutError(
            f"{name}: runner leaf of shape {leaf.shape} does not map onto the checkpoint's {shape}"
        )
    return np.ascontiguousarray(out)


def from_checkpoint(name: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `to_checkpoint`: a checkpoint tensor in the runner leaf's layout (`shape`).

    Raises:
        LayoutError: the tensor does not map onto `shape` (names both).
    """
    shape = tuple(shape)
    if _is_linear(name):
        if len(shape) == 2:
            out = tensor.T
        elif len(shape) == 3 and tensor.shape in (
            (shape[1] * shape[2], shape[0]),  # q/k/v
            (shape[2], shape[0] * shape[1]),  # o_proj
        ):
            out = tensor.T.reshape(shape)
        else:
            out = tensor
    elif len(shape) == 2 and tensor.ndim == 1:
        out = tensor.reshape(shape)
    else:
        out = tensor
    if out.shape != shape:
        raise LayoutError(
            f"{name}: checkpoint tensor of shape {tensor.shape} does not map onto the runner's {shape}"
        )
    return np.ascontiguousarray(out)


class JaxLayout:
    """The runner leaves of one model against its checkpoint directory.

    Args:
        leaf_names: the runner's leaves (`jax_weights.leaf_names`), in order.
        leaf_shapes: their shapes.
        model_dir: the Hugging Face directory the runner loaded (safetensors files).

    Attributes:
        names: checkpoint tensor name per leaf, in leaf order.
        shapes: checkpoint tensor name -> shape (from the safetensors headers).

    Raises:
        LayoutError: a leaf has no checkpoint tensor of its name, or no rule maps its shape.
    """

    def __init__(
        self, leaf_names: list[str], leaf_shapes: list[tuple[int, ...]], model_dir: str | Path
    ) -> None:
        self.model_dir = Path(model_dir)
        self.leaf_shapes = [tuple(s) for s in leaf_shapes]
        self.names = [checkpoint_name(n) for n in leaf_names]
        shapes = checkpoint_shapes(self.model_dir)
        missing = [n for n in self.names if n not in shapes]
        if missing:
            raise LayoutError(
                f"{self.model_dir}: runner leaves without a checkpoint tensor of the same name: {missing[:5]}"
            )
        self.shapes = {n: shapes[n] for n in self.names}

    def to_checkpoint(self, leaves: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Checkpoint name -> tensor for every leaf (arrays in leaf order, e.g. the fp32 master)."""
        return {
            name: to_checkpoint(name, leaf, self.shapes[name])
            for name, leaf in zip(self.names, leaves, strict=True)
        }

    def from_checkpoint(self, tensors: dict[str, Any]) -> list[np.ndarray]:
        """Leaf arrays (float32, in leaf order) from checkpoint name -> tensor.

        Raises:
            LayoutError: a tensor is missing or has another shape (named).
        """
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise LayoutError(f"master is missing tensors {missing[:5]} ({len(missing)} in all)")
        return [
            from_checkpoint(name, np.asarray(tensors[name], dtype=np.float32), shape)
            for name, shape in zip(self.names, self.leaf_shapes, strict=True)
        ]

    def check(self, leaves: list[np.ndarray], dtypes: list[Any]) -> None:
        """Requires the leaves (e.g. the fp32 master), mapped back and rounded to the runner's `dtypes`
        (one numpy dtype per leaf, bfloat16 included), to equal the checkpoint's tensors rounded the same
        way, bit for bit, one tensor at a time.

        Raises:
            LayoutError: a tensor differs (named): the rules do not fit this model.
        """
        from safetensors import safe_open

        index = {name: i for i, name in enumerate(self.names)}
        for path in sorted(self.model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name not in index:
                        continue
                    i = index[name]
                    expected = f.get_tensor(name).float().numpy().astype(dtypes[i])
                    got = to_checkpoint(name, leaves[i], self.shapes[name]).astype(dtypes[i])
                    if not np.array_equal(got, expected):
                        raise LayoutError(
                            f"{name}: the runner's weights, mapped back, differ from {path.name}: "
                            "engine.jax_layout's rules do not fit this model"
                        )
