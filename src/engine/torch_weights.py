"""ES weight operations on a torch model, in place: perturb, restore, apply_update, fingerprint.

Noise (Qiu et al. 2025, Sec. 3), version `shared.seeds.NOISE_VERSION`: for member seed s and parameter p,
eps = N(0, 1) float32 of p's shape with key `shared.seeds.noise_seed(s, p's name)`. On CPUs it is
`engine.cpu_noise` (Philox4x32-10 and Box-Muller over each element's index), computed and added in one pass
over the weights for float32 and bfloat16 parameters, with no noise tensor; on CUDA `torch.randn` from a
`torch.Generator` seeded with the key. It is therefore identical on every engine of the same device type
and i.i.d. across parameters; on CPUs it does not depend on the CPU model, instruction set or thread count.
Restoring (default) copies back from an float32 master copy of the base weights in host
memory, which is also where updates accumulate, so that updates of ~1e-5 (alpha = 5e-4 times shaped
rewards) are not rounded away in bf16. The reference's subtract-to-restore (`p -= sigma * eps`) is kept
as `restore_mode="subtract"`; in bf16 it drifts (measured by the tests and the benchmark).

Memory: one parameter's noise at a time lives on the device; the master copy (4 bytes per parameter)
lives in host memory (page-locked when the weights are on a GPU, for faster host-to-device copies). In the
default modes there is never a second full copy of the weights on the device. `restore_mode="device"`
trades one for speed: it keeps the unperturbed weights, in their own dtype, on the device and restores
with one device-to-device copy instead of a host-to-device copy of the fp32 master (bound by PCIe; the
figures are in docs/measurements.md, from `bench/gpu_check.py`). It is exact too: the copy is the fp32
master rounded to the parameter dtype, i.e. exactly what "master" writes back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from engine import cpu_noise
from shared.protocol import RESTORE_MODES
from shared.seeds import noise_seed


def noise_like(
    param: torch.Tensor, member_seed: int, name: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """The member's float32 noise for one parameter: shape `param.shape` (`param` may be a meta tensor),
    on `device` (default: the parameter's)."""
    return normal_like(param, noise_seed(member_seed, name), device)


def normal_like(param: torch.Tensor, key: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal float32 noise of shape `param.shape` under the 63-bit `key`, on `device` (default:
    the parameter's): `engine.cpu_noise` on CPUs (the same bits on every CPU), `torch.randn` from a
    generator seeded with `key` elsewhere."""
    device = param.device if device is None else torch.device(device)
    if device.type == "cpu":
        out = torch.empty(param.shape, dtype=torch.float32)
        cpu_noise.fill_normal(out.numpy(), key, threads=torch.get_num_threads())
        return out
    generator = torch.Generator(device=device)
    generator.manual_seed(key)
    return torch.randn(param.shape, generator=generator, dtype=torch.float32, device=device)


def _cpu_array(tensor: torch.Tensor) -> np.ndarray | None:
    """The array `engine.cpu_noise.add_normals` updates in place for `tensor` (its storage: float32 as is,
    bfloat16 as uint16 bits), or None where the kernel does not apply (another device, dtype or layout)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    if tensor.dtype == torch.float32:
        return tensor.detach().numpy()
    if tensor.dtype == torch.bfloat16:
        return tensor.detach().view(torch.int16).numpy().view(np.uint16)
    return None


# noise(parameter name, parameter, member seed) -> float32 noise shaped and placed like the parameter.
NoiseFn = Callable[[str, torch.Tensor, int], torch.Tensor]


class TorchWeights:
    """In-place ES operations on the parameters of a torch module.

    Args:
        model: the module whose `named_parameters()` are perturbed (all of them, in name order).
        restore_mode: "master" (exact: copy back from the fp32 host master), "device" (exact: copy back
            from an unperturbed copy of the weights kept on the device; one more set of parameters in
            device memory, much faster on GPUs) or "subtract" (the reference: subtract the same noise
            again, which is inexact in low precision).
        noise: where a parameter's noise comes from; default `noise_like` of its name. vLLM workers,
            whose parameters are fused and sharded, pass `engine.vllm_layout.HFLayout.noise`: the noise of
            the checkpoint tensors, placed where vLLM keeps them.
        noise_slices: with `noise`, parameters whose noise is `noise_like` of other names placed whole
            on contiguous flat ranges, zero elsewhere (parameter name -> [(name, offset, count)];
            `HFLayout.slices`): they are perturbed in one pass on CPUs, slice by slice, as without
            `noise`, instead of through a noise tensor.

    Raises:
        ValueError: unknown restore_mode.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        restore_mode: str = "master",
        noise: NoiseFn | None = None,
        noise_slices: Mapping[str, list[tuple[str, int, int]]] | None = None,
    ) -> None:
        if restore_mode not in RESTORE_MODES:
            raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {restore_mode!r}")
        self.restore_mode = restore_mode
        self.noise_fn = noise
        self.noise_slices = dict(noise_slices or {})
        self.params = dict(sorted(model.named_parameters()))
        pin = any(p.device.type == "cuda" for p in self.params.values())
        if any(p.device.type == "cpu" for p in self.params.values()):
            cpu_noise.warm_up()
        self.master = {}
        for name, p in self.params.items():
            master = p.detach().to(device="cpu", dtype=torch.float32, copy=True)
            self.master[name] = master.pin_memory() if pin else master
        # restore_mode "device": the unperturbed weights in their dtype, on their device.
        self.device_copy = (
            {name: p.detach().clone() for name, p in self.params.items()}
            if restore_mode == "device"
            else None
        )
        self._active: tuple[int, float] | None = None  # (seed, sign * sigma) of the applied perturbation

    def _load_from_master(self, name: str, p: torch.Tensor) -> None:
        """Writes the fp32 master of one parameter into its device tensor (rounded to its dtype), and into
        the device copy in restore_mode "device"."""
        # Transfer in fp32 and round on the parameter's device: with the page-locked master, faster than
        # rounding on the host first (docs/measurements.md, bench/gpu_check.py).
        p.copy_(self.master[name].to(device=p.device))
        if self.device_copy is not None:
            self.device_copy[name].copy_(p)

    def _noise(self, p: torch.Tensor, seed: int, name: str) -> torch.Tensor:
        """The float32 noise of parameter `name` for member `seed` (a fresh tensor, shaped like `p`)."""
        if self.noise_fn is None:
            return noise_like(p, seed, name)
        return self.noise_fn(name, p, seed)

    def _add_noise(self, target: torch.Tensor, name: str, terms: list[tuple[int, float]]) -> None:
        """target <- target + scale * eps(seed, name) for each (seed, scale) of `terms` in turn, in place;
        `target` is shaped like parameter `name`. Each term: the product rounded to float32, the sum
        computed in float32 and rounded once to target's dtype. In one pass on CPUs (engine.cpu_noise)
        where it applies, otherwise through a noise tensor per term; both round identically, so the
        results are bit-identical."""
        slices = [(name, 0, target.numel())] if self.noise_fn is None else self.noise_slices.get(name)
        array = _cpu_array(target) if slices is not None else None
        if array is not None:
            flat = array.reshape(-1)
            scales = [scale for _, scale in terms]
            for key_name, offset, count in slices:
                keys = [noise_seed(seed, key_name) for seed, _ in terms]
                cpu_noise.add_normals(flat[offset : offset + count], keys, scales, torch.get_num_threads())
            return
        for seed, scale in terms:
            target.copy_(self._noise(target, seed, name).mul_(scale).add_(target))

    @property
    def perturbed(self) -> bool:
        """True between `perturb` and `restore`."""
        return self._active is not None

    @property
    def es_names(self) -> list[str]:
        """The parameters ES perturbs and updates, in name order (here: all of them)."""
        return list(self.params)

    def _perturb_one(self, name: str, p: torch.Tensor, seed: int, scale: float) -> None:
        """Parameter `name` <- itself + scale * its noise of member `seed`, in place."""
        self._add_noise(p, name, [(seed, scale)])

    def _add_terms(self, target: torch.Tensor, name: str, terms: list[tuple[int, float]]) -> None:
        """float32 `target` (shaped like parameter `name`) += sum of scale * noise(seed) over `terms`."""
        self._add_noise(target, name, terms)

    @torch.no_grad()
    def perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """theta <- theta + sign * sigma * eps(seed), parameter by parameter, in place.

        Raises:
            RuntimeError: already perturbed (restore first).
        """
        if self._active is not None:
            raise RuntimeError("weights are already perturbed; call restore() first")
        scale = float(sign) * float(sigma)
        for name in self.es_names:
            self._perturb_one(name, self.params[name], seed, scale)
        self._active = (seed, scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Undoes `perturb`: copy from the master or the device copy (exact), or subtract the noise again
        (mode "subtract"). No-op when not perturbed."""
        if self._active is None:
            return
        seed, scale = self._active
        for name in self.es_names:
            p = self.params[name]
            if self.restore_mode == "master":
                self._load_from_master(name, p)
            elif self.restore_mode == "device":
                p.copy_(self.device_copy[name])
            else:
                self._add_noise(p, name, [(seed, -scale)])
        self._active = None

    @torch.no_grad()
    def apply_update(self, pairs: Iterable[tuple[int, float]]) -> None:
        """theta <- theta + sum_k coeff_k * eps(seed_k): accumulated in the fp32 master, then written to
        the device weights (rounded once to their dtype). `pairs` is `Strategy.tell()`'s output.

        Raises:
            RuntimeError: the weights are perturbed (restore first).
        """
        if self._active is not None:
            raise RuntimeError("cannot apply an update to perturbed weights; call restore() first")
        pairs = [(int(s), float(c)) for s, c in pairs]
        for name in self.es_names:
            p = self.params[name]
            update = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self._add_terms(update, name, pairs)
            self.master[name].add_(update.cpu())
            self._load_from_master(name, p)

    @torch.no_grad()
    def load_master(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replaces the fp32 master with `tensors` (parameter name -> tensor of the parameter's shape, any
        float dtype, converted to float32) and writes it into the device weights. Used to resume from a
        checkpoint's master and to resync an engine from a healthy one.

        Raises:
            RuntimeError: the weights are perturbed.
            ValueError: the names differ from the model's parameters, or a shape differs (named).
        """
        if self._active is not None:
            raise RuntimeError("cannot load a master into perturbed weights; call restore() first")
        if set(tensors) != set(self.params):
            missing, extra = sorted(set(self.params) - set(tensors)), sorted(set(tensors) - set(self.params))
            raise ValueError(
                f"master does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, p in self.params.items():
            value = torch.as_tensor(tensors[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"master {name!r}: shape {tuple(value.shape)}, parameter {tuple(p.shape)}")
            self.master[name].copy_(value.to(dtype=torch.float32, device="cpu"))
            self._load_from_master(name, p)

    @torch.no_grad()
    def fingerprint(self) -> str:
        """SHA-256 (hex) over every parameter's name, dtype, shape and raw bytes, in name order.

        Equal on two engines exactly when their weights are bit-identical (up to hash collisions), with or
        without vLLM's LoRA layers around them. Costs one device-to-host copy of the weights, one
        parameter at a time.
        """
        digest = hashlib.sha256()
        # vLLM's LoRA layers wrap a linear layer as `base_layer`: the same weights, named as without.
        plain = {name.replace(".base_layer.", "."): p for name, p in self.params.items()}
        for name, p in sorted(plain.items()):
            data = p.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
