"""Diffusion models (Task IV) across modules: training through the package's Learner (loss falls, EMA weights,
checkpoints that `load_model` rebuilds, training from a Task IV folder read by `deeplense_nb.data`), DDPM/DDIM
sampling (shape, range, seeds, DDIM(eta=1) == DDPM, guidance), FID equal to torchmetrics' on fixed features, the
FID sanity ordering with a lensing feature extractor trained on simulated data, the offline Inception error, and
the evaluation dict."""
import json, math, urllib.error
from pathlib import Path
import numpy as np
import pytest
import torch
from deeplense_nb.core import DeepLenseError
from deeplense_nb.diffusion import (GaussianDiffusion, InceptionUnavailableError, LensFeatureExtractor, UNet, UNetConfig,
                                    beta_schedule, build_diffusion, evaluate_samples, extract_features, fid,
                                    frechet_distance, get_extractor, load_samples, memorisation_stats, nearest_neighbours,
                                    power_spectrum_distance, radial_power_spectrum, save_grid, save_samples,
                                    train_diffusion, train_feature_extractor)
from deeplense_nb.simulate import get_preset, simulate_batch

torch.set_num_threads(1)
SIM32 = get_preset("model_i", npix=32, pixel_scale=0.05 * 150 / 32)
TINY = UNetConfig(base_width=8, channel_mults=(1, 2), attn_levels=(1,), mid_attn=False, blocks_per_level=1, heads=2)


@pytest.fixture(scope="module")
def lenses():
    "160 simulated Model I lenses at 32x32 in [0, 1] and their labels: 112 for training, 48 held out."
    x, y, _ = simulate_batch(160, preset=SIM32, seed=0)
    return x[:112], y[:112], x[112:]


@pytest.fixture(scope="module")
def trained(lenses, tmp_path_factory):
    "A tiny unconditional model trained through train_diffusion (Learner + EMA), with its run folder."
    train, _, _ = lenses
    out = tmp_path_factory.mktemp("diffusion_run")
    gd = train_diffusion(train, unet=TINY, timesteps=100, schedule="cosine", objective="v", epochs=8, batch_size=16,
                         lr=3e-3, warmup=5, out=out, device="cpu", progress=False)
    return gd, out


def perturbed(gd: GaussianDiffusion, seed=0) -> GaussianDiffusion:
    "Zero-initialised output layers give constant predictions; perturb the weights so sampling is non-trivial."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gd.parameters(): p.add_(0.02 * torch.randn(p.shape, generator=g))
    return gd


# --- training ------------------------------------------------------------------------------------------------------

def test_training_loss_decreases_and_run_folder(trained):
    gd, out = trained
    losses = [r["train_loss"] for r in gd.history]
    assert len(losses) == 8 and np.mean(losses[-2:]) < 0.6 * losses[0], losses
    assert not gd.training
    for f in ("last.ckpt", "history.csv", "config.json"): assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_config"]["builder"] == "deeplense_nb.diffusion:build_diffusion"


def test_checkpoint_rebuilds_the_ema_model(trained):
    from deeplense_nb.training import load_checkpoint, load_model
    gd, out = trained
    again, meta = load_model(out)
    assert isinstance(again, GaussianDiffusion) and again.settings() == gd.settings()
    for k, v in gd.state_dict().items(): torch.testing.assert_close(again.state_dict()[k], v)   # the EMA weights
    raw = load_checkpoint(out / "last.ckpt")["model"]
    assert any(not torch.equal(raw[k], v) for k, v in gd.state_dict().items())                # which differ from the raw ones
    torch.testing.assert_close(again.sample(3, steps=5, seed=1, progress=False), gd.sample(3, steps=5, seed=1, progress=False))


def test_train_from_task4_folder_via_data_module(lenses, tmp_path):
    train, _, _ = lenses
    save_samples(train[:48], tmp_path / "set" / "Samples")
    from deeplense_nb.data import get_dataloaders
    dls = get_dataloaders(tmp_path / "set", batch_size=16, augment=False)
    assert dls.classes in ([], None) and dls.img_size in (32, (32, 32))
    gd = train_diffusion(tmp_path / "set", unet=TINY, timesteps=50, epochs=1, batch_size=16, device="cpu", progress=False)
    assert gd.image_size == (32, 32) and len(gd.history) == 1
    with pytest.raises(DeepLenseError, match="labelled"):
        train_diffusion(tmp_path / "set", unet=TINY, conditional=True, epochs=1, device="cpu", progress=False)


def test_resume_continues_the_run(lenses, tmp_path):
    train, _, _ = lenses
    kw = dict(unet=TINY, timesteps=50, batch_size=16, device="cpu", progress=False, out=tmp_path)
    from deeplense_nb.training import Callback, CancelFitException
    class StopAfterFirstEpoch(Callback):
        def before_epoch(self):
            if self.learn.epoch == 1: raise CancelFitException()
    first = train_diffusion(train[:32], epochs=2, cbs=[StopAfterFirstEpoch()], **kw)      # interrupted after epoch 0
    assert [r["epoch"] for r in first.history] == [0]
    gd = train_diffusion(train[:32], epochs=2, resume=True, **kw)
    assert [r["epoch"] for r in gd.history] == [0, 1]
    assert gd.history[0]["train_loss"] == pytest.approx(first.history[0]["train_loss"])


def test_a_finished_run_is_never_silently_replaced(lenses, tmp_path):
    "A second train_diffusion into the same folder is refused before any work; overwrite=True starts again."
    train, _, _ = lenses
    kw = dict(unet=TINY, timesteps=20, batch_size=16, device="cpu", progress=False, out=tmp_path / "run", epochs=1)
    train_diffusion(train[:16], **kw)
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    with pytest.raises(DeepLenseError, match="already holds a run"): train_diffusion(train[:16], **kw)
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before
    with pytest.raises(DeepLenseError, match="not both"): train_diffusion(train[:16], resume=True, overwrite=True, **kw)
    assert len(train_diffusion(train[:16], overwrite=True, seed=1, **kw).history) == 1
    assert (tmp_path / "run" / "last.ckpt").read_bytes() != before["last.ckpt"]


def test_conditional_training_and_guided_sampling(lenses):
    train, labels, _ = lenses
    gd = train_diffusion((train[:48], labels[:48]), unet=TINY, conditional=True, timesteps=50, epochs=1, batch_size=16,
                         device="cpu", progress=False)
    assert gd.conditional and gd.unet.null_class == 3 and gd.classes == ("0", "1", "2")
    s = gd.sample(4, labels=[0, 1, 2, 1], guidance_scale=3.0, steps=5, progress=False)
    assert s.shape == (4, 1, 32, 32) and 0 <= s.min() and s.max() <= 1
    # label dropout: in training mode about p_uncond of the labels become the null class, none in eval mode
    gd.train(); gd.p_uncond = 0.5
    y = gd._labels(torch.zeros(4000, dtype=torch.long), 4000, "cpu")
    assert 0.45 < (y == 3).float().mean() < 0.55
    gd.eval(); assert (gd._labels(torch.zeros(50, dtype=torch.long), 50, "cpu") == 0).all()


# --- network and objective -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [150, 64, 37])
def test_unet_any_size(size):
    net = UNet(base_width=8, channel_mults=(1, 2, 2), attn_levels=(2,), heads=2, blocks_per_level=1)
    assert net(torch.randn(1, 1, size, size), torch.tensor([3])).shape == (1, 1, size, size)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid"])
def test_objectives_and_schedules(objective, schedule):
    gd = GaussianDiffusion(UNet(TINY), image_size=16, timesteps=30, schedule=schedule, objective=objective, ssim_weight=0.1)
    loss = gd(torch.rand(4, 1, 16, 16))
    assert loss.ndim == 0 and torch.isfinite(loss) and set(gd.last_losses) == {"mse", "ssim"}
    x0, t, noise = torch.rand(3, 1, 16, 16) * 2 - 1, torch.tensor([0, 15, 29]), torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(gd.predict_x0(gd.target(x0, t, noise), gd.q_sample(x0, t, noise), t), x0, atol=2e-3, rtol=0)
    b = beta_schedule(schedule, 1000)
    assert torch.cumprod(1 - b, 0)[-1] < 1e-3


@pytest.mark.parametrize("bad, match", [
    (lambda: GaussianDiffusion(UNet(TINY), objective="score"), "expected one of 'eps', 'x0', 'v'"),
    (lambda: GaussianDiffusion(UNet(TINY), schedule="exp"), "expected one of 'linear', 'cosine', 'sigmoid'"),
    (lambda: UNetConfig(pad_mode="circular"), "expected one of 'reflect'"),
    (lambda: UNetConfig(channel_mults=(1, 2), attn_levels=(2,)), "levels are 0..1"),
    (lambda: GaussianDiffusion(UNet(TINY), image_size=16, timesteps=10).sample(2, sampler="euler"), "expected one of 'ddpm', 'ddim'"),
    (lambda: nearest_neighbours(torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8), metric="cos"), "expected one of 'l2', 'ssim'"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(DeepLenseError, match=match): bad()


# --- sampling ------------------------------------------------------------------------------------------------------

def test_sampling_shape_range_seed_and_ddim_equals_ddpm_at_eta_1():
    torch.manual_seed(0)
    gd = perturbed(GaussianDiffusion(UNet(TINY), image_size=24, timesteps=40))
    a = gd.sample(5, sampler="ddpm", steps=10, seed=7, batch_size=2, progress=False)
    assert a.shape == (5, 1, 24, 24) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, gd.sample(5, sampler="ddpm", steps=10, seed=7, batch_size=2, progress=False))
    assert not torch.equal(a, gd.sample(5, sampler="ddpm", steps=10, seed=8, batch_size=2, progress=False))
    torch.testing.assert_close(gd.sample(3, sampler="ddim", eta=1.0, steps=6, seed=3, progress=False),
                               gd.sample(3, sampler="ddpm", steps=6, seed=3, progress=False), atol=1e-4, rtol=0)
    few = gd.sample(3, sampler="ddim", steps=3, seed=0, progress=False)
    assert few.shape == (3, 1, 24, 24)
    assert gd.training  # sampling restores the training mode


# --- evaluation ----------------------------------------------------------------------------------------------------

class Identity(torch.nn.Module):
    def __init__(self, d): super().__init__(); self.num_features = d
    def forward(self, x): return x


@pytest.mark.parametrize("seed, n_a, n_b, d", [(0, 400, 300, 16), (1, 60, 90, 32), (2, 20, 25, 40)])
def test_frechet_distance_equals_torchmetrics(seed, n_a, n_b, d):
    from torchmetrics.image.fid import FrechetInceptionDistance
    rng = np.random.default_rng(seed)
    fa = rng.normal(size=(n_a, d))
    fb = rng.normal(0.5, 1.0, size=(n_b, d)) @ rng.normal(size=(d, d)) / math.sqrt(d)
    tm = FrechetInceptionDistance(feature=Identity(d), normalize=True)
    tm.update(torch.from_numpy(fa), real=True); tm.update(torch.from_numpy(fb), real=False)
    ours = frechet_distance(fa, fb)
    assert ours == pytest.approx(tm.compute().item(), rel=1e-6, abs=1e-8)
    assert frechet_distance(torch.from_numpy(fa), torch.from_numpy(fb)) == pytest.approx(ours, rel=1e-12)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-5)  # sqrt of round-off eigenvalues when n < d


@pytest.fixture(scope="module")
def lens_extractor(tmp_path_factory):
    "A lensing feature extractor trained on simulated Task I lenses (at 32x32), saved and reloaded."
    out = tmp_path_factory.mktemp("fid_extractor")
    ex = train_feature_extractor(model="cnn_baseline", model_kw={"hidden": 32}, n=240, preset=SIM32, epochs=3,
                                 batch_size=32, out=out, device="cpu", progress=False)
    return ex, out


def test_fid_sanity_ordering(lenses, lens_extractor):
    train, _, held = lenses
    ex, _ = lens_extractor
    real = fid(held, train, extractor=ex)
    noise = fid(torch.rand(48, 1, 32, 32), train, extractor=ex)
    blobs = fid(torch.rand(48, 1, 1, 1).expand(48, 1, 32, 32).contiguous() * 0.2, train, extractor=ex)
    assert real < 0.2 * noise and real < 0.2 * blobs, (real, noise, blobs)
    # torchmetrics' FID equals ours on the extractor's features
    ours = frechet_distance(extract_features(held, ex), extract_features(train, ex))
    assert real == pytest.approx(ours, rel=1e-3, abs=1e-9)


def test_extractor_from_checkpoint_and_any_module(lenses, lens_extractor):
    train, _, held = lenses
    ex, out = lens_extractor
    again = LensFeatureExtractor(out)
    assert again.num_features == ex.num_features == 32 and again.name == "lens:cnn_baseline"
    torch.testing.assert_close(again(held[:4]), ex(held[:4]))
    assert fid(held, train, extractor=out) == pytest.approx(fid(held, train, extractor=ex), rel=1e-5)
    from deeplense_nb.training import tiny_cnn
    v = fid(held, train, extractor=tiny_cnn(in_chans=1, num_classes=3))   # any classifier with forward_features
    assert np.isfinite(v) and v >= 0
    with pytest.raises(DeepLenseError, match="does not exist"): LensFeatureExtractor(out / "nope.ckpt")


def test_inception_offline_is_a_clear_error(monkeypatch):
    import importlib.util
    if importlib.util.find_spec("torch_fidelity") is None:
        with pytest.raises(InceptionUnavailableError, match="pip install torch-fidelity"):
            fid(torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16))
    import torchmetrics.image.fid as tfid
    class Offline:
        def __init__(self, *a, **k): raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(tfid, "FrechetInceptionDistance", Offline)
    with pytest.raises(InceptionUnavailableError, match="inception_weights=PATH") as e:
        get_extractor("inception")
    assert "LensFeatureExtractor" in str(e.value) and isinstance(e.value, DeepLenseError)


def test_power_spectrum_and_memorisation(lenses):
    train, _, held = lenses
    k, P = radial_power_spectrum(torch.randn(32, 1, 32, 32) * 0.3)
    assert len(k) == 16 and P[2:].mean() == pytest.approx(0.09, rel=0.05)         # white noise: flat at the variance
    assert power_spectrum_distance(train, train) == 0.0
    assert power_spectrum_distance(held, train) < power_spectrum_distance(torch.rand(48, 1, 32, 32), train)
    fresh = memorisation_stats(held, train)
    copies = memorisation_stats(train[:10], train)
    assert 0.6 < fresh["nn_ratio"] < 1.6 and copies["nn_min"] == 0.0 and copies["frac_closer_than_train_min"] == 1.0
    d, i = nearest_neighbours(train[:6], train, exclude_self=True)
    assert (i != np.arange(6)).all() and (d > 0).all()


def test_evaluate_samples_metrics_json(trained, lenses, lens_extractor, tmp_path):
    gd, _ = trained
    train, _, held = lenses
    ex, _ = lens_extractor
    s = gd.sample(32, steps=10, seed=0, progress=False)
    m = evaluate_samples(s, held, extractor=ex, train=train)
    text = json.dumps(m)
    assert json.loads(text) == m
    assert m["fid_extractor"] == "lens:cnn_baseline" and m["fid"] >= 0 and m["n_samples"] == 32
    assert set(m["pixel"]) == {"mean", "std", "ref_mean", "ref_std", "hist_tv", "pixel_w1"}
    assert m["memorisation"]["n_train"] == len(train)
    # files for the Task IV layout and a contact sheet
    save_samples(s, tmp_path / "Samples")
    a = np.load(tmp_path / "Samples" / "sample32.npy")
    assert a.shape == (1, 32, 32) and a.dtype == np.float32
    torch.testing.assert_close(load_samples(tmp_path), s)
    png = save_grid(s, tmp_path / "grid.png")
    assert png.stat().st_size > 0


def test_diffusion_subset_follows_the_folders_rule():
    "`subset` of tensor images means what it means for folders: a fraction in (0, 1] or a number, stratified by label."
    from deeplense_nb.diffusion.train import diffusion_loaders
    from deeplense_nb.data import DataError
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
    n = lambda **kw: len(diffusion_loaders((x, y), batch_size=4, **kw)[0].dataset)
    assert (n(subset=1.0), n(subset=0.5), n(subset=10)) == (40, 20, 10)
    assert n(subset=10, val_frac=0.25) == 10
    with pytest.raises(DataError, match="subset=0"): n(subset=0)
