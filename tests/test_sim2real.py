"""The sim-to-real experiment runs headless (`deeplense run sim2real -p quick True`) and writes metrics.json in its schema."""
import json, math
from pathlib import Path
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from deeplense_nb.core import CLASSES_T1

def test_sim2real_quick(tmp_path, cli):
    out = tmp_path / "s2r"
    r = cli("run", "sim2real", "-p", "quick", "True", "--out", out, timeout=900)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    n_real = len([f for f in Path(m["real_dir"]).rglob("*.npy") if f.parent.name in CLASSES_T1])
    assert set(m["methods"]) >= {"residual", "residual_vortex", "cnn", "residual_cnn", "residual+residual_cnn"} and m["best_method"] in m["methods"]
    assert m["n_real"] == n_real > 0 and m["methods"]["residual_cnn"]["n_networks"] == m["settings"]["rcnn_seeds"] >= 1
    assert len(m["methods"]["residual_cnn"]["auc_macro_single_networks"]) == m["settings"]["rcnn_seeds"]
    st, c = m["settings"], m["methods"]["cnn"]   # the raw-pixel CNN: a stream of fresh simulations of the central field
    assert c["field"] == st["cnn_field"] and c["n_train"] == st["cnn_epochs"] * st["cnn_epoch_size"] and 0 <= c["sim_auc_macro"] <= 1
    assert (out / "residual_cnn_0" / "best.ckpt").is_file() and (out / "residual_maps.png").is_file()
    assert not (out / "residual_maps").exists()   # the network inputs are not kept: they are rebuilt from the seed
    for name, v in m["methods"].items():
        assert {"auc_macro", "accuracy", "n", "auc_ci", "confusion"} <= set(v), (name, sorted(v))
        assert v["n"] == n_real and 0 <= v["auc_macro"] <= 1 and 0 <= v["accuracy"] <= 1
        assert len(v["auc_ci"]) == 2 and all(math.isfinite(x) and 0 <= x <= 1 for x in v["auc_ci"]) and v["auc_ci"][0] <= v["auc_ci"][1]
        cm = np.array(v["confusion"]); assert cm.shape == (3, 3) and cm.sum() == n_real
        assert (out / f"confusion_{name}.png").is_file()
    pred = pd.read_csv(out / "predictions.csv")   # every real image with each method's probabilities and call
    assert len(pred) == n_real and (pred["class"] == [Path(f).parent.name for f in pred["file"]]).all()   # the class is the file's folder
    for name, v in m["methods"].items():
        p = pred[[f"{name}:p_{c}" for c in CLASSES_T1]].to_numpy(); assert np.allclose(p.sum(1), 1, atol=1e-4), name
        assert abs((pred[f"{name}:pred"] == pred["class"]).mean() - v["accuracy"]) < 1e-9, name
    sh = m["shift"]   # every method also scored images of a second simulator it never trained on
    assert sh["preset"] == m["settings"]["shift_preset"] == "deeplensesim_recipe" and sh["n"] == m["settings"]["n_shift"] > 0
    assert all(0 <= v["shift_auc_macro"] <= 1 and np.array(v["shift_confusion"]).sum() == v["shift_n"] for v in m["methods"].values())
    n_vf = m["settings"]["n_vortex_fit"]   # residual_vortex: trained on the vortex fits of the first n_vortex_fit training images, scored on a third as many shifted ones
    assert {k: v["shift_n"] for k, v in m["methods"].items()} == {k: max(3, n_vf // 3) if k == "residual_vortex" else sh["n"] for k in m["methods"]}
    assert m["methods"]["residual_vortex"]["n_train"] == n_vf and "vortex_gain" in m["methods"]["residual_vortex"]["features"]
    assert all(0 <= v <= 1 for v in m["methods"]["residual_vortex"]["residual_on_same_images"].values())   # like for like with `residual`
    assert set(sh["feature_medians"]) == {f"{src} {c}" for src in ("model_i", "deeplensesim_recipe") for c in CLASSES_T1}
    assert m["auc_macro"] == m["methods"][m["best_method"]]["auc_macro"] == max(v["auc_macro"] for v in m["methods"].values())
    cs = m["consistency"]   # each class's real images among the simulated ones of both simulators: quantiles and KS p
    assert set(cs) == {"model_i", "deeplensesim_recipe"} and all(set(d) == set(CLASSES_T1) for d in cs.values())
    assert all(sum(v["n"] for v in d.values()) == n_real for d in cs.values())
    assert all(0 <= v["ks_p"] <= 1 and len(v["quantiles"]) == v["n"] and all(0 <= q <= 1 for q in v["quantiles"]) for d in cs.values() for v in d.values())
    so = m["source_offset"]   # the fitted source distances from the lens centre, real against simulated
    assert 0 <= so["ks_p"] <= 1 and set(so["median"]) == set(so["within_0.05"]) == {"real", "sim"}
    vf, n_vort = m["vortex_fit"], sum(Path(f).parent.name == "vort" for f in Path(m["real_dir"]).rglob("*.npy"))   # the fitted vortices, real and simulated
    assert vf["n"]["real"] == n_vort and 1 <= vf["n"]["sim"] <= n_vf and all(0 <= p <= 1 for p in vf["ks_p"].values())
    assert set(vf["vortex_gain"]) == {"real", "sim"} and all(g >= 0 for d in vf["vortex_gain"].values() for g in d.values())
    assert all(v["vort_mass"] > 0 and v["vort_length"] > 0 and v["vort_offset"] >= 0 for v in vf["median"].values())
    fm = m["fit_match"]   # fit-matching: per-class medians of the residual features and the fit, real and simulated
    assert {f"{src} {c}" for src in ("real", "sim") for c in CLASSES_T1} <= set(fm)
    assert all({"chi2_ring", "fit_q", "fit_psf_fwhm"} <= set(row) for row in fm.values())
    t2 = m["task2"]   # the lens finder trained on simulated cutouts, scored on every real (or stand-in) cutout
    n_ii = len([f for f in Path(t2["real_dir"]).rglob("*.npy") if f.parent.name.endswith("lenses")])
    assert t2["n"] == n_ii > 0 and 0 < t2["n_lenses"] < n_ii and 0 <= t2["auc"] <= 1 and 0 <= t2["average_precision"] <= 1
    p2 = pd.read_csv(out / "predictions_task2.csv")
    assert len(p2) == n_ii and abs(roc_auc_score(p2["lens"], p2["p_lens"]) - t2["auc"]) < 1e-9
    assert t2["auc_ci"][0] <= t2["auc_ci"][1] and set(t2["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    assert t2["n_networks"] == m["settings"]["lf_seeds"] == len(t2["auc_single_networks"]) >= 1
    assert {src: set(d) for src, d in t2["cutout_stats"].items()} == {s: {"lenses", "nonlenses"} for s in ("real", "sim", "sim_fixed_colours", "sim_before")}
    assert all(len(c["noise_to_last_band"]) == 3 and c["noise_to_last_band"][2] == 1 for d in t2["cutout_stats"].values() for c in d.values())

def test_sim2real_refuses_bad_real_folders(tmp_path, cli):
    "A folder that is not a Task I class, or images of another size than the simulator's: one line that names them, before any fit."
    rng = np.random.default_rng(0)
    for name, folders, shape, msg in (("classes", ("no", "axion"), (150, 150), "folder(s) axion are not classes of this task"),
                                      ("size", ("no", "vort"), (1, 64, 64), "the images are 1x64x64, but preset 'model_i' simulates 1x150x150")):
        for f in folders:
            (tmp_path / name / f).mkdir(parents=True); np.save(tmp_path / name / f / "1.npy", rng.random(shape))
        r = cli("run", "sim2real", "-p", "quick", "True", "-p", "real_dir", tmp_path / name, "--out", tmp_path / f"out_{name}", check=False)
        assert r.returncode == 2 and "failed in cell" in r.stderr and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
