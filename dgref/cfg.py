"""Classifier-free and classifier guidance, the two CFG training losses, and the CFG trainer.

Book chapter "Classifier-free guidance and the training discrepancy".

Convention used throughout the book (libraries differ): guidance scale ``w`` with ``w = 0``
meaning *no guidance* (the plain conditional model),

    D_w(x; sigma, c) = (1 + w) D(x; sigma, c) - w D(x; sigma, null)        (eq. cfg-denoiser)

i.e. the score ``grad log p(x | c) + w grad log p(c | x)`` (eq. cfg-score). A *conditional
denoiser* is a callable ``D(x, sigma, labels)`` with ``labels`` ``(B,)`` in ``0..C`` where ``C``
is the null label (see :mod:`dgref.labelled`). Guidance wrappers below turn it into a plain
denoiser ``D(x, sigma)`` for :func:`dgref.edm_sampler`, so the sampler never changes.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ._checks import (check_callable, check_finite_float, check_labels, check_output_shape,
                      check_positive_float, check_positive_int, check_sigma, check_tensor,
                      checked_scope)
from ._util import bcast
from .edm import edm_loss_weight, edm_sample_sigmas
from .guidance import ScoreCorrectedDenoiser
from .rng import BatchGenerator, randn
from .training import optimisation_loop

__all__ = ["CFGDenoiser", "classifier_guidance", "guided_optimum_denoiser", "cfg_loss",
           "cfg_training_loop", "train_cfg"]


def _null_of(denoiser, null_label):
    if null_label is not None:
        return check_positive_int("null_label", null_label)
    for obj in (denoiser, getattr(denoiser, "net", None)):
        v = getattr(obj, "null_label", None)
        if v is not None:
            return int(v)
    raise ValueError("null_label was not given and the denoiser has no 'null_label' attribute; "
                     "pass null_label=C (the number of classes)")


class CFGDenoiser:
    """Classifier-free guidance as a denoiser ``D_w(x, sigma)`` (book eq. cfg-denoiser).

    ``D_w = (1 + w) D(x, sigma, c) - w D(x, sigma, null)``; ``w = 0`` returns the conditional
    branch itself (no second call, so it is bitwise the conditional sampler).

    Args:
        denoiser: conditional denoiser ``D(x, sigma, labels)``.
        labels: an int class or a ``(B,)`` integer tensor (no null label); or None, and the
            labels come with each call, positionally or as ``labels=`` / ``class_labels=``
            (k-diffusion's keyword ``extra_args``), which also override bound labels.
        weight: guidance scale ``w`` (any finite real; ``w = -1`` is the unconditional model).
        null_label: the null label; default ``denoiser.null_label`` (or ``denoiser.net``'s).
    """

    def __init__(self, denoiser, labels, weight: float = 0.0, null_label: int | None = None):
        self.denoiser = check_callable("denoiser", denoiser, "D(x, sigma, labels)")
        self.weight = check_finite_float("weight", weight)
        self.null_label = _null_of(denoiser, null_label)
        # The labels' values are checked here, once (on any device), not at every call.
        if isinstance(labels, torch.Tensor):
            check_labels("labels", labels, labels.reshape(-1).shape[0], self.null_label,
                         allow_null=False, force=True)
        elif labels is not None:
            check_labels("labels", labels, 1, self.null_label, allow_null=False)
        self.labels = labels

    def __call__(self, x: torch.Tensor, sigma, labels=None, *, class_labels=None
                 ) -> torch.Tensor:
        check_tensor("x", x, min_ndim=2)
        sigma = check_sigma("sigma", sigma, x.shape[0], like=x)
        if class_labels is not None:
            if labels is not None:
                raise TypeError("pass labels or class_labels, not both")
            labels = class_labels
        if labels is not None:            # per-call conditioning (k-diffusion's extra_args)
            lab = check_labels("labels", labels, x.shape[0], self.null_label,
                               allow_null=False, device=x.device)
        elif self.labels is None:
            raise TypeError("CFGDenoiser was built with labels=None: pass labels at each call "
                            "(e.g. edm_sampler(..., extra_args={'labels': c}))")
        else:
            with checked_scope():         # checked at construction
                lab = check_labels("labels", self.labels, x.shape[0], self.null_label,
                                   allow_null=False, device=x.device)
        with checked_scope():
            cond = self.denoiser(x, sigma, lab)
            check_output_shape("denoiser", cond, x.shape)
            if self.weight == 0.0:
                return cond
            uncond = self.denoiser(x, sigma, torch.full_like(lab, self.null_label))
        return (1 + self.weight) * cond - self.weight * uncond


def classifier_guidance(denoiser, log_classifier, labels, weight: float = 1.0, window=None
                        ) -> ScoreCorrectedDenoiser:
    """Classifier guidance ``D + w sigma^2 grad_x log p(c | x; sigma)`` (book eq. cfg-classifier).

    Args:
        denoiser: a plain denoiser ``D(x, sigma)`` (e.g. the conditional branch bound to ``c``).
        log_classifier: ``(x, sigma) -> (B, C)`` log class probabilities of the *noisy* input,
            differentiable in ``x`` (e.g. ``world.log_classifier`` or a trained network).
        labels: the target class, an int or a ``(B,)`` tensor.
        weight: ``w``; with the exact classifier and the exact conditional denoiser this equals
            :class:`CFGDenoiser` at the same ``w`` (Bayes' rule).
    """
    check_finite_float("weight", weight)
    check_callable("log_classifier", log_classifier, "(x, sigma) -> (B, C)")
    checked = []                          # labels' range: checked at the first call only

    def correction(x, sigma):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = log_classifier(xg, sigma)                        # (B, C)
            if logp.ndim != 2 or logp.shape[0] != x.shape[0]:
                raise ValueError(f"log_classifier must return (B, C), got {tuple(logp.shape)}")
            lab = check_labels("labels", labels, x.shape[0], logp.shape[1], allow_null=False,
                               device=x.device, force=not checked)
            if not checked:
                checked.append(True)
            sel = logp.gather(1, lab[:, None]).sum()
            (g,) = torch.autograd.grad(sel, xg)
        return g

    return ScoreCorrectedDenoiser(denoiser, correction, weight, window)


def guided_optimum_denoiser(denoiser, w_train: float, null_label: int | None = None):
    """The population optimum of the guidance-aware loss (our reading of Patel et al. 2023;
    book eq. cfg-guided-optimum): ``(D(x, c) + w_tr D(x, null)) / (1 + w_tr)`` for class rows,
    ``D(x, null)`` for null rows, given the exact conditional denoiser ``denoiser``.

    Sampling it with CFG at scale ``w'`` equals sampling the exact model at
    ``w_eff = (w' - w_tr) / (1 + w_tr)``.
    """
    w = check_finite_float("w_train", w_train)
    if w <= -1:
        raise ValueError(f"w_train must be > -1, got {w}")
    null = _null_of(denoiser, null_label)

    def D(x, sigma, labels):
        lab = check_labels("labels", labels, x.shape[0], null, device=x.device)
        cond = denoiser(x, sigma, lab)
        uncond = denoiser(x, sigma, torch.full_like(lab, null))
        mixed = (cond + w * uncond) / (1 + w)
        return torch.where(bcast(lab == null, x), uncond, mixed)

    D.null_label = null
    return D


_LOSSES = ("standard", "guided")


def cfg_loss(denoiser, x0: torch.Tensor, labels: torch.Tensor, *, loss: str = "standard",
             w_train: float = 0.0, p_uncond: float = 0.1, null_label: int | None = None,
             sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2,
             generator=None, sigma=None, reduction: str = "mean") -> torch.Tensor:
    """The EDM loss with label dropout, standard (book eq. cfg-loss) or guidance-aware (book eq.
    cfg-guided-loss).

    Each label is replaced by the null label with probability ``p_uncond``. Then, with
    ``x = x0 + sigma n`` and ``lambda(sigma)`` the EDM weight,

    - ``loss="standard"``: ``lambda |D(x, sigma, c_in) - x0|^2`` (Ho & Salimans 2022);
    - ``loss="guided"`` (our reading of Patel et al. 2023, [unconfirmed]):
      ``lambda |(1 + w_tr) D(x, sigma, c_in) - w_tr D(x, sigma, null) - x0|^2``; on dropped rows
      this is the standard unconditional term. Gradients flow through both branches.

    With ``w_train = 0`` the two coincide (same random draws in the same order).
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    check_callable("denoiser", denoiser, "D(x, sigma, labels)")
    check_tensor("x0", x0, min_ndim=2)
    w = check_finite_float("w_train", w_train)
    p = check_positive_float("p_uncond", p_uncond, allow_zero=True)
    if p > 1:
        raise ValueError(f"p_uncond must be in [0, 1], got {p}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    check_positive_float("sigma_data", sigma_data)
    null = _null_of(denoiser, null_label)
    B = x0.shape[0]
    lab = check_labels("labels", labels, B, null, device=x0.device)
    if sigma is None:
        sigma = edm_sample_sigmas(B, P_mean=P_mean, P_std=P_std, generator=generator,
                                  device=x0.device, dtype=x0.dtype)
    else:
        sigma = check_sigma("sigma", sigma, B, like=x0)
    if isinstance(generator, BatchGenerator):      # one uniform per row, from the row's stream
        u = torch.stack([torch.rand((), generator=g, device=generator.device)
                         for g in generator.generators])
    elif generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else x0.device
        u = torch.rand((B,), generator=generator, device=gdev)
    else:
        raise TypeError("generator must be a torch.Generator, a dgref.rng.BatchGenerator or "
                        f"None, got {type(generator).__name__}")
    drop = u.to(x0.device) < p
    lab_in = torch.where(drop, torch.full_like(lab, null), lab)
    n = randn(x0.shape, generator, dtype=x0.dtype, device=x0.device)
    x = x0 + bcast(sigma, x0) * n
    with checked_scope():
        if loss == "standard":
            pred = denoiser(x, sigma, lab_in)
        else:
            both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                            torch.cat([lab_in, torch.full_like(lab, null)]))
            pred = (1 + w) * both[:B] - w * both[B:]
    check_output_shape("denoiser", pred, x0.shape, "x0")
    weight = edm_loss_weight(sigma, sigma_data)
    per = weight * ((pred - x0) ** 2).flatten(1).sum(1)
    return per.mean() if reduction == "mean" else per


def cfg_training_loop(denoiser: nn.Module, data, labels=None, *, steps: int,
                      loss: str = "standard", w_train: float = 0.0, p_uncond: float = 0.1,
                      batch_size: int = 256, lr: float = 1e-3, sigma_data: float | None = None,
                      null_label: int | None = None, P_mean: float = -1.2, P_std: float = 1.2,
                      generator=None, progress: bool | None = None,
                      check_every: int | None = None) -> Iterator[dict]:
    """Train a conditional denoiser with :func:`cfg_loss` (book eq. cfg-loss or cfg-guided-loss);
    yields ``{"step", "loss"}`` per step.

    A generator: nothing is trained until it is iterated (or use :func:`train_cfg`, which
    returns the losses). ``data`` is either a tensor ``(N, dim)`` with ``labels`` ``(N,)``
    (batches drawn with replacement) or a :class:`dgref.LabelledWorld` (fresh samples each
    step, ``labels=None``). Adam with cosine decay and the shared loop of
    :func:`dgref.training.optimisation_loop` (non-finite stop, batched read-back).
    """
    steps = check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_float("lr", lr)
    null = _null_of(denoiser, null_label)
    if sigma_data is None:
        sigma_data = getattr(denoiser, "sigma_data", 0.5)
    if isinstance(data, torch.Tensor):
        check_tensor("data", data, ndim=2, finite=True)
        if labels is None:
            raise ValueError("labels must be given (shape (N,)) when data is a tensor")
        labels = check_labels("labels", labels, data.shape[0], null, allow_null=False)
        N = data.shape[0]

        def draw():
            gdev = generator.device if generator is not None else "cpu"
            idx = torch.randint(N, (batch_size,), generator=generator, device=gdev).cpu()
            return data[idx], labels[idx]
    elif hasattr(data, "sample") and hasattr(data, "null_label"):
        if labels is not None:
            raise ValueError("labels must be None when data is a LabelledWorld")

        def draw():
            return data.sample(batch_size, generator=generator)
    else:
        raise TypeError("data must be a tensor (N, dim) with labels, or a dgref.LabelledWorld, "
                        f"got {type(data).__name__}")
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise ValueError("denoiser has no trainable parameters")
    device = params[0].device
    opt = torch.optim.Adam(params, lr=lr)

    def step_loss(step):
        x0, lab = draw()
        x0, lab = x0.to(device, params[0].dtype), lab.to(device)
        return cfg_loss(denoiser, x0, lab, loss=loss, w_train=w_train, p_uncond=p_uncond,
                        null_label=null, sigma_data=sigma_data, P_mean=P_mean, P_std=P_std,
                        generator=generator)

    denoiser.train()
    yield from optimisation_loop(step_loss, params, opt, steps=steps, lr=lr,
                                 check_every=check_every, progress=progress, desc="training")
    denoiser.eval()


def train_cfg(denoiser: nn.Module, data, labels=None, *, steps: int, **kwargs) -> list[float]:
    """Train a conditional denoiser with :func:`cfg_loss` (book eq. cfg-loss or cfg-guided-loss):
    run :func:`cfg_training_loop` to the end and return the per-step losses."""
    return [rec["loss"] for rec in cfg_training_loop(denoiser, data, labels, steps=steps,
                                                      **kwargs)]
