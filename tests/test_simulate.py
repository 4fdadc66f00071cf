"""Simulator: real layouts/dtypes/ranges (checked against the real samples when present), CLI, determinism."""
import json
from pathlib import Path
import numpy as np
import torch
import pytest
from deeplense_nb.simulate import cutout_stats, simulate_task1, simulate_lens_finding, simulate_diffusion, load_truth, sample_truth, get_preset, image_rng

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

def test_lens_finding_cutouts_like_the_real_ones(real_samples):
    "The measured sim-to-real differences the preset was calibrated on: per-band sky noise and its band-to-band ratio, compact non-lenses, bright arcs."
    from deeplense_nb.simbatch import render_lens_finding_batch, sample_lens_finding_batch
    real = {c: cutout_stats(np.stack([np.load(f) for f in sorted((real_samples / "specific_test_II").glob(f"*_{c}/*.npy"))]))
            for c in ("lenses", "nonlenses")}
    sim = {c: cutout_stats(render_lens_finding_batch(sample_lens_finding_batch(labels=torch.full((200,), lab), seed=3)).numpy())
           for c, lab in (("lenses", 1), ("nonlenses", 0))}
    for c in real:
        r, s = np.array(real[c]["sky_noise"]), np.array(sim[c]["sky_noise"])
        assert r[0] > r[1] > r[2] and s[0] > s[1] > s[2] and np.all(s / r < 2.5) and np.all(r / s < 2.5), (c, r, s)
        r, s = np.array(real[c]["annulus_to_core"]), np.array(sim[c]["annulus_to_core"])
        assert np.all(s / r < 2) and np.all(r / s < 2), (c, r, s)
        r, s = np.array(real[c]["noise_to_last_band"]), np.array(sim[c]["noise_to_last_band"])   # band-to-band noise: no class shortcut
        assert np.all(s / r < 1.5) and np.all(r / s < 1.5), (c, r, s)
    for src in (real, sim):  # lenses: light around the centre (arcs), brightest in g; non-lenses: compact
        assert src["lenses"]["annulus_to_core"][0] > 2 * src["nonlenses"]["annulus_to_core"][0]

def test_a_split_without_images_has_no_folders(tmp_path):
    "Simulated sets with an empty split are read by the package's loaders (empty class folders would be refused)."
    from deeplense_nb.data import FolderDataset
    simulate_task1(tmp_path / "t1", n_train=6, n_val=0, progress=False)
    simulate_lens_finding(tmp_path / "t2", n_train_lenses=2, n_test_lenses=0, n_train_nonlenses=2, n_test_nonlenses=0, progress=False)
    assert not (tmp_path / "t1" / "val").exists() and not (tmp_path / "t2" / "test_lenses").exists()
    assert [(len(d), d.split_names) for d in map(FolderDataset, (tmp_path / "t1", tmp_path / "t2"))] == [(6, ("train",)), (4, ("train",))]

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
    for args, what in ((("task1", "--batch-size", 0), "--batch-size must be an integer >= 1, got 0."),
                       (("lens-finding", "--train-ratio", -1), "--train-ratio -1: non-lenses per lens must be >= 0")):
        r = cli("simulate", *args, "--out", tmp_path / "d", check=False)   # checked up front: no progress bar, no folder
        assert r.returncode == 2 and r.stderr.strip() == f"deeplense simulate: error: {what}" and not (tmp_path / "d").exists(), r.stderr

def test_no_class_shortcut_in_ring_size():
    "The main-lens Einstein radius spread dwarfs what substructure mass adds, so ring size does not give the class away."
    p = get_preset("model_i")
    truth = [sample_truth(p, c, image_rng(11, c, i)) for i in range(400) for c in p.classes]
    te = np.array([t["theta_E"] for t in truth]); y = np.array([p.classes.index(t["label"]) for t in truth])
    spread = te.std()
    for c in (1, 2): assert abs(te[y == c].mean() - te[y == 0].mean()) < 0.35 * spread

def _one_line_busy(rc, err, out):
    lines = err.strip().splitlines()
    return rc == 2 and "Traceback" not in err and len(lines) == 1 and "another simulation is writing" in lines[0] and str(out) in lines[0]

def test_overwrite_while_another_writes(tmp_path, cli):
    "A writer that finds the folder locked exits 2 with one line naming it, and leaves the dataset as it was."
    from deeplense_nb.simulate import _dataset_lock
    out = tmp_path / "t1"
    cli("simulate", "task1", "--out", out, "--n-train", 3, "--n-val", 0)
    before = (out / "train/no/1.npy").read_bytes()
    with _dataset_lock(out.absolute()):
        r = cli("simulate", "task1", "--out", out, "--n-train", 3, "--n-val", 0, "--seed", 9, "--overwrite", check=False)
    assert _one_line_busy(r.returncode, r.stderr, out), (r.returncode, r.stderr)
    assert (out / "train/no/1.npy").read_bytes() == before and len(load_truth(out)) == 3

def test_concurrent_overwrite(tmp_path, cli):
    "Two `deeplense simulate --overwrite` into one folder at once: both succeed, or the loser fails with one line; never a half-written dataset."
    import os, subprocess, sys
    out = tmp_path / "t1"
    cli("simulate", "task1", "--out", out, "--n-train", 3, "--n-val", 0)   # the dataset both runs overwrite
    cmd = [sys.executable, "-m", "deeplense_nb.cli", "simulate", "task1", "--out", str(out), "--n-train", "60", "--n-val", "6", "--overwrite"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for s in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    res = [(p.returncode, so, se) for p, (so, se) in zip(procs, outs)]
    codes = sorted(rc for rc, _, _ in res)
    assert codes in ([0, 0], [0, 2]), res
    for rc, so, se in res:
        assert "Traceback" not in se and (rc == 0 or _one_line_busy(rc, se, out)), (rc, se)
    truth, man = load_truth(out), json.loads((out / "manifest.json").read_text())
    assert man["images"] == len(truth) == 66 and all((out / f).is_file() for f in truth)
    assert len(list(out.rglob("*.npy"))) == 66 and sorted(p.name for p in tmp_path.iterdir()) == ["t1"]
