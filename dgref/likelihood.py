"""Probability-flow ODE log-likelihood, KL divergences and the score-error integral (book: eq. ode-loglik).

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

from ._checks import (check_callable, check_output_shape, check_positive_float,
                      check_positive_int, check_tensor, checked_scope)
from ._progress import progress_bar
from ._util import optional_device, split_extra_args
from .rng import randn

__all__ = ["divergence", "ode_log_likelihood", "kl_divergence", "mixture_kl", "score_error_kl"]

_SOLVERS = ("heun", "rk4", "exp-heun")


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
        args, kwargs = split_extra_args(extra_args)
        with checked_scope():
            out = denoiser(x, sigma, *args, **kwargs)
        check_output_shape("denoiser", out, x.shape)
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
                       sigma_max: float = 80.0, num_steps: int = 128, sigmas=None,
                       solver: str = "heun", method: str = "auto", num_probes: int = 1,
                       generator=None, batch_size: int | None = None,
                       progress: bool | None = None, extra_args=(), batched: bool = False,
                       field=None) -> torch.Tensor:
    """Log-likelihood ``(N,)`` of points ``x`` ``(N, dim)`` under a denoiser's probability-flow ODE.

    Integrates the joint ODE of ``(x, log-density)`` from ``sigma_min`` to ``sigma_max`` in
    ``u = log sigma`` (book eq. ode-loglik): ``num_steps`` steps uniform in ``log sigma``, or
    the steps of a given increasing grid ``sigmas`` ``(S+1,)`` (then ``sigma_min``,
    ``sigma_max`` and ``num_steps`` are taken from it; e.g. :func:`dgref.constructions.sigma_grid`,
    which refines where the field is stiff). ``method="auto"`` is exact for ``dim <= 8`` and
    Hutchinson (Rademacher probes, fixed along each path, ``num_probes`` of them) above.

    Solvers: ``"heun"`` (RK2, 2 evaluations per step; the default), ``"rk4"`` (classical
    Runge-Kutta, 4 per step) and ``"exp-heun"`` (Heun with the linear part ``x`` of the drift
    ``dx/du = x - D`` integrated exactly: ``x_{k+1} = e^h x_k - (e^h - 1) (D_k + D_{k+1}) / 2``
    with ``D_{k+1}`` at the Euler predictor; the log-density by the trapezoid rule). On the ring
    with its exact denoiser the KL bias is 0.008 nats for Heun with 128 steps (256 evaluations)
    and 0.001 for RK4 with 32 steps (128 evaluations): half the cost, a seventh of the bias;
    on the book's toy worlds exp-heun's error is about 3x smaller than Heun's at equal steps.
    ``batched`` is passed to :func:`divergence`; ``field``, if given, replaces autograd:
    ``field(x, sigma) -> (D, div D)`` with sigma ``(B,)``. ``extra_args`` go to the denoiser
    after ``sigma``: a tuple (positional) or a dict (keyword conditioning, as k-diffusion's).

    Compared with k-diffusion's ``log_likelihood(model, x, sigma_min, sigma_max)``: the same
    quantity (``log p`` of the data points in nats, summed over dimensions, higher is more
    likely, ``log N(x_T; 0, sigma_max^2 I)`` of the end point plus the integrated divergence,
    ``int (dim - div D) du = int div((x - D)/sigma) dsigma``). k-diffusion integrates in
    ``sigma`` with an adaptive solver (torchdiffeq's dopri5, ``atol = rtol = 1e-4``) and one
    Rademacher Hutchinson probe, and returns ``(log p, info)``; here the steps are fixed (in
    ``log sigma``), the divergence is exact in low dimension, and a tensor is returned.
    """
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    if field is None:
        check_callable("denoiser", denoiser)
    else:
        check_callable("field", field, "field(x, sigma) -> (D, div D)")
    check_tensor("x", x, ndim=2, finite=True)
    split_extra_args(extra_args)
    if sigmas is None:
        sigma_min = check_positive_float("sigma_min", sigma_min)
        sigma_max = check_positive_float("sigma_max", sigma_max)
        if sigma_min >= sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} >= {sigma_max}")
        num_steps = check_positive_int("num_steps", num_steps)
        u = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_steps + 1,
                           dtype=torch.float64).tolist()
    else:
        check_tensor("sigmas", sigmas, ndim=1, finite=True)
        if sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()) \
                or float(sigmas[0]) <= 0:
            raise ValueError("sigmas must be a positive, strictly increasing grid of >= 2 "
                             "points")
        u = sigmas.double().log().tolist()
        sigma_max = float(sigmas[-1])
    check_positive_int("num_probes", num_probes)
    if method == "auto":
        method = "exact" if x.shape[1] <= 8 else "hutchinson"
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'auto', 'exact' or 'hutchinson', got {method!r}")
    N, dim = x.shape
    bs = N if batch_size is None else check_positive_int("batch_size", batch_size)
    out = []
    for start in range(0, N, bs):
        xb = x[start:start + bs].detach()
        B = xb.shape[0]
        probes = None
        if method == "hutchinson":
            probes = randn((num_probes, B, dim), generator, dtype=x.dtype, device=x.device)
            probes = probes.sign()
            probes[probes == 0] = 1.0

        def f(xx, uu):
            sig = torch.full((B,), math.exp(uu), dtype=x.dtype, device=x.device)
            if field is not None:
                den, div = field(xx, sig)
            else:
                den, div = divergence(denoiser, xx, sig, method=method, probes=probes,
                                      extra_args=extra_args, batched=batched)
            return xx - den, dim - div

        delta = torch.zeros(B, dtype=torch.float64, device=x.device)
        for k in progress_bar(range(len(u) - 1), desc="ODE likelihood", progress=progress):
            h = u[k + 1] - u[k]
            v1, g1 = f(xb, u[k])
            if solver == "heun":
                x_pred = xb + h * v1
                v2, g2 = f(x_pred, u[k + 1])
                xb = xb + 0.5 * h * (v1 + v2)
                delta = delta + 0.5 * h * (g1 + g2).double()
            elif solver == "exp-heun":           # v = x - D, so D = x - v
                eh = math.exp(h)
                d1 = xb - v1
                x_pred = eh * xb - (eh - 1) * d1
                v2, g2 = f(x_pred, u[k + 1])
                xb = eh * xb - (eh - 1) * 0.5 * (d1 + x_pred - v2)
                delta = delta + 0.5 * h * (g1 + g2).double()
            else:
                um = 0.5 * (u[k] + u[k + 1])
                v2, g2 = f(xb + 0.5 * h * v1, um)
                v3, g3 = f(xb + 0.5 * h * v2, um)
                v4, g4 = f(xb + h * v3, u[k + 1])
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
    if not hasattr(data, "log_prob") or not hasattr(data, "sample"):
        raise TypeError(f"data must be a GaussianMixture (log_prob and sample), got "
                        f"{type(data).__name__}")
    if x is None:
        check_positive_int("num_points", num_points)
        x = data.sample(num_points, generator=generator, device=optional_device(device),
                        dtype=dtype)
    else:
        check_tensor("x", x, ndim=2, last_dim=data.dim, finite=True)
    log_p = data.log_prob(x.double()).to(x.dtype)
    log_q = ode_log_likelihood(denoiser, x, **ode_kwargs)
    return _mean_se(log_p - log_q)


def mixture_kl(p, q, *, num_points: int = 100_000, generator=None) -> tuple[float, float]:
    """Monte Carlo ``KL(p || q)`` between two mixtures with exact densities: ``(kl, se)``.

    ``mean log p(x) - log q(x)`` over ``x ~ p``, both densities closed form (book eq. mixture).
    """
    for name, m in (("p", p), ("q", q)):
        if not hasattr(m, "log_prob") or not hasattr(m, "sample"):
            raise TypeError(f"{name} must be a mixture with log_prob and sample, got "
                            f"{type(m).__name__}")
    if p.dim != q.dim:
        raise ValueError(f"p and q must have the same dimension, got p.dim={p.dim} and "
                         f"q.dim={q.dim}")
    check_positive_int("num_points", num_points)
    x = p.sample(num_points, generator=generator, dtype=torch.float64)
    return _mean_se(p.log_prob(x) - q.log_prob(x))


def score_error_kl(p, denoiser, *, reference=None, sigma_min: float = 0.002,
                   sigma_max: float = 80.0, num_sigmas: int = 64, num_points: int = 2000,
                   generator=None, dtype=torch.float32, batch_size: int | None = None,
                   device=None) -> tuple[float, float]:
    """The score-error integral with its standard error (book eq. kl_argument-score-integral).

    ``I = 1/2 int g^2 E_{p_t}|grad log p_t - s|^2 dt = int_{sigma_min}^{sigma_max}
    E_{p_sigma} |D_p(x; sigma) - D(x; sigma)|^2 / sigma^3 dsigma``
    (EDM coordinates: ``g^2 dt = 2 sigma dsigma``, ``s = (D - x)/sigma^2``), where ``D_p`` is
    ``reference`` (default: the data mixture's exact denoiser ``p.denoise``) and ``D`` is
    ``denoiser`` (any denoiser; a guided one from :func:`dgref.discriminator_guidance`).

    Quadrature in ``u = ln sigma`` (``I = int du E|D_p - D|^2 / sigma^2``, Simpson's rule on
    ``num_sigmas`` uniform nodes, rounded up to odd) with Monte Carlo in ``x``: every one of
    ``num_points`` pairs ``(x0 ~ p, n ~ N(0, I))`` is pushed through all levels
    (``x = x0 + sigma n``), so each pair gives an independent estimate of ``I`` and the
    standard error is theirs. ``dtype`` and ``device`` are those of the points (match the
    denoiser's; the squared errors are summed in float64 on the CPU). When ``D`` is the exact denoiser of a model ``q``, ``I`` equals
    ``KL(p_{sigma_min} || q_{sigma_min}) - KL(p_{sigma_max} || q_{sigma_max})``.
    Returns ``(value, standard_error)``.
    """
    if not hasattr(p, "sample"):
        raise TypeError(f"p must be a GaussianMixture, got {type(p).__name__}")
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    lo = check_positive_float("sigma_min", sigma_min)
    hi = check_positive_float("sigma_max", sigma_max)
    if lo >= hi:
        raise ValueError(f"sigma_min must be < sigma_max, got {lo} >= {hi}")
    num_sigmas = check_positive_int("num_sigmas", num_sigmas)
    num_points = check_positive_int("num_points", num_points)
    if num_sigmas < 3:
        raise ValueError(f"num_sigmas must be >= 3, got {num_sigmas}")
    if num_sigmas % 2 == 0:
        num_sigmas += 1
    reference = p.denoise if reference is None else reference
    u = torch.linspace(math.log(lo), math.log(hi), num_sigmas, dtype=torch.float64)
    h = float(u[1] - u[0])
    simpson = torch.ones(num_sigmas, dtype=torch.float64)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    quad = (simpson * h / 3).tolist()
    x0 = p.sample(num_points, generator=generator, dtype=dtype, device=optional_device(device))
    noise = randn(x0.shape, generator, dtype=dtype, device=x0.device)
    bs = num_points if batch_size is None else check_positive_int("batch_size", batch_size)
    total = torch.zeros(num_points, dtype=torch.float64)
    for i, ui in enumerate(u.tolist()):
        s = math.exp(ui)
        for a in range(0, num_points, bs):
            xb = x0[a:a + bs] + s * noise[a:a + bs]
            sig = torch.full((xb.shape[0],), s, dtype=dtype, device=xb.device)
            with torch.no_grad(), checked_scope():
                diff = reference(xb, sig) - denoiser(xb, sig)
            total[a:a + bs] += quad[i] * diff.double().flatten(1).pow(2).sum(1).cpu() / s ** 2
    return float(total.mean()), float(total.std(unbiased=True) / math.sqrt(num_points))
