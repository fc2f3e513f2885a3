"""Factories in Pyro's style: ``cpflow(input_dim, ...)`` and friends."""

from __future__ import annotations

from collections.abc import Sequence

from .actnorm import ActNorm
from .nn import DEFAULT_INPUT_GAIN, ICNN, PICNN, NoNetwork
from .options import StackOptions
from .potential import ContextQuadratic, ConvexPotential
from .stack import ConditionalCPFlowStack, CPFlowStack
from .transforms import ConditionalCPFlow, CPFlow
from .triangular import BlockTriangularCPFlow

__all__ = [
    "block_triangular_cpflow",
    "conditional_cpflow",
    "conditional_cpflow_stack",
    "cpflow",
    "cpflow_stack",
]


_POTENTIAL_OPTIONS = ("initial_scale", "initial_factor_std", "learn_quadratic")


def _split_options(input_dim: int, alpha: float, quadratic_rank: int | None, options: dict) -> dict:
    """Pop the :class:`~pyro_cpflow.potential.ConvexPotential` options out of ``options``."""
    default_rank = min(input_dim, 64) if options.get("learn_quadratic", True) else 0
    rank = default_rank if quadratic_rank is None else quadratic_rank
    potential = {"input_dim": input_dim, "alpha": alpha, "quadratic_rank": rank}
    potential.update({key: options.pop(key) for key in _POTENTIAL_OPTIONS if key in options})
    return potential


def cpflow(
    input_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    augmented: bool = True,
    activation: str = "gaussian_softplus",
    alpha: float = 1e-2,
    quadratic_rank: int | None = None,
    input_gain: float = DEFAULT_INPUT_GAIN,
    **options,
) -> CPFlow:
    """A :class:`~pyro_cpflow.transforms.CPFlow` on an (input-augmented) ICNN.

    :param input_dim: event dimension ``d``.
    :param hidden_dims: ICNN widths.
    :param augmented: input-augmented ICNN (Huang et al. 2021, eq. 7).
    :param activation: ``"gaussian_softplus"`` or ``"softplus"``.
    :param alpha: strong-convexity floor of the potential.
    :param quadratic_rank: columns of the learnable factor ``L`` (default ``min(d, 64)``; 0 with
        ``learn_quadratic=False``).
    :param input_gain: initial sharpness of the network's input features (see
        :class:`~pyro_cpflow.nn.ICNN`); it assumes roughly standardised inputs.
    :param options: ``initial_scale``, ``initial_factor_std`` and ``learn_quadratic`` of
        :class:`~pyro_cpflow.potential.ConvexPotential`, and the
        :class:`~pyro_cpflow.options.FlowOptions` (``logdet``, tolerances...).

    >>> flow = cpflow(3, hidden_dims=(8, 8), logdet="exact")
    >>> flow.inv(flow(torch.randn(4, 3))).shape
    torch.Size([4, 3])
    """
    network = ICNN(input_dim, hidden_dims, augmented=augmented, activation=activation, input_gain=input_gain)
    potential = ConvexPotential(network, **_split_options(input_dim, alpha, quadratic_rank, options))
    return CPFlow(potential, **options)


def conditional_cpflow(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    augmented: bool = True,
    activation: str = "gaussian_softplus",
    alpha: float = 1e-2,
    quadratic_rank: int | None = None,
    context_quadratic_rank: int = 0,
    context_diagonal: bool = False,
    input_gain: float = DEFAULT_INPUT_GAIN,
    **options,
) -> ConditionalCPFlow:
    r"""A :class:`~pyro_cpflow.transforms.ConditionalCPFlow` on an (input-augmented) PICNN.

    Arguments as in :func:`cpflow`, plus the context dimension and
    ``context_quadratic_rank``: when positive, the potential gains
    :math:`\tfrac12|L(c)^\top x|^2 + b(c)^\top x` with :math:`L(c)` of that rank
    (:class:`~pyro_cpflow.potential.ContextQuadratic`); ``context_diagonal=True`` adds
    :math:`\tfrac12 x^\top D(c) x` with a log-linear positive diagonal :math:`D(c)`, a
    per-coordinate scale that the context can move by orders of magnitude. ``hidden_dims=()``
    leaves the network out (:class:`~pyro_cpflow.nn.NoNetwork`): the flow is then the
    conditional Gaussian :math:`x \mapsto A(c)\,x + b(c)` of its quadratic and context terms,
    which must be present.

    >>> flow = conditional_cpflow(3, context_dim=5, hidden_dims=(8, 8))
    >>> flow.condition(torch.randn(5))(torch.randn(4, 3)).shape
    torch.Size([4, 3])
    >>> gaussian = conditional_cpflow(3, context_dim=5, hidden_dims=(), context_diagonal=True)
    >>> gaussian.condition(torch.randn(5))(torch.randn(4, 3)).shape
    torch.Size([4, 3])
    """
    has_context_terms = context_quadratic_rank > 0 or context_diagonal
    if len(hidden_dims) == 0:
        if not has_context_terms:
            raise ValueError(
                "hidden_dims=() leaves only the quadratic, which ignores the context: give "
                "context_quadratic_rank > 0 or context_diagonal=True"
            )
        network: PICNN | NoNetwork = NoNetwork(input_dim, context_dim)
    else:
        network = PICNN(
            input_dim,
            context_dim,
            hidden_dims,
            augmented=augmented,
            activation=activation,
            input_gain=input_gain,
        )
    context_terms = (
        ContextQuadratic(context_dim, input_dim, context_quadratic_rank, diagonal=context_diagonal)
        if has_context_terms
        else None
    )
    potential = ConvexPotential(
        network, context_terms=context_terms, **_split_options(input_dim, alpha, quadratic_rank, options)
    )
    return ConditionalCPFlow(potential, **options)


ACTNORM_PLACEMENTS = ("between", "around", "none")


def _with_actnorm(blocks: list, input_dim: int, placement: str) -> list:
    """The blocks with :class:`ActNorm` layers placed as ``placement`` says.

    ``"between"``: ``[b0, A, b1, A, ..., bK]``; ``"around"``: ``[A, b0, A, b1, ..., A, bK, A]``
    (before every block and after the last, as in the reference VAE code); ``"none"``.
    """
    if not blocks:
        raise ValueError("num_blocks must be positive")
    if placement not in ACTNORM_PLACEMENTS:
        raise ValueError(f"actnorm must be one of {ACTNORM_PLACEMENTS}, got {placement!r}")
    if placement == "none":
        return list(blocks)
    parts = [blocks[0]]
    for block in blocks[1:]:
        parts += [ActNorm(input_dim), block]
    if placement == "around":
        parts = [ActNorm(input_dim), *parts, ActNorm(input_dim)]
    return parts


def _stack_options(kwargs: dict) -> StackOptions:
    """The :class:`StackOptions` in ``kwargs``: ``inverse_tol`` and ``on_failure`` stay there
    for the blocks too, ``refine_max_iter`` is the stack's alone."""
    values = {name: kwargs[name] for name in ("inverse_tol", "on_failure") if name in kwargs}
    if "refine_max_iter" in kwargs:
        values["refine_max_iter"] = kwargs.pop("refine_max_iter")
    return StackOptions(**values)


def cpflow_stack(
    input_dim: int,
    num_blocks: int,
    actnorm: str = "between",
    block_hidden_dims: Sequence[Sequence[int]] | None = None,
    **kwargs,
) -> CPFlowStack:
    """``num_blocks`` CP-Flow blocks with data-initialised :class:`ActNorm` layers.

    :param actnorm: ``"between"`` the blocks (default), ``"around"`` them (also before the
        first and after the last, as in the reference VAE code) or ``"none"``.
    :param block_hidden_dims: the ``hidden_dims`` of each block, when the blocks differ
        (``num_blocks`` sequences; without it, ``hidden_dims`` serves every block).

    Other keyword arguments go to :func:`cpflow`, except ``refine_max_iter``, which goes
    with ``inverse_tol`` and ``on_failure`` to the stack's own
    :class:`~pyro_cpflow.options.StackOptions`: the inverse of the stack meets
    ``inverse_tol`` end to end (see :mod:`pyro_cpflow.stack`). The result is a
    :class:`~pyro_cpflow.stack.CPFlowStack` (``cache_size=1``) whose ``stack.inv``, for
    the density direction, is an ``nn.Module``.

    >>> stack = cpflow_stack(2, num_blocks=2, hidden_dims=(8, 8))
    >>> [type(t).__name__ for t in stack]
    ['CPFlow', 'ActNorm', 'CPFlow']
    >>> uneven = cpflow_stack(2, num_blocks=2, block_hidden_dims=[(16, 16, 16), (8, 8)])
    >>> [t.potential.network.hidden_dims for t in uneven if isinstance(t, CPFlow)]
    [(16, 16, 16), (8, 8)]
    """
    options = _stack_options(kwargs)
    if block_hidden_dims is None:
        widths: list[dict] = [{}] * num_blocks
    else:
        if "hidden_dims" in kwargs:
            raise ValueError(
                "pass either hidden_dims (every block) or block_hidden_dims (each block), not both"
            )
        widths = [{"hidden_dims": tuple(dims)} for dims in block_hidden_dims]
        if len(widths) != num_blocks:
            raise ValueError(
                f"block_hidden_dims must hold one sequence per block ({num_blocks}), got {len(widths)}"
            )
    blocks = [cpflow(input_dim, **width, **kwargs) for width in widths]
    return CPFlowStack(_with_actnorm(blocks, input_dim, actnorm), cache_size=1, options=options)


def conditional_cpflow_stack(
    input_dim: int, context_dim: int, num_blocks: int, actnorm: str = "between", **kwargs
) -> ConditionalCPFlowStack:
    """Conditional counterpart of :func:`cpflow_stack` (ActNorm is unconditional).

    >>> stack = conditional_cpflow_stack(2, 3, num_blocks=2, hidden_dims=(8, 8), actnorm="around")
    >>> len(stack.transforms)  # ActNorm, block, ActNorm, block, ActNorm
    5
    >>> stack.condition(torch.randn(3))(torch.randn(5, 2)).shape
    torch.Size([5, 2])
    """
    options = _stack_options(kwargs)
    blocks = [conditional_cpflow(input_dim, context_dim, **kwargs) for _ in range(num_blocks)]
    return ConditionalCPFlowStack(_with_actnorm(blocks, input_dim, actnorm), cache_size=1, options=options)


def block_triangular_cpflow(
    sizes: Sequence[int],
    context_diagonal: bool = True,
    local_hidden_dims: Sequence[int] | None = None,
    **kwargs,
) -> BlockTriangularCPFlow:
    r"""A :class:`~pyro_cpflow.triangular.BlockTriangularCPFlow` over groups of ``sizes``: a
    :func:`cpflow` on the first group, a :func:`conditional_cpflow` on each later one given
    the outputs of the groups before it.

    :param context_diagonal: give the conditional blocks the log-linear context diagonal
        :math:`\tfrac12 x^\top D(c) x`, so that a group's scale can follow the groups
        before it by orders of magnitude (see :mod:`pyro_cpflow.triangular`).
    :param local_hidden_dims: the widths of the conditional blocks' networks (default: the
        ``hidden_dims`` of all blocks); ``()`` makes each later group a conditional Gaussian of
        the groups before it (:class:`~pyro_cpflow.nn.NoNetwork`).

    Other keyword arguments (``hidden_dims``, ``logdet``, ``alpha``, tolerances...) go to
    every block.

    >>> flow = block_triangular_cpflow([1, 3], hidden_dims=(8, 8))
    >>> [type(block).__name__ for block in flow.blocks]
    ['CPFlow', 'ConditionalCPFlow']
    """
    sizes = list(sizes)
    if not sizes or not all(isinstance(size, int) and size >= 1 for size in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive ints, got {sizes!r}")
    first = cpflow(sizes[0], **kwargs)
    local = dict(kwargs) if local_hidden_dims is None else {**kwargs, "hidden_dims": tuple(local_hidden_dims)}
    rest = [
        conditional_cpflow(size, sum(sizes[:k]), context_diagonal=context_diagonal, **local)
        for k, size in enumerate(sizes[1:], start=1)
    ]
    return BlockTriangularCPFlow(first, rest)
