"""Convex Potential Flows (Huang et al., ICLR 2021) as Pyro transforms."""

from .actnorm import ActNorm
from .amortized import AutoAmortizedCPFlow, AutoAmortizedNormal
from .autoguide import AutoCPFlow
from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .derivatives import AutogradTrace, NetworkTrace, PotentialTrace
from .factories import (
    block_triangular_cpflow,
    conditional_cpflow,
    conditional_cpflow_stack,
    cpflow,
    cpflow_stack,
)
from .linalg import CGResult, StochasticLogdet, conjugate_gradient, stochastic_logdet
from .nn import ICNN, PICNN, NoNetwork, PositiveLinear, gaussian_softplus
from .options import (
    FlowOptions,
    NonConvergenceError,
    NonConvergenceWarning,
    StackOptions,
    StochasticDensityWarning,
)
from .potential import ConvexPotential
from .pyro_glue import InverseTransformModule
from .reports import Diagnostics, InverseReport
from .solvers import LBFGS, InverseSolver, NewtonCG, invert_gradient_map, solve_gradient_equation
from .stack import ConditionalCPFlowStack, CPFlowStack
from .transforms import ConditionalCPFlow, ConditionedCPFlow, CPFlow
from .triangular import BlockTriangularCPFlow

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AutoAmortizedCPFlow",
    "AutoAmortizedNormal",
    "AutoCPFlow",
    "AutogradTrace",
    "BlockTriangularCPFlow",
    "CGResult",
    "CPFlow",
    "CPFlowStack",
    "CheckpointError",
    "ConditionalCPFlow",
    "ConditionalCPFlowStack",
    "ConditionedCPFlow",
    "ConvexPotential",
    "Diagnostics",
    "FlowOptions",
    "ICNN",
    "InverseReport",
    "InverseSolver",
    "InverseTransformModule",
    "LBFGS",
    "NetworkTrace",
    "NewtonCG",
    "NoNetwork",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "StochasticDensityWarning",
    "PICNN",
    "PositiveLinear",
    "PotentialTrace",
    "StackOptions",
    "StochasticLogdet",
    "block_triangular_cpflow",
    "conditional_cpflow",
    "conditional_cpflow_stack",
    "conjugate_gradient",
    "cpflow",
    "cpflow_stack",
    "gaussian_softplus",
    "invert_gradient_map",
    "load_checkpoint",
    "save_checkpoint",
    "solve_gradient_equation",
    "stochastic_logdet",
]
