"""Convex Potential Flows (Huang et al., ICLR 2021) as Pyro transforms."""

from .actnorm import ActNorm
from .factories import conditional_cpflow, conditional_cpflow_stack, cpflow, cpflow_stack
from .inverse import (
    InverseReport,
    NonConvergenceError,
    NonConvergenceWarning,
    invert_gradient_map,
    solve_gradient_equation,
)
from .linalg import CGResult, conjugate_gradient, stochastic_logdet
from .nn import ICNN, PICNN, PositiveLinear, gaussian_softplus
from .potential import ConvexPotential
from .inverse_module import InverseTransformModule
from .transforms import ConditionalCPFlow, ConditionedCPFlow, CPFlow, CPFlowStack

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "CGResult",
    "CPFlow",
    "CPFlowStack",
    "ConditionalCPFlow",
    "ConditionedCPFlow",
    "ConvexPotential",
    "ICNN",
    "InverseTransformModule",
    "InverseReport",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "PICNN",
    "PositiveLinear",
    "conditional_cpflow",
    "conditional_cpflow_stack",
    "conjugate_gradient",
    "cpflow",
    "cpflow_stack",
    "gaussian_softplus",
    "invert_gradient_map",
    "solve_gradient_equation",
    "stochastic_logdet",
]
