"""Offline digit images and small convolutional networks for them (book chapter "Images").

* :func:`load_digit_images`: scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no
  download), scaled to ``[-1, 1]``, split into training and held-out parts by a seeded
  permutation, optionally upsampled (bilinear) to 16x16. Images have shape ``(N, 1, H, W)``.
* :class:`UNet`: a compact U-Net ``F(x_in, c_noise)`` (conv, GroupNorm, SiLU, FiLM noise
  embedding; one down/up level at 8x8, two at 16x16) for :class:`dgref.EDMPrecond`.
* :class:`ImageDiscriminator`: a noise-conditioned conv net ``d(x, sigma) -> logits (B,)``
  with smooth activations, for discriminator guidance.
* :func:`generate_images`: batched EDM sampling of many images from one set of latents.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (check_finite_float, check_positive_float, check_positive_int,
                      check_sigma, check_tensor)
from ._util import resolve_device
from .edm import EDMPrecond, edm_sampler
from .nets import FourierEmbedding
from .rng import init_rng, randn

__all__ = ["DigitImages", "load_digit_images", "UNet", "unet_denoiser", "ImageDiscriminator",
           "generate_images", "image_grid"]


class DigitImages(NamedTuple):
    """A fixed split of the digits: images ``(N, 1, H, W)`` in ``[-1, 1]``, labels ``(N,)``."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor


def _digits_arrays():
    """The 1797 digits as ``(pixels (N, 64), labels (N,))`` numpy arrays.

    From scikit-learn's bundled copy (no download); where scikit-learn is not installed, from
    the same file (``digits.csv.gz``: 64 pixel columns and the label) named by the environment
    variable ``DGREF_DIGITS_CSV``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        path = os.environ.get("DGREF_DIGITS_CSV")
        if not path or not os.path.isfile(path):
            raise ImportError("load_digit_images needs scikit-learn (its bundled digits) or "
                              "DGREF_DIGITS_CSV naming a copy of its digits.csv.gz; got "
                              f"DGREF_DIGITS_CSV={path!r}") from None
        import numpy as np
        table = np.loadtxt(path, delimiter=",")                  # (N, 65)
        return table[:, :-1], table[:, -1].astype(np.int64)
    digits = load_digits()
    return digits.data, digits.target


def load_digit_images(image_size: int = 8, *, heldout_fraction: float = 0.2, seed: int = 0,
                      device=None, dtype=torch.float32) -> DigitImages:
    """scikit-learn's 8x8 digits as images in ``[-1, 1]``, split by a seeded permutation.
    (book chapter images)

    Pixel values ``0..16`` map to ``v / 8 - 1``. ``image_size`` 8 keeps them, any larger size
    upsamples bilinearly (``align_corners=False``: each output pixel is a convex combination
    of input pixels, so the range stays ``[-1, 1]``). The split depends only on ``seed`` and
    ``heldout_fraction``: ``round(heldout_fraction * 1797)`` images are held out.
    """
    size = check_positive_int("image_size", image_size)
    if size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {size}")
    frac = check_positive_float("heldout_fraction", heldout_fraction)
    if not 0 < frac < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {frac}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    pixels, labels = _digits_arrays()
    x = torch.as_tensor(pixels, dtype=torch.float64).reshape(-1, 8, 8) / 8.0 - 1.0  # (N, 8, 8)
    y = torch.as_tensor(labels, dtype=torch.long)                                 # (N,)
    x = x[:, None]                                                          # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.clamp(-1.0, 1.0)
    n = x.shape[0]
    n_held = int(round(frac * n))
    if not 0 < n_held < n:
        raise ValueError(f"heldout_fraction={frac} leaves an empty part of the {n} images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, train = perm[:n_held], perm[n_held:]
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    x = x.to(dtype=dtype, device=dev)
    y = y.to(dev)
    return DigitImages(x[train], y[train], x[held], y[held])


# --------------------------------------------------------------------------------------------
# Networks


def _groups(channels: int, max_groups: int = 8) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a FiLM (scale, shift) from the noise embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        nn.init.zeros_(self.conv2.weight)       # each block starts as its skip path
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                        # (B, cout, H, W)
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _NoiseEmbedding(nn.Module):
    """``c_noise (B,) -> (B, emb_dim)``: Fourier features then a SiLU MLP."""

    def __init__(self, emb_dim: int, num_freqs: int = 16):
        super().__init__()
        self.fourier = FourierEmbedding(num_freqs)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, emb_dim), nn.SiLU(),
                                 nn.Linear(emb_dim, emb_dim), nn.SiLU())

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.fourier(c_noise))


class UNet(nn.Module):
    """A compact U-Net ``F(x_in, c_noise) -> (B, C, H, W)`` (the raw network inside EDMPrecond).

    ``channels[i]`` is the width at resolution ``H / 2**i``; ``len(channels) - 1`` down/up
    levels (default: one level at 8x8, two at 16x16). One residual block per resolution on
    the way down and up (concatenated skips), two at the bottom. The output convolution
    starts at zero, so the preconditioned denoiser starts as ``c_skip x``.
    """

    def __init__(self, image_size: int = 8, in_channels: int = 1, channels=None,
                 emb_dim: int | None = None, *, generator=None):
        super().__init__()
        with init_rng(generator):
            self._build(image_size, in_channels, channels, emb_dim)

    def _build(self, image_size, in_channels, channels, emb_dim):
        size = check_positive_int("image_size", image_size)
        check_positive_int("in_channels", in_channels)
        if channels is None:
            channels = (32, 64) if size <= 8 else (32, 64, 64)
        channels = tuple(check_positive_int(f"channels[{i}]", c) for i, c in enumerate(channels))
        if not channels:
            raise ValueError("channels must not be empty")
        levels = len(channels) - 1
        if size % (2 ** levels):
            raise ValueError(f"image_size {size} is not divisible by 2**{levels} "
                             f"({len(channels)} resolutions)")
        self.image_size, self.in_channels, self.channels = size, in_channels, channels
        emb_dim = 4 * channels[0] if emb_dim is None else check_positive_int("emb_dim", emb_dim)
        self.embed = _NoiseEmbedding(emb_dim)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = channels[0]
        for c in channels:
            self.down.append(_ResBlock(cin, c, emb_dim))
            cin = c
        self.mid = nn.ModuleList([_ResBlock(cin, cin, emb_dim), _ResBlock(cin, cin, emb_dim)])
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            self.up.append(_ResBlock(cin + channels[i], channels[i], emb_dim))
            cin = channels[i]
        self.out_norm = nn.GroupNorm(_groups(cin), cin)
        self.out = nn.Conv2d(cin, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise.to(x_in.dtype))                  # (B, emb_dim)
        h = self.stem(x_in)                                        # (B, c0, H, W)
        skips = []
        last = len(self.down) - 1
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < last:
                h = F.avg_pool2d(h, 2)                             # H / 2**(i+1)
        for block in self.mid:
            h = block(h, emb)
        for j, block in enumerate(self.up):
            i = last - j
            if i < last:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips[i]], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))                  # (B, C, H, W)


def unet_denoiser(image_size: int = 8, *, channels=None, sigma_data: float = 0.5,
                  in_channels: int = 1, generator=None) -> EDMPrecond:
    """An EDM-preconditioned U-Net denoiser ``D(x, sigma)`` for ``(B, C, H, W)`` images.
    (book chapter images) ``generator`` draws the initial weights (default: torch's global
    generator)."""
    return EDMPrecond(UNet(image_size, in_channels, channels, generator=generator), sigma_data)


class ImageDiscriminator(nn.Module):
    """A noise-conditioned discriminator ``d(x, sigma) -> logits (B,)`` for images.

    The input is scaled by ``c_in = 1/sqrt(sigma^2 + sigma_data^2)`` (as the denoiser's) and
    the network sees ``c_noise = log(sigma)/4`` through a FiLM embedding; residual blocks
    with average-pooling down to 4x4, a global mean, and a small SiLU head. All activations
    are smooth (SiLU), so ``grad_x d`` is smooth, which guidance needs.
    """

    def __init__(self, image_size: int = 8, in_channels: int = 1, channels=None,
                 sigma_data: float = 0.5, emb_dim: int | None = None, *, generator=None):
        super().__init__()
        with init_rng(generator):
            self._build(image_size, in_channels, channels, sigma_data, emb_dim)

    def _build(self, image_size, in_channels, channels, sigma_data, emb_dim):
        size = check_positive_int("image_size", image_size)
        if channels is None:
            channels = (32, 64) if size <= 8 else (32, 64, 64)
        channels = tuple(check_positive_int(f"channels[{i}]", c) for i, c in enumerate(channels))
        if size % (2 ** (len(channels) - 1)):
            raise ValueError(f"image_size {size} is not divisible by 2**{len(channels) - 1}")
        self.sigma_data = check_positive_float("sigma_data", sigma_data)
        emb_dim = 2 * channels[0] if emb_dim is None else check_positive_int("emb_dim", emb_dim)
        self.embed = _NoiseEmbedding(emb_dim)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        cin = channels[0]
        for c in channels:
            self.blocks.append(_ResBlock(cin, c, emb_dim))
            cin = c
        self.head = nn.Sequential(nn.Linear(cin + emb_dim, cin), nn.SiLU(), nn.Linear(cin, 1))

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        check_tensor("x", x, ndim=4)
        param = self.stem.weight
        if x.dtype != param.dtype or x.device != param.device:
            raise ValueError(f"x is {x.dtype} on {x.device} but the discriminator's parameters "
                             f"are {param.dtype} on {param.device}; pass x.to(...) or move the "
                             "discriminator")
        sigma = check_sigma("sigma", sigma, x.shape[0], like=x)
        c_in = (sigma ** 2 + self.sigma_data ** 2).rsqrt()
        emb = self.embed(sigma.log() / 4)                          # (B, emb_dim)
        h = self.stem(x * c_in[:, None, None, None])
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i < last:
                h = F.avg_pool2d(h, 2)
        h = F.silu(h).mean(dim=(2, 3))                             # (B, C)
        return self.head(torch.cat([h, emb], dim=1))[:, 0]         # (B,)


# --------------------------------------------------------------------------------------------
# Sampling and display


def generate_images(denoiser, num_images: int, *, image_shape=(1, 8, 8), generator=None,
                    latents: torch.Tensor | None = None, batch_size: int = 500, device=None,
                    clamp: bool = True, **sampler_kwargs) -> torch.Tensor:
    """Draw ``num_images`` images with :func:`dgref.edm_sampler` in batches (book Algorithm edm-sampler).

    The latents ``(num_images, *image_shape)`` are drawn once from ``generator`` (or passed in),
    so the result does not depend on ``batch_size``: two denoisers given the same generator
    seed start from the same noise (a paired comparison). Extra keyword arguments go to the
    sampler (``num_steps``, ``sigma_max``, ``heun_denoiser``, ...). Returns a tensor on
    ``device`` (default: the latents' device), clamped to ``[-1, 1]`` unless ``clamp=False``.
    """
    n = check_positive_int("num_images", num_images)
    bs = check_positive_int("batch_size", batch_size)
    dev = resolve_device(device) if device is not None else None
    if latents is None:
        latents = randn((n, *image_shape), generator, device=dev)
    else:
        check_tensor("latents", latents, min_ndim=2)
        if latents.shape[0] != n:
            raise ValueError(f"latents must have {n} rows (num_images), got shape "
                             f"{tuple(latents.shape)}")
        if dev is not None:
            latents = latents.to(dev)
    out = [edm_sampler(denoiser, latents[i:i + bs], **sampler_kwargs) for i in range(0, n, bs)]
    x = torch.cat(out)
    return x.clamp(-1.0, 1.0) if clamp else x


def image_grid(x: torch.Tensor, nrow: int = 10, pad: int = 1, pad_value: float = 1.0
               ) -> torch.Tensor:
    """Tile images ``(B, 1, H, W)`` into one ``(rows*(H+pad)+pad, nrow*(W+pad)+pad)`` array in ``[0, 1]``.
    (book chapter images)"""
    check_tensor("x", x, ndim=4)
    if x.shape[1] != 1:
        raise ValueError(f"x must have one channel, got shape {tuple(x.shape)}")
    check_positive_int("nrow", nrow)
    check_finite_float("pad_value", pad_value)
    B, _, H, W = x.shape
    rows = math.ceil(B / nrow)
    img = ((x.detach().float().cpu()[:, 0] + 1) / 2).clamp(0, 1)
    grid = torch.full((rows * (H + pad) + pad, nrow * (W + pad) + pad), float(pad_value))
    for k in range(B):
        r, c = divmod(k, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H,
             pad + c * (W + pad): pad + c * (W + pad) + W] = img[k]
    return grid
