r"""Amortized autoguides for plate-local latent variables.

A model with a local latent :math:`z_i` per member :math:`i` of a plate (a datum of a VAE, a
group of a hierarchical model) has as many posteriors :math:`p(z_i \mid x_i, \dots)` as the
plate has members. A per-datum guide (``AutoNormal``) learns parameters for each of them and
cannot say anything about a datum it has not seen; an *amortized* guide learns one map from a
datum's features :math:`x_i` to its posterior (Kingma and Welling 2014; Gershman and Goodman
2014). Here, with :math:`h_i = e(x_i) \in \mathbb R^c` the features of a user-given encoder,

.. math::

    u_i = m(h_i) + s(h_i) \odot f_{h_i}(\varepsilon_i), \qquad
    \varepsilon_i \sim \mathcal N(0, I_d), \qquad z_i = T(u_i),

where :math:`m, s` are affine heads of :math:`h` (:math:`s` through a softplus),
:math:`f_h = \nabla_\varepsilon F(\varepsilon; h)` is a conditional CP-Flow (a potential
convex in :math:`\varepsilon` for every context :math:`h`) and :math:`T` maps each site's
unconstrained coordinates to its support, as in Pyro's autoguides. The density is

.. math::

    \log q(u_i \mid x_i) = \log \mathcal N(\varepsilon_i; 0, I)
        - \log\det \nabla^2_\varepsilon F(\varepsilon_i; h_i) - \textstyle\sum_k \log s_k(h_i).

**Why the affine map comes after the flow** (and not :math:`f_h(m + s\,\varepsilon)` as in
the VAE experiments): the flow's input is then always standard normal, whatever the units
and the location of the latents, which is what the network's ``input_gain`` assumes and what
:class:`~pyro_cpflow.AutoCPFlow` does; the heads carry the per-datum location and scale and
the flow only the shape, and its quadratic is fixed at :math:`Q = I` (``learn_quadratic=False``),
so that no shared scale or correlation of the flow competes with the heads (a learned one let
latents of a VAE collapse). The flow starts near the identity, so
:class:`AutoAmortizedCPFlow` starts as :class:`AutoAmortizedNormal` (no flow), the
amortized diagonal Gaussian of a plain VAE, with the same encoder and heads: the flow's
gain over it is measured, not assumed (``experiments/amortized_guide.py``).

The guide opens the model's plate with its size and subsample size (from a prototype trace,
or from ``create_plates``), so the subsample indices it draws are those the model uses and
Pyro scales the ELBO by :math:`N/B`. Sampling then scoring a sample never inverts the flow
(every transform caches its input); densities are exact in eval mode (``guide.eval()``).

References: Kingma and Welling, *Auto-encoding variational Bayes*, ICLR 2014; Huang et al.,
*Convex potential flows*, ICLR 2021; Cremer et al., *Inference suboptimality in variational
autoencoders*, ICML 2018 (the amortization gap).

>>> import pyro, pyro.distributions as dist
>>> from torch import nn
>>> pyro.clear_param_store()
>>> x = torch.randn(100, 5)
>>> def model(x):
...     with pyro.plate("data", len(x), subsample_size=10) as i:
...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
...         pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x[i])
>>> guide = AutoAmortizedCPFlow(model, plate="data", encoder=nn.Linear(5, 8),
...                             data=lambda x: x, hidden_dims=(8, 8))
>>> guide(x)["z"].shape
torch.Size([10, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from torch import Tensor, nn
from torch.distributions import biject_to

from .checks import check_not_tracing
from .factories import conditional_cpflow, conditional_cpflow_stack
from .pyro_glue import take_stored_parameters

__all__ = ["AutoAmortizedCPFlow", "AutoAmortizedNormal"]


class AutoAmortizedNormal(AutoGuide):
    r"""An amortized diagonal Gaussian for the local latents of one plate:
    :math:`u_i = m(h_i) + s(h_i) \odot \varepsilon_i` with :math:`h_i` = ``encoder(x_i)``.

    :param model: a Pyro model.
    :param plate: the name of the model's plate whose members have the local latents.
    :param encoder: an ``nn.Module`` mapping the features of a batch of members
        ``(B, ...)`` to context features ``(B, c)``; its parameters are trained with the guide.
    :param data: a callable taking the model's ``*args, **kwargs`` and returning the features
        of every member of the plate, a tensor ``(N, ...)`` with ``N`` the plate's full size;
        the guide encodes ``data(*args, **kwargs)[indices]`` for the plate's (subsample)
        indices.
    :param sites: the local latent site(s) to guide (default: every latent site of the
        model). Each must lie in ``plate`` and in no other plate; the others are left to
        another guide (in an :class:`~pyro.infer.autoguide.AutoGuideList`).
    :param init_loc_fn: a per-site initialisation; the location head starts at the mean over
        the plate of the initial (unconstrained) values.
    :param init_scale: the initial posterior standard deviation in the unconstrained space.
    :param create_plates: as for every :class:`~pyro.infer.autoguide.AutoGuide`: a callable
        of the model's arguments returning the plate(s), for a plate whose size or indices
        change between calls (``pyro.plate("data", len(x))`` on minibatches of varying size).

    >>> import pyro, pyro.distributions as dist
    >>> from torch import nn
    >>> pyro.clear_param_store()
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    >>> guide = AutoAmortizedNormal(model, plate="data", encoder=nn.Linear(1, 4),
    ...                             data=lambda x: x.unsqueeze(-1))
    >>> guide.posterior(torch.zeros(3, 1)).batch_shape
    Traceback (most recent call last):
    ...
    RuntimeError: the guide has not been run yet: call it (or an SVI step) first
    >>> guide(torch.randn(6))["z"].shape
    torch.Size([6])
    >>> guide.posterior(torch.zeros(3, 1)).batch_shape
    torch.Size([3])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        plate: str,
        encoder: nn.Module,
        data: Callable[..., Tensor],
        sites: str | Sequence[str] | None = None,
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = 0.1,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        if not isinstance(plate, str):
            raise TypeError(f"plate must be the name of a plate (a str), got {plate!r}")
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if not callable(data):
            raise TypeError(f"data must be a callable of the model's arguments, got {type(data).__name__}")
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        names = [sites] if isinstance(sites, str) else sites
        if names is not None and not (names and all(isinstance(name, str) for name in names)):
            raise TypeError(f"sites must be a site name or a non-empty sequence of them, got {sites!r}")
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)
        self.plate = plate
        self.encoder = encoder
        self._data = data
        self._site_names = None if names is None else list(names)
        self._init_scale = float(init_scale)

    # ------------------------------------------------------------------ prototype

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        frame = self._plate_frame()
        self._batch_shape = torch.Size([frame.size] + [1] * (-frame.dim - 1))
        self._slices: dict[str, tuple[int, int, torch.Size]] = {}
        start, init = 0, []
        for name in self._local_sites(frame):
            site = self.prototype_trace.nodes[name]
            unconstrained = biject_to(site["fn"].support).inv(site["value"].detach())
            shape = unconstrained.shape[len(self._batch_shape) :]
            self._slices[name] = (start, start + shape.numel(), shape)
            start += shape.numel()
            init.append(unconstrained.reshape(frame.size, -1).mean(0))
        self.latent_dim = start
        features = self._features(frame.full_size or frame.size, args, kwargs)[: frame.size]
        context = self.encoder(features)
        if not (isinstance(context, Tensor) and context.dim() == 2 and len(context) == len(features)):
            raise ValueError(
                f"encoder must map features {tuple(features.shape)} to context features (B, c) "
                f"with B = {len(features)}, got {_describe(context)}"
            )
        self.context_dim = context.shape[-1]
        self.head = nn.Linear(self.context_dim, 2 * self.latent_dim).to(context)
        with torch.no_grad():  # the guide starts at N(init, init_scale^2) for every member
            self.head.weight.zero_()
            raw_scale = init[0].new_full((start,), _softplus_inverse(self._init_scale))
            self.head.bias.copy_(torch.cat([*init, raw_scale]))
        self._setup_flow(context)
        if not pyro.settings.get("module_local_params"):
            for name in self._modules_to_store():
                take_stored_parameters(self._pyro_get_fullname(name), getattr(self, name))

    def _setup_flow(self, context: Tensor) -> None:
        """No flow: the Gaussian guide (overridden by :class:`AutoAmortizedCPFlow`)."""

    def _modules_to_store(self) -> list[str]:
        return ["encoder", "head"]

    def _plate_frame(self):
        if self.plate not in self._prototype_frames:
            raise ValueError(
                f"plate: the model has no plate named {self.plate!r} around a latent site; "
                f"its plates are {sorted(self._prototype_frames)}"
            )
        return self._prototype_frames[self.plate]

    def _local_sites(self, frame) -> list[str]:
        latent = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
        names = latent if self._site_names is None else self._site_names
        for name in names:
            if name not in latent:
                raise ValueError(
                    f"sites: the model has no latent site {name!r}; its latent sites are {latent}"
                )
            site = self.prototype_trace.nodes[name]
            plates = [f.name for f in site["cond_indep_stack"] if f.vectorized]
            if plates != [self.plate]:
                raise ValueError(
                    f"sites: site {name!r} is inside the plates {plates}, but {type(self).__name__} "
                    f"guides sites inside plate {self.plate!r} and no other; guide the others with "
                    "another autoguide in an AutoGuideList (poutine.block the model)"
                )
            if site["fn"].batch_shape != self._batch_shape:
                raise ValueError(
                    f"sites: site {name!r} has batch shape {tuple(site['fn'].batch_shape)}, expected "
                    f"{tuple(self._batch_shape)} for plate {self.plate!r} (dim {frame.dim}); move the "
                    "per-member dimensions into the event with .to_event()"
                )
        return list(names)

    # ------------------------------------------------------------------ the posterior

    def _features(self, size: int, args: tuple, kwargs: dict) -> Tensor:
        features = self._data(*args, **kwargs)
        if not isinstance(features, Tensor) or features.dim() < 1 or len(features) != size:
            raise ValueError(
                f"data(*args, **kwargs) must return the features of all {size} members of plate "
                f"{self.plate!r}, a tensor ({size}, ...), got {_describe(features)}; pass "
                "create_plates= when the plate's size changes between calls"
            )
        return features

    def _encode(self, features: Tensor) -> Tensor:
        context = self.encoder(features)
        expected = (len(features), self.context_dim)
        if not (isinstance(context, Tensor) and tuple(context.shape) == expected):
            raise ValueError(f"encoder must return context features {expected}, got {_describe(context)}")
        return context

    def _transforms(self, context: Tensor) -> list:
        loc, raw_scale = self.head(context).split(self.latent_dim, dim=-1)
        # the affine map caches its input so that scoring a sample never inverts a flow
        return [
            dist.transforms.AffineTransform(loc, nn.functional.softplus(raw_scale), event_dim=1, cache_size=1)
        ]

    def _distribution(self, context: Tensor) -> dist.TorchDistribution:
        zeros = context.new_zeros(context.shape[:-1] + (self.latent_dim,))
        base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
        return dist.TransformedDistribution(base, self._transforms(context))

    def posterior(self, features: Tensor) -> dist.TorchDistribution:
        r""":math:`q(u \mid x)` of the unconstrained latent (the sites' coordinates concatenated,
        event ``(latent_dim,)``) for each row of ``features`` ``(B, ...)``: batch shape ``(B,)``.
        """
        check_not_tracing()
        if self.prototype_trace is None:
            raise RuntimeError("the guide has not been run yet: call it (or an SVI step) first")
        return self._distribution(self._encode(features))

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Coordinate-wise posterior quantiles of each local site for **every** member of the
        plate (all ``N`` rows of ``data(*args, **kwargs)``), from ``num_samples`` draws per
        member: shape ``(len(quantiles), N) + event shape``. As in
        :meth:`~pyro_cpflow.AutoCPFlow.quantiles`, they are taken in the unconstrained space and
        mapped to each site's support."""
        if self.prototype_trace is None:
            raise RuntimeError("the guide has not been run yet: call it (or an SVI step) first")
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
        frame = self._plate_frame()
        features = self._features(frame.full_size or frame.size, args, kwargs)
        draws = self.posterior(features).sample((num_samples,))  # (S, N, latent_dim)
        levels = torch.as_tensor(quantiles, dtype=draws.dtype, device=draws.device).reshape(-1)
        if not bool(((levels >= 0) & (levels <= 1)).all()):
            raise ValueError(f"quantiles must lie in [0, 1], got {levels.tolist()}")
        latent = draws.quantile(levels, dim=0)  # (Q, N, latent_dim)
        result = {}
        for name, (start, stop, shape) in self._slices.items():
            unconstrained = latent[..., start:stop].reshape(latent.shape[:2] + shape)
            result[name] = biject_to(self.prototype_trace.nodes[name]["fn"].support)(unconstrained)
        return result

    @torch.no_grad()
    def median(self, *args: Any, num_samples: int = 1000, **kwargs: Any) -> dict[str, Tensor]:
        """The coordinate-wise posterior median of each local site for every member of the plate,
        ``(N,) + event shape`` (see :meth:`quantiles`)."""
        values = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in values.items()}

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample the local sites for the plate's (subsample) indices; the same arguments as
        the model."""
        check_not_tracing()
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plate = self._create_plates(*args, **kwargs)[self.plate]
        with plate as indices:
            features = self._features(plate.size, args, kwargs)[indices]
            context = self._encode(features)
            context = context.reshape(context.shape[:1] + self._batch_shape[1:] + context.shape[1:])
            latent = pyro.sample(
                f"_{self._pyro_name}_latent", self._distribution(context), infer={"is_auxiliary": True}
            )
            return {name: self._sample_site(name, latent) for name in self._slices}

    def _sample_site(self, name: str, latent: Tensor) -> Tensor:
        start, stop, shape = self._slices[name]
        fn = self.prototype_trace.nodes[name]["fn"]
        unconstrained = latent[..., start:stop].reshape(latent.shape[:-1] + shape)
        transform = biject_to(fn.support)
        value = transform(unconstrained)
        if poutine.get_mask() is False:
            log_density: Tensor | float = 0.0
        else:
            log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + fn.event_dim)
        return pyro.sample(name, dist.Delta(value, log_density=log_density, event_dim=fn.event_dim))


class AutoAmortizedCPFlow(AutoAmortizedNormal):
    r"""An amortized CP-Flow guide for the local latents of one plate:
    :math:`u_i = m(h_i) + s(h_i) \odot f_{h_i}(\varepsilon_i)` with :math:`h_i` =
    ``encoder(x_i)`` and :math:`f_h` a conditional CP-Flow (see the module docstring).

    Arguments as in :class:`AutoAmortizedNormal`, plus:

    :param hidden_dims: widths of each block's PICNN.
    :param num_blocks: conditional CP-Flow blocks composed (without ActNorm: the heads
        after them already standardise).
    :param flow_options: other keyword arguments of :func:`~pyro_cpflow.conditional_cpflow`
        (``logdet``, ``alpha``, ``input_gain``, ``context_quadratic_rank``, tolerances...).
        Unless ``quadratic_rank`` or ``learn_quadratic`` is given, the flow's quadratic is fixed
        at :math:`Q = I` (``learn_quadratic=False``): the heads carry every scale. A learned
        :math:`Q` shares an overall scale with :math:`s(h)`, and on the digits VAE
        (``experiments/RESULTS.md``, "Amortized guide across seeds") it let one or two of the
        four latents collapse at every seed (held-out ELBO −141.18, −143.01, −137.61 against
        −126.30, −129.05, −126.49 with :math:`Q = I`; the amortized Gaussian −124.97, −126.72,
        −130.44).

    A hierarchical model with a global latent: :class:`~pyro_cpflow.AutoCPFlow` (or
    ``AutoNormal``) guides it, this guide the group effects.

    >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from pyro.infer.autoguide import AutoGuideList, AutoNormal
    >>> from torch import nn
    >>> pyro.clear_param_store()
    >>> y = torch.randn(50, 4) + 1.0  # 50 groups of 4 observations
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    ...     with pyro.plate("groups", len(y), subsample_size=20) as g:
    ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    ...         with pyro.plate("obs", 4):
    ...             pyro.sample("y", dist.Normal(theta, 1.0), obs=y[g].T)
    >>> guide = AutoGuideList(model)
    >>> guide.append(AutoNormal(poutine.block(model, expose=["mu"])))
    >>> guide.append(AutoAmortizedCPFlow(poutine.block(model, expose=["theta"]), plate="groups",
    ...                                  encoder=nn.Linear(4, 8), data=lambda y: y, hidden_dims=(8, 8)))
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    >>> loss = svi.step(y)
    >>> sorted(guide(y))
    ['mu', 'theta']
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        plate: str,
        encoder: nn.Module,
        data: Callable[..., Tensor],
        sites: str | Sequence[str] | None = None,
        hidden_dims: Sequence[int] = (64, 64),
        num_blocks: int = 1,
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = 0.1,
        create_plates: Callable[..., Any] | None = None,
        **flow_options: Any,
    ) -> None:
        if not (isinstance(num_blocks, int) and num_blocks >= 1):
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self._hidden_dims = tuple(hidden_dims)
        self._num_blocks = num_blocks
        self._flow_options = flow_options
        super().__init__(
            model,
            plate=plate,
            encoder=encoder,
            data=data,
            sites=sites,
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
            create_plates=create_plates,
        )

    def _setup_flow(self, context: Tensor) -> None:
        options = {"hidden_dims": self._hidden_dims, **self._flow_options}
        if "quadratic_rank" not in options:
            options.setdefault("learn_quadratic", False)
        if self._num_blocks == 1:
            flow = conditional_cpflow(self.latent_dim, self.context_dim, **options)
        else:
            flow = conditional_cpflow_stack(
                self.latent_dim, self.context_dim, self._num_blocks, actnorm="none", **options
            )
        self.flow = flow.to(dtype=context.dtype, device=context.device)

    def _modules_to_store(self) -> list[str]:
        return [*super()._modules_to_store(), "flow"]

    def _transforms(self, context: Tensor) -> list:
        return [self.flow.condition(context), *super()._transforms(context)]


def _softplus_inverse(value: float) -> float:
    """:math:`y` with :math:`\\log(1 + e^y) =` ``value``."""
    return value + math.log(-math.expm1(-value))


def _describe(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
