"""Labelled toy worlds: class-conditional and unconditional laws, exact at every noise level.

Book chapters "Classifier-free guidance and the training discrepancy" (eq. cfg-bayes) and
"What guidance provably does". A *labelled world* is a mixture whose components carry class
labels ``c in {0, ..., C-1}``. Noised by ``x = x0 + sigma n`` it gives, in closed form,

- the class-conditional law ``p_sigma(x | c)`` (the mixture of class c's components),
- the unconditional law ``p_sigma(x) = sum_c p(c) p_sigma(x | c)``,
- the noisy classifier ``p(c | x; sigma) = p(c) p_sigma(x | c) / p_sigma(x)`` (Bayes' rule),
- both exact denoisers ``E[x0 | x, c]`` and ``E[x0 | x]`` and their scores (Tweedie).

Labels convention (shared with :mod:`dgref.cfg`): a label tensor has shape ``(B,)`` and
integer entries in ``0..C``; the extra value ``C`` (``world.null_label``) is the *null* label
and asks for the unconditional branch.

Two kinds of component are supported: Gaussians (:class:`dgref.GaussianMixture` with
``labels``), in any dimension; and uniform intervals (:class:`UniformIntervals`), in 1-D, for
compactly supported classes. For the uniform case the noised density and the denoiser are
also closed form (a Gaussian CDF difference and a truncated-normal mean), evaluated in log
space: exact, no grid and no many-Gaussian approximation.
"""
from __future__ import annotations

import math

import torch

from ._checks import (check_finite_float, check_labels, check_positive_float,
                      check_positive_int, check_sigma, check_tensor)
from ._util import optional_device
from .toy import GaussianMixture

__all__ = ["UniformIntervals", "LabelledWorld", "gaussian_pair", "three_classes_1d",
           "labelled_ring", "uniform_classes_1d"]

_LOG_2PI = math.log(2 * math.pi)


def _log_diff_ndtr(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``log(Phi(hi) - Phi(lo))`` for ``lo < hi``, accurate in both tails."""
    # Upper tail (lo > 0): use Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi).
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)     # la < lb
    return lb + torch.log(-torch.expm1(la - lb))


class UniformIntervals:
    """A 1-D mixture of uniform laws on intervals, closed form at every noise level.

    Args:
        intervals: ``(K, 2)`` rows ``(a_k, b_k)`` with ``a_k < b_k``.
        weights: ``(K,)`` non-negative weights summing to one (default equal).
        labels: optional ``(K,)`` class label of each interval.

    ``p_sigma(x) = sum_k pi_k (Phi((b_k - x)/sigma) - Phi((a_k - x)/sigma)) / (b_k - a_k)`` and
    ``E[x0 | x, k]`` is the mean of ``N(x, sigma^2)`` truncated to ``[a_k, b_k]``; both are exact
    (book chapter "What guidance provably does", compact-support case). At ``sigma = 0`` the
    density is the piecewise-constant one and the denoiser is the identity.
    """

    def __init__(self, intervals, weights=None, labels=None):
        iv = torch.as_tensor(intervals, dtype=torch.float64)
        check_tensor("intervals", iv, ndim=2, last_dim=2, finite=True)
        if bool((iv[:, 1] <= iv[:, 0]).any()):
            raise ValueError(f"intervals must have a < b in every row, got {iv.tolist()}")
        K = iv.shape[0]
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},) to match intervals, got "
                             f"{tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
        if abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum {float(weights.sum()):.8g}")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (K,):
                raise ValueError(f"labels must have shape ({K},), got {tuple(labels.shape)}")
        self.intervals = iv          # (K, 2)
        self.weights = weights       # (K,)
        self.labels = labels         # (K,) or None

    dim = 1

    @property
    def num_components(self) -> int:
        return self.intervals.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.weights @ self.intervals.mean(1)).reshape(1)

    def std(self) -> float:
        a, b = self.intervals[:, 0], self.intervals[:, 1]
        second = self.weights @ ((a ** 2 + a * b + b ** 2) / 3)
        return float(torch.sqrt(second - self.mean()[0] ** 2))

    def __repr__(self) -> str:
        return f"UniformIntervals(K={self.num_components})"

    def _check(self, x, sigma):
        check_tensor("x", x, ndim=2, last_dim=1, finite=True)
        return check_sigma("sigma", sigma, x.shape[0], allow_zero=True, like=x)

    def component_terms(self, x: torch.Tensor, sigma):
        """``log(pi_k p_{k,sigma}(x))`` ``(B, K)`` and ``E[x0 | x, k]`` ``(B, K, 1)``."""
        sigma = self._check(x, sigma)
        iv = self.intervals.to(x.device, x.dtype)
        a, b = iv[:, 0][None], iv[:, 1][None]                        # (1, K)
        log_w = self.weights.to(x.device, x.dtype).log()[None]
        xx = x[:, :1]                                                # (B, 1)
        s = sigma[:, None]                                           # (B, 1)
        zero = s == 0
        s_safe = torch.where(zero, torch.ones_like(s), s)
        lo, hi = (a - xx) / s_safe, (b - xx) / s_safe                 # (B, K)
        logZ = _log_diff_ndtr(lo, hi)
        log_len = torch.log(b - a)
        log_phi = lambda z: -0.5 * z ** 2 - 0.5 * _LOG_2PI          # noqa: E731
        shift = s_safe * (torch.exp(log_phi(lo) - logZ) - torch.exp(log_phi(hi) - logZ))
        inside = (xx >= a) & (xx <= b)
        log_terms = torch.where(zero, torch.where(inside, -log_len, torch.full_like(lo, -math.inf)),
                                logZ - log_len) + log_w
        cond = torch.where(zero, xx.expand_as(lo), xx + shift)
        return log_terms, cond[:, :, None]

    def log_prob(self, x, sigma=0.0):
        """``log p_sigma(x)``, ``(B,)``."""
        return torch.logsumexp(self.component_terms(x, sigma)[0], dim=1)

    def posterior(self, x, sigma=0.0):
        """Component posterior ``p(k | x; sigma)``, ``(B, K)``."""
        return torch.softmax(self.component_terms(x, sigma)[0], dim=1)

    def denoise(self, x, sigma):
        """Exact denoiser ``E[x0 | x; sigma]``, ``(B, 1)`` (the identity at sigma = 0)."""
        t, cond = self.component_terms(x, sigma)
        out = (torch.softmax(t, dim=1)[:, :, None] * cond).sum(1)
        return torch.where(torch.isfinite(out), out, x)

    __call__ = denoise

    def score(self, x, sigma):
        """``grad log p_sigma(x) = (D - x) / sigma^2`` (sigma > 0), ``(B, 1)``."""
        sigma = check_sigma("sigma", sigma, x.shape[0], like=x)
        return (self.denoise(x, sigma) - x) / sigma[:, None] ** 2

    def sample(self, num_samples: int, sigma=0.0, *, generator=None,
               return_components: bool = False, device=None, dtype=torch.float32):
        """``num_samples`` points of ``p_sigma``, ``(N, 1)``; optionally their components."""
        n = check_positive_int("num_samples", num_samples)
        sig = check_positive_float("sigma", float(sigma), allow_zero=True)
        device = optional_device(device)
        gdev = generator.device if generator is not None else torch.device(device or "cpu")
        k = torch.multinomial(self.weights.to(gdev), n, replacement=True, generator=generator)
        u = torch.rand((n, 1), generator=generator, device=gdev, dtype=torch.float64)
        z = torch.randn((n, 1), generator=generator, device=gdev, dtype=torch.float64)
        iv = self.intervals.to(gdev)
        x = iv[k, :1] + u * (iv[k, 1:] - iv[k, :1]) + sig * z
        x = x.to(dtype=dtype, device=device if device is not None else gdev)
        return (x, k.to(x.device)) if return_components else x

    def subset(self, mask: torch.Tensor) -> "UniformIntervals":
        w = self.weights[mask]
        return UniformIntervals(self.intervals[mask], w / w.sum(),
                                None if self.labels is None else self.labels[mask])


def _gaussian_terms(mix: GaussianMixture, x: torch.Tensor, sigma):
    """``log(pi_k N_k(x; sigma))`` ``(B, K)`` and ``E[x0 | x, k]`` ``(B, K, dim)``."""
    check_tensor("x", x, ndim=2, last_dim=mix.dim, finite=True)
    sigma = check_sigma("sigma", sigma, x.shape[0], allow_zero=True, like=x)
    mu = mix.means.to(x.device, x.dtype)
    var = mix.variances.to(x.device, x.dtype)
    log_w = mix.weights.to(x.device, x.dtype).log()
    v = var[None] + sigma[:, None, None] ** 2                       # (B, K, dim)
    diff = x[:, None, :] - mu[None]                                 # (B, K, dim)
    log_terms = log_w[None] - 0.5 * ((diff ** 2 / v) + torch.log(v) + _LOG_2PI).sum(-1)
    cond = mu[None] + var[None] / v * diff                          # (B, K, dim)
    return log_terms, cond


def _subset_gaussian(mix: GaussianMixture, mask: torch.Tensor) -> GaussianMixture:
    w = mix.weights[mask]
    return GaussianMixture(mix.means[mask], w / w.sum(), mix.variances[mask].sqrt(),
                           None if mix.labels is None else mix.labels[mask])


class LabelledWorld:
    """A labelled mixture with exact class-conditional and unconditional laws at every sigma.

    Args:
        base: a :class:`dgref.GaussianMixture` or :class:`UniformIntervals` whose ``labels``
            give each component's class; every class ``0..C-1`` needs at least one component.

    Calling the world, ``world(x, sigma, labels)``, is the exact *conditional denoiser* with
    the null-label convention: rows whose label is ``world.null_label`` (= C) get the
    unconditional ``E[x0 | x]``, the others ``E[x0 | x, c]`` (book eq. cfg-bayes).
    """

    def __init__(self, base):
        if not isinstance(base, (GaussianMixture, UniformIntervals)):
            raise TypeError("base must be a dgref.GaussianMixture or dgref.UniformIntervals, "
                            f"got {type(base).__name__}")
        if base.labels is None:
            raise ValueError("base must carry labels (one class label per component), got "
                             "labels=None")
        labels = base.labels
        if bool((labels < 0).any()):
            raise ValueError(f"component labels must be >= 0, got {labels.tolist()}")
        C = int(labels.max()) + 1
        present = torch.zeros(C, dtype=torch.bool)
        present[labels] = True
        if not bool(present.all()):
            raise ValueError(f"every class 0..{C - 1} needs a component; missing "
                             f"{torch.nonzero(~present).flatten().tolist()}")
        self.base = base
        self.num_classes = C
        self.null_label = C
        # (C, K) membership mask and class priors p(c) = sum of the class's weights.
        self._member = labels[None, :] == torch.arange(C)[:, None]
        self.prior = (self._member.double() * base.weights[None]).sum(1)    # (C,)
        if bool((self.prior <= 0).any()):
            raise ValueError(f"every class needs positive prior mass, got {self.prior.tolist()}")

    @property
    def dim(self) -> int:
        return self.base.dim

    def __repr__(self) -> str:
        return f"LabelledWorld({self.base!r}, C={self.num_classes})"

    def std(self) -> float:
        """Per-coordinate data standard deviation (the natural ``sigma_data``)."""
        return self.base.std()

    # -- internals ---------------------------------------------------------------------------
    def _terms(self, x, sigma):
        if isinstance(self.base, GaussianMixture):
            return _gaussian_terms(self.base, x, sigma)
        return self.base.component_terms(x, sigma)

    def _labels(self, labels, batch, device, allow_null=True):
        return check_labels("labels", labels, batch, self.num_classes, allow_null=allow_null,
                            device=device)

    # -- laws ----------------------------------------------------------------------------------
    def class_world(self, c: int):
        """The class-conditional law ``p(x0 | c)`` as its own mixture (weights renormalised)."""
        c = self._class_index(c)
        mask = self._member[c]
        if isinstance(self.base, GaussianMixture):
            return _subset_gaussian(self.base, mask)
        return self.base.subset(mask)

    def _class_index(self, c) -> int:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"c must be an int class index, got {type(c).__name__} {c!r}")
        if not 0 <= c < self.num_classes:
            raise ValueError(f"c must be in 0..{self.num_classes - 1}, got {c}")
        return c

    def class_log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """``log p_sigma(x | c)`` for every class, shape ``(B, C)``."""
        t, _ = self._terms(x, sigma)                                   # (B, K)
        member = self._member.to(x.device)
        masked = torch.where(member[None], t[:, None, :],
                             torch.full_like(t[:, None, :], -math.inf))  # (B, C, K)
        log_prior = self.prior.to(x.device, x.dtype).log()
        return torch.logsumexp(masked, dim=2) - log_prior[None]

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Unconditional ``log p_sigma(x)``, shape ``(B,)``."""
        t, _ = self._terms(x, sigma)
        return torch.logsumexp(t, dim=1)

    def log_classifier(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """The noisy classifier ``log p(c | x; sigma)``, ``(B, C)`` (Bayes' rule, eq. cfg-bayes)."""
        joint = self.class_log_prob(x, sigma) + self.prior.to(x.device, x.dtype).log()[None]
        return joint - torch.logsumexp(joint, dim=1, keepdim=True)

    def classifier(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """``p(c | x; sigma)``, ``(B, C)``; rows sum to one."""
        return self.log_classifier(x, sigma).exp()

    def denoise(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """Exact ``E[x0 | x, c]`` per row (``labels`` ``(B,)`` or an int), or ``E[x0 | x]``
        where the label is the null label or ``labels`` is None. Shape ``(B, dim)``."""
        t, cond = self._terms(x, sigma)                                # (B, K), (B, K, dim)
        if labels is not None:
            lab = self._labels(labels, x.shape[0], x.device)
            member = torch.cat([self._member, torch.ones_like(self._member[:1])]).to(x.device)
            t = torch.where(member[lab], t, torch.full_like(t, -math.inf))
        r = torch.softmax(t, dim=1)
        out = (r[:, :, None] * cond).sum(1)
        # At sigma = 0 outside a compact support every term is -inf: the identity is the limit.
        return torch.where(torch.isfinite(out), out, x) if isinstance(
            self.base, UniformIntervals) else out

    def __call__(self, x: torch.Tensor, sigma, labels=None, *, class_labels=None
                 ) -> torch.Tensor:
        """``denoise(x, sigma, labels)``; ``class_labels=`` is an alias of ``labels=``."""
        if class_labels is not None:
            if labels is not None:
                raise TypeError("pass labels or class_labels, not both")
            labels = class_labels
        return self.denoise(x, sigma, labels)

    def score(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """``grad log p_sigma(x | c)`` (or unconditional) via Tweedie, sigma > 0; ``(B, dim)``."""
        s = check_sigma("sigma", sigma, x.shape[0], like=x)
        return (self.denoise(x, s, labels) - x) / s[:, None] ** 2

    def grad_log_classifier(self, x: torch.Tensor, sigma, labels) -> torch.Tensor:
        """``grad_x log p(c | x; sigma) = score(x | c) - score(x)``, closed form; ``(B, dim)``."""
        s = check_sigma("sigma", sigma, x.shape[0], like=x)
        lab = self._labels(labels, x.shape[0], x.device, allow_null=False)
        return (self.denoise(x, s, lab) - self.denoise(x, s)) / s[:, None] ** 2

    def tilted_log_density(self, x: torch.Tensor, c: int, w: float) -> torch.Tensor:
        """Unnormalised ``log p(x | c) + w log p(c | x)`` at sigma = 0 (book eq. cfg-tilted);
        shape ``(B,)``."""
        c = self._class_index(c)
        w = check_finite_float("w", w)
        lc = self.class_log_prob(x, 0.0)[:, c]
        if w == 0.0:
            return lc
        return lc + w * self.log_classifier(x, 0.0)[:, c]

    def sample(self, num_samples: int, sigma=0.0, *, generator=None, device=None,
               dtype=torch.float32):
        """``(x, labels)``: ``num_samples`` points of the joint law and their classes."""
        x, k = self.base.sample(num_samples, sigma, generator=generator,
                                return_components=True, device=device, dtype=dtype)
        return x, self.base.labels.to(k.device)[k]

    def class_sample(self, c: int, num_samples: int, sigma=0.0, *, generator=None,
                     device=None, dtype=torch.float32) -> torch.Tensor:
        """``num_samples`` points of ``p_sigma(x | c)``, ``(N, dim)``."""
        return self.class_world(c).sample(num_samples, sigma, generator=generator,
                                          device=device, dtype=dtype)


# -- presets -------------------------------------------------------------------------------------
def gaussian_pair(separation: float = 2.0, std: float = 0.5, weights=None) -> LabelledWorld:
    """The book's Gaussian pair (chapters cfg and guidance_theory, eq. cfg-bayes).

    Two 1-D Gaussian classes ``N(-separation/2, std^2)`` (class 0) and ``N(+separation/2,
    std^2)`` (class 1): each class-conditional is one Gaussian, the unconditional a mixture.
    """
    check_positive_float("separation", separation)
    check_positive_float("std", std)
    m = separation / 2
    return LabelledWorld(GaussianMixture(torch.tensor([[-m], [m]], dtype=torch.float64),
                                         weights, std, labels=[0, 1]))


def three_classes_1d(spacing: float = 2.0, std: float = 0.5, weights=None) -> LabelledWorld:
    """Three 1-D Gaussian classes at ``-spacing, 0, +spacing`` (labels 0, 1, 2): the middle class
    of Wu et al. (2024) (book chapter guidance_theory, eq. guidance-theory-baseline)."""
    check_positive_float("spacing", spacing)
    check_positive_float("std", std)
    means = torch.tensor([[-spacing], [0.0], [spacing]], dtype=torch.float64)
    return LabelledWorld(GaussianMixture(means, weights, std, labels=[0, 1, 2]))


def labelled_ring(num_modes: int = 6, num_classes: int = 3, radius: float = 2.0,
                  std: float = 0.3) -> LabelledWorld:
    """A 2-D labelled world (book chapter guidance_theory, eq. guidance-theory-baseline).

    ``num_modes`` Gaussians on a circle, mode ``k`` in class ``k % num_classes``; with the
    defaults each class is two opposite modes (a multimodal class-conditional).
    """
    check_positive_int("num_modes", num_modes)
    check_positive_int("num_classes", num_classes)
    if num_classes > num_modes:
        raise ValueError(f"num_classes must be <= num_modes={num_modes}, got {num_classes}")
    angle = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    labels = torch.arange(num_modes) % num_classes
    return LabelledWorld(GaussianMixture(means, None, std, labels=labels))


def uniform_classes_1d(intervals=((-2.0, -0.5), (0.5, 2.0)), weights=None) -> LabelledWorld:
    """Compactly supported 1-D classes (book chapter guidance_theory, edge and off-support cases).

    Class ``k`` is uniform on ``intervals[k]`` (exact closed form at every sigma, see
    :class:`UniformIntervals`); the Chidambaram et al. (2024) setting.
    """
    iv = torch.as_tensor(intervals, dtype=torch.float64)
    return LabelledWorld(UniformIntervals(iv, weights, labels=torch.arange(iv.shape[0])))
