"""The digit-image experiment: EDM on digits, discriminator guidance with both objectives, metrics.

Book chapter "Images" and ``benchmarks/images_full.py`` run the same phases from here:

1. data (:func:`dgref.digits.load_digit_images`),
2. the feature network (a digit classifier trained on the training split),
3. the base EDM denoiser (U-Net, :func:`dgref.train_denoiser`),
4. base samples: a set for training the CE discriminator and an evaluation set,
5. two discriminators, trained with the cross-entropy and with the KL objective
   (:func:`dgref.discriminator.train_discriminator`),
6. guided samples from the *same latents* as the base evaluation set (a paired comparison),
7. a metrics table against the training split, with intervals and baselines.

Each trained model and sample set is cached (:mod:`dgref.cache`) under a name holding the
setting and seed, with the config it was built from, which includes the configs of the phases
it depends on: changing a size rebuilds that phase and everything after it, nothing before.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from ._checks import check_nonneg_int
from .cache import cached
from ._util import resolve_device
from .digits import ImageDiscriminator, generate_images, load_digit_images, unet_denoiser
from .discriminator import dg_sampler_kwargs, train_discriminator
from .metrics import (DigitClassifier, bootstrap_interval, class_histogram,
                      classifier_accuracy, evaluate_samples, extract_features,
                      frechet_distance, train_classifier)
from .rng import make_generator
from .training import train_denoiser

__all__ = ["IMAGES_QUICK", "IMAGES_FULL", "images_config", "ImagesExperiment",
           "format_metrics_table"]

# Bump when a change of the code changes what a cached phase would contain.
_CODE_VERSION = 2

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
    "discriminator": {"channels": [16, 32], "steps": 800, "batch_size": 128, "lr": 1e-3,
                      "kl_weighting": "kl"},
    "guidance": {"weight": 1.0, "window": [0.05, 20.0], "slopes": "both"},
    "metrics": {"k": 3, "num_boot": 200, "level": 0.95},
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
                      "kl_weighting": "kl"},
    "guidance": {"weight": 1.0, "window": [0.05, 40.0], "slopes": "both"},
    "metrics": {"k": 3, "num_boot": 200, "level": 0.95},
}


def images_config(quick: bool = True, seed: int = 0, overrides: dict | None = None) -> dict:
    """The experiment's config: :data:`IMAGES_QUICK` or :data:`IMAGES_FULL`, ``seed``, and
    ``overrides`` ``{"section": {"key": value}}`` (each key must exist); book chapter images."""
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be True or False, got {quick!r}")
    check_nonneg_int("seed", seed)
    cfg = copy.deepcopy(IMAGES_QUICK if quick else IMAGES_FULL)
    for section, values in (overrides or {}).items():
        if section not in cfg:
            raise ValueError(f"overrides: unknown section {section!r}; expected one of "
                             f"{sorted(cfg)}")
        for key, value in values.items():
            if key not in cfg[section]:
                raise ValueError(f"overrides[{section!r}]: unknown key {key!r}; expected one of "
                                 f"{sorted(cfg[section])}")
            cfg[section][key] = value
    cfg["setting"] = "quick" if quick else "full"
    cfg["seed"] = int(seed)
    cfg["code_version"] = _CODE_VERSION
    return cfg


class ImagesExperiment:
    """The phases of the digit experiment, each cached; attributes hold what was built.

    ``ImagesExperiment(config, device=, cache_dir=, log=)``; call the phases in order or
    :meth:`run` for all. ``timings`` maps each phase to its wall time in seconds and
    ``cache_hits`` to whether it was loaded rather than built. Randomness: each phase draws
    from its own generator seeded from ``config["seed"]`` and a phase index, on the device;
    initial weights too (the global generator is left untouched), so a phase rebuilt alone
    gives what a full run gives.
    """

    def __init__(self, config: dict, *, device=None, cache_dir=None,
                 log: Callable[[str], None] | None = print):
        self.config = config
        self.device = resolve_device(device)
        self.cache_dir = cache_dir
        self.log = log or (lambda s: None)
        self.timings: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        self.tag = f"images-{config['setting']}-s{config['seed']}"
        self.data = None

    # ---------------------------------------------------------------- helpers
    def _gen(self, phase: int) -> torch.Generator:
        return make_generator(1000 * self.config["seed"] + phase, self.device)

    def _build(self, phase: int, factory):
        """Build a network with its initial weights drawn from a seed of its own (``phase``),
        leaving torch's global generator as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 * self.config["seed"] + phase)
            net = factory()
        return net.to(self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _phase(self, name: str, config: dict, build: Callable[[], dict]) -> dict:
        t0 = time.perf_counter()
        payload, hit = cached(f"{self.tag}-{name}", config, build, self.cache_dir,
                              log=self.log)
        self._sync()
        self.timings[name] = time.perf_counter() - t0
        self.cache_hits[name] = hit
        self.log(f"[{name}] {'loaded from cache' if hit else 'built'} in "
                 f"{self.timings[name]:.1f} s")
        return payload

    def _cfg(self, *sections) -> dict:
        c = self.config
        out = {"seed": c["seed"], "code_version": c["code_version"], "data": c["data"]}
        for s in sections:
            out[s] = c[s]
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
        """Phase 2: the digit classifier (the feature network); its held-out accuracy."""
        c = self.config["classifier"]
        clf = self._build(102, lambda: DigitClassifier(width=c["width"],
                                                       feature_dim=c["feature_dim"]))

        def build():
            train_classifier(clf, self.data.x_train, self.data.y_train, steps=c["steps"],
                             batch_size=c["batch_size"], lr=c["lr"], noise_std=c["noise_std"],
                             generator=self._gen(2))
            return {"state": clf.state_dict()}
        payload = self._phase("classifier", self._cfg("classifier"), build)
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

    def train_denoiser(self):
        """Phase 3: the base EDM denoiser."""
        c = self.config["denoiser"]
        den = self._build(103, lambda: unet_denoiser(self.image_shape[-1],
                                                     channels=tuple(c["channels"])))

        def build():
            losses = train_denoiser(den, self.data.x_train, steps=c["steps"],
                                    batch_size=c["batch_size"], lr=c["lr"],
                                    generator=self._gen(3))
            return {"state": den.state_dict(), "losses": torch.tensor(losses)}
        payload = self._phase("denoiser", self._cfg("denoiser"), build)
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
        self.samples = {"base": payload["eval"].to(self.device)}
        return self.samples["base"]

    def train_discriminator(self, objective: str):
        """Phase 5: a discriminator trained with ``objective`` ``"ce"`` or ``"kl"``."""
        if objective not in ("ce", "kl"):
            raise ValueError(f"objective must be 'ce' or 'kl', got {objective!r}")
        c = self.config["discriminator"]
        disc = self._build(150 if objective == "ce" else 151, lambda: ImageDiscriminator(
            self.image_shape[-1], channels=tuple(c["channels"])))
        s = self.config["sampler"]

        def build():
            kw = dict(objective=objective, x_real=self.data.x_train, steps=c["steps"],
                      batch_size=c["batch_size"], lr=c["lr"],
                      generator=self._gen(50 if objective == "ce" else 51))
            if objective == "ce":
                kw["x_fake"] = self.fake_train
            else:
                kw.update(denoiser=self.denoiser, weighting=c["kl_weighting"],
                          sigma_min=s["sigma_min"], sigma_max=s["sigma_max"])
            losses = train_discriminator(disc, **kw)
            return {"state": disc.state_dict(), "losses": torch.tensor(losses)}
        cfg = self._cfg("denoiser", "sampler", "samples", "discriminator")
        cfg["objective"] = objective
        if objective == "kl":             # its recorded losses are relative to d = 0
            cfg["kl_losses"] = "relative"
        payload = self._phase(f"disc-{objective}", cfg, build)
        disc.load_state_dict(payload["state"])
        disc.eval()
        for p in disc.parameters():
            p.requires_grad_(False)
        if not hasattr(self, "discriminators"):
            self.discriminators, self.disc_losses = {}, {}
        self.discriminators[objective] = disc
        self.disc_losses[objective] = payload["losses"]
        return disc

    def sample_guided(self, objective: str, weight: float | None = None):
        """Phase 6: guided samples from the base evaluation set's latents.

        ``weight`` defaults to the config's guidance weight (stored as ``samples[objective]``);
        another weight is stored as ``samples[f"{objective}-w{weight:g}"]``.
        """
        g = dict(self.config["guidance"])
        key = objective
        if weight is not None and float(weight) != float(g["weight"]):
            g["weight"] = float(weight)
            key = f"{objective}-w{float(weight):g}"
        disc = self.discriminators[objective]

        def build():
            kw = dg_sampler_kwargs(self.denoiser, disc, g["weight"], tuple(g["window"]),
                                   g["slopes"])
            den = kw.pop("denoiser")
            return {"eval": self._sample(den, self.config["samples"]["num_eval"], 41, **kw)}
        cfg = self._cfg("denoiser", "sampler", "samples", "discriminator")
        cfg["guidance"] = g
        cfg["objective"] = objective
        payload = self._phase(f"samples-{key}", cfg, build)
        self.samples[key] = payload["eval"].to(self.device)
        return self.samples[key]

    def evaluate(self, extra: dict | None = None) -> dict:
        """Phase 7: metrics of every sample set (and baselines) against the training split.

        Rows: ``heldout`` (real held-out images: the floor at their size), each sample set,
        and two far baselines: ``noise`` (uniform pixels in [-1, 1]) and ``shuffled``
        (held-out images with their pixels permuted). Guided rows also get the paired
        difference of the Frechet distance to the base row (same latents; bootstrap that
        resamples latents jointly). ``extra`` adds named image sets.
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
        sets = {"heldout": x_held, **self.samples, **(extra or {}),
                "noise": noise, "shuffled": shuffled}
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
        for name in self.samples:
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

    def run(self, objectives=("ce", "kl"), weights=()) -> dict:
        """All phases in order (guided samples at the config's weight and at ``weights``);
        returns the metrics."""
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
        return self.evaluate()


_LABELS = {"heldout": "held-out real images", "base": "EDM (no guidance)",
           "ce": "DG, cross-entropy discriminator", "kl": "DG, KL-objective discriminator",
           "noise": "uniform noise", "shuffled": "held-out, pixels shuffled"}


def _label(name: str) -> str:
    base, _, w = name.partition("-w")
    return _LABELS.get(base, base) + (f", w = {w}" if w else "")


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

