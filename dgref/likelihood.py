"""Probability-flow ODE log-likelihood and exact KL on the toy world (book: eq. ode-loglik).

In ``u = log sigma`` the probability-flow ODE is ``dx/du = x - D(x; sigma)`` and, by the
instantaneous change of variables,

    log p_model(x_0) = log N(x_U; 0, sigma_max^2 I) + integral_{log sigma_min}^{log sigma_max}
                       (dim - div_x D(x_u; e^u)) du,

which is the density of the deterministic sampler's output started from
``N(0, sigma_max^2 I)`` (up to the discretisation of the integral). The divergence is exact for
low dimension (one autograd call per coordinate, all points batched) or a Hutchinson estimate.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_positive_float, check_positive_int, check_tensor
from ._progress import progress_bar
from .utils import randn

__all__ = ["divergence", "ode_log_likelihood", "kl_divergence", "mixture_kl"]


def divergence(denoiser, x: torch.Tensor, sigma: torch.Tensor, *, method: str = "exact",
               probes: torch.Tensor | None = None, extra_args=(), batched: bool = False):
    """Return ``(D(x; sigma), div_x D(x; sigma))`` for ``x`` of shape ``(B, dim)``.

    The divergence term of the probability-flow likelihood (book eq. ode-loglik).

    ``method="exact"`` uses ``dim`` vector-Jacobian products on the whole batch;
    ``"hutchinson"`` uses ``probes`` ``(P, B, dim)`` and returns the unbiased estimate
    ``mean_p eps_p^T J eps_p``. ``batched=True`` runs the ``dim`` exact products as one
    vmapped backward pass (``is_grads_batched``): the same arithmetic in fewer, larger kernels,
    for a GPU; on one CPU thread the loop is as fast.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = denoiser(x, sigma, *extra_args)
        if method == "exact" and batched:
            dim = x.shape[1]
            eye = torch.eye(dim, dtype=x.dtype, device=x.device)
            g, = torch.autograd.grad(out, x, eye[:, None, :].expand(dim, *x.shape),
                                     is_grads_batched=True)            # (dim, B, dim)
            div = torch.diagonal(g, dim1=0, dim2=2).sum(-1)           # (B,)
        elif method == "exact":
            dim = x.shape[1]
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(dim):
                g, = torch.autograd.grad(out[:, i].sum(), x, retain_graph=i < dim - 1)
                div = div + g[:, i]
        elif method == "hutchinson":
            if probes is None:
                raise ValueError("probes are required for method='hutchinson'")
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for p in range(probes.shape[0]):
                g, = torch.autograd.grad(out, x, probes[p], retain_graph=p < probes.shape[0] - 1)
                div = div + (g * probes[p]).sum(1)
            div = div / probes.shape[0]
        else:
            raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    return out.detach(), div.detach()


def ode_log_likelihood(denoiser, x: torch.Tensor, *, sigma_min: float = 0.002,
                       sigma_max: float = 80.0, num_steps: int = 128, method: str = "auto",
                       num_probes: int = 1, generator=None, batch_size: int | None = None,
                       progress: bool | None = None, extra_args=(), solver: str = "heun",
                       batched: bool = False) -> torch.Tensor:
    """Log-likelihood ``(N,)`` of points ``x`` ``(N, dim)`` under a denoiser's probability-flow ODE.

    Integrates the joint ODE of ``(x, log-density)`` from ``sigma_min`` to ``sigma_max`` with
    ``num_steps`` Heun (RK2) steps uniform in ``log sigma`` (book eq. ode-loglik).
    ``method="auto"`` is exact for ``dim <= 8`` and Hutchinson (Rademacher probes, fixed along
    each path, ``num_probes`` of them) above.

    ``solver="rk4"`` takes classical Runge-Kutta steps instead (4 evaluations per step, 2 for
    Heun). On the ring with its exact denoiser the KL bias is 0.008 nats for Heun with 128
    steps (256 evaluations) and 0.001 for RK4 with 32 steps (128 evaluations): half the cost,
    a seventh of the bias. ``batched`` is passed to :func:`divergence`.
    """
    if solver not in ("heun", "rk4"):
        raise ValueError(f"solver must be 'heun' or 'rk4', got {solver!r}")
    check_tensor("x", x, ndim=2)
    sigma_min = check_positive_float("sigma_min", sigma_min)
    sigma_max = check_positive_float("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} >= {sigma_max}")
    num_steps = check_positive_int("num_steps", num_steps)
    check_positive_int("num_probes", num_probes)
    if method == "auto":
        method = "exact" if x.shape[1] <= 8 else "hutchinson"
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'auto', 'exact' or 'hutchinson', got {method!r}")
    N, dim = x.shape
    bs = N if batch_size is None else check_positive_int("batch_size", batch_size)
    out = []
    u = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_steps + 1,
                       dtype=torch.float64).tolist()
    for start in range(0, N, bs):
        xb = x[start:start + bs].detach()
        B = xb.shape[0]
        probes = None
        if method == "hutchinson":
            probes = randn((num_probes, B, dim), generator, dtype=x.dtype, device=x.device)
            probes = probes.sign()
            probes[probes == 0] = 1.0

        def field(xx, uu):
            sig = torch.full((B,), math.exp(uu), dtype=x.dtype, device=x.device)
            den, div = divergence(denoiser, xx, sig, method=method, probes=probes,
                                  extra_args=extra_args, batched=batched)
            return xx - den, dim - div

        delta = torch.zeros(B, dtype=torch.float64, device=x.device)
        for k in progress_bar(range(num_steps), desc="ODE likelihood", progress=progress):
            h = u[k + 1] - u[k]
            v1, g1 = field(xb, u[k])
            if solver == "heun":
                x_pred = xb + h * v1
                v2, g2 = field(x_pred, u[k + 1])
                xb = xb + 0.5 * h * (v1 + v2)
                delta = delta + 0.5 * h * (g1 + g2).double()
            else:
                um = 0.5 * (u[k] + u[k + 1])
                v2, g2 = field(xb + 0.5 * h * v1, um)
                v3, g3 = field(xb + 0.5 * h * v2, um)
                v4, g4 = field(xb + h * v3, u[k + 1])
                xb = xb + (h / 6) * (v1 + 2 * v2 + 2 * v3 + v4)
                delta = delta + (h / 6) * (g1 + 2 * g2 + 2 * g3 + g4).double()
        prior = (-0.5 * (xb.double() ** 2).sum(1) / sigma_max ** 2
                 - dim * math.log(sigma_max) - 0.5 * dim * math.log(2 * math.pi))
        out.append(prior + delta)
    return torch.cat(out).to(x.dtype)


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(v.numel()))


def kl_divergence(data, denoiser, *, num_points: int = 2000, generator=None, x=None,
                  device=None, dtype=torch.float32, **ode_kwargs) -> tuple[float, float]:
    """``KL(p_data || p_model)`` with its standard error, by the ODE likelihood (book eq. kl-ode).

    ``data`` is a :class:`~dgref.GaussianMixture` (its log-density is exact); ``p_model`` is
    the density of ``denoiser``'s deterministic sampler. Returns ``(kl, standard_error)`` from
    ``num_points`` samples of the data (or the given ``x``).
    """
    if x is None:
        check_positive_int("num_points", num_points)
        x = data.sample(num_points, generator=generator, device=device, dtype=dtype)
    log_p = data.log_prob(x.double()).to(x.dtype)
    log_q = ode_log_likelihood(denoiser, x, **ode_kwargs)
    return _mean_se(log_p - log_q)


def mixture_kl(p, q, *, num_points: int = 100_000, generator=None) -> tuple[float, float]:
    """Monte Carlo ``KL(p || q)`` between two mixtures with exact densities: ``(kl, se)``.

    ``mean log p(x) - log q(x)`` over ``x ~ p``, both densities closed form (book eq. mixture).
    """
    check_positive_int("num_points", num_points)
    x = p.sample(num_points, generator=generator, dtype=torch.float64)
    return _mean_se(p.log_prob(x) - q.log_prob(x))
