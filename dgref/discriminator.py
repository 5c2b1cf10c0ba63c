"""Discriminator guidance: the discriminator, its two training objectives, and the guided denoiser.

Book chapters "The KL argument" (eq. kl_argument-identity, eq. kl_argument-gradient-error) and
"A KL-minimising objective" (eq. kl_objective-loss).

- A time-dependent discriminator returns a *logit* ``d(x, sigma)`` (real = data = 1); the
  optimal logit is ``d* = log p_sigma - log q_sigma`` (Kim et al. 2023).
- Guidance adds ``w sigma^2 grad_x d`` to the model's denoiser (book eq. guided-denoiser).
- Two objectives: the time-weighted binary cross-entropy of Kim et al. 2023 (:func:`ce_loss`)
  and the reconstruction loss on the corrected denoiser that bounds the KL of the refined model
  (Verine et al. 2025; :func:`kl_loss`).

Every function takes an explicit ``generator=`` where randomness enters.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ._checks import (check_callable, check_output_shape, check_positive_float,
                      check_positive_int, check_sigma, check_tensor, check_window,
                      checked_scope)
from ._util import bcast as _bcast
from ._util import optional_device
from .edm import _precond_coeffs, edm_loss_weight, edm_sample_sigmas
from .guidance import ScoreCorrectedDenoiser
from .nets import MLP, silu_mlp
from .rng import init_rng, randn
from .training import batch_sampler, optimisation_loop

__all__ = ["Discriminator", "logit_and_grad", "sample_training_sigmas", "ce_loss", "kl_loss",
           "discriminator_correction", "discriminator_guidance", "dg_sampler_kwargs",
           "oracle_logit", "discriminator_training_loop", "train_discriminator"]

_SIGMA_DISTS = ("lognormal", "loguniform")


# ---------------------------------------------------------------------------------------------
# The discriminator and its input gradient
# ---------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """A time-dependent discriminator logit ``d(x, sigma)`` for vector data (book: chapter kl_argument).

    ``d = F(c_in x, c_noise)`` with EDM's ``c_in = 1/sqrt(sigma^2 + sigma_data^2)`` and
    ``c_noise = log(sigma)/4`` (book eq. edm-precond), ``F`` a SiLU network with one output, so
    ``grad_x d`` is smooth (guidance needs it; with ReLU it would be piecewise constant).
    ``forward(x (B, dim), sigma (B,) or number) -> (B,)``; ``sigmoid(d)`` is the probability
    that ``x`` is real.

    ``num_freqs=0`` (default) feeds ``c_noise`` to the network as one raw input. With
    ``num_freqs > 0`` the network is :class:`dgref.nets.MLP` with that many Fourier features of
    ``c_noise``; in our 2-D runs those 32 (default 16 frequencies) noise features drowned the
    two coordinates at initialisation and cross-entropy training stayed on the plateau
    ``d = const`` for hundreds of steps, hence the default.
    """

    def __init__(self, dim: int, sigma_data: float, hidden: int = 128, depth: int = 3,
                 num_freqs: int = 0, *, generator=None):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.sigma_data = check_positive_float("sigma_data", sigma_data)
        check_positive_int("hidden", hidden)
        check_positive_int("depth", depth)
        if isinstance(num_freqs, bool) or not isinstance(num_freqs, int) or num_freqs < 0:
            raise ValueError(f"num_freqs must be an int >= 0, got {num_freqs!r}")
        self.num_freqs = num_freqs
        with init_rng(generator):
            if num_freqs > 0:
                self.net = MLP(self.dim, hidden, depth, out_dim=1, num_freqs=num_freqs)
            else:
                self.net = silu_mlp(self.dim + 1, hidden, depth, 1)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        check_tensor("x", x, ndim=2, last_dim=self.dim)
        param = next(self.net.parameters())
        if x.dtype != param.dtype or x.device != param.device:
            raise ValueError(f"x is {x.dtype} on {x.device} but the discriminator's parameters "
                             f"are {param.dtype} on {param.device}; pass x.to(...) or move the "
                             "discriminator (e.g. disc.double() for float64 data)")
        sigma = check_sigma("sigma", sigma, x.shape[0], like=x)
        _, _, c_in, c_noise = _precond_coeffs(sigma, self.sigma_data)
        if self.num_freqs > 0:
            out = self.net(c_in[:, None] * x, c_noise)
        else:
            out = self.net(torch.cat([c_in[:, None] * x, c_noise[:, None]], dim=1))
        return out.reshape(x.shape[0])                             # (B,)


def logit_and_grad(disc, x: torch.Tensor, sigma, create_graph: bool = False):
    """Return ``(d (B,), grad_x d (same shape as x))`` for any discriminator ``disc(x, sigma) -> (B,)`` (book eq. guided-denoiser).

    Works for ``x`` of any shape ``(B, ...)`` and inside ``torch.no_grad()`` (it switches
    autograd on locally). With ``create_graph=False`` both results are detached. With
    ``create_graph=True`` the gradient keeps its graph, for double backprop (training with
    :func:`kl_loss`) and for the divergence of a guided denoiser (ODE likelihood); if ``x``
    itself requires grad, the graph reaches back to ``x``.
    """
    check_callable("disc", disc, "disc(x, sigma) -> (B,)")
    check_tensor("x", x, min_ndim=2)
    sigma = check_sigma("sigma", sigma, x.shape[0], like=x)
    with torch.enable_grad(), checked_scope():
        if create_graph and x.requires_grad:
            x_in = x
        else:
            x_in = x.detach().requires_grad_(True)
        d = disc(x_in, sigma)
        if not isinstance(d, torch.Tensor) or d.shape != (x.shape[0],):
            got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"disc must return a logit of shape ({x.shape[0]},), got {got}")
        g, = torch.autograd.grad(d.sum(), x_in, create_graph=create_graph)
    if not create_graph:
        return d.detach(), g.detach()
    return d, g


# ---------------------------------------------------------------------------------------------
# Noise levels for training
# ---------------------------------------------------------------------------------------------
def _check_dist(sigma_dist):
    if sigma_dist not in _SIGMA_DISTS:
        raise ValueError(f"sigma_dist must be one of {_SIGMA_DISTS}, got {sigma_dist!r}")
    return sigma_dist


def sample_training_sigmas(batch: int, *, sigma_dist: str = "lognormal", P_mean: float = -1.2,
                           P_std: float = 1.2, sigma_min: float = 0.002, sigma_max: float = 80.0,
                           generator=None, device=None, dtype=torch.float32):
    """Training noise levels ``(batch,)`` and their density ``p_train(sigma)`` ``(batch,)`` (book: chapter kl_objective).

    ``"lognormal"``: ``ln sigma ~ N(P_mean, P_std^2)`` (EDM). ``"loguniform"``: ``ln sigma``
    uniform on ``[ln sigma_min, ln sigma_max]``, density ``1/(sigma ln(sigma_max/sigma_min))``.
    """
    _check_dist(sigma_dist)
    check_positive_int("batch", batch)
    device = optional_device(device)
    if sigma_dist == "lognormal":
        sigma = edm_sample_sigmas(batch, P_mean=P_mean, P_std=P_std, generator=generator,
                                  device=device, dtype=dtype)
    else:
        lo, hi = _check_range(sigma_min, sigma_max)
        gen_device = generator.device if generator is not None else (device or "cpu")
        u = torch.rand((batch,), generator=generator, dtype=dtype, device=gen_device)
        sigma = (math.log(lo) + u * math.log(hi / lo)).exp()
        if device is not None:
            sigma = sigma.to(device)
    return sigma, _sigma_density(sigma, sigma_dist, P_mean, P_std, sigma_min, sigma_max)


def _check_range(sigma_min, sigma_max):
    lo = check_positive_float("sigma_min", sigma_min)
    hi = check_positive_float("sigma_max", sigma_max)
    if lo >= hi:
        raise ValueError(f"sigma_min must be < sigma_max, got {lo} >= {hi}")
    return lo, hi


def _sigma_density(sigma, sigma_dist, P_mean, P_std, sigma_min, sigma_max):
    """Density of ``sigma`` (not of ``ln sigma``) under the training distribution."""
    if sigma_dist == "lognormal":
        z = (sigma.log() - P_mean) / P_std
        return torch.exp(-0.5 * z ** 2) / (sigma * P_std * math.sqrt(2 * math.pi))
    lo, hi = _check_range(sigma_min, sigma_max)
    inside = ((sigma >= lo * (1 - 1e-6)) & (sigma <= hi * (1 + 1e-6))).to(sigma.dtype)
    return inside / (sigma * math.log(hi / lo))


# ---------------------------------------------------------------------------------------------
# The two objectives
# ---------------------------------------------------------------------------------------------
def _ce_sigma_dist(sigma_dist, weighting):
    """The level distribution of :func:`ce_loss` from ``sigma_dist`` (and the old ``weighting``)."""
    if weighting is not None:
        if weighting != "loguniform":
            raise ValueError(
                f"weighting={weighting!r} is not an argument of ce_loss any more: the level "
                f"distribution is sigma_dist ('lognormal' or 'loguniform'; the old "
                f"weighting='uniform' is sigma_dist='lognormal'), and weighting means only a "
                f"loss weight lambda(sigma), which the cross-entropy does not have")
        if sigma_dist not in (None, "loguniform"):
            raise ValueError(f"weighting='loguniform' (old spelling of sigma_dist='loguniform') "
                             f"contradicts sigma_dist={sigma_dist!r}")
        sigma_dist = "loguniform"
    return _check_dist("lognormal" if sigma_dist is None else sigma_dist)


def ce_loss(disc, x_real: torch.Tensor, x_fake: torch.Tensor, *, generator=None, sigma=None,
            sigma_dist: str | None = None, P_mean: float = -1.2, P_std: float = 1.2,
            sigma_min: float = 0.002, sigma_max: float = 80.0, reduction: str = "mean",
            weighting: str | None = None) -> torch.Tensor:
    """Time-weighted binary cross-entropy of a discriminator, in logit form (book eq. kl_objective-ce).

    ``L_CE = E_sigma [ E_{p_sigma} softplus(-d) + E_{q_sigma} softplus(d) ]`` (Kim et al. 2023):
    ``x_real`` (data, label 1) and ``x_fake`` (model samples, label 0), both ``(B, ...)``, are
    noised at the *same* levels ``sigma`` ``(B,)``; ``softplus`` keeps it stable for any logit.
    Its pointwise optimum is ``d* = log p_sigma/q_sigma``.

    ``sigma_dist`` says how the noise levels are drawn (each drawn level has loss weight 1):
    ``"lognormal"`` (the default): ``ln sigma ~ N(P_mean, P_std^2)`` as in EDM training.
    ``"loguniform"``: ``ln sigma`` uniform on ``[sigma_min, sigma_max]``, DG as published
    (Kim et al. 2023): their VP likelihood-weighting importance sampling, density proportional
    to ``g^2/sigma_VP^2`` in VP time, is ``d ln(e^B - 1) = d ln sigma^2`` in EDM's
    ``sigma^2 = e^B - 1`` (``B(t) = int_0^t beta``), i.e. log-uniform in sigma. Pass ``sigma`` to
    fix the levels. ``reduction="none"`` returns the per-pair ``(B,)`` values.

    ``weighting`` is not a level distribution any more (it names only a loss weight
    ``lambda(sigma)``, which cross-entropy does not have): ``weighting="uniform"`` (which drew
    log-normal levels) raises; ``weighting="loguniform"`` is accepted for now as the old spelling
    of ``sigma_dist="loguniform"`` (callers: please move to ``sigma_dist``).
    """
    check_tensor("x_real", x_real, min_ndim=2)
    check_tensor("x_fake", x_fake, min_ndim=2)
    if x_real.shape != x_fake.shape:
        raise ValueError(f"x_real and x_fake must have the same shape, got {tuple(x_real.shape)} "
                         f"and {tuple(x_fake.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    dist = _ce_sigma_dist(sigma_dist, weighting)
    B = x_real.shape[0]
    if sigma is None:
        sigma, _ = sample_training_sigmas(B, sigma_dist=dist, P_mean=P_mean, P_std=P_std,
                                          sigma_min=sigma_min, sigma_max=sigma_max,
                                          generator=generator, device=x_real.device,
                                          dtype=x_real.dtype)
    else:
        sigma = check_sigma("sigma", sigma, B, like=x_real)
    s = _bcast(sigma, x_real)
    n_real = randn(x_real.shape, generator, dtype=x_real.dtype, device=x_real.device)
    n_fake = randn(x_fake.shape, generator, dtype=x_fake.dtype, device=x_fake.device)
    with checked_scope():
        d_real = disc(x_real + s * n_real, sigma)                   # (B,)
        d_fake = disc(x_fake + s * n_fake, sigma)                   # (B,)
    check_output_shape("disc", d_real, (B,), "a logit per row, (B,)")
    per = F.softplus(-d_real) + F.softplus(d_fake)                  # (B,)
    return per.mean() if reduction == "mean" else per


def kl_loss(disc, denoiser, x0: torch.Tensor, *, generator=None, sigma=None,
            weighting: str = "kl", gamma: float = 0.0, x_fake: torch.Tensor | None = None,
            P_mean: float = -1.2, P_std: float = 1.2, sigma_min: float = 0.002,
            sigma_max: float = 80.0, sigma_dist: str | None = None,
            sigma_data: float | None = None, reduction: str = "mean",
            relative: bool = False) -> torch.Tensor:
    """The KL-minimising discriminator loss: reconstruction of the corrected denoiser (book eq. kl_objective-loss).

    Per example, with ``x = x0 + sigma n`` and the frozen model ``D`` (no gradient flows into it)::

        l = lambda(sigma) * | D(x; sigma) + sigma^2 grad_x d(x, sigma) - x0 |^2

    (sum over data dimensions). ``grad_x d`` is taken with ``create_graph=True`` so the loss
    can be back-propagated to the discriminator's parameters (double backprop).

    Why this is the KL: by denoising score matching,
    ``E |D_tilde - x0|^2 = E |D_tilde - D_true|^2 + E |D_true - x0|^2`` with the second term
    independent of ``d``; and ``int dsigma E_{p_sigma}|D_tilde - D_true|^2 / sigma^3`` is the
    score-error integral ``1/2 int g^2 E|grad log p - s_tilde|^2 dt`` (``g^2 dt = 2 sigma dsigma``,
    ``s = (D - x)/sigma^2``), which equals ``KL(p||q_tilde)`` minus the prior term when the
    refined model is self-consistent and bounds the SDE sampler's KL otherwise.

    Weighting:

    - ``"kl"``: ``lambda = 1 / (sigma^3 p_train(sigma))``, where ``p_train`` is the density of the
      drawn levels, so that ``E_{sigma ~ p_train}[l] = int_{sigma_min}^{sigma_max} dsigma
      E|D_tilde - x0|^2 / sigma^3`` exactly, i.e. the KL bound plus a ``d``-independent constant.
      Levels are drawn log-uniformly on ``[sigma_min, sigma_max]`` by default
      (``sigma_dist="loguniform"``: ``lambda = ln(sigma_max/sigma_min) / sigma^2``), which keeps
      the variance finite; with ``sigma_dist="lognormal"`` the same identity holds on
      ``(0, inf)`` but the weight ``~exp((ln sigma - P_mean)^2/(2 P_std^2))/sigma^2`` has
      infinite variance at small sigma (avoid).
    - ``"edm"``: EDM's ``lambda = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2`` with
      ``ln sigma ~ N(P_mean, P_std^2)`` (a practical alternative; not the KL).

    ``gamma > 0`` adds ``gamma * ce_loss(disc, x0, x_fake)`` (needs ``x_fake``, same shape as
    ``x0``, noised at the same levels).

    What follows the paper and what is ours: the *form* (the reconstruction loss on
    ``D + sigma^2 grad d`` against real data, trained with double backprop, needing only real
    data and the frozen model) follows Verine et al. 2025. The KL weighting and its
    log-uniform sampling are our derivation; ``L_MSE + gamma L_CE`` is our reading of how the
    paper mixes in the cross-entropy (its exact placement is unconfirmed).

    Pass ``sigma`` ``(B,)`` to fix the levels (the ``"kl"`` weight then uses the density of
    ``sigma_dist`` at those levels). ``reduction="none"`` returns ``(B,)``.

    ``relative=True`` returns ``loss(d) - loss(0)``: the same loss at ``d = 0`` (no correction;
    ``lambda |D - x0|^2``, plus ``gamma 2 ln 2``), on the same batch and noise, is subtracted.
    That term does not depend on the discriminator, so the gradient is unchanged, but the
    value then estimates the *change* that guidance makes: with ``weighting="kl"`` the change
    of the score-error integral (book eq. kl_argument-score-integral), in nats, which is
    negative when guidance helps (``I(D + sigma^2 grad d) - I(D)``; the constant that the
    absolute loss carries, the base model's own denoising error, is gone). The training loop
    (:func:`discriminator_training_loop`) reports it.
    """
    check_tensor("x0", x0, min_ndim=2)
    if weighting not in ("kl", "edm"):
        raise ValueError(f"weighting must be 'kl' or 'edm', got {weighting!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    gamma = check_positive_float("gamma", gamma, allow_zero=True)
    if gamma > 0:
        if x_fake is None:
            raise ValueError("gamma > 0 needs x_fake (model samples) for the cross-entropy term")
        check_tensor("x_fake", x_fake, min_ndim=2)
        if x_fake.shape != x0.shape:
            raise ValueError(f"x_fake must have x0's shape {tuple(x0.shape)}, got "
                             f"{tuple(x_fake.shape)}")
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    if sigma_dist is None:
        sigma_dist = "loguniform" if weighting == "kl" else "lognormal"
    _check_dist(sigma_dist)
    B = x0.shape[0]
    # Drawn levels lie in range by construction: on a GPU, skip the read-back that checks them.
    check_levels = sigma is not None or x0.device.type == "cpu"
    if sigma is None:
        sigma, dens = sample_training_sigmas(B, sigma_dist=sigma_dist, P_mean=P_mean,
                                             P_std=P_std, sigma_min=sigma_min,
                                             sigma_max=sigma_max, generator=generator,
                                             device=x0.device, dtype=x0.dtype)
    else:
        sigma = check_sigma("sigma", sigma, B, like=x0)
        dens = _sigma_density(sigma, sigma_dist, P_mean, P_std, sigma_min, sigma_max)
    if weighting == "kl":
        if check_levels and bool((dens <= 0).any()):
            raise ValueError("sigma has levels outside [sigma_min, sigma_max] where the "
                             "log-uniform training density is 0")
        lam = 1.0 / (sigma ** 3 * dens)                             # (B,)
    else:
        if sigma_data is None:
            sigma_data = getattr(denoiser, "sigma_data", None) or getattr(disc, "sigma_data", 0.5)
        sd = check_positive_float("sigma_data", sigma_data)
        lam = edm_loss_weight(sigma, sd)
    n = randn(x0.shape, generator, dtype=x0.dtype, device=x0.device)
    x = x0 + _bcast(sigma, x0) * n
    with torch.no_grad(), checked_scope():                          # the frozen model
        den = denoiser(x, sigma)
    check_output_shape("denoiser", den, x0.shape, "x0")
    _, g = logit_and_grad(disc, x, sigma, create_graph=True)
    err = den + _bcast(sigma ** 2, x0) * g - x0
    per = lam * err.flatten(1).pow(2).sum(1)                        # (B,)
    if gamma > 0:
        per = per + gamma * ce_loss(disc, x0, x_fake, generator=generator, sigma=sigma,
                                    reduction="none")
    if relative:                          # minus the same loss at d = 0 (constant in phi)
        zero = lam * (den - x0).flatten(1).pow(2).sum(1)
        if gamma > 0:
            zero = zero + gamma * 2 * math.log(2.0)                 # softplus(0) twice
        per = per - zero.detach()
    return per.mean() if reduction == "mean" else per


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------
def discriminator_correction(disc):
    """The score correction ``c(x, sigma) = grad_x d(x, sigma)`` of a discriminator (book eq. guided-denoiser).

    One discriminator forward + backward per call (the sigma window is applied, and the call
    skipped outside it, by :class:`dgref.ScoreCorrectedDenoiser`). Inside ``torch.no_grad()``
    (the sampler) it returns a detached gradient; when ``x`` requires grad under autograd (the
    ODE likelihood's divergence), it keeps the graph.
    """
    def correction(x, sigma):
        keep = torch.is_grad_enabled() and x.requires_grad
        _, g = logit_and_grad(disc, x, sigma, create_graph=keep)
        return g
    return correction


def discriminator_guidance(denoiser, disc, weight: float = 1.0, window=None
                           ) -> ScoreCorrectedDenoiser:
    """Discriminator guidance ``D_tilde = D + w sigma^2 grad_x d`` inside ``window`` (book eq. guided-denoiser).

    Kim et al. 2023: with the optimal logit ``d* = log p_sigma/q_sigma``, ``w = 1`` and a model
    whose denoiser is exact for its own marginals, ``D_tilde`` is the data's exact denoiser.
    Returns a :class:`dgref.ScoreCorrectedDenoiser`; one guided evaluation costs one denoiser
    forward and one discriminator forward + backward. ``disc`` is any ``disc(x, sigma) -> (B,)``
    (a :class:`Discriminator`, or :func:`oracle_logit`). For the official DG code's default
    (guidance on the Euler slope only) see :func:`dg_sampler_kwargs`.
    """
    check_callable("denoiser", denoiser)
    check_callable("disc", disc, "disc(x, sigma) -> (B,)")
    window = check_window("window", window)
    return ScoreCorrectedDenoiser(denoiser, discriminator_correction(disc), weight, window)


def dg_sampler_kwargs(denoiser, disc, weight: float = 1.0, window=None, slopes: str = "euler"
                      ) -> dict:
    """``dict(denoiser=..., heun_denoiser=...)`` for :func:`dgref.edm_sampler` (book: chapter kl_objective).

    ``slopes="euler"`` guides only the Euler slope and leaves Heun's corrector slope unguided,
    the default of the official DG code (so a Heun step carries the guidance at about half
    weight); ``slopes="both"`` guides both slopes (the refined ODE itself). Usage:
    ``edm_sampler(latents=z, **dg_sampler_kwargs(D, disc, 2.0, (0.05, 80)))``.
    """
    if slopes not in ("euler", "both"):
        raise ValueError(f"slopes must be 'euler' or 'both', got {slopes!r}")
    guided = discriminator_guidance(denoiser, disc, weight, window)
    return {"denoiser": guided, "heun_denoiser": denoiser if slopes == "euler" else guided}


def oracle_logit(p, q):
    """The optimal logit ``d*(x, sigma) = log p_sigma(x) - log q_sigma(x)`` of two mixtures (book eq. kl_argument-dstar).

    Returns a callable ``(x (B, dim), sigma) -> (B,)``, differentiable by autograd, usable
    wherever a discriminator is.
    """
    for name, m in (("p", p), ("q", q)):
        if not hasattr(m, "log_prob"):
            raise TypeError(f"{name} must be a GaussianMixture (with log_prob), got "
                            f"{type(m).__name__}")
    if p.dim != q.dim:
        raise ValueError(f"p and q must have the same dimension, got {p.dim} and {q.dim}")

    def logit(x, sigma):
        return p.log_prob(x, sigma) - q.log_prob(x, sigma)
    logit.sigma_data = p.std()
    return logit


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def discriminator_training_loop(disc: nn.Module, *, objective: str = "ce", x_real,
                                x_fake=None, denoiser=None, steps: int, batch_size: int = 256,
                                lr: float = 1e-3, generator=None, weighting: str | None = None,
                                gamma: float = 0.0, progress: bool | None = None,
                                weight_decay: float = 0.0, lr_schedule: str = "constant",
                                optimizer=None, check_every: int | None = None,
                                **loss_kwargs) -> Iterator[dict]:
    """Train a discriminator with :func:`ce_loss` or :func:`kl_loss` (book: chapter kl_objective); yields ``{"step", "loss"}``.

    A generator: nothing is trained until it is iterated (or use :func:`train_discriminator`).

    ``x_real`` / ``x_fake`` are tensors ``(N, ...)`` (batches drawn with replacement, so a small
    ``N`` means a finite training set) or objects with ``sample(n, generator=)`` (a fresh
    sample every step). ``objective="ce"`` needs ``x_fake``; ``"kl"`` needs the frozen
    ``denoiser`` (and ``x_fake`` only when ``gamma > 0``). ``sigma_dist`` (in
    ``loss_kwargs``) draws the levels; ``weighting`` is the KL objective's loss weight (default
    ``"kl"``; see :func:`ce_loss` for CE). Adam (AdamW when ``weight_decay > 0``) at ``lr``,
    constant or with ``lr_schedule="cosine"`` decay. Stops with :class:`dgref.NonFiniteError` at
    the first non-finite loss or gradient, naming the step and the last finite loss.
    ``check_every`` (default 1 on the CPU, 32 on a GPU) is how many steps run between two
    read-backs of the losses, as in :func:`dgref.training.edm_training_loop`: on a GPU each read-back
    is a synchronisation, so records then come in blocks (every step still gets one, in order)
    and the steps after a non-finite one in the same block have already run (likewise after
    the record at which a consumer stops: use ``check_every=1`` to stop at an exact step).
    With ``objective="kl"`` the recorded (and shown) loss is relative to ``d = 0``
    (:func:`kl_loss` with ``relative=True``): with the KL weighting, an estimate of the change
    of the score-error integral in nats, which falls below 0 as the discriminator improves.
    """
    if objective not in ("ce", "kl"):
        raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    check_positive_float("lr", lr)
    check_positive_float("weight_decay", weight_decay, allow_zero=True)
    gamma = check_positive_float("gamma", gamma, allow_zero=True)
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if not isinstance(disc, nn.Module):
        raise TypeError(f"disc must be a torch.nn.Module, got {type(disc).__name__}")
    params = [p for p in disc.parameters() if p.requires_grad]
    if not params:
        raise ValueError("disc has no trainable parameters")
    need_fake = objective == "ce" or gamma > 0
    if need_fake and x_fake is None:
        raise ValueError(f"objective={objective!r} with gamma={gamma} needs x_fake")
    if objective == "kl" and denoiser is None:
        raise ValueError("objective='kl' needs the frozen model's denoiser")
    if objective == "ce":
        _ce_sigma_dist(loss_kwargs.get("sigma_dist"), weighting)   # bad input fails before training
    elif weighting is None:
        weighting = "kl"
    for name, data in (("x_real", x_real), ("x_fake", x_fake)):
        if isinstance(data, torch.Tensor):
            check_tensor(name, data, min_ndim=2, finite=True)
        elif data is not None and not hasattr(data, "sample"):
            raise TypeError(f"{name} must be a tensor (N, ...) or have .sample(n, generator=), "
                            f"got {type(data).__name__}")
    device = params[0].device
    draw_real = batch_sampler(x_real, batch_size, generator, device)
    draw_fake = batch_sampler(x_fake, batch_size, generator, device) if need_fake else None
    if optimizer is None:
        optimizer = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
                     if weight_decay > 0 else torch.optim.Adam(params, lr=lr))

    def step_loss(step):
        xr = draw_real()
        xf = draw_fake().to(xr.dtype) if need_fake else None
        if objective == "ce":
            return ce_loss(disc, xr, xf, generator=generator, weighting=weighting,
                           **loss_kwargs)
        return kl_loss(disc, denoiser, xr, generator=generator, weighting=weighting,
                       gamma=gamma, x_fake=xf, relative=True, **loss_kwargs)

    disc.train()
    yield from optimisation_loop(step_loss, params, optimizer, steps=steps, lr=lr,
                                 lr_schedule=lr_schedule, check_every=check_every,
                                 progress=progress, desc="discriminator",
                                 what="discriminator loss")
    disc.eval()


def train_discriminator(disc: nn.Module, **kwargs) -> list[float]:
    """Run :func:`discriminator_training_loop` to the end; return the per-step losses (book: chapter kl_objective)."""
    return [rec["loss"] for rec in discriminator_training_loop(disc, **kwargs)]
