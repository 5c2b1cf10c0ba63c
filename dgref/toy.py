"""The exact toy world: Gaussian mixtures at every noise level (book: notation page, eq. (mixture)).

A mixture ``p = sum_k pi_k N(mu_k, diag(v_k))`` noised by ``x = x0 + sigma * n`` is again a
mixture, ``p_sigma = sum_k pi_k N(mu_k, diag(v_k + sigma**2))``. Its log-density, score, exact
denoiser ``E[x0 | x]`` and component posterior ``p(k | x; sigma)`` are closed form. These are the
ground truth that the whole book and the tests measure against.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_positive_int, check_sigma, check_tensor
from ._util import optional_device

__all__ = ["GaussianMixture", "ring", "grid_world", "mixture_1d"]

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """A Gaussian mixture with per-component means, weights and isotropic or diagonal widths.

    Args:
        means: ``(K, dim)`` component means (a 1-D tensor of length K means dim = 1).
        weights: ``(K,)`` mixture weights, non-negative and summing to one (within 1e-6).
        stds: component standard deviations: a number (shared), ``(K,)`` (isotropic per
            component) or ``(K, dim)`` (diagonal).
        labels: optional ``(K,)`` integer class label of each component (used by the
            classifier-free guidance chapters).

    Every method takes ``x`` of shape ``(B, dim)`` and ``sigma`` as a number >= 0 or a tensor of
    shape ``(B,)``; computations run in ``x``'s dtype and device.
    """

    def __init__(self, means, weights=None, stds=1.0, labels=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 1:
            means = means[:, None]
        check_tensor("means", means, ndim=2, finite=True)
        K, dim = means.shape
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},) to match means, got "
                             f"{tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
        if abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum {float(weights.sum()):.8g}")
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(K, dim)
        elif stds.ndim == 1:
            if stds.shape[0] != K:
                raise ValueError(f"stds of shape (K,) must have K={K} entries, got "
                                 f"{tuple(stds.shape)}")
            stds = stds[:, None].expand(K, dim)
        elif stds.shape != (K, dim):
            raise ValueError(f"stds must be a number, ({K},) or ({K}, {dim}), got "
                             f"{tuple(stds.shape)}")
        if not bool(torch.isfinite(stds).all()) or bool((stds <= 0).any()):
            raise ValueError("stds must be finite and > 0")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (K,):
                raise ValueError(f"labels must have shape ({K},), got {tuple(labels.shape)}")
        self.means = means                   # (K, dim)
        self.weights = weights               # (K,)
        self.variances = stds.clone() ** 2   # (K, dim)
        self.labels = labels                 # (K,) or None
        self._cache = {}

    # -- basic facts -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> torch.Tensor:
        """Mean of the mixture, ``(dim,)``."""
        return self.weights @ self.means

    def std(self) -> float:
        """Root mean per-coordinate variance of the data: the natural ``sigma_data``."""
        m = self.mean()
        second = self.weights @ (self.variances + self.means ** 2)
        return float(torch.sqrt((second - m ** 2).mean()))

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, dim={self.dim})"

    def _params(self, x: torch.Tensor):
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = (self.means.to(x.device, x.dtype),
                                self.weights.to(x.device, x.dtype).log(),
                                self.variances.to(x.device, x.dtype))
        return self._cache[key]

    def _check(self, x, sigma):
        check_tensor("x", x, ndim=2, last_dim=self.dim, finite=True)
        sigma = check_sigma("sigma", sigma, x.shape[0], allow_zero=True, like=x)
        return x, sigma

    def _component_terms(self, x, sigma):
        """Per-component log(pi_k N_k(x; sigma)) ``(B, K)`` and noised variances ``(B, K, dim)``."""
        mu, log_w, var = self._params(x)
        v = var[None] + sigma[:, None, None] ** 2                   # (B, K, dim)
        diff = x[:, None, :] - mu[None]                             # (B, K, dim)
        log_n = -0.5 * ((diff ** 2 / v) + torch.log(v) + _LOG_2PI).sum(-1)   # (B, K)
        return log_w[None] + log_n, v, diff

    # -- closed forms --------------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """``log p_sigma(x)``, shape ``(B,)``."""
        x, sigma = self._check(x, sigma)
        terms, _, _ = self._component_terms(x, sigma)
        return torch.logsumexp(terms, dim=1)

    def posterior(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Component posterior ``p(k | x; sigma)``, shape ``(B, K)``; rows sum to one."""
        x, sigma = self._check(x, sigma)
        terms, _, _ = self._component_terms(x, sigma)
        return torch.softmax(terms, dim=1)

    def score(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """``grad_x log p_sigma(x)``, shape ``(B, dim)``."""
        x, sigma = self._check(x, sigma)
        terms, v, diff = self._component_terms(x, sigma)
        r = torch.softmax(terms, dim=1)                             # (B, K)
        return -(r[:, :, None] * diff / v).sum(1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact denoiser ``E[x0 | x; sigma]``, shape ``(B, dim)`` (Tweedie: ``x + sigma**2 score``).

        Computed per component as ``mu_k + v_k / (v_k + sigma**2) (x - mu_k)`` weighted by the
        posterior, which stays accurate at small sigma.
        """
        x, sigma = self._check(x, sigma)
        terms, v, diff = self._component_terms(x, sigma)
        r = torch.softmax(terms, dim=1)
        mu, _, var = self._params(x)
        cond = mu[None] + var[None] / v * diff                      # (B, K, dim)
        return (r[:, :, None] * cond).sum(1)

    __call__ = denoise

    def sample(self, num_samples: int, sigma=0.0, *, generator=None,
               return_components: bool = False, device=None, dtype=torch.float32):
        """Draw ``num_samples`` points of ``p_sigma`` (``(N, dim)``); optionally their components."""
        n = check_positive_int("num_samples", num_samples)
        device = optional_device(device)
        gen_device = generator.device if generator is not None else torch.device(device or "cpu")
        key = ("sample", gen_device)
        if key not in self._cache:        # device copies made once: a copy to a GPU syncs
            self._cache[key] = (self.weights.to(gen_device), self.means.to(gen_device),
                                self.variances.to(gen_device))
        weights, means, var = self._cache[key]
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, self.dim), generator=generator, device=gen_device,
                            dtype=torch.float64)
        sig = float(check_sigma("sigma", sigma, allow_zero=True)) if not isinstance(
            sigma, torch.Tensor) or sigma.ndim == 0 else None
        if sig is None:
            raise ValueError("sigma for sample() must be a single number >= 0")
        x = means[k] + torch.sqrt(var[k] + sig ** 2) * noise
        x = x.to(dtype=dtype, device=device if device is not None else gen_device)
        if return_components:
            return x, k.to(x.device)
        return x

    def reweighted(self, weights=None, stds=None) -> "GaussianMixture":
        """The same means with other weights or widths (a convenient 'wrong model')."""
        return GaussianMixture(self.means, self.weights if weights is None else weights,
                               self.variances.sqrt() if stds is None else stds, self.labels)


def ring(num_modes: int = 8, radius: float = 2.0, std: float = 0.15, weights=None
         ) -> GaussianMixture:
    """``num_modes`` equal Gaussians on a circle of ``radius`` (the book's main 2-D world)."""
    check_positive_int("num_modes", num_modes)
    angle = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture(means, weights, std)


def grid_world(side: int = 3, spacing: float = 2.0, std: float = 0.2, weights=None
               ) -> GaussianMixture:
    """A centred ``side x side`` square grid of Gaussians, ``spacing`` apart (book eq. mixture).

    A 2-D world (not to be confused with :func:`dgref.gridflow.grid_flow`, a 1-D numerical
    tool)."""
    check_positive_int("side", side)
    coords = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(coords, coords, indexing="ij")
    means = torch.stack([gx.flatten(), gy.flatten()], dim=1)
    return GaussianMixture(means, weights, std)


def mixture_1d(means=(-2.0, 2.0), stds=(0.5, 0.5), weights=None) -> GaussianMixture:
    """A 1-D mixture (dim = 1) with the given means, stds and weights (book eq. mixture)."""
    means = torch.as_tensor(means, dtype=torch.float64)
    return GaussianMixture(means[:, None], weights, torch.as_tensor(stds, dtype=torch.float64))
