"""What Pyro's transform API needs from a CP-Flow: a cache that cannot go stale, and module-valued inverses.

**The cache.** :class:`torch.distributions.Transform` caches the last pair ``(x, y)`` and
returns ``y`` whenever it is called again with the same tensor ``x``. For a
:class:`~pyro.distributions.TransformModule` that pair goes stale as soon as an
optimizer updates the parameters (Pyro issue #2564): the same data tensor, scored
again after ``optimizer.step()``, would be mapped with the old parameters through a
graph that has already been freed. Every in-place update of a tensor (optimizer
steps, ``load_state_dict``, ``copy_``) increments its version counter, so keying the
cache on the parameters' versions as well as on the identity of ``x`` invalidates it
exactly when it must. The same holds for the cached tensors themselves: ``x.mul_(2)``
after ``f(x)`` leaves ``x`` the same object with new values, so the pair also records the
versions of ``x`` and ``y``. Two more things invalidate the pair: a change of grad mode (a
pair computed under ``torch.no_grad()`` has no graph, and returning it in grad mode
would silently drop gradients), and a backward pass through the cached output (which
frees its graph): a hook on the output forgets the pair as soon as a gradient flows
through it. Subclasses may add further state to the key through
:meth:`VersionedCacheMixin._cache_key_extra`, and keep side entries (such as the
evaluated potential, so that ``log_abs_det_jacobian`` after a call does not evaluate it
again) with :meth:`VersionedCacheMixin._side_lookup`. A result that a solver could not
bring to its tolerance is never cached (:meth:`VersionedCacheMixin._mark_unconverged`):
calling again solves again, and applies the failure policy again, instead of serving a
failed inverse as if it were a success.

**Module-valued inverses.** Pyro's generic inverse of a transform
(``torch.distributions.transforms._InverseTransform``) is not an ``nn.Module``: put into a
guide or a ``ComposeTransformModule``, the parameters of the transform it wraps are
silently left out of ``parameters()`` and of ``pyro.module``, so they never train.
:class:`InverseTransformModule` registers the wrapped transform as a submodule instead,
and :class:`ModuleInverseMixin` makes a transform's ``inv`` return one.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable
from typing import Any

import pyro
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from pyro.params.param_store import param_with_module_name
from torch import Tensor, nn
from torch.distributions import Transform

__all__ = [
    "InverseTransformModule",
    "ModuleInverseMixin",
    "VersionedCacheMixin",
    "module_parameters_and_buffers",
    "module_repr",
    "take_stored_parameters",
]


class VersionedCacheMixin:
    """Mixin for transforms: the ``(x, y)`` cache also checks the parameters' versions.

    Subclasses implement :meth:`_cache_parameters`, the tensors whose in-place
    changes must invalidate the cache.
    """

    _cache_size: int
    _cached_x_y: tuple[Tensor | None, Tensor | None]

    def _cache_parameters(self) -> Iterable[Tensor]:
        raise NotImplementedError

    def _cache_key_extra(self) -> Hashable:
        """Further state whose change must invalidate the cache (none by default)."""
        return None

    def _cache_stamp(self, *keys: Tensor) -> tuple:
        """The state a cached entry depends on: parameters' versions, grad mode, the extra
        key, and the versions of the cached tensors ``keys`` themselves."""
        versions = tuple((id(p), p._version) for p in self._cache_parameters())
        own = tuple(key._version for key in keys)
        return versions, own, torch.is_grad_enabled(), self._cache_key_extra()

    def _cache_lookup(self, key: Tensor, position: int) -> Tensor | None:
        cached = self._cached_x_y
        if (
            isinstance(key, Tensor)
            and cached[position] is key
            and self.__dict__.get("_cached_stamp") == self._cache_stamp(*cached)
        ):
            return cached[1 - position]
        return None

    def _cache_store(self, x: Tensor, y: Tensor, output: Tensor) -> None:
        self._cached_x_y = x, y
        self.__dict__["_cached_stamp"] = self._cache_stamp(x, y)
        self._forget_after_backward(output, x)

    def _mark_unconverged(self) -> None:
        """Called by ``_call`` or ``_inverse`` when its solver missed the tolerance: the
        result is returned but not cached."""
        self.__dict__["_unconverged"] = True

    def _computed(self, compute, value: Tensor) -> tuple[Tensor, bool]:  # type: ignore[no-untyped-def]
        """``compute(value)`` and whether its result may be cached."""
        self.__dict__["_unconverged"] = False
        result = compute(value)
        return result, not self.__dict__.pop("_unconverged")

    def _forget_after_backward(self, output: Tensor, x: Tensor) -> None:
        """Clear the cache when a gradient flows through ``output``, computed from the input ``x``:
        the backward pass frees the graph that the cached pair and side entries share."""
        if not output.requires_grad:
            return
        owner = weakref.ref(self)

        def forget(grad: Tensor) -> None:
            transform = owner()
            if transform is None:
                return
            entry = transform.__dict__.get("_side_entry")
            if transform._cached_x_y[0] is x or (entry is not None and entry[0] is x):
                transform.clear_cache()

        output.register_hook(forget)

    def __call__(self, x: Tensor) -> Tensor:
        if self._cache_size == 0:
            return self._call(x)  # type: ignore[attr-defined]
        y = self._cache_lookup(x, 0)
        if y is None:
            y, keep = self._computed(self._call, x)  # type: ignore[attr-defined]
            if keep:
                self._cache_store(x, y, output=y)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        if self._cache_size == 0:
            return self._inverse(y)  # type: ignore[attr-defined]
        x = self._cache_lookup(y, 1)
        if x is None:
            x, keep = self._computed(self._inverse, y)  # type: ignore[attr-defined]
            if keep:
                self._cache_store(x, y, output=x)
        return x

    def __getstate__(self) -> dict:
        # copies and pickles start with an empty cache: the cached pair may hold a graph
        state = super().__getstate__()  # type: ignore[misc]
        if "_cached_x_y" in state:
            state["_cached_x_y"] = None, None
        state.pop("_cached_stamp", None)
        state.pop("_side_entry", None)
        return state

    def clear_cache(self) -> None:
        """Forget the cached pair, its parameter stamp and every side entry."""
        if self._cache_size == 1:
            self._cached_x_y = None, None
        self.__dict__.pop("_cached_stamp", None)
        self.__dict__.pop("_side_entry", None)

    def _side_store(self, key: Tensor, value: Any) -> None:
        """Keep ``value`` for the input tensor ``key`` (one entry, same invalidation as the cache)."""
        if self._cache_size:
            self.__dict__["_side_entry"] = key, self._cache_stamp(key), value

    def _side_lookup(self, key: Tensor) -> Any:
        """The side value stored for this very tensor, if nothing has changed since; else ``None``."""
        entry = self.__dict__.get("_side_entry")
        if entry is not None and entry[0] is key and entry[1] == self._cache_stamp(key):
            return entry[2]
        return None


def module_parameters_and_buffers(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``module``: what an update may change in place.

    A direct walk of the module tree (no names, no de-duplication): several times faster
    than ``parameters()`` and ``buffers()``, which matters because the cache reads it on
    every call.
    """
    tensors = [t for t in module._parameters.values() if t is not None]
    tensors += [t for t in module._buffers.values() if t is not None]
    for child in module._modules.values():
        if child is not None:
            tensors += module_parameters_and_buffers(child)
    return tensors


def take_stored_parameters(fullname: str, module: nn.Module) -> None:
    """``pyro.module(fullname, module, update_module_params=True)``: a param store loaded
    before (a saved guide) hands ``module`` its parameters under their names, where a plain
    ``pyro.module`` would keep the fresh ones and leave the loaded ones untrained. A stored
    parameter of another shape (a guide of another model or size left in the store) is refused
    by name, where Pyro would hand it back silently."""
    store = pyro.get_param_store()
    for name, parameter in module.named_parameters():
        stored = param_with_module_name(fullname, name)  # pyro.module's naming
        if stored in store and store[stored].shape != parameter.shape:
            raise ValueError(
                f"the param store holds {stored!r} with shape {tuple(store[stored].shape)}, but this "
                f"guide's has shape {tuple(parameter.shape)} (another model or size): call "
                "pyro.clear_param_store() or give the guide another name"
            )
    pyro.module(fullname, module, update_module_params=True)


def module_repr(module: nn.Module) -> str:
    """``nn.Module``'s repr (the class, its ``extra_repr`` and its children) for a Pyro
    ``TransformModule``, whose MRO puts ``Transform.__repr__`` (the bare class name) first.

    >>> from pyro_cpflow import cpflow
    >>> print(cpflow(2, hidden_dims=(8,), logdet="exact"))
    CPFlow(
      input_dim=2, logdet='exact'
      (potential): ConvexPotential(
        input_dim=2, alpha=0.01, quadratic_rank=2
        (network): ICNN(input_dim=2, hidden_dims=(8,), augmented=True, activation='gaussian_softplus')
      )
    )
    """
    return nn.Module.__repr__(module)


class InverseTransformModule(TransformModule):
    r"""The inverse of a :class:`~pyro.distributions.TransformModule`, itself an ``nn.Module``.

    Pyro's generic inverse is not a module, so its parameters would silently go
    untrained inside a guide or a ``ComposeTransformModule``. This one registers the
    wrapped transform as a submodule and shares its parameters and cache
    (``t.inv.inv is t``). For a CP-Flow its forward runs the convex solver and its
    inverse is the gradient map; use it for the density direction, where training
    evaluates only :math:`\nabla F`:

    >>> import pyro.distributions as dist
    >>> from pyro_cpflow import cpflow
    >>> flow = cpflow(2, hidden_dims=(16, 16))
    >>> p = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow.inv])
    >>> p.log_prob(torch.randn(7, 2)).shape
    torch.Size([7])
    """

    bijective = True

    def __init__(self, transform: TransformModule) -> None:
        super().__init__(cache_size=0)
        self.transform = transform

    __repr__ = module_repr

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return self.transform.codomain

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return self.transform.domain

    @property
    def sign(self) -> int:  # type: ignore[override]
        return self.transform.sign

    @property
    def inv(self) -> TransformModule:
        return self.transform

    def __call__(self, y: Tensor) -> Tensor:
        return self.transform._inv_call(y)

    def _inv_call(self, x: Tensor) -> Tensor:
        return self.transform(x)

    def _call(self, y: Tensor) -> Tensor:
        return self.transform._inverse(y)

    def _inverse(self, x: Tensor) -> Tensor:
        return self.transform._call(x)

    def log_abs_det_jacobian(self, y: Tensor, x: Tensor) -> Tensor:
        return -self.transform.log_abs_det_jacobian(x, y)

    def with_cache(self, cache_size: int = 1) -> Transform:
        return self.transform.with_cache(cache_size).inv

    def clear_cache(self) -> None:
        self.transform.clear_cache()


class ModuleInverseMixin:
    """``inv`` returns one :class:`InverseTransformModule` (kept, but not as a submodule)."""

    @property
    def inv(self) -> InverseTransformModule:
        inverse = self.__dict__.get("_inverse_module")
        if inverse is None:
            inverse = InverseTransformModule(self)  # type: ignore[arg-type]
            self.__dict__["_inverse_module"] = inverse  # not a submodule: no cycle
        return inverse
