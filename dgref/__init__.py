"""dgref: the package behind the book *Guidance in diffusion models, measured exactly*.

Pure functions over tensors, one per algorithm box of the book; classes only for things that
hold parameters. The top level holds the core a student needs; book and experiment helpers
are reached through their modules (one responsibility each):

- worlds: :mod:`dgref.toy` (Gaussian mixtures), :mod:`dgref.labelled` (labelled worlds);
- networks: :mod:`dgref.nets` (imports nothing above it);
- :mod:`dgref.edm` (preconditioning, loss, schedules, both samplers), :mod:`dgref.training`
  (the one optimisation loop, the EDM trainer), :mod:`dgref.rng` (generators and seeds);
- guidance: :mod:`dgref.guidance` (wrappers), :mod:`dgref.discriminator`, :mod:`dgref.cfg`;
- measuring: :mod:`dgref.likelihood` (ODE likelihood, KL), :mod:`dgref.gridflow` (exact 1-D
  laws of the sampler), :mod:`dgref.constructions` (the ce_failure chapter's constructions);
- images: :mod:`dgref.digits`, :mod:`dgref.metrics`, :mod:`dgref.image_experiment`,
  :mod:`dgref.cache`; :mod:`dgref.checkpoint`; :mod:`dgref.book` (chapter set-up).

See the book's API page for the equation each function implements.
"""
from . import book  # noqa: F401  (every chapter calls dgref.book.setup_chapter)
from . import (cache, cfg, checkpoint, constructions, digits, discriminator, edm,  # noqa: F401
               gridflow, guidance, labelled, likelihood, nets, rng, toy, training)
from ._checks import NonFiniteError
from ._progress import set_progress
from ._util import resolve_device
from .cfg import CFGDenoiser, cfg_loss, classifier_guidance, train_cfg
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .discriminator import (Discriminator, ce_loss, discriminator_guidance, kl_loss,
                            logit_and_grad, oracle_logit, train_discriminator)
from .edm import (EDMPrecond, conditional_mlp_denoiser, edm_loss, edm_precond_coeffs,
                  edm_sampler, edm_sampler_iter, edm_sde_sampler, edm_sigma_steps, mlp_denoiser)
from .guidance import ScoreCorrectedDenoiser, oracle_correction
from .labelled import LabelledWorld, gaussian_pair
from .likelihood import kl_divergence, mixture_kl, ode_log_likelihood, score_error_kl
from .rng import make_generator, randn, seed_everything
from .toy import GaussianMixture, grid_world, mixture_1d, ring
from .training import train_denoiser

__version__ = "0.1.0"

__all__ = [
    # worlds
    "GaussianMixture", "ring", "grid_world", "mixture_1d", "LabelledWorld", "gaussian_pair",
    # EDM core and samplers
    "EDMPrecond", "edm_precond_coeffs", "edm_loss", "edm_sigma_steps", "mlp_denoiser",
    "train_denoiser", "edm_sampler", "edm_sampler_iter", "edm_sde_sampler",
    # guidance wrappers
    "ScoreCorrectedDenoiser", "oracle_correction",
    # discriminator guidance
    "Discriminator", "ce_loss", "kl_loss", "logit_and_grad", "oracle_logit",
    "discriminator_guidance", "train_discriminator",
    # classifier-free guidance
    "CFGDenoiser", "classifier_guidance", "conditional_mlp_denoiser", "cfg_loss", "train_cfg",
    # likelihood and KL
    "ode_log_likelihood", "kl_divergence", "mixture_kl", "score_error_kl",
    # checkpoints
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    # seeds, devices, errors, progress
    "make_generator", "randn", "seed_everything", "resolve_device", "NonFiniteError",
    "set_progress",
]
