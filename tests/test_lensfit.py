"""Smooth-lens fitting (deeplense_nb.lensfit): the physics forward model reproduces the fitter's former private model,
fits are unchanged, residual features see substructure (simulated and real), the classifier's contract."""
import math
import numpy as np
import pytest
import torch
from deeplense_nb.core import DeepLenseError
from deeplense_nb.physics import alpha_sie, alpha_shear, ellipticity_to_q_phi, lens_equation, pixel_grid, sersic
from deeplense_nb.simulate import get_preset, simulate_batch
from deeplense_nb import lensfit
from deeplense_nb.lensfit import (fit_smooth_lens, residual_features, residual_classifier, residual_cnn_input,
                                  residual_significance, RESIDUAL_FEATURES, GEOMETRY_FEATURES)

def _smooth_model_v1(P: dict, x, y, pixel_scale: float, gain: float = 1.0) -> torch.Tensor:
    "Frozen copy of the fitter's model before it moved onto `physics.smooth_lens_image` (own separable PSF); `gain` as in the binned search."
    v = lambda k: P[k].view(-1, 1, 1)
    q, phi = ellipticity_to_q_phi(P["le1"].clamp(-0.6, 0.6), P["le2"].clamp(-0.6, 0.6))
    ax, ay = alpha_sie(x, y, theta_E=v("logtE").exp(), q=q.view(-1, 1, 1), phi=phi.view(-1, 1, 1), x0=v("x0"), y0=v("y0"))
    gx, gy = alpha_shear(x, y, gamma1=v("g1"), gamma2=v("g2"), x0=v("x0"), y0=v("y0"))
    bx, by = lens_equation(x, y, ax + gx, ay + gy)
    sq, sphi = ellipticity_to_q_phi(P["se1"].clamp(-0.6, 0.6), P["se2"].clamp(-0.6, 0.6))
    img = sersic(bx, by, R_e=v("logRe").exp(), n=v("logn").exp().clamp(0.3, 8), q=sq.view(-1, 1, 1),
                 phi=sphi.view(-1, 1, 1), x0=v("sx"), y0=v("sy"))
    sig = P["logfwhm"].exp().clamp(0.02, 0.5) / (2 * math.sqrt(2 * math.log(2))) / pixel_scale
    r = torch.arange(-7, 8, dtype=img.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sig[:, None] ** 2)); k = k / k.sum(1, keepdim=True)
    img = torch.nn.functional.conv2d(img[None], k[:, None, None, :], padding=(0, 7), groups=len(k))
    img = torch.nn.functional.conv2d(img, k[:, None, :, None], padding=(7, 0), groups=len(k))[0]
    return gain * (v("logamp").exp() * img + v("logsky").exp())

def test_smooth_model_matches_former_model():
    "The fitter's model, now `physics.smooth_lens_image`, gives the former images (random parameters, incl. clipped ones)."
    P = lensfit._starts(12, torch.Generator().manual_seed(3))
    P["le1"] = P["le1"] * 5; P["logfwhm"] = torch.linspace(-4.5, 0.0, 12)   # beyond the clips of |e| and of the FWHM
    x, y = pixel_grid(100, 0.05)
    new, old = lensfit._smooth_model(P, x, y, 0.05), _smooth_model_v1(P, x, y, 0.05)
    assert torch.allclose(new, old, rtol=1e-6, atol=1e-5), float((new - old).abs().max())

def test_fit_unchanged(monkeypatch):
    "fit_smooth_lens gives the same fit with the physics model as with the former one."
    x, _, _ = simulate_batch(2, seed=3)
    new = fit_smooth_lens(x, starts=2, steps=30, refine=20, crop=30)
    monkeypatch.setattr(lensfit, "_smooth_model", _smooth_model_v1)
    old = fit_smooth_lens(x, starts=2, steps=30, refine=20, crop=30)
    for a, b in zip(new, old):
        for k in a: assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])

def test_residual_features_see_substructure():
    "A smooth lens leaves only photon noise behind; a heavy, long vortex leaves coherent residuals."
    p = get_preset("model_i", vort_mass=3e11, vort_log_ma=(-23.7, -23.7))    # a 1.5" half-length vortex of 3e11 Msun
    x, y, _ = simulate_batch(2, preset=p, labels=[0, 2], seed=4)
    f = residual_features(x, starts=3, steps=150, refine=150)
    cols = [*RESIDUAL_FEATURES, *GEOMETRY_FEATURES]
    assert list(f.columns[:len(cols)]) == cols and np.isfinite(f[cols].values).all()
    assert all(c.startswith("fit_") for c in f.columns[len(cols):]) and {"fit_theta_E", "fit_psf_fwhm", "fit_retried"} <= set(f.columns)
    assert f.loc[0, "chi2_ring"] < 1.5 and f.loc[0, "deviance_per_pixel"] < 1.25, f
    assert f.loc[1, "chi2_ring"] > 2 * f.loc[0, "chi2_ring"], f

def test_residual_maps_carry_the_features():
    "The maps `return_maps` adds are the ones behind the zone chi^2s, and asking for them changes no feature."
    x, _, _ = simulate_batch(2, preset=get_preset("model_i", vort_mass=3e11), labels=[0, 2], seed=5)
    kw = dict(starts=2, steps=60, refine=40, crop=25)
    f, z = residual_features(x, return_maps=True, **kw)
    assert z.shape == (2, 100, 100) and z.dtype == np.float32 and f.equals(residual_features(x, **kw))
    zones = f[["chi2_inner", "chi2_ring", "chi2_outer"]].values   # the zones tile the map: its mean z^2 lies among theirs
    assert ((zones.min(1) <= (z ** 2).mean((1, 2)) + 1e-6) & ((z ** 2).mean((1, 2)) <= zones.max(1) + 1e-6)).all(), (zones, z)
    xin = residual_cnn_input(z, bin=2)
    assert xin.shape == (2, 1, 50, 50) and float(xin.abs().max()) <= 1
    assert torch.allclose(xin[:, 0], (torch.tensor(z).reshape(2, 50, 2, 50, 2).mean((2, 4)) / 2.5).clamp(-1, 1), atol=1e-6)
    with pytest.raises(DeepLenseError, match="bin >= 1"): residual_cnn_input(z, bin=0)

def test_residual_significance_is_unit_normal_for_photon_noise():
    "Only photon noise left: the smoothed significance has mean 0 and variance 1, at low and high counts alike."
    rng = np.random.default_rng(1)
    for mu in (5.0, 500.0):
        m = np.full((200, 48, 48), mu); z = residual_significance(rng.poisson(m), m, smooth=1.5)[:, 10:-10, 10:-10]
        assert abs(z.mean()) < 0.03 and abs(z.var() - 1) < 0.08, (mu, z.mean(), z.var())

def test_residual_features_real_samples(real_samples):
    "On the real Task I samples the smooth model explains every `no` image to the noise; vortices leave residuals."
    files = {c: sorted((real_samples / "common_test_I" / c).glob("*.npy")) for c in ("no", "vort")}
    f = {c: residual_features(np.stack([np.load(p) for p in fs])) for c, fs in files.items()}
    assert f["no"]["chi2_inner"].max() < 1.5 and f["no"]["chi2_ring"].max() < 1.5, f["no"]
    assert f["vort"]["chi2_inner"].min() > f["no"]["chi2_inner"].max(), (f["no"], f["vort"])

def test_residual_classifier_contract():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 50)
    X = np.exp(rng.normal(size=(150, len(RESIDUAL_FEATURES))) * 0.2 + y[:, None] * 0.8)
    clf = residual_classifier(X, y)
    assert clf.predict_proba(X).shape == (150, 3) and (clf.predict(X) == y).mean() > 0.9
    with pytest.raises(DeepLenseError, match="residual_classifier"): residual_classifier(X[:, :3], y)
    X[0, 0] = np.nan
    with pytest.raises(DeepLenseError, match="finite"): residual_classifier(X, y)


def test_fit_on_the_device_argument():
    "`device=` moves the whole fit; the starts are drawn on the CPU, so the fit is the same on the CPU by name or default."
    xs, _, truth = simulate_batch(2, preset="deeplensesim_recipe", labels=[0, 0], seed=3)
    a = fit_smooth_lens(xs, starts=2, steps=20, refine=10, crop=25, device="cpu")
    assert a == fit_smooth_lens(xs, starts=2, steps=20, refine=10, crop=25)
    with pytest.raises(DeepLenseError, match="Unknown device"): fit_smooth_lens(xs, device="tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_cuda_matches_cpu():
    "The same fit on a GPU: float32 rounding differs, the fitted lens agrees to 1%."
    xs, _, truth = simulate_batch(4, preset="deeplensesim_recipe", labels=[0, 0, 1, 2], seed=3)
    cpu = fit_smooth_lens(xs, starts=4, steps=150, crop=25)
    gpu = fit_smooth_lens(xs, starts=4, steps=150, crop=25, device="cuda")
    for c, g in zip(cpu, gpu):
        assert abs(c["theta_E"] - g["theta_E"]) < 0.01 * c["theta_E"] and abs(c["deviance_per_pixel"] - g["deviance_per_pixel"]) < 0.05

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vortex_fit_on_cuda_matches_cpu():
    "`fit_vortex` on a GPU (the line-mass deflection with gradients there): the fitted vortex agrees with the CPU fit."
    xs, _, _ = simulate_batch(2, preset="model_i", labels=[2, 2], seed=5)
    f = residual_features(xs, starts=2, steps=100, refine=100, crop=20)
    cpu, gpu = lensfit.fit_vortex(xs, f), lensfit.fit_vortex(xs, f, device="cuda")
    assert np.allclose(cpu.vort_mass, gpu.vort_mass, rtol=0.05) and np.allclose(cpu.vort_length, gpu.vort_length, rtol=0.05)
    assert np.allclose(cpu.deviance_vortex, gpu.deviance_vortex, atol=0.02), (cpu, gpu)
