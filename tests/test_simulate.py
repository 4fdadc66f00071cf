"""Simulator: real layouts/dtypes/ranges (checked against the real samples when present), CLI, determinism."""
import json
from pathlib import Path
import numpy as np
import pytest
from deeplense_nb.simulate import simulate_task1, simulate_lens_finding, simulate_diffusion, load_truth, sample_truth, get_preset, image_rng

@pytest.fixture(scope="module")
def t1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim") / "task1"
    simulate_task1(d, n_train=9, n_val=3, seed=1, progress=False)
    return d

def _real(real_samples, sub):
    return [np.load(f) for f in sorted((real_samples / sub).glob("*/*.npy"))]

def test_task1_layout_and_format(t1):
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("no", "sphere", "vort"):
            files = sorted((t1 / split / cls).glob("*.npy"))
            assert [f.name for f in files] == [f"{i}.npy" for i in range(1, n + 1)]
            for f in files:
                a = np.load(f, allow_pickle=False)
                assert a.shape == (1, 150, 150) and a.dtype == np.float64
                assert a.min() == 0.0 and a.max() == 1.0
                # normalised Poisson counts: values are k/N for integers k, N of several hundred
                N = round(1 / np.diff(np.unique(a)).min())
                assert 400 < N < 1500, N
                assert np.abs(a * N - np.rint(a * N)).max() < 1e-6
    man = json.loads((t1 / "manifest.json").read_text())
    assert man["task"] == "task1" and man["seed"] == 1 and man["preset"]["name"] == "model_i"
    truth = load_truth(t1)
    assert len(truth) == 12 and {"theta_E", "q", "phi", "gamma1", "gamma2", "src_x", "src_y"} <= set(truth["val/no/1.npy"])
    assert len(truth["train/sphere/1.npy"]["sub_mass"]) == 25 and "vort_length" in truth["train/vort/3.npy"]

def test_task1_matches_real_format(t1, real_samples):
    real = _real(real_samples, "common_test_I")
    sim = [np.load(f) for f in sorted(t1.glob("*/*/*.npy"))]
    assert {(a.shape, a.dtype) for a in real} == {(a.shape, a.dtype) for a in sim} == {((1, 150, 150), np.dtype("float64"))}
    for group in (real, sim):
        assert all(a.min() == 0 and a.max() == 1 for a in group)
    # pixel statistics close to the real ones (means over images)
    rm, sm = np.mean([a.mean() for a in real]), np.mean([a.mean() for a in sim])
    rs, ss = np.mean([a.std() for a in real]), np.mean([a.std() for a in sim])
    assert abs(sm - rm) < 0.35 * rm and abs(ss - rs) < 0.35 * rs, (rm, sm, rs, ss)
    # sky background: pure Poisson counts of about ten (few zero pixels)
    for group in (real, sim):
        assert np.mean([(a == 0).mean() for a in group]) < 1e-3

def test_lens_finding_matches_real_format(tmp_path, real_samples):
    simulate_lens_finding(tmp_path / "lf", n_train_lenses=2, n_test_lenses=1, n_train_nonlenses=3, n_test_nonlenses=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "lf").iterdir() if p.is_dir()) == ["test_lenses", "test_nonlenses", "train_lenses", "train_nonlenses"]
    sim = [np.load(f) for f in sorted((tmp_path / "lf").glob("*/*.npy"))]
    real = _real(real_samples, "specific_test_II")
    assert {(a.shape, a.dtype) for a in real} == {(a.shape, a.dtype) for a in sim} == {((3, 64, 64), np.dtype("float32"))}
    for a in real + sim:  # each channel separately min-max scaled
        assert np.allclose(a.reshape(3, -1).min(1), 0) and np.allclose(a.reshape(3, -1).max(1), 1)

def test_diffusion_layout(tmp_path):
    simulate_diffusion(tmp_path / "d", n=4, progress=False)
    files = sorted((tmp_path / "d" / "Samples").glob("*.npy"))
    assert [f.name for f in files] == [f"sample{i}.npy" for i in (1, 2, 3, 4)]
    a = np.load(files[0]); assert a.shape == (1, 150, 150) and 0 <= a.min() and a.max() <= 1

def test_cli_same_seed_byte_identical(tmp_path, cli):
    for name in ("a", "b"):
        cli("simulate", "task1", "--out", tmp_path / name, "--n-train", 3, "--n-val", 3, "--seed", 7)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npy"))
    assert len(fa) == 6
    for f in fa: assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    cli("simulate", "task1", "--out", tmp_path / "c", "--n-train", 3, "--n-val", 0, "--seed", 8)
    assert (tmp_path / "a/train/no/1.npy").read_bytes() != (tmp_path / "c/train/no/1.npy").read_bytes()
    r = cli("simulate", "task1", "--out", tmp_path / "a", "--n-train", 3, check=False)
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr

def test_no_class_shortcut_in_ring_size():
    "The main-lens Einstein radius spread dwarfs what substructure mass adds, so ring size does not give the class away."
    p = get_preset("model_i")
    truth = [sample_truth(p, c, image_rng(11, c, i)) for i in range(400) for c in p.classes]
    te = np.array([t["theta_E"] for t in truth]); y = np.array([p.classes.index(t["label"]) for t in truth])
    spread = te.std()
    for c in (1, 2): assert abs(te[y == c].mean() - te[y == 0].mean()) < 0.35 * spread

def test_residual_features_see_substructure():
    "A smooth lens leaves only photon noise behind; a heavy, long vortex leaves coherent residuals."
    from deeplense_nb.simulate import simulate_batch, residual_features, RESIDUAL_FEATURES, GEOMETRY_FEATURES
    p = get_preset("model_i", vort_mass=3e11, vort_log_ma=(-23.7, -23.7))    # a 1.5" half-length vortex of 3e11 Msun
    x, y, _ = simulate_batch(2, preset=p, labels=[0, 2], seed=4)
    f = residual_features(x, starts=3, steps=150, refine=150)
    assert list(f.columns) == [*RESIDUAL_FEATURES, *GEOMETRY_FEATURES] and np.isfinite(f.values).all()
    assert f.loc[0, "chi2_ring"] < 1.5 and f.loc[0, "deviance_per_pixel"] < 1.25, f
    assert f.loc[1, "chi2_ring"] > 2 * f.loc[0, "chi2_ring"], f

def test_residual_features_real_samples(real_samples):
    "On the real Task I samples the smooth model explains every `no` image to the noise; vortices leave residuals."
    from deeplense_nb.simulate import residual_features
    files = {c: sorted((real_samples / "common_test_I" / c).glob("*.npy")) for c in ("no", "vort")}
    f = {c: residual_features(np.stack([np.load(p) for p in fs])) for c, fs in files.items()}
    assert f["no"]["chi2_inner"].max() < 1.5 and f["no"]["chi2_ring"].max() < 1.5, f["no"]
    assert f["vort"]["chi2_inner"].min() > f["no"]["chi2_inner"].max(), (f["no"], f["vort"])

def test_residual_classifier_contract():
    from deeplense_nb.simulate import residual_classifier, RESIDUAL_FEATURES
    from deeplense_nb.core import DeepLenseError
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 50)
    X = np.exp(rng.normal(size=(150, len(RESIDUAL_FEATURES))) * 0.2 + y[:, None] * 0.8)
    clf = residual_classifier(X, y)
    assert clf.predict_proba(X).shape == (150, 3) and (clf.predict(X) == y).mean() > 0.9
    with pytest.raises(DeepLenseError, match="residual_classifier"): residual_classifier(X[:, :3], y)
    X[0, 0] = np.nan
    with pytest.raises(DeepLenseError, match="finite"): residual_classifier(X, y)
