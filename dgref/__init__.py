"""dgref: the package behind the book *Guidance in diffusion models, measured exactly*.

Pure functions over tensors, one per algorithm box of the book; classes only for things that
hold parameters. See the book's API page for the equation each function implements.
"""
from ._checks import NonFiniteError
from ._progress import set_progress
from . import book  # noqa: F401  (every chapter calls dgref.book.setup_chapter)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .discriminator import (Discriminator, ce_loss, dg_sampler_kwargs,
                            discriminator_correction, discriminator_guidance,
                            discriminator_training_loop, guided_kl, kl_loss, logit_and_grad,
                            oracle_logit, sample_training_sigmas, score_error_kl,
                            train_discriminator)
from .edm import (EDMPrecond, SamplerStep, edm_loss, edm_precond_coeffs, edm_sample_sigmas,
                  edm_sampler, edm_sampler_iter, edm_sigma_steps)
from .guidance import ScoreCorrectedDenoiser, oracle_correction
from .likelihood import divergence, kl_divergence, mixture_kl, ode_log_likelihood
from .nets import MLP, FourierEmbedding, edm_training_loop, mlp_denoiser, train_denoiser
from .toy import GaussianMixture, grid, mixture_1d, ring
from .conditional import (LabelledWorld, UniformIntervals, gaussian_pair, labelled_ring,
                          three_classes_1d, uniform_classes_1d)
from .cfg import (CFGDenoiser, ConditionalMLP, cfg_loss, cfg_training_loop, classifier_guidance,
                  conditional_mlp_denoiser, guided_optimum_denoiser)
from .sde import GridFlow, edm_sde_sampler, grid_density, grid_flow, grid_kl, grid_w1
from .utils import BatchGenerator, make_generator, randn, resolve_device, seed_everything
from .cache import (CacheConfigError, CacheError, cache_path, cached, default_cache_dir,
                    load_cached, save_cached)
from .images import (DigitImages, ImageDiscriminator, UNet, generate_images, image_grid,
                     load_digit_images, unet_denoiser)
from .metrics import (DigitClassifier, bootstrap_interval, class_histogram, classifier_accuracy,
                      evaluate_samples, extract_features, frechet_distance,
                      gaussian_frechet_distance, kernel_distance, kernel_distance_bootstrap,
                      precision_recall, total_variation, train_classifier, wilson_interval)
from .image_experiment import (IMAGES_FULL, IMAGES_QUICK, ImagesExperiment,
                               format_metrics_table, images_config)
from .overfit import (bernoulli_kl_logits, empirical_mixture, excess_cross_entropy,
                      ode_log_likelihood_sigmas, oscillation, oscillation_correction,
                      oscillation_gradient_error, oscillation_score_error, sigma_grid)

__version__ = "0.1.0"

__all__ = [
    "NonFiniteError", "set_progress",
    "CheckpointError", "load_checkpoint", "save_checkpoint",
    "EDMPrecond", "SamplerStep", "edm_loss", "edm_precond_coeffs", "edm_sample_sigmas",
    "edm_sampler", "edm_sampler_iter", "edm_sigma_steps",
    "ScoreCorrectedDenoiser", "oracle_correction",
    "divergence", "kl_divergence", "mixture_kl", "ode_log_likelihood",
    "MLP", "FourierEmbedding", "edm_training_loop", "mlp_denoiser", "train_denoiser",
    "GaussianMixture", "grid", "mixture_1d", "ring",
    "LabelledWorld", "UniformIntervals", "gaussian_pair", "labelled_ring", "three_classes_1d",
    "uniform_classes_1d",
    "CFGDenoiser", "ConditionalMLP", "cfg_loss", "cfg_training_loop", "classifier_guidance",
    "conditional_mlp_denoiser", "guided_optimum_denoiser",
    "GridFlow", "edm_sde_sampler", "grid_density", "grid_flow", "grid_kl", "grid_w1",
    "BatchGenerator", "make_generator", "randn", "resolve_device", "seed_everything",
    "Discriminator", "ce_loss", "dg_sampler_kwargs", "discriminator_correction",
    "discriminator_guidance", "discriminator_training_loop", "guided_kl", "kl_loss",
    "logit_and_grad", "oracle_logit", "sample_training_sigmas", "score_error_kl",
    "train_discriminator",
    "CacheConfigError", "CacheError", "cache_path", "cached", "default_cache_dir", "load_cached",
    "save_cached",
    "DigitImages", "ImageDiscriminator", "UNet", "generate_images", "image_grid",
    "load_digit_images", "unet_denoiser",
    "DigitClassifier", "bootstrap_interval", "class_histogram", "classifier_accuracy",
    "evaluate_samples", "extract_features", "frechet_distance", "gaussian_frechet_distance",
    "kernel_distance", "kernel_distance_bootstrap", "precision_recall", "total_variation",
    "train_classifier", "wilson_interval",
    "IMAGES_FULL", "IMAGES_QUICK", "ImagesExperiment", "format_metrics_table", "images_config",
    "bernoulli_kl_logits", "empirical_mixture", "excess_cross_entropy", "ode_log_likelihood_sigmas",
    "oscillation", "oscillation_correction", "oscillation_gradient_error",
    "oscillation_score_error", "sigma_grid",
]
