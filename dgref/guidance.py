"""Guidance as a denoiser wrapper: the sampler never changes (book: notation page, eq. guided-denoiser).

Every guidance in the book corrects the score at ``(x, sigma)``:
``score_tilde = score + w * c(x, sigma)``, i.e. in denoiser form
``D_tilde(x; sigma) = D(x; sigma) + w * sigma^2 * c(x, sigma)``, switched off outside a sigma
window. Discriminator guidance takes ``c = grad_x d_phi``; the oracle takes the exact
``grad_x log(p_sigma / q_sigma)``.
"""
from __future__ import annotations

import math

import torch

from ._checks import (check_callable, check_finite_float, check_output_shape, check_sigma,
                      check_tensor, check_window, checked_scope)
from ._util import bcast

__all__ = ["ScoreCorrectedDenoiser", "oracle_correction"]


class ScoreCorrectedDenoiser:
    """``D_tilde = D + w sigma^2 c(x, sigma)`` inside ``window = (sigma_lo, sigma_hi)``, ``D`` outside.

    ``c`` is not evaluated at all when no level of the batch lies in the window (a sampler
    step has one level for the whole batch), so a costly correction costs nothing there.

    Args:
        denoiser: the base ``D(x, sigma)``.
        correction: ``c(x, sigma) -> (B, ...)``, a score correction (may use autograd itself).
        weight: the guidance weight ``w`` (0 gives back ``D``).
        window: sigmas where guidance is on (inclusive); default everywhere.
    """

    def __init__(self, denoiser, correction, weight: float = 1.0, window=None):
        self.denoiser = check_callable("denoiser", denoiser)
        self.correction = check_callable("correction", correction, "c(x, sigma)")
        self.weight = check_finite_float("weight", weight)
        self.window = check_window("window", window)

    def __call__(self, x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        check_tensor("x", x, min_ndim=2)
        sigma = check_sigma("sigma", sigma, x.shape[0], like=x)   # the one check of sigma
        with checked_scope():
            out = self.denoiser(x, sigma, *args, **kwargs)
        check_output_shape("denoiser", out, x.shape)
        if self.weight == 0.0:
            return out
        lo, hi = self.window
        if lo == 0.0 and math.isinf(hi):
            mask = None                   # guidance everywhere: no mask to build
        else:
            on = (sigma >= lo) & (sigma <= hi)                  # (B,)
            if not bool(on.any()):        # whole batch outside the window: no correction call
                return out
            mask = on.to(x.dtype)
        with checked_scope():
            c = self.correction(x, sigma)
        check_output_shape("correction", c, x.shape)
        scale = self.weight * sigma ** 2 if mask is None else self.weight * sigma ** 2 * mask
        return out + bcast(scale, x) * c


def oracle_correction(data, model):
    """The exact correction ``c(x, sigma) = grad log p_sigma - grad log q_sigma`` for two mixtures.

    The oracle field ``c`` of book eq. guided-denoiser, in closed form from eq. mixture.

    With ``w = 1`` and the model's exact denoiser, :class:`ScoreCorrectedDenoiser` then equals
    the data's exact denoiser (Kim et al. 2023, Theorem 1, in its exact form).
    """
    def correction(x, sigma):
        return data.score(x, sigma) - model.score(x, sigma)
    return correction
