"""Networks for low-dimensional data: a noise embedding and one SiLU MLP body behind every net.

The raw networks ``F`` that :class:`dgref.EDMPrecond` wraps (book eq. edm-precond) and the
discriminator's body. Nothing here knows about EDM or training: the EDM factories
(:func:`dgref.mlp_denoiser`, :func:`dgref.conditional_mlp_denoiser`) live in :mod:`dgref.edm`.

Every constructor takes ``generator=``: with a ``torch.Generator`` the initial weights depend on
it alone (see :func:`dgref.rng.init_rng`); with ``None`` (default) they come from torch's global
generator, as torch's own layers do.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_labels, check_positive_int
from .rng import init_rng

__all__ = ["FourierEmbedding", "silu_mlp", "MLP", "ConditionalMLP"]


def _one_labels(labels, class_labels):
    """``labels`` or its keyword alias ``class_labels`` (exactly one of them)."""
    if class_labels is not None:
        if labels is not None:
            raise TypeError("pass labels or class_labels, not both")
        return class_labels
    if labels is None:
        raise TypeError("labels are required (positionally, labels= or class_labels=)")
    return labels


class FourierEmbedding(nn.Module):
    """Fixed sinusoidal features of a scalar (the noise level): ``(B,) -> (B, 2 * num_freqs)``."""

    def __init__(self, num_freqs: int = 16, max_freq: float = 8.0):
        super().__init__()
        check_positive_int("num_freqs", num_freqs)
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), num_freqs)
                             * math.pi, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs[None].to(t.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


def silu_mlp(in_width: int, hidden: int, depth: int, out_width: int) -> nn.Sequential:
    """``depth`` hidden ``Linear + SiLU`` layers of width ``hidden``, then a ``Linear`` to
    ``out_width``: the one MLP body of :class:`MLP`, :class:`ConditionalMLP` and
    :class:`dgref.Discriminator` (book: chapters edm and kl_objective). SiLU keeps the input
    gradient smooth, which guidance needs."""
    check_positive_int("hidden", hidden)
    check_positive_int("depth", depth)
    layers, width = [], in_width
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, out_width))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """``F(x_in, c_noise)``: a SiLU MLP on ``[x_in, embed(c_noise)]`` returning ``dim`` numbers.

    With ``out_dim=1`` it returns ``(B,)`` (a scalar field, e.g. a discriminator logit).
    SiLU keeps the input gradient smooth, which guidance needs.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, out_dim: int | None = None,
                 num_freqs: int = 16, *, generator=None):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.out_dim = dim if out_dim is None else check_positive_int("out_dim", out_dim)
        with init_rng(generator):
            self.embed = FourierEmbedding(num_freqs)
            self.body = silu_mlp(dim + 2 * num_freqs, hidden, depth, self.out_dim)
            # Initialise the first layer as if x_in and the noise embedding had separate
            # layers (uniform +-1/sqrt(fan_in) for each group). With one shared fan-in of
            # dim + 2 num_freqs the few x columns start so small that the net is nearly linear
            # in x and does not learn a multi-modal denoiser in thousands of steps (measured
            # on the ring).
            first = self.body[0]
            with torch.no_grad():
                first.weight[:, :dim].uniform_(-dim ** -0.5, dim ** -0.5)
                first.weight[:, dim:].uniform_(-(2 * num_freqs) ** -0.5,
                                               (2 * num_freqs) ** -0.5)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_in, self.embed(c_noise).to(x_in.dtype)], dim=1)
        out = self.body(h)
        return out[:, 0] if self.out_dim == 1 and self.dim != 1 else out


class ConditionalMLP(nn.Module):
    """``F(x_in, c_noise, labels)``: a SiLU MLP on ``[x_in, embed(c_noise), embed(label)]``.

    ``labels`` ``(B,)`` in ``0..num_classes``; the last value is the null label (its own learned
    embedding), trained by label dropout. The labels may be passed positionally or by keyword,
    ``labels=`` or ``class_labels=`` (k-diffusion's and EDM's name).
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 3,
                 num_freqs: int = 16, label_dim: int = 16, *, generator=None):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.null_label = self.num_classes
        check_positive_int("label_dim", label_dim)
        with init_rng(generator):
            self.embed = FourierEmbedding(num_freqs)
            self.label_embed = nn.Embedding(num_classes + 1, label_dim)
            self.body = silu_mlp(dim + 2 * num_freqs + label_dim, hidden, depth, dim)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels=None, *,
                class_labels=None) -> torch.Tensor:
        labels = _one_labels(labels, class_labels)
        lab = check_labels("labels", labels, x_in.shape[0], self.num_classes, device=x_in.device)
        h = torch.cat([x_in, self.embed(c_noise).to(x_in.dtype),
                       self.label_embed(lab).to(x_in.dtype)], dim=1)
        return self.body(h)
