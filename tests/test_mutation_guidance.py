"""The guided denoiser's remaining contract (issue 15, mutation testing of dgref/guidance.py):
windows open at one end, extra arguments passed through, sigma given as a number, and bad
input named precisely. The window edges and the sigma^2 scaling are in test_pins.py."""
import pytest
import torch

import dgref

DT = torch.float64


def _base(x, sigma, *args, **kwargs):
    shift = sum(args) + kwargs.get("bias", 0.0)
    return 0.5 * x / (1 + sigma[:, None] ** 2) + shift


def _field(x, sigma):
    return torch.cos(2 * x) + sigma[:, None]


SIG = torch.tensor([0.2, 0.9, 1.0, 1.1, 5.0], dtype=DT)
X = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=DT)


@pytest.mark.parametrize("window", [(0.0, 1.0), (1.0, float("inf")), (0.95, float("inf")),
                                    (0.0, float("inf"))])
def test_windows_open_at_one_end(window):
    """(0, hi): no guidance above hi; (lo, inf): none below lo; lo = 1 exactly included."""
    lo, hi = window
    G = dgref.ScoreCorrectedDenoiser(_base, _field, 1.5, window=window)
    on = (SIG >= lo) & (SIG <= hi)
    ref = torch.where(on[:, None], _base(X, SIG) + 1.5 * SIG[:, None] ** 2 * _field(X, SIG),
                      _base(X, SIG))
    torch.testing.assert_close(G(X, SIG), ref, rtol=0, atol=1e-14)


def test_extra_arguments_reach_the_denoiser_only():
    G = dgref.ScoreCorrectedDenoiser(_base, _field, 2.0)
    ref = _base(X, SIG, 0.25, bias=1.0) + 2.0 * SIG[:, None] ** 2 * _field(X, SIG)
    torch.testing.assert_close(G(X, SIG, 0.25, bias=1.0), ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_as_a_number_follows_x(dtype):
    """A number sigma becomes a (B,) tensor of x's dtype: bitwise the same as passing it."""
    G = dgref.ScoreCorrectedDenoiser(_base, _field, 2.0, window=(0.1, 3.0))
    x = X.to(dtype)
    out = G(x, 0.7)
    assert out.dtype == dtype
    torch.testing.assert_close(out, G(x, torch.full((5,), 0.7, dtype=dtype)), rtol=0, atol=0)


def test_bad_input_is_named():
    G = dgref.ScoreCorrectedDenoiser(_base, _field, 2.0)
    with pytest.raises(ValueError, match=r"^x must have at least 2 dimension"):
        G(torch.zeros(5, dtype=DT), 0.5)
    with pytest.raises(ValueError, match=r"^sigma must have shape \(5,\) to match x"):
        G(X, torch.ones(3, dtype=DT))
    with pytest.raises(TypeError, match=r"^correction must be callable c\(x, sigma\)"):
        dgref.ScoreCorrectedDenoiser(_base, "not a field")
    with pytest.raises(TypeError, match=r"^denoiser must be callable"):
        dgref.ScoreCorrectedDenoiser(None, _field)
    with pytest.raises(ValueError, match=r"^weight must be finite"):
        dgref.ScoreCorrectedDenoiser(_base, _field, float("nan"))
    with pytest.raises(ValueError, match=r"^window must have min <= max"):
        dgref.ScoreCorrectedDenoiser(_base, _field, 1.0, window=(2.0, 1.0))
