"""A one-entry transform cache that cannot go stale when parameters change.

:class:`torch.distributions.Transform` caches the last pair ``(x, y)`` and returns
``y`` whenever it is called again with the same tensor ``x``. For a
:class:`~pyro.distributions.TransformModule` that pair goes stale as soon as an
optimizer updates the parameters (Pyro issue #2564): the same data tensor, scored
again after ``optimizer.step()``, would be mapped with the old parameters through a
graph that has already been freed. Every in-place update of a tensor (optimizer
steps, ``load_state_dict``, ``copy_``) increments its version counter, so keying the
cache on the parameters' versions as well as on the identity of ``x`` invalidates it
exactly when it must.

Two more things invalidate the pair: a change of grad mode (a pair computed under
``torch.no_grad()`` has no graph, and returning it in grad mode would silently drop
gradients), and a backward pass through the cached output (which frees its graph): a
hook on the output forgets the pair as soon as a gradient flows through it. Subclasses
may add further state to the key through :meth:`_cache_key_extra`.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["VersionedCacheMixin", "module_parameters_and_buffers"]


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

    def _cache_stamp(self) -> tuple:
        versions = tuple((id(p), p._version) for p in self._cache_parameters())
        return versions, torch.is_grad_enabled(), self._cache_key_extra()

    def _cache_lookup(self, key: Tensor, position: int) -> Tensor | None:
        cached = self._cached_x_y
        if cached[position] is key and self.__dict__.get("_cached_stamp") == self._cache_stamp():
            return cached[1 - position]
        return None

    def _cache_store(self, x: Tensor, y: Tensor, output: Tensor) -> None:
        self._cached_x_y = x, y
        self.__dict__["_cached_stamp"] = self._cache_stamp()
        if output.requires_grad:
            owner = weakref.ref(self)

            def forget(grad: Tensor) -> None:
                transform = owner()
                if transform is not None and transform._cached_x_y[0] is x:
                    transform.clear_cache()

            output.register_hook(forget)

    def __call__(self, x: Tensor) -> Tensor:
        if self._cache_size == 0:
            return self._call(x)  # type: ignore[attr-defined]
        y = self._cache_lookup(x, 0)
        if y is None:
            y = self._call(x)  # type: ignore[attr-defined]
            self._cache_store(x, y, output=y)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        if self._cache_size == 0:
            return self._inverse(y)  # type: ignore[attr-defined]
        x = self._cache_lookup(y, 1)
        if x is None:
            x = self._inverse(y)  # type: ignore[attr-defined]
            self._cache_store(x, y, output=x)
        return x

    def __getstate__(self) -> dict:
        # copies and pickles start with an empty cache: the cached pair may hold a graph
        state = super().__getstate__()  # type: ignore[misc]
        if "_cached_x_y" in state:
            state["_cached_x_y"] = None, None
        state.pop("_cached_stamp", None)
        return state

    def clear_cache(self) -> None:
        """Forget the cached pair and its parameter stamp."""
        if self._cache_size == 1:
            self._cached_x_y = None, None
        self.__dict__.pop("_cached_stamp", None)


def module_parameters_and_buffers(module: nn.Module) -> Iterable[Tensor]:
    """Every parameter and buffer of ``module``: what an update may change in place."""
    yield from module.parameters()
    yield from module.buffers()
