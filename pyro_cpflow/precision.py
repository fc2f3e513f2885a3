"""Judging lower-precision results in float64.

A float32 residual :math:`|f(x) - y|_\\infty` is computed with float32 rounding, which can
exceed the tolerance it is compared with once the terms of :math:`f` cancel; a sample could
then pass on rounding alone. So the final residual of a float32 (or float16, bfloat16)
inverse is computed in float64, by a float64 twin of the module holding the same
parameter values (exactly: every float32 value is a float64 value). The float32 flow *is*
the map its float32 parameters define; the twin evaluates that map without the float32
rounding of the evaluation. Twins are kept and renewed when a parameter changes.

>>> from torch import nn
>>> layer = nn.Linear(2, 2).float()
>>> twin = float64_twin(layer)
>>> twin.weight.dtype, float64_twin(layer) is twin
(torch.float64, True)
>>> with torch.no_grad():
...     _ = layer.weight.add_(1.0)
>>> float64_twin(layer) is twin
False
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from .pyro_glue import module_parameters_and_buffers

__all__ = ["float64_twin", "judged_in_float64"]

_TWINS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def judged_in_float64(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether results of ``dtype`` on ``device`` are judged in float64: any floating
    dtype narrower than float64, on a device with float64 (not Apple's MPS)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 64 and device.type != "mps"


def float64_twin(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` with its current parameter values (kept until one changes)."""
    tensors = module_parameters_and_buffers(module)
    stamp = tuple((id(t), t._version, t.dtype, t.device) for t in tensors)
    kept = _TWINS.get(module)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    twin = copy.deepcopy(module).double()
    _TWINS[module] = stamp, twin
    return twin
