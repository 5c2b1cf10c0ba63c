"""Bad input is named exactly (issue 15, mutation testing of session 3): every argument check of
the toy and labelled worlds, the likelihood and the grid flow raises with the argument's own name
and the expected form, so a check that names the wrong argument (or none) fails here. Each case
is one cheap call."""
import math
import re

import pytest
import torch

import dgref
from dgref.gridflow import grid_density, grid_flow, grid_kl, grid_w1
from dgref.sde_density import grid_flow_sde
from dgref.labelled import UniformIntervals, labelled_ring, three_classes_1d, uniform_classes_1d
from dgref.likelihood import divergence, kl_divergence, mixture_kl, score_error_kl

DT = torch.float64


def _D(x, s):
    return 0.5 * x


def _flow():
    start = dgref.mixture_1d((0.0,), (1.0,))
    return grid_flow(lambda x, s: x / (1 + s[:, None] ** 2), start, num_points=33, num_steps=4)


def _cases():
    x2 = torch.zeros(4, 2, dtype=DT)
    x1 = torch.zeros(4, 1, dtype=DT)
    nan2 = torch.full((4, 2), math.nan, dtype=DT)
    ring = dgref.ring()
    u = UniformIntervals([[0.0, 1.0], [2.0, 3.0]])
    pair = dgref.gaussian_pair()
    start = dgref.mixture_1d((0.0,), (1.0,))
    lin = torch.linspace(0.01, 1.0, 5, dtype=DT)
    V = ValueError
    return [
        # likelihood
        (lambda: divergence(lambda x, s: x[:, :1], x2, torch.ones(4, dtype=DT)), V,
         r"^denoiser returned shape \(4, 1\), expected x's shape \(4, 2\)"),
        (lambda: dgref.ode_log_likelihood(1, x2), TypeError, r"^denoiser must be callable D\(x, sigma\)"),
        (lambda: dgref.ode_log_likelihood(None, x2, field=1), TypeError,
         r"^field must be callable field\(x, sigma\) -> \(D, div D\)"),
        (lambda: dgref.ode_log_likelihood(_D, torch.zeros(4, dtype=DT)), V, r"^x must have 2 dim"),
        (lambda: dgref.ode_log_likelihood(_D, nan2), V, r"^x must be finite"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigma_min=0.0), V, r"^sigma_min must be > 0"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigma_max=-1.0), V, r"^sigma_max must be > 0"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigma_min=2.0, sigma_max=2.0), V,
         r"^sigma_min must be < sigma_max, got 2.0 >= 2.0"),
        (lambda: dgref.ode_log_likelihood(_D, x2, num_steps=0), V, r"^num_steps must be an int"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigmas=lin[:, None]), V, r"^sigmas must have 1 dim"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigmas=torch.tensor([0.1, math.nan], dtype=DT)),
         V, r"^sigmas must be finite"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigmas=lin[:1]), V, r"^sigmas must be a positive"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigmas=lin.flip(0)), V, r"^sigmas must be a positive"),
        (lambda: dgref.ode_log_likelihood(_D, x2, sigmas=lin - 0.01), V, r"^sigmas must be a positive"),
        (lambda: dgref.ode_log_likelihood(_D, x2, num_probes=0), V, r"^num_probes must be an int"),
        (lambda: dgref.ode_log_likelihood(_D, x2, batch_size=0), V, r"^batch_size must be an int"),
        (lambda: dgref.ode_log_likelihood(_D, x2, method="exactly"), V,
         r"^method must be 'auto', 'exact' or 'hutchinson', got 'exactly'"),
        (lambda: dgref.ode_log_likelihood(_D, x2, solver="euler"), V, r"^solver must be one of"),
        (lambda: kl_divergence(ring, _D, num_points=0), V, r"^num_points must be an int"),
        (lambda: kl_divergence(ring, _D, x=x1), V, r"^x must have last dimension 2"),
        (lambda: kl_divergence(ring, _D, x=torch.zeros(4, dtype=DT)), V, r"^x must have 2 dim"),
        (lambda: kl_divergence(ring, _D, x=nan2), V, r"^x must be finite"),
        (lambda: mixture_kl(ring, ring, num_points=0), V, r"^num_points must be an int"),
        (lambda: mixture_kl(ring, dgref.mixture_1d()), V,
         r"^p and q must have the same dimension, got p.dim=2 and q.dim=1"),
        (lambda: score_error_kl(ring, _D, sigma_min=0.0), V, r"^sigma_min must be > 0"),
        (lambda: score_error_kl(ring, _D, sigma_max=0.0), V, r"^sigma_max must be > 0"),
        (lambda: score_error_kl(ring, _D, sigma_min=1.0, sigma_max=1.0), V,
         r"^sigma_min must be < sigma_max"),
        (lambda: score_error_kl(ring, _D, num_sigmas=0), V, r"^num_sigmas must be an int"),
        (lambda: score_error_kl(ring, _D, num_sigmas=2), V, r"^num_sigmas must be >= 3, got 2"),
        (lambda: score_error_kl(ring, _D, num_points=0), V, r"^num_points must be an int"),
        (lambda: score_error_kl(ring, _D, batch_size=0), V, r"^batch_size must be an int"),
        # grid flow
        (lambda: grid_flow(1, start), TypeError, r"^denoiser must be callable D\(x, sigma\)"),
        (lambda: grid_flow(_D, start, heun_denoiser=1), TypeError,
         r"^heun_denoiser must be callable D\(x, sigma\)"),
        (lambda: grid_flow(_D, start, num_points=0), V, r"^num_points must be an int"),
        (lambda: grid_flow(_D, start, num_points=2), V, r"^num_points must be >= 3, got 2"),
        (lambda: grid_flow(_D, start, width=0.0), V, r"^width must be > 0"),
        (lambda: grid_flow(_D, start, fd_rel=0.0), V, r"^fd_rel must be > 0"),
        (lambda: grid_flow(_D, start, gap_factor=0.0), V, r"^gap_factor must be > 0"),
        (lambda: grid_flow(_D, start, gap_factor=0.5), V, r"^gap_factor must be >= 1, got 0.5"),
        (lambda: grid_flow(_D, ring), V, r"^grid_flow needs a 1-D start law, got dim=2"),
        (lambda: grid_flow(_D, object()), TypeError,
         r"^start must have log_prob\(x, sigma\), mean\(\) and std\(\); object has no 'log_prob'"),
        (lambda: grid_flow_sde(_D, ring), V, r"^grid_flow_sde needs a 1-D start law, got dim=2"),
        (lambda: grid_flow_sde(_D, object()), TypeError,
         r"^start must be None or have log_prob\(x, sigma\), mean\(\) and std\(\); object has "
         r"no 'log_prob'"),
        (lambda: grid_flow(lambda x, s: x[:, :0], start, num_points=5, num_steps=2), V,
         r"^denoiser returned shape \(5, 0\), expected x's shape \(5, 1\)"),
        (lambda: grid_flow(_D, start, heun_denoiser=lambda x, s: x[:, :0], num_points=5,
                           num_steps=2), V,
         r"^heun_denoiser returned shape \(5, 0\), expected x's shape \(5, 1\)"),
        (lambda: grid_density(lambda y: -y[:, 0] ** 2, math.nan, 1.0), V, r"^lo must be finite"),
        (lambda: grid_density(lambda y: -y[:, 0] ** 2, 0.0, math.inf), V, r"^hi must be finite"),
        (lambda: grid_density(lambda y: -y[:, 0] ** 2, 1.0, 1.0), V, r"^lo must be < hi"),
        (lambda: grid_density(lambda y: -y[:, 0] ** 2, 0.0, 1.0, 0), V, r"^num_points must be an int"),
        (lambda: grid_density(lambda y: -y[:, 0] ** 2, 0.0, 1.0, 2), V, r"^num_points must be >= 3"),
        (lambda: grid_kl(1, lambda y: y[:, 0], 0.0, 1.0), TypeError, r"^flow must be a dgref.gridflow"),
        (lambda: grid_w1(1, lambda y: y[:, 0], 0.0, 1.0), TypeError, r"^flow must be a dgref.gridflow"),
        (lambda: _flow()._replace(monotone=False).entropy(), V, r"^the grid map is not monotone"),
        (lambda: grid_kl(_flow()._replace(monotone=False), lambda y: y[:, 0], 0.0, 1.0), V,
         r"^the grid map is not monotone: KL needs"),
        # labelled worlds
        (lambda: UniformIntervals([0.0, 1.0]), V, r"^intervals must have 2 dim"),
        (lambda: UniformIntervals([[0.0, 1.0, 2.0]]), V, r"^intervals must have last dimension 2"),
        (lambda: UniformIntervals([[0.0, math.inf]]), V, r"^intervals must be finite"),
        (lambda: u.log_prob(torch.zeros(4, dtype=DT)), V, r"^x must have 2 dim"),
        (lambda: u.log_prob(x2), V, r"^x must have last dimension 1"),
        (lambda: u.log_prob(torch.full((4, 1), math.nan, dtype=DT)), V, r"^x must be finite"),
        (lambda: u.log_prob(x1, -1.0), V, r"^sigma must be finite and >= 0"),
        (lambda: u.log_prob(x1, torch.ones(3, dtype=DT)), V, r"^sigma must have shape \(4,\)"),
        (lambda: u.score(x1, 0.0), V, r"^sigma must be finite and > 0"),
        (lambda: u.score(x1, torch.ones(3, dtype=DT)), V, r"^sigma must have shape \(4,\)"),
        (lambda: u.sample(0), V, r"^num_samples must be an int"),
        (lambda: u.sample(3, -1.0), V, r"^sigma must be >= 0"),
        (lambda: pair.log_prob(x2), V, r"^x must have last dimension 1"),
        (lambda: pair.log_prob(torch.zeros(4, dtype=DT)), V, r"^x must have 2 dim"),
        (lambda: pair.log_prob(torch.full((4, 1), math.nan, dtype=DT)), V, r"^x must be finite"),
        (lambda: pair.log_prob(x1, -1.0), V, r"^sigma must be finite and >= 0"),
        (lambda: pair.log_prob(x1, torch.ones(3, dtype=DT)), V, r"^sigma must have shape \(4,\)"),
        (lambda: pair.score(x1, 0.0), V, r"^sigma must be finite and > 0"),
        (lambda: pair.score(x1, torch.ones(3, dtype=DT)), V, r"^sigma must have shape \(4,\)"),
        (lambda: pair.grad_log_classifier(x1, 0.0, 0), V, r"^sigma must be finite and > 0"),
        (lambda: pair.grad_log_classifier(x1, torch.ones(3, dtype=DT), 0), V,
         r"^sigma must have shape \(4,\)"),
        (lambda: pair.grad_log_classifier(x1, 1.0, 2), V,
         r"^labels must be in 0\.\.1 \(no null label here\)"),
        (lambda: pair.denoise(x1, 1.0, 3), V, r"^labels must be in 0\.\.2 \(the last is the null"),
        (lambda: pair.denoise(x1, 1.0, torch.zeros(3, dtype=torch.long)), V,
         r"^labels must have shape \(4,\)"),
        (lambda: pair.tilted_log_density(x1, 0, math.inf), V, r"^w must be finite"),
        (lambda: dgref.gaussian_pair(0.0), V, r"^separation must be > 0"),
        (lambda: dgref.gaussian_pair(2.0, 0.0), V, r"^std must be > 0"),
        (lambda: three_classes_1d(0.0), V, r"^spacing must be > 0"),
        (lambda: three_classes_1d(2.0, 0.0), V, r"^std must be > 0"),
        (lambda: labelled_ring(0), V, r"^num_modes must be an int"),
        (lambda: labelled_ring(6, 0), V, r"^num_classes must be an int"),
        (lambda: labelled_ring(2, 3), V, r"^num_classes must be <= num_modes=2, got 3"),
        (lambda: uniform_classes_1d(((0.0, 1.0),), weights=[0.5, 0.5]), V,
         r"^weights must have shape \(1,\)"),
        # toy worlds
        (lambda: dgref.GaussianMixture(torch.zeros(2, 1, 1)), V, r"^means must have 2 dim"),
        (lambda: dgref.GaussianMixture([[0.0, math.nan]]), V, r"^means must be finite"),
        (lambda: ring.log_prob(x1), V, r"^x must have last dimension 2"),
        (lambda: ring.log_prob(torch.zeros(4, dtype=DT)), V, r"^x must have 2 dim"),
        (lambda: ring.log_prob(nan2), V, r"^x must be finite"),
        (lambda: ring.log_prob(x2, -1.0), V, r"^sigma must be finite and >= 0"),
        (lambda: ring.log_prob(x2, torch.ones(3, dtype=DT)), V, r"^sigma must have shape \(4,\)"),
        (lambda: ring.sample(0), V, r"^num_samples must be an int"),
        (lambda: ring.sample(3, -1.0), V, r"^sigma must be finite and >= 0"),
        (lambda: ring.sample(3, torch.ones(3)), V, r"^sigma for sample\(\) must be a single"),
        (lambda: dgref.ring(0), V, r"^num_modes must be an int"),
        (lambda: dgref.grid_world(0), V, r"^side must be an int"),
        (lambda: dgref.oracle_logit(ring, 1), TypeError, r"^q must be a GaussianMixture"),
        (lambda: dgref.oracle_logit(1, ring), TypeError, r"^p must be a GaussianMixture"),
        # device="cuda" on a machine without CUDA (the cheap cases of test_bad_input's list)
    ] + ([] if torch.cuda.is_available() else [
        (lambda: ring.sample(4, device="cuda"), V, CUDA),
        (lambda: pair.sample(4, device="cuda"), V, CUDA),
        (lambda: u.sample(4, device="cuda"), V, CUDA),
        (lambda: kl_divergence(ring, ring, num_points=8, num_steps=2, device="cuda"), V, CUDA),
        (lambda: score_error_kl(ring, ring, num_points=8, device="cuda"), V, CUDA),
        (lambda: dgref.edm_sigma_steps(4, device="cuda"), V, CUDA),
        (lambda: dgref.edm.edm_sample_sigmas(4, device="cuda"), V, CUDA),
    ])


CUDA = r"device='cuda' was requested but CUDA is not available"


def _ids(cases):
    """Test ids from the expected messages (not the positions), so that a case added in the
    middle of a list is a new test for mutmut's test-to-function map, not an old id whose
    recorded coverage belongs to another case."""
    ids, seen = [], {}
    for _, _, msg in cases:
        base = re.sub(r"[^0-9A-Za-z]+", "_", msg).strip("_")[:60]
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return ids


N_CASES = 101 if torch.cuda.is_available() else 108
CASE_IDS = _ids(_cases())


def test_case_count():
    assert len(CASE_IDS) == N_CASES == len(set(CASE_IDS))


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_named_exactly(case):
    call, exc, msg = _cases()[CASE_IDS.index(case)]
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("world", [dgref.ring(), uniform_classes_1d().base],
                         ids=["mixture", "uniform"])
def test_sampling_without_a_generator_uses_the_global_stream(world):
    torch.manual_seed(3)
    a, ka = world.sample(16, 0.2, return_components=True)
    torch.manual_seed(3)
    b, kb = world.sample(16, 0.2, return_components=True, generator=torch.default_generator)
    assert torch.equal(a, b) and torch.equal(ka, kb) and a.dtype == torch.float32
    torch.manual_seed(3)
    c = world.sample(16, 0.2, device="cpu", dtype=DT)
    assert c.dtype == DT and torch.allclose(c, b.double(), atol=1e-6)


def test_sigma_steps_in_the_requested_dtype():
    for dt in (torch.float32, DT):
        t = dgref.edm_sigma_steps(4, 0.5, 2.0, dtype=dt)
        assert t.dtype == dt
        torch.testing.assert_close(t[[0, 3]].double(), torch.tensor([2.0, 0.5], dtype=DT))
    assert dgref.edm_sigma_steps(4).dtype == DT


class _Half(torch.nn.Module):
    """A raw network that returns one coordinate of two."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=DT))

    def forward(self, x, c_noise):
        return self.w * x[:, :1]


def _edm_disc_cases():
    from dgref.discriminator import logit_and_grad, sample_training_sigmas
    from dgref.edm import edm_precond_coeffs, edm_sample_sigmas
    x2 = torch.zeros(4, 2, dtype=DT)
    ring = dgref.ring()
    V = ValueError
    disc = dgref.Discriminator(2, 0.5, hidden=4, depth=1, generator=torch.Generator().manual_seed(0))
    return [
        (lambda: edm_precond_coeffs(0.0, 0.5), V, r"^sigma must be finite and > 0"),
        (lambda: edm_precond_coeffs(1.0, 0.0), V, r"^sigma_data must be > 0"),
        (lambda: dgref.EDMPrecond(torch.nn.Linear(2, 2), 0.0), V, r"^sigma_data must be > 0"),
        (lambda: dgref.EDMPrecond(torch.nn.Linear(2, 2).double())(x2, 0.0), V,
         r"^sigma must be finite and > 0"),
        (lambda: dgref.EDMPrecond(_Half())(x2, 1.0), V,
         r"^the network returned shape \(4, 1\), expected x's shape \(4, 2\)"),
        (lambda: edm_sample_sigmas(0), V, r"^batch must be an int"),
        (lambda: edm_sample_sigmas(2, P_mean=math.inf), V, r"^P_mean must be finite"),
        (lambda: edm_sample_sigmas(2, P_std=0.0), V, r"^P_std must be > 0"),
        (lambda: dgref.edm_loss(ring, torch.zeros(4, dtype=DT)), V, r"^x0 must have at least 2"),
        (lambda: dgref.edm_loss(ring, x2, sigma=torch.ones(3, dtype=DT)), V,
         r"^sigma must have shape \(4,\) to match x"),
        (lambda: dgref.edm_loss(lambda x, s: x[:, :1], x2), V,
         r"^denoiser returned shape \(4, 1\), expected x0's shape"),
        (lambda: dgref.edm_sigma_steps(0), V, r"^num_steps must be an int"),
        (lambda: dgref.edm_sampler(ring, x2, sigmas=[3.0, 1.0, 2.0, 0.0]), V,
         r"^sigmas must be a strictly decreasing"),
        (lambda: dgref.CFGDenoiser(dgref.gaussian_pair(), torch.tensor([0, 1, 1]), 1.0)(
            torch.zeros(4, 1, dtype=DT), 1.0), V, r"^labels must have shape \(4,\), got \(3,\)"),
        (lambda: dgref.edm_sigma_steps(4, 0.0), V, r"^sigma_min must be > 0"),
        (lambda: dgref.edm_sigma_steps(4, 1.0, 0.0), V, r"^sigma_max must be > 0"),
        (lambda: dgref.edm_sigma_steps(4, rho=0.0), V, r"^rho must be > 0"),
        (lambda: dgref.edm_sampler(ring, x2, heun_denoiser=1), TypeError,
         r"^heun_denoiser must be callable"),
        (lambda: dgref.edm_sampler(ring, torch.zeros(4, dtype=DT)), V,
         r"^latents must have at least 2"),
        (lambda: dgref.edm_sampler(ring, x2, S_churn=-1.0), V, r"^S_churn must be >= 0"),
        (lambda: dgref.edm_sampler(ring, x2, S_min=-1.0), V, r"^S_min must be >= 0"),
        (lambda: dgref.edm_sampler(ring, x2, S_noise=-1.0), V, r"^S_noise must be >= 0"),
        (lambda: dgref.edm_sampler(ring, x2, S_max=-1.0), V, r"^S_max must be >= 0"),
        (lambda: dgref.edm_sampler(ring, x2, heun_denoiser=lambda x, s: x[:, :1], num_steps=2),
         V, r"^heun_denoiser returned shape \(4, 1\), expected x's"),
        (lambda: dgref.edm_sampler(lambda x, s: x[:, :1], x2, num_steps=2), V,
         r"^denoiser returned shape \(4, 1\), expected x's"),
        (lambda: dgref.edm_sde_sampler(1, x2), TypeError, r"^denoiser must be callable"),
        (lambda: dgref.edm_sde_sampler(ring, torch.zeros(4, dtype=DT)), V,
         r"^latents must have at least 2"),
        (lambda: dgref.Discriminator(0, 0.5), V, r"^dim must be an int"),
        (lambda: dgref.Discriminator(2, 0.0), V, r"^sigma_data must be > 0"),
        (lambda: dgref.Discriminator(2, 0.5, hidden=0), V, r"^hidden must be an int"),
        (lambda: dgref.Discriminator(2, 0.5, depth=0), V, r"^depth must be an int"),
        (lambda: disc(torch.zeros(4, 3), 1.0), V, r"^x must have last dimension 2"),
        (lambda: disc(torch.zeros(4, 2, 1), 1.0), V, r"^x must have 2 dim"),
        (lambda: disc(torch.zeros(4, 2), torch.ones(3)), V, r"^sigma must have shape \(4,\)"),
        (lambda: logit_and_grad(1, x2, 1.0), TypeError,
         r"^disc must be callable disc\(x, sigma\) -> \(B,\)"),
        (lambda: logit_and_grad(disc, torch.zeros(4), 1.0), V, r"^x must have at least 2"),
        (lambda: logit_and_grad(disc, x2.float(), torch.ones(3)), V,
         r"^sigma must have shape \(4,\)"),
        (lambda: sample_training_sigmas(0), V, r"^batch must be an int"),
        (lambda: sample_training_sigmas(2, sigma_dist="loguniform", sigma_min=0.0), V,
         r"^sigma_min must be > 0"),
        (lambda: sample_training_sigmas(2, sigma_dist="loguniform", sigma_max=0.0), V,
         r"^sigma_max must be > 0"),
        (lambda: dgref.discriminator_guidance(ring, 1), TypeError,
         r"^disc must be callable disc\(x, sigma\) -> \(B,\)"),
        (lambda: dgref.discriminator_guidance(1, disc), TypeError, r"^denoiser must be callable"),
        (lambda: dgref.discriminator_guidance(ring, disc, window=(2.0, 1.0)), V,
         r"^window must have min <= max"),
        (lambda: dgref.train_discriminator(disc, x_real=x2, x_fake=x2, steps=0), V,
         r"^steps must be an int"),
        (lambda: dgref.train_discriminator(disc, x_real=x2, x_fake=x2, steps=1, batch_size=0), V,
         r"^batch_size must be an int"),
        (lambda: dgref.train_discriminator(disc, x_real=x2, x_fake=x2, steps=1, lr=0.0), V,
         r"^lr must be > 0"),
        (lambda: dgref.train_discriminator(disc, x_real=x2, x_fake=x2, steps=1,
                                           weight_decay=-1.0), V, r"^weight_decay must be >= 0"),
        (lambda: dgref.train_discriminator(disc, x_real=x2, x_fake=x2, steps=1, gamma=-1.0), V,
         r"^gamma must be >= 0"),
    ]


N_EDM_DISC = 48
EDM_DISC_IDS = _ids(_edm_disc_cases())


def test_edm_disc_case_count():
    assert len(EDM_DISC_IDS) == N_EDM_DISC == len(set(EDM_DISC_IDS))


@pytest.mark.parametrize("case", EDM_DISC_IDS)
def test_edm_and_discriminator_bad_input_named_exactly(case):
    call, exc, msg = _edm_disc_cases()[EDM_DISC_IDS.index(case)]
    with pytest.raises(exc, match=msg):
        call()


def test_logit_and_grad_takes_sigma_in_x_dtype():
    from dgref.discriminator import logit_and_grad
    disc = dgref.Discriminator(2, 0.5, hidden=4, depth=1,
                               generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    s = torch.tensor([0.013, 0.31, 1.7, 23.0])                  # float32 levels
    for a, b in zip(logit_and_grad(disc, x, s), logit_and_grad(disc, x, s.double())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_logit_and_grad_hands_the_disc_sigma_in_x_dtype():
    from dgref.discriminator import logit_and_grad
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))        # float32
    s = torch.tensor([0.013, 0.31, 1.7, 23.0], dtype=DT)                    # float64 levels
    d, g = logit_and_grad(lambda x, s: (x ** 2).sum(1) * s, x, s)
    assert d.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(g, 2 * x * s.float()[:, None], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The fifth sample (seed 19, final tests): defaults and options
# --------------------------------------------------------------------------------------------
def test_discriminator_takes_sigma_in_x_dtype_and_class_index_is_an_int():
    disc = dgref.Discriminator(2, 0.5, hidden=4, depth=1,
                               generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    s = torch.tensor([0.013, 0.31, 1.7, 23.0])
    torch.testing.assert_close(disc(x, s), disc(x, s.double()), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"^c must be an int class index, got bool True"):
        dgref.gaussian_pair().class_world(True)


def test_grid_defaults_and_a_start_law_without_dim():
    p = dgref.mixture_1d((0.0,), (1.0,))
    y, lq, m, v = grid_density(lambda y: -0.5 * y[:, 0] ** 2, -5.0, 5.0)
    y2, lq2, m2, v2 = grid_density(lambda y: -0.5 * y[:, 0] ** 2, -5.0, 5.0, 20001)
    assert torch.equal(lq, lq2) and (m, v) == (m2, v2)

    class NoDim:
        def log_prob(self, x, sigma=0.0):
            return p.log_prob(x, sigma)

        def mean(self):
            return p.mean()

        def std(self):
            return p.std()

    def D(x, s):
        return x / (1 + s[:, None] ** 2)
    a = grid_flow(D, NoDim(), num_steps=2)
    b = grid_flow(D, p, num_steps=2, num_points=4001, width=12.0)
    assert torch.equal(a.y, b.y) and torch.equal(a.weights, b.weights)


def test_divergence_hutchinson_when_batched_and_default_probes():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    s = torch.full((5,), 0.3, dtype=DT)
    A = torch.tensor([[0.5, 0.3, 0.0], [-0.2, 1.5, 0.4], [0.1, 0.0, -0.7]], dtype=DT)
    probes = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    _, hut = divergence(lambda x, s: x @ A.T, x, s, method="hutchinson", probes=probes,
                        batched=True)
    ref = torch.einsum("pbi,ij,pbj->pb", probes, A, probes).mean(0)
    torch.testing.assert_close(hut, ref, rtol=1e-13, atol=1e-14)
    # one probe by default (the Jacobian A is not diagonal, so 1 and 2 probes differ)
    kw = dict(num_steps=2, method="hutchinson", sigma_min=0.1, sigma_max=2.0)

    def ll(**k):
        return dgref.ode_log_likelihood(lambda x, s: 0.3 * x @ A.T, x, **kw, **k,
                                        generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ll(), ll(num_probes=1), rtol=0, atol=0)
    assert not torch.allclose(ll(), ll(num_probes=2))


def test_score_error_rounds_the_node_count_up_and_uses_the_reference():
    p = dgref.ring()
    a = torch.tensor([0.3, -0.4], dtype=DT)

    def D(x, sigma):                      # error sigma^2 a: the integrand e^(2u), not Simpson-exact
        return p.denoise(x, sigma) + (sigma ** 2)[:, None] * a

    def val(n, **kw):
        return score_error_kl(p, D, sigma_min=0.1, sigma_max=3.0, num_sigmas=n, num_points=5,
                              dtype=DT, generator=torch.Generator().manual_seed(6), **kw)[0]
    assert val(8) == val(9) != val(7)
    assert val(9, reference=D) == 0.0
