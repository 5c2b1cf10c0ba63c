"""The digit-image experiment: EDM on digits, discriminator guidance with both objectives, metrics.

Book chapter "Images" and ``benchmarks/images_full.py`` run the same phases from here:

1. data (:func:`dgref.digits.load_digit_images`),
2. the feature network (a digit classifier trained on the training split),
3. the base EDM denoiser (U-Net, :func:`dgref.train_denoiser`),
4. base samples: a set for training the CE discriminator and an evaluation set,
5. two discriminators, trained with the cross-entropy and with the KL objective
   (:func:`dgref.distributed.train_discriminator_parallel`, one shard by default),
6. guided samples from the *same latents* as the base evaluation set (a paired comparison),
7. a metrics table against the training split, with intervals and baselines, and
8. the KL objective's held-out loss gap ``loss(d) - loss(0)`` of each discriminator
   (:func:`loss_gap_terms`, :class:`LossGap`): the change of the score-error integral that
   the guidance makes, in nats, with a paired interval.

Two *regimes* (:data:`REGIMES`) share the data and the classifier: ``"trained"`` (the
denoiser at its default budget) and ``"undertrained"`` (a quarter of the steps: a controlled
regime with room to improve). Guidance follows Kim et al. 2023's published setting
(:data:`IMAGES_QUICK` ``"guidance"``), for both discriminators.

Each trained model and sample set is cached (:mod:`dgref.cache`) under a name holding the
setting, regime and seed, with the config it was built from, which includes the configs of the
phases it depends on: changing a size rebuilds that phase and everything after it, nothing
before. Under ``torchrun`` (``ctx`` from :func:`dgref.distributed.init_distributed`) the
training phases run on every process with DistributedDataParallel over
``config["parallel"]["shards"]`` shards, and rank 0 builds every other phase and writes the
cache while the others wait and then read it.
"""
from __future__ import annotations

import copy
import inspect
import math
import time
from typing import Callable, NamedTuple

import torch

from ._checks import check_nonneg_int, check_positive_int, check_tensor, check_window
from ._util import bcast, resolve_device
from .cache import cached, load_cached, save_cached
from .digits import ImageDiscriminator, generate_images, load_digit_images, unet_denoiser
from .discriminator import ce_loss, dg_sampler_kwargs, logit_and_grad
from .distributed import (DistContext, barrier, broadcast_object, current_context,
                          train_denoiser_parallel, train_discriminator_parallel)
from .metrics import (DigitClassifier, bootstrap_interval, class_histogram,
                      classifier_accuracy, evaluate_samples, extract_features,
                      frechet_distance, train_classifier)
from .rng import make_generator, randn

__all__ = ["IMAGES_QUICK", "IMAGES_FULL", "REGIMES", "images_config", "ImagesExperiment",
           "format_metrics_table", "format_loss_gap_table", "loss_gap_terms", "LossGap",
           "field_weight"]

# Bump when a change of the code changes what a cached phase would contain.
# 3: DG's published guidance and log-uniform CE levels; KL levels on the window; regimes;
# shards.
_CODE_VERSION = 3

#: The images chapter's CPU default (book chapter images): 8x8 digits, small networks.
IMAGES_QUICK = {
    "data": {"image_size": 8, "heldout_fraction": 0.2, "split_seed": 0},
    "classifier": {"width": 16, "feature_dim": 32, "steps": 300, "batch_size": 128,
                   "lr": 3e-3, "noise_std": 0.1},
    "denoiser": {"channels": [16, 32], "steps": 600, "batch_size": 128, "lr": 2e-3},
    # sigma_max 20: about twice the largest distance between two 8x8 digits (9.6), EDM's rule
    # of thumb for where the prior N(0, sigma_max^2 I) covers the data.
    "sampler": {"num_steps": 18, "sigma_min": 0.002, "sigma_max": 20.0, "rho": 7.0},
    "samples": {"num_fake": 1000, "num_eval": 359, "batch_size": 500},
    # ce_sigma_dist "loguniform": the cross-entropy's noise levels log-uniform on
    # [sigma_min, sigma_max], Kim et al. 2023's importance sampling in EDM's sigma.
    # kl_levels "window": the KL objective's levels log-uniform on the guidance window
    # [window[0], sigma_max] where its correction is used ("full": [sigma_min, sigma_max]).
    "discriminator": {"channels": [16, 32], "steps": 500, "batch_size": 128, "lr": 1e-3,
                      "kl_weighting": "kl", "kl_levels": "window",
                      "ce_sigma_dist": "loguniform"},
    # Kim et al. 2023's published guidance: w = 2 on the Euler slope only (Heun's corrector
    # slope unguided), switched on for sigma >= 0.045 (VP time 0.01) up to sigma_max.
    "guidance": {"weight": 2.0, "window": [0.045, 20.0], "slopes": "euler"},
    # the held-out loss gap: `draws` noise draws (sigma, n) per held-out digit, from `seed`
    "loss_gap": {"draws": 16, "seed": 7},
    "metrics": {"k": 3, "num_boot": 200, "level": 0.95},
    # global batches split into `shards` (one per process under torchrun)
    "parallel": {"shards": 1},
}

#: The images chapter's full-size GPU setting (book chapter images): 16x16 digits, wider
#: networks, more steps and samples.
IMAGES_FULL = {
    "data": {"image_size": 16, "heldout_fraction": 0.2, "split_seed": 0},
    "classifier": {"width": 32, "feature_dim": 32, "steps": 2000, "batch_size": 256,
                   "lr": 2e-3, "noise_std": 0.1},
    # Measured on one H100: about 21 ms per denoiser step and 17 ms per CE discriminator step
    # at these widths, so the whole run takes about 5 minutes there.
    "denoiser": {"channels": [64, 128, 128], "steps": 8000, "batch_size": 256, "lr": 1e-3},
    # 16x16 images are upsampled 8x8 ones: the largest distance doubles (19), so sigma_max 40.
    "sampler": {"num_steps": 32, "sigma_min": 0.002, "sigma_max": 40.0, "rho": 7.0},
    "samples": {"num_fake": 5000, "num_eval": 2000, "batch_size": 1000},
    "discriminator": {"channels": [32, 64, 64], "steps": 1500, "batch_size": 256, "lr": 1e-3,
                      "kl_weighting": "kl", "kl_levels": "window",
                      "ce_sigma_dist": "loguniform"},
    "guidance": {"weight": 2.0, "window": [0.045, 40.0], "slopes": "euler"},
    "loss_gap": {"draws": 16, "seed": 7},
    "metrics": {"k": 3, "num_boot": 200, "level": 0.95},
    "parallel": {"shards": 1},
}

#: The regimes (book chapter images): overrides of each setting's config. ``"undertrained"``
#: trains the same denoiser for a quarter of the steps, a controlled regime with room to
#: improve.
REGIMES = {
    "quick": {"trained": {}, "undertrained": {"denoiser": {"steps": 150}}},
    "full": {"trained": {}, "undertrained": {"denoiser": {"steps": 2000}}},
}


def images_config(quick: bool = True, seed: int = 0, overrides: dict | None = None,
                  regime: str = "trained") -> dict:
    """The experiment's config: :data:`IMAGES_QUICK` or :data:`IMAGES_FULL`, the ``regime``'s
    overrides (:data:`REGIMES`), ``seed``, and ``overrides`` ``{"section": {"key": value}}``
    (each key must exist; applied last); book chapter images."""
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be True or False, got {quick!r}")
    check_nonneg_int("seed", seed)
    setting = "quick" if quick else "full"
    if regime not in REGIMES[setting]:
        raise ValueError(f"regime must be one of {sorted(REGIMES[setting])}, got {regime!r}")
    cfg = copy.deepcopy(IMAGES_QUICK if quick else IMAGES_FULL)
    for layer, what in ((REGIMES[setting][regime], "REGIMES"), (overrides or {}, "overrides")):
        for section, values in layer.items():
            if section not in cfg:
                raise ValueError(f"{what}: unknown section {section!r}; expected one of "
                                 f"{sorted(cfg)}")
            for key, value in values.items():
                if key not in cfg[section]:
                    raise ValueError(f"{what}[{section!r}]: unknown key {key!r}; expected one "
                                     f"of {sorted(cfg[section])}")
                cfg[section][key] = value
    check_positive_int("parallel.shards", cfg["parallel"]["shards"])
    check_window("guidance.window", cfg["guidance"]["window"])
    if cfg["guidance"]["slopes"] not in ("euler", "both"):
        raise ValueError(f"guidance.slopes must be 'euler' or 'both', got "
                         f"{cfg['guidance']['slopes']!r}")
    cfg["setting"] = setting
    cfg["regime"] = regime
    cfg["seed"] = int(seed)
    cfg["code_version"] = _CODE_VERSION
    return cfg


def field_weight(weight: float, slopes: str) -> float:
    """The weight of the guided field ``D + w_f sigma^2 grad d`` that a Heun sampler follows
    (book chapter images).

    ``slopes="both"``: ``w_f = w``. ``slopes="euler"`` (the DG code's default): each Heun step
    averages a guided Euler slope and an unguided corrector slope, so to first order in the
    step it follows ``w_f = w / 2``.
    """
    if slopes not in ("euler", "both"):
        raise ValueError(f"slopes must be 'euler' or 'both', got {slopes!r}")
    return float(weight) / 2 if slopes == "euler" else float(weight)


def _ce_level_kwargs(sigma_dist: str, sigma_min: float, sigma_max: float) -> dict:
    """Keywords that make :func:`dgref.ce_loss` draw its levels from ``sigma_dist``, in
    whichever vocabulary it speaks (``sigma_dist=``, or the older ``weighting=``)."""
    if sigma_dist not in ("lognormal", "loguniform"):
        raise ValueError(f"discriminator.ce_sigma_dist must be 'lognormal' or 'loguniform', "
                         f"got {sigma_dist!r}")
    kw = {"sigma_min": sigma_min, "sigma_max": sigma_max}
    if "sigma_dist" in inspect.signature(ce_loss).parameters:
        kw["sigma_dist"] = sigma_dist
    else:
        kw["weighting"] = "loguniform" if sigma_dist == "loguniform" else "uniform"
    return kw


# --------------------------------------------------------------------------------------------
# The held-out loss gap


def loss_gap_terms(denoiser, disc, x0: torch.Tensor, *, window, draws: int = 16,
                   generator=None, batch_size: int = 2048):
    """Per-example terms of the KL objective on held-out data, restricted to a sigma window
    (book eq. images-loss-gap).

    For every example ``x0_i`` and ``K = draws`` pairs ``(sigma, n)``: ``ln sigma`` uniform on
    ``[ln lo, ln hi]`` (stratified: the k-th draw in the k-th of K equal slices), ``n ~ N(0, I)``,
    ``x = x0 + sigma n``, ``r = D(x; sigma) - x0``, ``g = grad_x d(x, sigma)``, ``L = ln(hi/lo)``::

        A_i = mean_k L sigma^2 |g|^2,   B_i = mean_k L g . r,   C_i = mean_k L |r|^2 / sigma^2.

    The KL objective of the field ``D + w sigma^2 grad d`` on ``[lo, hi]`` is then
    ``C + 2 w B + w^2 A``: the paired gap ``gap_i(w) = w^2 A_i + 2 w B_i`` (the same digits,
    noise and levels for ``d`` and for ``d = 0``) estimates without bias
    ``int_lo^hi dsigma E|D_tilde - x0|^2 / sigma^3 - (the same for D)``, which by denoising
    score matching is the change that guidance makes to the score-error integral (nats).
    Returns float64 CPU tensors ``(A, B, C)`` of shape ``(N,)``. Pass the same ``generator``
    seed for two discriminators to pair them too.
    """
    check_tensor("x0", x0, min_ndim=2)
    lo, hi = check_window("window", window)
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"window must be finite with 0 < lo < hi, got {window!r}")
    K = check_positive_int("draws", draws)
    bs = check_positive_int("batch_size", batch_size)
    n = x0.shape[0]
    L = math.log(hi / lo)
    u = (torch.arange(K, dtype=torch.float64)[None, :]
         + torch.rand((n, K), generator=generator, dtype=torch.float64)) / K      # (N, K)
    sigma = (math.log(lo) + u * L).exp().reshape(-1)                               # (N K,)
    noise = torch.randn((n * K, *x0.shape[1:]), generator=generator, dtype=x0.dtype)
    rows = torch.arange(n).repeat_interleave(K)
    out = torch.zeros(3, n * K, dtype=torch.float64)
    for a in range(0, n * K, bs):
        s = sigma[a:a + bs].to(device=x0.device, dtype=x0.dtype)
        xb0 = x0[rows[a:a + bs].to(x0.device)]
        x = xb0 + bcast(s, x0) * noise[a:a + bs].to(x0.device)
        with torch.no_grad():
            r = (denoiser(x, s) - xb0).double().flatten(1).cpu()
        _, g = logit_and_grad(disc, x, s)
        g = g.double().flatten(1).cpu()
        s64 = s.double().cpu()
        out[0, a:a + bs] = L * s64 ** 2 * g.pow(2).sum(1)
        out[1, a:a + bs] = L * (g * r).sum(1)
        out[2, a:a + bs] = L * r.pow(2).sum(1) / s64 ** 2
    A, B, C = out.reshape(3, n, K).mean(2)
    return A, B, C


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return math.sqrt(2) * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()


class LossGap(NamedTuple):
    """The held-out loss gap of one discriminator (book chapter images): per-example terms
    ``A, B, C`` of :func:`loss_gap_terms` on the sigma ``window``.

    ``gap(w)`` is the per-example gap at field weight ``w``; :meth:`estimate` its mean with a
    normal interval from the examples' spread (the discriminator and denoiser held fixed).
    """
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    window: tuple

    def gap(self, w: float) -> torch.Tensor:
        """Per-example ``w^2 A + 2 w B`` (nats)."""
        return w * w * self.A + 2 * w * self.B

    def estimate(self, w: float, level: float = 0.95) -> tuple[float, float, float]:
        """``(mean, lo, hi)`` of the gap at field weight ``w``: mean -/+ z standard errors."""
        return _mean_interval(self.gap(w), level)

    def difference(self, other: "LossGap", w: float, level: float = 0.95
                   ) -> tuple[float, float, float]:
        """``(mean, lo, hi)`` of ``self.gap(w) - other.gap(w)`` example by example (paired:
        needs ``other`` measured on the same examples and draws)."""
        if self.A.shape != other.A.shape:
            raise ValueError("other must be measured on the same examples")
        return _mean_interval(self.gap(w) - other.gap(w), level)

    def best_weight(self, level: float = 0.95, num_boot: int = 1000, generator=None
                    ) -> dict:
        """The field weight ``w* = -mean B / mean A`` that minimises the mean gap, the minimal
        gap ``-mean(B)^2 / mean(A)``, and bootstrap intervals (examples resampled)."""
        def stats(idx):
            a, b = self.A[idx].mean(), self.B[idx].mean()
            return torch.stack([-b / a, -b * b / a])
        n = self.A.numel()
        point = stats(torch.arange(n))
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        boot = torch.stack([stats(torch.randint(n, (n,), generator=gen))
                            for _ in range(check_positive_int("num_boot", num_boot))])
        z, se = _z(level), boot.std(0)
        return {"weight": float(point[0]), "weight_ci": (float(point[0] - z * se[0]),
                                                         float(point[0] + z * se[0])),
                "gap": float(point[1]), "gap_ci": (float(point[1] - z * se[1]),
                                                   float(point[1] + z * se[1]))}


def _mean_interval(v: torch.Tensor, level: float) -> tuple[float, float, float]:
    m = float(v.mean())
    half = _z(level) * float(v.std(unbiased=True)) / math.sqrt(v.numel())
    return m, m - half, m + half


class ImagesExperiment:
    """The phases of the digit experiment, each cached; attributes hold what was built.

    ``ImagesExperiment(config, device=, cache_dir=, log=, ctx=)``; call the phases in order or
    :meth:`run` for all. ``timings`` maps each phase to its wall time in seconds and
    ``cache_hits`` to whether it was loaded rather than built. Randomness: each phase draws
    from its own generator seeded from ``config["seed"]`` and a phase index, on the device;
    initial weights too (the global generator is left untouched), so a phase rebuilt alone
    gives what a full run gives. ``ctx`` (:func:`dgref.distributed.init_distributed`): the
    process group when run under torchrun (default: the current one, or a single process).
    """

    def __init__(self, config: dict, *, device=None, cache_dir=None,
                 log: Callable[[str], None] | None = print, ctx: DistContext | None = None):
        self.config = config
        self.device = resolve_device(device)
        self.cache_dir = cache_dir
        self.ctx = ctx if ctx is not None else current_context(self.device)
        if self.ctx.world_size > 1 and config["parallel"]["shards"] != self.ctx.world_size:
            raise ValueError(f"config parallel.shards={config['parallel']['shards']} must "
                             f"equal the number of processes ({self.ctx.world_size})")
        log = log or (lambda s: None)
        self.log = log if self.ctx.is_main else (lambda s: None)
        self.timings: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        self.tag = f"images-{config['setting']}-{config['regime']}-s{config['seed']}"
        self.data = None
        self.discriminators: dict = {}
        self.disc_losses: dict = {}
        self.samples: dict = {}

    # ---------------------------------------------------------------- helpers
    def _seed(self, phase: int) -> int:
        return 1000 * self.config["seed"] + phase

    def _gen(self, phase: int) -> torch.Generator:
        return make_generator(self._seed(phase), self.device)

    def _build(self, phase: int, factory):
        """Build a network with its initial weights drawn from a seed of its own (``phase``),
        leaving torch's global generator as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(phase))
            net = factory()
        return net.to(self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _phase(self, name: str, config: dict, build: Callable[[], dict], *,
               collective: bool = False, tag: str | None = None) -> dict:
        """Load or build one cached phase. Across processes: a ``collective`` phase (training)
        is built by every process and saved by rank 0; any other is built by rank 0 while the
        others wait, then read from the cache."""
        t0 = time.perf_counter()
        key = f"{tag or self.tag}-{name}"
        ctx = self.ctx
        if ctx.world_size == 1:
            payload, hit = cached(key, config, build, self.cache_dir, log=self.log)
        else:
            def present():
                try:
                    load_cached(key, config, self.cache_dir)
                    return True
                except (FileNotFoundError, ValueError):
                    return False
            hit = broadcast_object(present() if ctx.is_main else None, ctx)
            if hit:
                payload = load_cached(key, config, self.cache_dir)
            elif collective:
                payload = build()
                if ctx.is_main:
                    save_cached(key, config, payload, self.cache_dir)
                barrier(ctx)
            else:
                if ctx.is_main:
                    save_cached(key, config, build(), self.cache_dir)
                barrier(ctx)
                payload = load_cached(key, config, self.cache_dir)
        self._sync()
        self.timings[name] = time.perf_counter() - t0
        self.cache_hits[name] = hit
        self.log(f"[{self.config['regime']}: {name}] {'loaded from cache' if hit else 'built'} "
                 f"in {self.timings[name]:.1f} s")
        return payload

    def _cfg(self, *sections) -> dict:
        c = self.config
        out = {"seed": c["seed"], "code_version": c["code_version"], "data": c["data"]}
        for s in sections:
            out[s] = c[s]
        if "denoiser" in sections or "discriminator" in sections:
            out["parallel"] = c["parallel"]
        return out

    # ---------------------------------------------------------------- phases
    def load_data(self):
        """Phase 1: the digits, split, on the device."""
        d = self.config["data"]
        self.data = load_digit_images(d["image_size"], heldout_fraction=d["heldout_fraction"],
                                      seed=d["split_seed"], device=self.device)
        self.image_shape = tuple(self.data.x_train.shape[1:])
        return self.data

    def train_classifier(self):
        """Phase 2: the digit classifier (the feature network; shared by the regimes); its
        held-out accuracy."""
        c = self.config["classifier"]
        clf = self._build(102, lambda: DigitClassifier(width=c["width"],
                                                       feature_dim=c["feature_dim"]))

        def build():
            train_classifier(clf, self.data.x_train, self.data.y_train, steps=c["steps"],
                             batch_size=c["batch_size"], lr=c["lr"], noise_std=c["noise_std"],
                             generator=self._gen(2))
            return {"state": clf.state_dict()}
        payload = self._phase("classifier", self._cfg("classifier"), build,
                              tag=f"images-{self.config['setting']}-s{self.config['seed']}")
        clf.load_state_dict(payload["state"])
        clf.eval()
        self.classifier = clf
        self.classifier_accuracy = classifier_accuracy(clf, self.data.x_heldout,
                                                       self.data.y_heldout)
        # Features standardised by the training split's per-dimension mean and std: a fixed
        # part of the feature network, so distances are in units of the data's spread.
        with torch.no_grad():
            f = extract_features(clf.features, self.data.x_train)
        self._feat_mean, self._feat_std = f.mean(0), f.std(0).clamp(min=1e-6)
        return clf

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised penultimate-layer features ``(N, feature_dim)`` (float64, CPU)."""
        f = extract_features(self.classifier.features, x, device=self.device)
        return (f - self._feat_mean) / self._feat_std

    def predicted_class(self, x: torch.Tensor) -> torch.Tensor:
        """The digit classifier's predicted class ``(N,)`` (CPU)."""
        with torch.no_grad():
            return torch.cat([self.classifier(x[i:i + 1000]).argmax(1).cpu()
                              for i in range(0, x.shape[0], 1000)])

    def train_denoiser(self):
        """Phase 3: the base EDM denoiser."""
        c = self.config["denoiser"]
        den = self._build(103, lambda: unet_denoiser(self.image_shape[-1],
                                                     channels=tuple(c["channels"])))

        def build():
            losses = train_denoiser_parallel(
                den, self.data.x_train, steps=c["steps"], batch_size=c["batch_size"],
                lr=c["lr"], seed=self._seed(3), num_shards=self.config["parallel"]["shards"],
                ctx=self.ctx)
            return {"state": den.state_dict(), "losses": torch.tensor(losses)}
        payload = self._phase("denoiser", self._cfg("denoiser"), build, collective=True)
        den.load_state_dict(payload["state"])
        den.eval()
        for p in den.parameters():
            p.requires_grad_(False)
        self.denoiser = den
        self.denoiser_losses = payload["losses"]
        return den

    def _sample(self, denoiser, n, seed_phase, **extra):
        s = self.config["sampler"]
        return generate_images(denoiser, n, image_shape=self.image_shape,
                               generator=self._gen(seed_phase),
                               batch_size=self.config["samples"]["batch_size"],
                               device=self.device, num_steps=s["num_steps"],
                               sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], rho=s["rho"],
                               **extra)

    def sample_base(self):
        """Phase 4: base samples: ``fake_train`` (for the CE discriminator) and ``eval``."""
        n = self.config["samples"]

        def build():
            return {"fake_train": self._sample(self.denoiser, n["num_fake"], 40),
                    "eval": self._sample(self.denoiser, n["num_eval"], 41)}
        payload = self._phase("samples-base", self._cfg("denoiser", "sampler", "samples"), build)
        self.fake_train = payload["fake_train"].to(self.device)
        self.samples["base"] = payload["eval"].to(self.device)
        return self.samples["base"]

    def train_discriminator(self, objective: str):
        """Phase 5: a discriminator trained with ``objective`` ``"ce"`` or ``"kl"``.

        Cross-entropy: real training digits against ``fake_train``, both noised at levels
        drawn from ``discriminator.ce_sigma_dist`` on ``[sigma_min, sigma_max]``. KL objective:
        real digits and the frozen denoiser, ``kl_weighting`` with log-uniform levels on the
        guidance window ``[window[0], sigma_max]`` (``kl_levels="window"``, where its
        correction is used) or on ``[sigma_min, sigma_max]`` (``"full"``); its recorded losses
        are relative to ``d = 0``.
        """
        if objective not in ("ce", "kl"):
            raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
        c = self.config["discriminator"]
        disc = self._build(150 if objective == "ce" else 151, lambda: ImageDiscriminator(
            self.image_shape[-1], channels=tuple(c["channels"])))
        s = self.config["sampler"]

        def build():
            kw = dict(objective=objective, x_real=self.data.x_train, steps=c["steps"],
                      batch_size=c["batch_size"], lr=c["lr"],
                      seed=self._seed(50 if objective == "ce" else 51),
                      num_shards=self.config["parallel"]["shards"], ctx=self.ctx)
            if objective == "ce":
                kw["x_fake"] = self.fake_train
                kw.update(_ce_level_kwargs(c["ce_sigma_dist"], s["sigma_min"], s["sigma_max"]))
            else:
                if c["kl_levels"] not in ("window", "full"):
                    raise ValueError(f"discriminator.kl_levels must be 'window' or 'full', got "
                                     f"{c['kl_levels']!r}")
                lo = (self.config["guidance"]["window"][0] if c["kl_levels"] == "window"
                      else s["sigma_min"])
                kw.update(denoiser=self.denoiser, weighting=c["kl_weighting"],
                          sigma_min=lo, sigma_max=s["sigma_max"])
            losses = train_discriminator_parallel(disc, **kw)
            return {"state": disc.state_dict(), "losses": torch.tensor(losses)}
        cfg = self._cfg("denoiser", "sampler", "samples", "discriminator")
        cfg["objective"] = objective
        if objective == "kl":             # its recorded losses are relative to d = 0
            cfg["kl_losses"] = "relative"
            if c["kl_levels"] == "window":
                cfg["guidance_window"] = self.config["guidance"]["window"]
        payload = self._phase(f"disc-{objective}", cfg, build, collective=True)
        disc.load_state_dict(payload["state"])
        disc.eval()
        for p in disc.parameters():
            p.requires_grad_(False)
        self.discriminators[objective] = disc
        self.disc_losses[objective] = payload["losses"]
        return disc

    def guidance_key(self, objective: str, weight: float | None = None,
                     slopes: str | None = None) -> str:
        """The name of a guided sample set: ``objective`` for the config's guidance, with
        ``-w<weight>`` and ``-<slopes>`` when those differ from it."""
        g = self.config["guidance"]
        key = objective
        if weight is not None and float(weight) != float(g["weight"]):
            key += f"-w{float(weight):g}"
        if slopes is not None and slopes != g["slopes"]:
            key += f"-{slopes}"
        return key

    def sample_guided(self, objective: str, weight: float | None = None,
                      slopes: str | None = None, num: int | None = None):
        """Phase 6: guided samples from the base evaluation set's latents.

        ``weight`` and ``slopes`` default to the config's guidance (stored as
        ``samples[objective]``); others are stored under :meth:`guidance_key`. ``num``: only
        the first ``num`` latents of the evaluation set (default: all).
        """
        g = dict(self.config["guidance"])
        key = self.guidance_key(objective, weight, slopes)
        if weight is not None:
            g["weight"] = float(weight)
        if slopes is not None:
            g["slopes"] = slopes
        n_eval = self.config["samples"]["num_eval"]
        num = n_eval if num is None else min(check_positive_int("num", num), n_eval)
        disc = self.discriminators[objective]

        def build():
            kw = dg_sampler_kwargs(self.denoiser, disc, g["weight"], tuple(g["window"]),
                                   g["slopes"])
            den = kw.pop("denoiser")
            if num == n_eval:
                return {"eval": self._sample(den, num, 41, **kw)}
            latents = randn((n_eval, *self.image_shape), self._gen(41), device=self.device)
            return {"eval": self._sample(den, num, 41, latents=latents[:num], **kw)}
        cfg = self._cfg("denoiser", "sampler", "samples", "discriminator")
        cfg["guidance"] = g
        cfg["objective"] = objective
        cfg["num"] = num
        payload = self._phase(f"samples-{key}" + (f"-n{num}" if num < n_eval else ""), cfg,
                              build)
        self.samples[key] = payload["eval"].to(self.device)
        return self.samples[key]

    def loss_gap(self, objective: str) -> LossGap:
        """Phase 8: the held-out loss gap of a discriminator on the guidance window
        (:func:`loss_gap_terms`; the same digits, levels and noise for both objectives)."""
        t0 = time.perf_counter()
        lg = self.config["loss_gap"]
        window = tuple(self.config["guidance"]["window"])
        gen = torch.Generator().manual_seed(1000 * self.config["seed"] + lg["seed"])
        A, B, C = loss_gap_terms(self.denoiser, self.discriminators[objective],
                                 self.data.x_heldout, window=window, draws=lg["draws"],
                                 generator=gen)
        if not hasattr(self, "loss_gaps"):
            self.loss_gaps = {}
        self.loss_gaps[objective] = LossGap(A, B, C, window)
        self.timings[f"loss-gap-{objective}"] = time.perf_counter() - t0
        return self.loss_gaps[objective]

    def class_changes(self, key: str) -> torch.Tensor:
        """Indices of the evaluation latents whose predicted class differs between the base
        samples and ``samples[key]`` (same latents)."""
        n = self.samples[key].shape[0]
        base = self.predicted_class(self.samples["base"][:n])
        return (self.predicted_class(self.samples[key]) != base).nonzero()[:, 0]

    def evaluate(self, extra: dict | None = None, keys=None, baselines: bool = True) -> dict:
        """Phase 7: metrics of sample sets (and baselines) against the training split.

        Rows: ``heldout`` (real held-out images: the floor at their size), each sample set
        (``keys``, default all of full size), and two far baselines: ``noise`` (uniform pixels
        in [-1, 1]) and ``shuffled`` (held-out images with their pixels permuted). Guided rows
        also get the paired difference of the Frechet distance to the base row (same latents;
        bootstrap that resamples latents jointly). ``extra`` adds named image sets;
        ``baselines=False`` leaves out the two far baselines (they do not depend on the model).
        """
        t0 = time.perf_counter()
        m = self.config["metrics"]
        gen = torch.Generator().manual_seed(7 + self.config["seed"])
        x_held = self.data.x_heldout
        n_held = x_held.shape[0]
        noise = torch.rand(x_held.shape, generator=gen).to(self.device) * 2 - 1
        perm = torch.stack([torch.randperm(x_held[0].numel(), generator=gen)
                            for _ in range(n_held)]).to(self.device)
        shuffled = x_held.flatten(1).gather(1, perm).reshape(x_held.shape)
        n_eval = self.samples["base"].shape[0]
        if keys is None:
            keys = [k for k, v in self.samples.items() if v.shape[0] == n_eval]
        own = {k: self.samples[k] for k in keys}
        sets = {"heldout": x_held, **own, **(extra or {})}
        if baselines:
            sets.update(noise=noise, shuffled=shuffled)
        ref = self.features(self.data.x_train)
        freqs = class_histogram(self.data.y_train.cpu())
        feats, rows = {}, {}
        for name, x in sets.items():
            feats[name] = self.features(x)
            with torch.no_grad():
                logits = torch.cat([self.classifier(x[i:i + 1000])
                                    for i in range(0, x.shape[0], 1000)]).cpu()
            rows[name] = evaluate_samples(ref, feats[name], logits, freqs, k=m["k"],
                                          num_boot=m["num_boot"], level=m["level"],
                                          generator=gen)
            rows[name]["class_hist"] = class_histogram(logits, freqs.numel())
        for name in own:
            if name == "base":
                continue

            def diff(r, pair):
                return frechet_distance(r, pair[1]) - frechet_distance(r, pair[0])
            pair = torch.stack([feats["base"], feats[name]])      # (2, N, d): joint resampling
            rows[name]["frechet_diff"] = diff(ref, pair)
            rows[name]["frechet_diff_ci"] = bootstrap_interval(
                lambda r, pr: diff(r, pr.transpose(0, 1)), ref, pair.transpose(0, 1),
                num_boot=m["num_boot"], level=m["level"], generator=gen)
        self.metrics = rows
        self.timings["evaluate"] = time.perf_counter() - t0
        return rows

    def run(self, objectives=("ce", "kl"), weights=(), evaluate: bool = True) -> dict:
        """All phases in order (guided samples at the config's weight and at ``weights``, loss
        gaps); returns the metrics (``{}`` with ``evaluate=False``, and on every process but
        rank 0, which alone measures)."""
        self.load_data()
        self.train_classifier()
        self.train_denoiser()
        self.sample_base()
        for obj in objectives:
            self.train_discriminator(obj)
        for obj in objectives:
            self.sample_guided(obj)
            for w in weights:
                self.sample_guided(obj, w)
        if not self.ctx.is_main:
            return {}
        for obj in objectives:
            self.loss_gap(obj)
        return self.evaluate() if evaluate else {}


_LABELS = {"heldout": "held-out real images", "base": "EDM (no guidance)",
           "ce": "DG, cross-entropy discriminator", "kl": "DG, KL-objective discriminator",
           "noise": "uniform noise", "shuffled": "held-out, pixels shuffled"}


def _label(name: str) -> str:
    parts = name.split("-")
    out = _LABELS.get(parts[0], parts[0])
    for p in parts[1:]:
        if p.startswith("w"):
            out += f", w = {p[1:]}"
        elif p in ("euler", "both"):
            out += ", Euler slope only" if p == "euler" else ", both slopes"
        else:
            out += f", {p}"
    return out


_SHORT = {"ce": "cross-entropy", "kl": "KL objective"}


def format_loss_gap_table(gaps: dict, weights=(0.5, 1.0, 2.0), *, level: float = 0.95,
                          primary: float | None = None, markdown: bool = False) -> str:
    """The held-out loss gaps ``{name: LossGap}`` at field weights ``weights`` (nats,
    estimate ± half-width of the interval at ``level``), the best weight and its gap (book
    chapter images). ``primary`` marks the published setting's field weight."""
    head = (["discriminator"] + [f"w_f = {w:g}" + (" (published)" if w == primary else "")
                                 for w in weights] + ["best w_f", "gap at best w_f"])
    lines = []
    for name, g in gaps.items():
        row = [_SHORT.get(name, _label(name))]
        for w in weights:
            m, lo, hi = g.estimate(w, level)
            row.append(f"{m:+.3g} ± {(hi - lo) / 2:.2g}")
        b = g.best_weight(level)
        row.append(f"{b['weight']:.2f} ± {(b['weight_ci'][1] - b['weight_ci'][0]) / 2:.2f}")
        row.append(f"{b['gap']:+.3g} ± {(b['gap_ci'][1] - b['gap_ci'][0]) / 2:.2g}")
        lines.append(row)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in lines])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in lines])


def format_metrics_table(rows: dict, *, markdown: bool = False) -> str:
    """The metrics as a text (or markdown) table, intervals in brackets (book chapter images)."""
    def ci(v, lo_hi, fmt="{:.2f}", scale=1.0):
        lo, hi = lo_hi
        return f"{fmt.format(v * scale)} [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]"

    head = ["samples", "n", "Frechet (digit-classifier features)", "dFrechet vs base",
            "KID x1e3", "precision", "recall", "class TV"]
    lines = []
    for name, r in rows.items():
        dfr = ci(r["frechet_diff"], r["frechet_diff_ci"]) if "frechet_diff" in r else ""
        lines.append([_label(name), str(r["n"]), ci(r["frechet"], r["frechet_ci"]),
                      dfr, ci(r["kernel"], r["kernel_ci"], "{:.1f}", 1e3),
                      ci(r["precision"], r["precision_ci"]), ci(r["recall"], r["recall_ci"]),
                      ci(r["class_tv"], r["class_tv_ci"]) if "class_tv" in r else ""])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in lines])

