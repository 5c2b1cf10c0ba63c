"""Sample-quality metrics without Inception weights (book chapter "Images").

The feature network is a small digit classifier the project trains itself on the training
split (:class:`DigitClassifier`, :func:`train_classifier`); its penultimate layer gives the
features. The distances below take *features* ``(N, d)`` and know nothing about the network:

* :func:`frechet_distance` / :func:`gaussian_frechet_distance`: the Frechet (2-Wasserstein)
  distance between Gaussians fitted to two feature sets. In the book it is called "Frechet
  distance in our digit-classifier features", never FID (which means Inception-v3 features).
* :func:`kernel_distance`: the unbiased squared MMD with the cubic polynomial kernel
  ``k(a, b) = (a.b / d + 1)^3`` (the kernel of KID, Binkowski et al. 2018), in our features.
* :func:`precision_recall`: k-nearest-neighbour manifold estimates (Kynkaanniemi et al. 2019).
* :func:`class_histogram` and :func:`total_variation`: the predicted-class histogram of
  samples and its distance to the data's class frequencies.

Intervals: :func:`bootstrap_interval` (estimate -/+ z bootstrap standard errors, both sets
resampled) for the Frechet distance, the kernel distance and the class histogram, and a
Wilson interval for precision and recall (given the reference manifold). :func:`evaluate_samples` gathers them in one record.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_float, check_positive_int, check_tensor
from .rng import init_rng
from .training import optimisation_loop

__all__ = ["DigitClassifier", "classifier_training_loop", "train_classifier",
           "classifier_accuracy", "extract_features",
           "gaussian_frechet_distance", "frechet_distance", "kernel_distance",
           "kernel_distance_bootstrap", "precision_recall", "class_histogram",
           "total_variation", "bootstrap_interval", "wilson_interval", "evaluate_samples"]


# --------------------------------------------------------------------------------------------
# The feature network


class DigitClassifier(nn.Module):
    """A small conv classifier ``(B, 1, H, W) -> logits (B, num_classes)``.

    ``features(x)`` returns the penultimate layer ``(B, feature_dim)`` (after SiLU), used as
    the embedding for the distances. Works for any ``H, W >= 4`` (global average pooling).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, feature_dim: int = 64,
                 num_classes: int = 10, *, generator=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("width", width),
                        ("feature_dim", feature_dim), ("num_classes", num_classes)):
            check_positive_int(name, v)
        self.feature_dim, self.num_classes = feature_dim, num_classes
        with init_rng(generator):
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                nn.AvgPool2d(2),
                nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                nn.Linear(8 * width, feature_dim), nn.SiLU())
            self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=4)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_training_loop(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                             steps: int, batch_size: int = 128, lr: float = 2e-3,
                             weight_decay: float = 1e-4, noise_std: float = 0.1,
                             generator=None, progress: bool | None = None,
                             check_every: int | None = None) -> Iterator[dict]:
    """Train a classifier with cross-entropy (AdamW, cosine decay); yields ``{"step", "loss"}``.
    (book chapter images)

    A generator: nothing is trained until it is iterated (or use :func:`train_classifier`).
    Each batch gets Gaussian pixel noise of std ``noise_std`` (a mild augmentation that keeps
    the features meaningful on slightly imperfect generated images). Runs on the shared loop
    of :func:`dgref.training.optimisation_loop` (non-finite stop, batched read-back).
    """
    check_tensor("x", x, ndim=4, finite=True)
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != x.shape[:1]:
        raise ValueError(f"y must be a long tensor of shape ({x.shape[0]},), got "
                         f"{getattr(y, 'dtype', type(y).__name__)} "
                         f"{tuple(getattr(y, 'shape', ()))}")
    steps = check_positive_int("steps", steps)
    bs = check_positive_int("batch_size", batch_size)
    check_positive_float("lr", lr)
    check_positive_float("noise_std", noise_std, allow_zero=True)
    params = list(classifier.parameters())
    device = params[0].device
    x, y = x.to(device), y.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gdev = generator.device if generator is not None else torch.device("cpu")

    def step_loss(step):
        idx = torch.randint(x.shape[0], (bs,), generator=generator, device=gdev).to(device)
        xb = x[idx]
        if noise_std > 0:
            xb = xb + noise_std * torch.randn(xb.shape, generator=generator, device=gdev
                                              ).to(device)
        return F.cross_entropy(classifier(xb), y[idx])

    classifier.train()
    yield from optimisation_loop(step_loss, params, opt, steps=steps, lr=lr,
                                 check_every=check_every, progress=progress, desc="classifier",
                                 what="classifier loss")
    classifier.eval()


def train_classifier(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                     **kwargs) -> list[float]:
    """Run :func:`classifier_training_loop` to the end; return the per-step losses.
    (book chapter images)"""
    return [rec["loss"] for rec in classifier_training_loop(classifier, x, y, steps=steps,
                                                             **kwargs)]


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 1000) -> float:
    """Fraction of ``x`` whose arg-max class equals ``y`` (book chapter images)."""
    check_tensor("x", x, ndim=4)
    device = next(classifier.parameters()).device
    was = classifier.training
    classifier.eval()
    pred = torch.cat([classifier(x[i:i + batch_size].to(device)).argmax(1)
                      for i in range(0, x.shape[0], batch_size)])
    classifier.train(was)
    return float((pred.cpu() == y.cpu()).double().mean())


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     batch_size: int = 1000, device=None) -> torch.Tensor:
    """Apply ``feature_fn`` to ``x`` in batches; returns ``(N, d)`` float64 features on the CPU.
    (book chapter images)"""
    check_tensor("x", x, min_ndim=2)
    bs = check_positive_int("batch_size", batch_size)
    out = [feature_fn(x[i:i + bs] if device is None else x[i:i + bs].to(device))
           for i in range(0, x.shape[0], bs)]
    return torch.cat(out).double().cpu()


# --------------------------------------------------------------------------------------------
# Distances between feature sets


def _features(name, f):
    check_tensor(name, f, ndim=2, finite=True)
    if f.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows, got shape {tuple(f.shape)}")
    return f.double()


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(c)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def gaussian_frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor,
                              cov2: torch.Tensor) -> float:
    """Frechet distance of two Gaussians (book eq. images-frechet):
    ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^(1/2) C2 C1^(1/2))^(1/2))``.

    Computed in float64 with symmetric eigendecompositions (the matrix square root of the
    symmetric PSD ``C1^(1/2) C2 C1^(1/2)`` has the same trace as ``(C1 C2)^(1/2)``).
    """
    mu1, mu2 = mu1.double(), mu2.double()
    cov1, cov2 = cov1.double(), cov2.double()
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"expected mu (d,) and cov (d, d) with one d; got {tuple(mu1.shape)}, "
                         f"{tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}")
    s1 = _psd_sqrt((cov1 + cov1.T) / 2)
    m = s1 @ cov2 @ s1
    tr_cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * tr_cross
    return float(value.clamp(min=0))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N_a, d)``, ``(N_b, d)``.
    (book chapter images)

    Means and unbiased covariances, then :func:`gaussian_frechet_distance`. The estimate is
    biased upwards at finite N (by about ``tr(C)/N`` per set): compare sets of equal size.
    """
    a, b = _features("feats_a", feats_a), _features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same width, got {a.shape[1]} and "
                         f"{b.shape[1]}")
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                                     b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


def kernel_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Unbiased squared MMD with the kernel ``k(a, b) = (a.b / d + 1)^3`` (book eq. images-kid).

    ``mean_{i != j} k(a_i, a_j) + mean_{i != j} k(b_i, b_j) - 2 mean_{i, j} k(a_i, b_j)``;
    its expectation is 0 when both sets come from one distribution (it can be negative).
    """
    a, b = _features("feats_a", feats_a), _features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same width, got {a.shape[1]} and "
                         f"{b.shape[1]}")
    d = a.shape[1]
    m, n = a.shape[0], b.shape[0]
    kaa = (a @ a.T / d + 1) ** 3
    kbb = (b @ b.T / d + 1) ** 3
    kab = (a @ b.T / d + 1) ** 3
    value = ((kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
             + (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1)) - 2 * kab.mean())
    return float(value)


def kernel_distance_bootstrap(feats_a: torch.Tensor, feats_b: torch.Tensor, *,
                              num_boot: int = 200, level: float = 0.95, generator=None
                              ) -> tuple[float, float]:
    """:func:`bootstrap_interval` of :func:`kernel_distance`, computed from the kernel matrices once.
    (book chapter images)

    A replicate that resamples rows with counts ``c`` has the same-set term
    ``(c^T K c - sum_i c_i K_ii) / (m (m - 1))`` (pairs of distinct *positions*, as the
    estimator on the resampled set would sum) and the cross term ``c_a^T K_ab c_b / (m n)``,
    so each replicate costs one quadratic form instead of new kernel matrices. Returns
    ``estimate -/+ z * sd(replicates)``.
    """
    a, b = _features("feats_a", feats_a), _features("feats_b", feats_b)
    check_positive_int("num_boot", num_boot)
    z = _normal_quantile(level)
    d = a.shape[1]
    m, n = a.shape[0], b.shape[0]
    kaa, kbb, kab = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
    ca = torch.stack([torch.bincount(torch.randint(m, (m,), generator=generator), minlength=m)
                      for _ in range(num_boot)]).double()              # (R, m)
    cb = torch.stack([torch.bincount(torch.randint(n, (n,), generator=generator), minlength=n)
                      for _ in range(num_boot)]).double()              # (R, n)
    same_a = (((ca @ kaa) * ca).sum(1) - ca @ kaa.diagonal()) / (m * (m - 1))
    same_b = (((cb @ kbb) * cb).sum(1) - cb @ kbb.diagonal()) / (n * (n - 1))
    cross = ((ca @ kab) * cb).sum(1) / (m * n)
    sd = float((same_a + same_b - 2 * cross).std())
    centre = kernel_distance(a, b)
    return centre - z * sd, centre + z * sd


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, *, k: int = 3,
                     return_indicators: bool = False):
    """Improved precision and recall (Kynkaanniemi et al. 2019; book eq. images-pr).

    The real manifold is the union of balls around each real feature with radius its distance
    to its ``k``-th nearest real neighbour; precision is the fraction of fake features inside
    it. Recall swaps the roles. With ``return_indicators`` also returns the per-sample 0/1
    indicators ``(N_fake,)`` and ``(N_real,)`` (for an interval).
    """
    real, fake = _features("real_feats", real_feats), _features("fake_feats", fake_feats)
    k = check_positive_int("k", k)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"k={k} needs more than k rows in each set, got {real.shape[0]} and "
                         f"{fake.shape[0]}")

    def radii(f):
        dist = torch.cdist(f, f)                                   # (N, N), 0 on the diagonal
        return dist.kthvalue(k + 1, dim=1).values                  # skip the point itself

    r_real, r_fake = radii(real), radii(fake)
    d_rf = torch.cdist(real, fake)                                 # (N_real, N_fake)
    in_real = (d_rf <= r_real[:, None]).any(0)                     # (N_fake,)
    in_fake = (d_rf <= r_fake[None, :]).any(1)                     # (N_real,)
    p, r = float(in_real.double().mean()), float(in_fake.double().mean())
    if return_indicators:
        return p, r, in_real, in_fake
    return p, r


def class_histogram(logits_or_labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Fraction of samples per predicted class, ``(num_classes,)``, from logits or labels.
    (book chapter images)"""
    check_positive_int("num_classes", num_classes)
    t = logits_or_labels
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"logits_or_labels must be a tensor, got {type(t).__name__}")
    labels = t.argmax(1) if t.ndim == 2 else t
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"expected logits (N, C) or labels (N,), got shape {tuple(t.shape)}")
    return torch.bincount(labels.long().cpu(), minlength=num_classes).double() / labels.numel()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """``1/2 sum |p - q|`` between two histograms (book chapter images)."""
    if p.shape != q.shape:
        raise ValueError(f"p and q must have one shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    return float(0.5 * (p.double() - q.double()).abs().sum())


# --------------------------------------------------------------------------------------------
# Intervals


def _normal_quantile(level: float) -> float:
    check_positive_float("level", level)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()


def bootstrap_interval(statistic: Callable[..., float], *samples: torch.Tensor,
                       num_boot: int = 200, level: float = 0.95, generator=None,
                       method: str = "normal") -> tuple[float, float]:
    """Bootstrap interval of ``statistic(*samples)``, resampling the rows of every set.
    (book chapter images)

    Each replicate draws every sample set's rows with replacement (independently; put paired
    sets side by side in one tensor ``(N, 2, ...)`` to resample them jointly) and re-evaluates
    the statistic. ``method="normal"`` (default) returns ``estimate -/+ z * sd(replicates)``,
    centred on the full-sample estimate: right for statistics such as the Frechet distance
    whose bootstrap replicates are biased upwards (duplicated rows shrink the effective sample
    size), where percentile intervals can miss the estimate altogether.
    ``method="percentile"`` returns the replicates' ``(1-level)/2`` and ``(1+level)/2`` quantiles.
    """
    check_positive_int("num_boot", num_boot)
    z = _normal_quantile(level)
    if method not in ("normal", "percentile"):
        raise ValueError(f"method must be 'normal' or 'percentile', got {method!r}")
    if not samples:
        raise ValueError("bootstrap_interval needs at least one sample set")
    vals = []
    for _ in range(num_boot):
        resampled = [s[torch.randint(s.shape[0], (s.shape[0],), generator=generator)]
                     for s in samples]
        vals.append(statistic(*resampled))
    v = torch.tensor(vals, dtype=torch.float64)
    if method == "normal":
        centre, sd = float(statistic(*samples)), float(v.std())
        return centre - z * sd, centre + z * sd
    lo, hi = torch.quantile(v, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                            dtype=torch.float64)).tolist()
    return lo, hi


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (book chapter images)."""
    n = check_positive_int("n", n)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = _normal_quantile(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp, so that rounding never puts p outside its own interval (e.g. at p = 0 or 1)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def evaluate_samples(real_feats: torch.Tensor, fake_feats: torch.Tensor,
                     fake_logits: torch.Tensor | None = None,
                     class_freqs: torch.Tensor | None = None, *, k: int = 3,
                     num_boot: int = 200, level: float = 0.95,
                     generator=None) -> dict:
    """Every metric of one sample set against the reference features, with intervals.
    (book chapter images)

    Returns ``{"n", "frechet", "frechet_ci", "kernel", "kernel_ci", "precision",
    "precision_ci", "recall", "recall_ci"}`` and, with ``fake_logits`` and ``class_freqs``,
    ``"class_tv"`` (total variation between the predicted-class histogram and
    ``class_freqs``) with ``"class_tv_ci"``. Intervals at ``level``.
    """
    real, fake = _features("real_feats", real_feats), _features("fake_feats", fake_feats)
    out = {"n": fake.shape[0], "frechet": frechet_distance(real, fake)}
    out["frechet_ci"] = bootstrap_interval(frechet_distance, real, fake, num_boot=num_boot,
                                           level=level, generator=generator)
    out["kernel"] = kernel_distance(real, fake)
    out["kernel_ci"] = kernel_distance_bootstrap(real, fake, num_boot=num_boot, level=level,
                                                 generator=generator)
    p, r, in_real, in_fake = precision_recall(real, fake, k=k, return_indicators=True)
    out["precision"], out["recall"] = p, r
    out["precision_ci"] = wilson_interval(int(in_real.sum()), in_real.numel(), level)
    out["recall_ci"] = wilson_interval(int(in_fake.sum()), in_fake.numel(), level)
    if fake_logits is not None and class_freqs is not None:
        labels = fake_logits.argmax(1).cpu() if fake_logits.ndim == 2 else fake_logits.cpu()
        freqs = class_freqs.double().cpu()

        def tv(lab):
            return total_variation(class_histogram(lab, freqs.numel()), freqs)
        out["class_tv"] = tv(labels)
        out["class_tv_ci"] = bootstrap_interval(tv, labels, num_boot=num_boot, level=level,
                                                generator=generator)
    return out
