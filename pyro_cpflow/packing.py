r"""Modules whose parameters live in one flat tensor, read as named views.

Pyro's optimisers (:class:`pyro.optim.PyroOptim`) keep one torch optimiser per parameter
tensor and step them one by one, so every tensor costs a fixed overhead per SVI step
(0.07 ms for Adam on one CPU thread, whatever its size; ``experiments/benchmarks/
optimizer_overhead.py``): the eleven tensors a CP-Flow block had cost 0.78 ms per step,
its two packed ones 0.16 ms. A
:class:`PackedParameters` module registers a single :class:`~torch.nn.Parameter`
``packed`` and hands out named views of it, cut by one ``split`` per evaluation (whose
backward pass is one concatenation).

The state dict still holds one entry per named tensor (``first.weight``, ...), so
checkpoints read as those of ordinary modules, load with ``weights_only=True`` and are
checked entry by entry for missing, unexpected and mis-shaped tensors.

>>> class Affine(PackedParameters):
...     def __init__(self):
...         super().__init__()
...         self.pack({"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
>>> module = Affine()
>>> [name for name, _ in module.named_parameters()], sorted(module.state_dict())
(['packed'], ['bias', 'weight'])
>>> module.unpacked()["weight"].shape
torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["PackedParameters"]


class PackedParameters(nn.Module):
    """Base class: the module's own parameters are the named views of one flat ``packed``.

    Subclasses call :meth:`pack` once in ``__init__`` with their initial tensors and read
    them back with :meth:`unpacked` (all at once, for evaluations) or :meth:`view` (one).
    Child modules keep their own parameters; the module itself holds no buffers.
    """

    _packed_names: tuple[str, ...]
    _packed_shapes: tuple[torch.Size, ...]
    _packed_sizes: tuple[int, ...]

    def pack(self, tensors: Mapping[str, Tensor]) -> None:
        """Register ``tensors`` (copied, in this order) as the views of a new ``packed``."""
        if not tensors:
            raise ValueError("pack needs at least one tensor")
        clashes = [name for name in tensors if name.split(".", 1)[0] in self._modules]
        if clashes:
            raise ValueError(f"packed names {clashes} clash with child modules")
        self._packed_names = tuple(tensors)
        self._packed_shapes = tuple(t.shape for t in tensors.values())
        self._packed_sizes = tuple(t.numel() for t in tensors.values())
        flat = torch.cat([t.detach().reshape(-1) for t in tensors.values()])
        self.packed = nn.Parameter(flat)

    def unpacked(self) -> dict[str, Tensor]:
        """Every named view of ``packed`` (differentiable), from one ``split``.

        Inside ``torch.compile`` the views are cut by ``narrow`` (:meth:`view`) instead: with torch 2.14's
        inductor, a compiled graph that applies ``softplus`` to a part of a ``split``
        parameter and backpropagates wrote the result into the parameter itself (a CP-Flow's
        scale moved at every compiled step, silently; ``tests/test_packing.py``). In eager mode
        ``split`` stays: its backward pass is one concatenation, where ``narrow`` costs one
        full-size zero-fill per view."""
        if torch.compiler.is_compiling():
            return {name: self.view(name) for name in self._packed_names}
        parts = self.packed.split(self._packed_sizes)
        return {  # a part already of its shape (a vector) needs no view, nor its backward node
            name: part if part.shape == shape else part.view(shape)
            for name, part, shape in zip(self._packed_names, parts, self._packed_shapes, strict=True)
        }

    def view(self, name: str) -> Tensor:
        """The named view ``name`` of ``packed``."""
        index = self._packed_names.index(name)
        start = sum(self._packed_sizes[:index])
        return self.packed.narrow(0, start, self._packed_sizes[index]).view(self._packed_shapes[index])

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        for name, tensor in self.unpacked().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        with torch.no_grad():
            views = self.unpacked()
            for name, view in views.items():
                key = prefix + name
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict[key]
                if not isinstance(value, Tensor) or value.shape != view.shape:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    error_msgs.append(
                        f"size mismatch for {key}: copying {shape} from the checkpoint, the shape "
                        f"in the current model is {tuple(view.shape)}."
                    )
                    continue
                view.copy_(value)
        if strict:
            for key in state_dict:
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix) :]
                if rest not in views and rest.split(".", 1)[0] not in self._modules:
                    unexpected_keys.append(key)
