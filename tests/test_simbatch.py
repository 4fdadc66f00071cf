"""Batched simulator: counter-based randomness (batch-size independence), the per-image simulator's statistics,
the packed-store output, and training on a stream of fresh simulations."""
import json, os, shutil
import numpy as np
import pytest
import torch
from scipy import stats
from deeplense_nb import simbatch as sb
from deeplense_nb.simulate import get_preset, image_rng, image_stats, render, sample_lens_finding, sample_truth, LensFindingPreset

def _ref_mix(v):
    m = (1 << 64) - 1
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & m
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & m
    return v ^ (v >> 31)

def test_mix64_is_splitmix64():
    w = [0, 1, 7, 2**62 + 3, 2**63, 2**64 - 1]
    assert sb.mix64(torch.tensor([sb._i64(v) for v in w])).tolist() == [sb._i64(_ref_mix(v)) for v in w]

@pytest.mark.parametrize("preset", ["model_ii", "lens_finding"])
def test_batch_size_and_subset_independence(preset):
    x7, y7 = sb.simulate_images(20, preset, seed=4, batch_size=7)
    x64, y64 = sb.simulate_images(20, preset, seed=4, batch_size=64)
    assert torch.equal(x7, x64) and torch.equal(y7, y64)
    idx = torch.tensor([19, 3, 11])
    xs, ys = sb.simulate_images(idx, preset, seed=4, batch_size=2)
    assert torch.equal(xs, x64[idx]) and torch.equal(ys, y64[idx])
    assert not torch.equal(sb.simulate_images(3, preset, seed=5)[0], x64[:3])

def test_model_i_truth_distributions():
    p, n = get_preset("model_i"), 1200
    old = [sample_truth(p, p.classes[i % 3], image_rng(3, "t", p.classes[i % 3], i)) for i in range(n)]
    new = sb.sample_truth_batch(p, torch.arange(n) % 3, seed=3, split="t")
    for k in ("halo_mass", "theta_E", "q", "phi", "gamma1", "gamma2", "src_x", "src_y", "src_R_e", "src_n", "src_q", "src_phi", "peak_counts"):
        a, b = np.array([o[k] for o in old]), new[k].numpy()
        if a.std() == 0: assert np.allclose(b, a[0], rtol=1e-12), k
        else: assert stats.ks_2samp(a, b).pvalue > 1e-3, k
    for cls, keys in ((1, ("sub_mass", "sub_x", "sub_y")), (2, ("vort_log_ma", "vort_length", "vort_angle"))):
        sel = new["label"] == cls
        for k in keys:
            a = np.concatenate([np.ravel(o[k]) for o in old if o["label"] == p.classes[cls]])
            assert stats.ks_2samp(a, new[k][sel].ravel().numpy()).pvalue > 1e-3, k

@pytest.mark.parametrize("disc", [True, False])
def test_vortex_offset_same_in_both_engines(disc):
    "The off-centre vortex draw (`vort_offset`, over the disc or uniform in distance) has one distribution in the per-image and the batched sampler, and moves the rendered vortex."
    p, n = get_preset("model_i", vort_offset=0.8, vort_disc=disc), 900
    old = [sample_truth(p, "vort", image_rng(3, "t", "vort", i)) for i in range(n)]
    new = sb.sample_truth_batch(p, torch.full((n,), 2), seed=3, split="t")
    for k, k0 in (("vort_x", "x0"), ("vort_y", "y0")):
        assert stats.ks_2samp([o[k] - o[k0] for o in old], (new[k] - new[k0]).numpy()).pvalue > 1e-3, k
    r = np.hypot([o["vort_x"] for o in old], [o["vort_y"] for o in old])
    assert r.max() <= 0.8 and abs(r.mean() - 0.8 * (2 / 3 if disc else 1 / 2)) < 0.03   # mean distance: 2/3 (disc) or 1/2 of the radius
    lab = torch.tensor([0, 1, 2])
    x0 = sb.render_batch(sb.sample_truth_batch("model_i", lab, seed=1), "model_i", noise=False)
    x1 = sb.render_batch(sb.sample_truth_batch(p, lab, seed=1), p, noise=False)
    assert torch.equal(x0[:2], x1[:2]) and not torch.allclose(x0[2], x1[2])   # only the vortex image changes

def test_lens_finding_truth_distributions():
    p, n = LensFindingPreset(band_noise_scatter=0.3, lens_sed_scatter=0.2, src_sed_scatter=0.3), 1200
    old = [sample_lens_finding(p, i % 2 == 1, image_rng(3, "t", i)) for i in range(n)]
    new = sb.sample_lens_finding_batch(p, torch.arange(n) % 2, seed=3, split="t")
    for k in ("psf_fwhm", "noise_sigma", "n_field", "n_stars", "gal_size"):
        assert stats.ks_2samp([o[k] for o in old], new[k].numpy()).pvalue > 1e-3, k
    lens = new["label"] == 1
    for k in ("theta_E", "q", "phi", "gamma1", "gamma2", "lens_R_e", "src_x", "src_y", "src_R_e", "src_q", "src_phi", "arc_flux"):
        assert stats.ks_2samp([o[k] for o in old if o["label"] == "lens"], new[k][lens].numpy()).pvalue > 1e-3, k
    for k, sel in (("noise_bands", torch.ones(n, dtype=bool)), ("lens_sed", lens), ("src_sed", lens)):   # per band, scattered
        a, b = np.array([o[k] for o in old if k == "noise_bands" or o["label"] == "lens"]), new[k][sel].numpy()
        assert a.shape == b.shape and a.std(0).min() > 0, k
        for j in range(a.shape[1]): assert stats.ks_2samp(a[:, j], b[:, j]).pvalue > 1e-3, (k, j)

def test_poisson_noise_matches_numpy():
    rng = np.random.default_rng(0)
    for lam in (10.0, 40.0, 700.0):
        k = sb.poisson_counts(torch.full((300_000,), lam), torch.rand(300_000, dtype=torch.float64)).numpy()
        ref = rng.poisson(lam, 300_000)
        assert np.all(k == np.round(k))
        for f in (np.mean, np.var):
            assert abs(f(k) / f(ref) - 1) < 0.02, (lam, f.__name__, f(k), f(ref))

def test_pixel_statistics_match_per_image_renderer():
    p, n = get_preset("model_ii"), 60
    old = render([sample_truth(p, p.classes[i % 3], image_rng(6, "px", p.classes[i % 3], i)) for i in range(n)], p).numpy()
    new = sb.simulate_images(n, p, seed=6, split="px")[0].double().numpy()
    for k in ("N", "sky_counts", "flux", "ring_radius", "mean", "std"):
        a, b = [image_stats(im)[k] for im in old], [image_stats(im)[k] for im in new]
        assert abs(np.mean(a) - np.mean(b)) < 4 * np.std(a) * (2 / n) ** 0.5 + 0.03 * abs(np.mean(a)), (k, np.mean(a), np.mean(b))

def test_simulate_store_cli(tmp_path, capsys):
    from deeplense_nb.data import PackedDataset, get_dataloaders, open_dataset
    from deeplense_nb.cli import main
    cli = lambda *a: main([str(v) for v in a])
    assert cli("simulate", "task1", "--out", tmp_path / "s", "--format", "store", "--n-train", 6, "--n-val", 3, "--seed", 1) == 0
    assert cli("simulate", "task1", "--out", tmp_path / "f", "--n-train", 6, "--n-val", 3, "--seed", 1) == 0
    ds = open_dataset(tmp_path / "s")
    assert isinstance(ds, PackedDataset) and len(ds) == 9 and list(ds.split_names) == ["train", "val"]
    for i, f in enumerate(ds.files): assert np.array_equal(ds[i][0].numpy(), np.load(tmp_path / "f" / f).astype(np.float32))
    assert len(list((tmp_path / "s").rglob("*.npy"))) == 2   # labels.npy and splits.npy only
    dls = get_dataloaders(tmp_path / "s", batch_size=3)
    assert (len(dls.train.dataset), len(dls.valid.dataset)) == (6, 3)
    truth = [json.loads(l) for l in (tmp_path / "s" / "truth.jsonl").read_text().splitlines()]
    assert len(truth) == 9 and all(len(t["sub_mass"]) == 25 for t in truth if t["label"] == "sphere")
    assert cli("simulate", "lens-finding", "--out", tmp_path / "lf", "--format", "store", "--n-train-lenses", 2,
               "--n-test-lenses", 1, "--train-ratio", 2, "--test-ratio", 2) == 0
    assert len(open_dataset(tmp_path / "lf")) == 9 and open_dataset(tmp_path / "lf").shape == (3, 64, 64)
    capsys.readouterr()
    assert cli("simulate", "task1", "--out", tmp_path / "s", "--format", "store", "--n-train", 3) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "Traceback" not in err

def test_train_on_sim_stream(tmp_path, capsys):
    from deeplense_nb.cli import main
    rc = main(["train", "--data", "sim:model_i:npix=48", "--epoch-size", "24", "--epochs", "1", "--batch-size", "8",
               "--model", "cnn_baseline", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert rc == 0   # the central 48 x 48 pixels of the Model I field
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["epochs"] == 1 and m["config"]["epoch_size"] == 24 and m["classes"] == ["no", "sphere", "vort"]
    from deeplense_nb.checkpoint import checkpoint_meta
    assert checkpoint_meta(tmp_path / "run" / "best.ckpt")["config"]["img_size"] == 48   # predict and evaluate check images against it
    capsys.readouterr()
    assert main(["train", "--data", "sim:model_i:npx=48", "--out", str(tmp_path / "bad"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown field(s) ['npx']" in err and err.count("\n") == 1 and not (tmp_path / "bad").exists(), err

FUSED_CHECK = """
import torch
from deeplense_nb import physics as P
x, y = P.pixel_grid(48, 0.1)
g = torch.Generator().manual_seed(0)
for B, N in ((3, 25), (2, 100)):   # subhalos (sphere) and a vortex's 100 masses
    te, xs, ys = torch.rand(B, N, generator=g) * 0.05, torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    with torch.no_grad(): ref = P.alpha_point_masses(x, y, theta_E=te, xs=xs, ys=ys, s=1e-3)   # CPU: the torch loop
    got = P._point_masses_fused(x, y, te * te, xs, ys, 1e-3, block=256)                          # 48*48 is not a multiple of 256
    for a, r in zip(got, ref): torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
print("ok")
"""

def test_fused_point_masses_match_the_torch_loop():
    "The fused CUDA kernel's arithmetic, run by Triton's CPU interpreter, gives the torch loop's deflections (float32 rounding)."
    pytest.importorskip("triton")
    import os, subprocess, sys
    r = subprocess.run([sys.executable, "-c", FUSED_CHECK], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_point_masses_on_cuda_match_the_torch_loop(monkeypatch):
    "On a GPU the simulator's expected counts are the same with the fused kernel and with the torch loop."
    from deeplense_nb import physics as P
    idx = torch.arange(96)
    t = sb.sample_truth_batch("model_i", idx % 3, seed=0, split="train", index=idx, device="cuda")
    fused = sb.render_batch(t, "model_i", noise=False, normalize=False)
    assert P.FUSED_POINT_MASSES, "the fused kernel failed and handed over to the loop (see the warning)"
    monkeypatch.setattr(P, "FUSED_POINT_MASSES", False)
    torch.testing.assert_close(fused, sb.render_batch(t, "model_i", noise=False, normalize=False), rtol=1e-4, atol=1e-3)

NO_COMPILER_CHECK = """
import warnings, torch
from deeplense_nb import physics as P, simbatch as sb
idx = torch.arange(6)
t = sb.sample_truth_batch("model_i", idx % 3, seed=0, split="train", index=idx)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = sb.render_batch(t, "model_i", noise=False, normalize=False)
    again = sb.render_batch(t, "model_i", noise=False, normalize=False)
said = [str(w.message) for w in caught if "point-mass kernel failed" in str(w.message)]
assert not P.COMPILED_POINT_MASSES
print(len(said), torch.equal(got, again), "C++" in said[0] if said else None)
"""

def test_no_cpp_compiler_hands_the_point_masses_to_the_loop(tmp_path):
    "Without a C++ compiler the CPU's compiled point-mass sum fails at its first call: one warning, then the torch loop renders every image."
    import os, subprocess, sys
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),   # nothing cached to fall back on
           "DEEPLENSE_COMPILE": "1"}
    r = subprocess.run([sys.executable, "-c", NO_COMPILER_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.split() == ["1", "True", "True"], (r.stdout, r.stderr[-3000:])
    off = subprocess.run([sys.executable, "-c", "from deeplense_nb import physics as P; print(P.COMPILED_POINT_MASSES)"],
                         env={**env, "DEEPLENSE_COMPILE": "0"}, capture_output=True, text=True, timeout=600)
    assert off.stdout.split() == ["False"], off.stderr[-3000:]   # the switch for many small runs

@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler: the loop is the only path")
@pytest.mark.skipif(os.environ.get("DEEPLENSE_COMPILE", "1") == "0", reason="DEEPLENSE_COMPILE=0 turns the compiled sum off")
def test_compiled_point_masses_match_the_torch_loop(monkeypatch):
    "On a CPU the simulator's expected counts are the same, up to float32 rounding, with the compiled sum and with the torch loop."
    from deeplense_nb import physics as P
    idx = torch.arange(48)
    t = sb.sample_truth_batch("model_i", idx % 3, seed=0, split="train", index=idx)
    compiled = sb.render_batch(t, "model_i", noise=False, normalize=False)
    assert P.COMPILED_POINT_MASSES, "the compiled sum failed and handed over to the loop (see the warning)"
    monkeypatch.setattr(P, "COMPILED_POINT_MASSES", False)
    torch.testing.assert_close(compiled, sb.render_batch(t, "model_i", noise=False, normalize=False), rtol=1e-5, atol=1e-4)
