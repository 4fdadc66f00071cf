"""Evaluation: metrics equal scikit-learn's, operating points on a hand-made case, TTA invariance, a full report from
a tiny trained model (every key, every PNG), and `deeplense evaluate` on a checkpoint trained by deeplense_nb.training."""
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from torch import nn
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from deeplense_nb.core import DeepLenseError
from deeplense_nb.evaluation import (EvaluationError, Report, _d4_local, bootstrap_auc, calibration,
                                     classification_metrics, compare_runs, d4_views, evaluate, predict_probs,
                                     select_threshold, tpr_at_fpr)

torch.set_num_threads(1)

MULTI_KEYS = {"auc_macro", "auc_micro", "auc_per_class", "accuracy", "confusion_matrix", "classes",
              "balanced_accuracy", "report", "auc_ci", "ece", "reliability", "notes"}
BINARY_KEYS = {"auc", "average_precision", "tpr_at_fpr", "accuracy", "confusion_matrix", "threshold", "classes",
               "auc_ci", "ece", "thresholds_at_fpr", "youden", "balanced_accuracy", "report", "reliability", "notes"}


def _fixed(n=600, K=3, seed=0, signal=1.5):
    "Fixed, imperfect probabilities: softmax of noisy logits that favour the true class."
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    logits = rng.normal(size=(n, K)) + signal * np.eye(K)[y]
    p = np.exp(logits); p /= p.sum(1, keepdims=True)
    return p, y


# ---------------------------------------------------------------- metrics against scikit-learn
def test_multiclass_metrics_equal_sklearn():
    p, y = _fixed(K=3)
    m = classification_metrics(p, y, classes=["no", "sphere", "vort"], n_boot=0)
    pred = p.argmax(1)
    assert m["auc_macro"] == skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["auc_micro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="micro"), abs=1e-12)
    assert list(m["auc_per_class"].values()) == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average=None), abs=1e-12)
    assert m["accuracy"] == skm.accuracy_score(y, pred)
    assert m["balanced_accuracy"] == skm.balanced_accuracy_score(y, pred)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred)
    for k, c in enumerate(["no", "sphere", "vort"]):
        assert m["report"][c]["precision"] == pytest.approx(prec[k]) and m["report"][c]["recall"] == pytest.approx(rec[k])
        assert m["report"][c]["f1-score"] == pytest.approx(f1[k]) and m["report"][c]["support"] == sup[k]
    assert m["classes"] == ["no", "sphere", "vort"] and m["kind"] == "multiclass"
    assert MULTI_KEYS <= set(m)


def test_binary_metrics_equal_sklearn():
    p, y = _fixed(n=1000, K=2, signal=1.0)
    s = p[:, 1]
    m = classification_metrics(p, y, classes=["nonlens", "lens"], threshold=0.3, n_boot=0)
    assert m["auc"] == skm.roc_auc_score(y, s)
    assert m["average_precision"] == skm.average_precision_score(y, s)
    assert m["accuracy"] == skm.accuracy_score(y, s >= 0.3)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, s >= 0.3).tolist()
    assert m["threshold"] == 0.3
    fpr, tpr, thr = skm.roc_curve(y, s)
    i = np.argmax(tpr - fpr)
    assert m["youden"]["threshold"] == thr[i] and m["youden"]["j"] == pytest.approx(tpr[i] - fpr[i])
    assert list(m["tpr_at_fpr"]) == ["0.001", "0.01", "0.1"] and list(m["thresholds_at_fpr"]) == ["0.001", "0.01", "0.1"]
    assert BINARY_KEYS <= set(m)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_perfect_and_random_classifiers(K):
    rng = np.random.default_rng(K)
    y = np.arange(6000) % K
    perfect = np.full((len(y), K), 0.1 / (K - 1)); perfect[np.arange(len(y)), y] = 0.9
    rand = rng.dirichlet(np.ones(K), len(y))
    mp, mr = (classification_metrics(q, y, n_boot=0) for q in (perfect, rand))
    keys = ["auc"] if K == 2 else ["auc_macro", "auc_micro"]
    for k in keys:
        assert mp[k] == 1.0
        assert abs(mr[k] - 0.5) < 0.03, (k, mr[k])
    assert mp["accuracy"] == 1.0 and abs(mr["accuracy"] - 1 / K) < 0.03
    if K == 2:
        assert mp["tpr_at_fpr"] == {"0.001": 1.0, "0.01": 1.0, "0.1": 1.0}
        assert abs(mr["average_precision"] - 0.5) < 0.03


def test_tpr_at_fpr_and_thresholds_hand_case():
    # 10 negatives 0.0..0.9, 4 positives 0.95 0.85 0.55 0.05; positive iff score >= threshold
    y = np.r_[np.zeros(10), np.ones(4)]
    s = np.r_[np.arange(10) / 10, [0.95, 0.85, 0.55, 0.05]]
    ops = tpr_at_fpr(y, s, [0.0, 0.1, 0.25, 0.5, 1.0])
    assert ops["0"] == {"tpr": 0.25, "fpr": 0.0, "threshold": 0.95}
    assert ops["0.1"] == {"tpr": 0.5, "fpr": 0.1, "threshold": 0.85}
    assert ops["0.25"] == {"tpr": 0.5, "fpr": 0.1, "threshold": 0.85}
    assert ops["0.5"] == {"tpr": 0.75, "fpr": 0.4, "threshold": 0.55}
    assert ops["1"] == {"tpr": 1.0, "fpr": 0.9, "threshold": 0.05}
    yj = select_threshold(y, s)
    assert (yj["threshold"], yj["tpr"], yj["fpr"]) == (0.85, 0.5, 0.1) and yj["j"] == pytest.approx(0.4)
    assert select_threshold(y, s, method="fpr", fpr=0.5)["threshold"] == 0.55
    # nothing reaches FPR 0 with a positive: TPR 0, threshold null ("call nothing positive")
    assert tpr_at_fpr([0, 0, 1], [0.9, 0.8, 0.1], [0.0])["0"] == {"tpr": 0.0, "fpr": 0.0, "threshold": None}
    with pytest.raises(EvaluationError, match="expected one of 'youden', 'fpr'"): select_threshold(y, s, method="f1")


def test_tpr_at_fpr_matches_brute_force():
    rng = np.random.default_rng(1)
    y = (rng.uniform(size=400) < 0.2).astype(int)
    s = np.round(rng.normal(size=400) + y, 1)  # ties on purpose
    for f, o in tpr_at_fpr(y, s, [0.001, 0.01, 0.05, 0.1, 0.3]).items():
        best = (0.0, None)
        for t in np.unique(s)[::-1]:  # every threshold, highest first
            fp, tp = ((s >= t) & (y == 0)).mean() / (y == 0).mean(), ((s >= t) & (y == 1)).mean() / (y == 1).mean()
            if fp <= float(f) and tp > best[0]: best = (tp, t)
        assert o["tpr"] == pytest.approx(best[0]) and o["threshold"] == best[1], (f, o, best)


def test_bootstrap_ci_is_seeded_stratified_and_covers_the_point():
    p, y = _fixed(n=400, K=3)
    b = bootstrap_auc(p, y, n_boot=60, seed=0)
    auc = skm.roc_auc_score(y, p, multi_class="ovr")
    assert b["macro"]["low"] < auc < b["macro"]["high"] and len(b["per_class"]) == 3
    assert b == bootstrap_auc(p, y, n_boot=60, seed=0) and b != bootstrap_auc(p, y, n_boot=60, seed=1)
    # stratified: even a class with 2 members is in every resample, so the binary AUC is always defined
    pb, yb = _fixed(n=200, K=2)
    yb[:] = 0; yb[:2] = 1
    bb = bootstrap_auc(pb, yb, n_boot=100)
    assert 0 <= bb["low"] <= bb["high"] <= 1


def test_calibration_matches_sklearn():
    p, y = _fixed(n=800, K=3, signal=2.0)
    c = calibration(p, y, n_bins=10)
    acc, conf = calibration_curve(p.argmax(1) == y, p.max(1), n_bins=10)
    assert [v for v in c["accuracy"] if v is not None] == pytest.approx(acc, abs=1e-12)
    assert [v for v in c["confidence"] if v is not None] == pytest.approx(conf, abs=1e-12)
    assert c["ece"] == pytest.approx(sum(n / 800 * abs(a - f) for n, a, f in zip(c["count"], c["accuracy"], c["confidence"]) if n))
    assert calibration(np.tile([[0.0, 1.0]], (10, 1)), np.arange(10) % 2)["ece"] == pytest.approx(0.5)


def test_strict_json_when_a_class_is_missing():
    p, y = _fixed(n=300, K=3)
    m = classification_metrics(p[y < 2], y[y < 2], classes=["a", "b", "c"], n_boot=20)
    assert m["auc_macro"] is None and m["auc_per_class"]["c"] is None and m["auc_ci"] is None
    assert m["auc_per_class"]["a"] == pytest.approx(skm.roc_auc_score(y[y < 2] == 0, p[y < 2, 0]))
    pb, yb = _fixed(n=100, K=2)
    mb = classification_metrics(pb[yb == 0], yb[yb == 0], n_boot=20)
    assert mb["auc"] is None and mb["tpr_at_fpr"]["0.01"] is None and any("undefined" in n for n in mb["notes"])
    for d in (m, mb): json.dumps(d, allow_nan=False)


# ---------------------------------------------------------------- predictions, TTA, ensembles
def _random_cnn(seed=0, size=24, K=3):
    torch.manual_seed(seed)  # a flattening head: not rotation invariant at all
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * (size - 2) ** 2, K))


@pytest.mark.parametrize("views", ["package", "local"])
def test_tta_is_invariant_to_rot90(views, monkeypatch):
    if views == "local":  # the fallback used when deeplense_nb.data has no d4_transforms
        import deeplense_nb.evaluation as E
        monkeypatch.setattr(E, "d4_views", lambda x: [v.contiguous() for v in _d4_local(x)])
    net = _random_cnn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 24, 24, generator=g), torch.arange(16) % 3
    for k in (1, 2, 3):
        xr = torch.rot90(x, k, dims=(-2, -1))
        plain = [predict_probs(net, (a, y), device="cpu").probs for a in (x, xr)]
        tta = [predict_probs(net, (a, y), tta=True, device="cpu").probs for a in (x, xr)]
        assert np.abs(plain[0] - plain[1]).max() > 1e-3  # the network itself is not invariant
        np.testing.assert_allclose(tta[0], tta[1], atol=1e-6)
    xf = x.flip(-1)
    np.testing.assert_allclose(predict_probs(net, (xf, y), tta=True).probs, tta[0], atol=1e-6)


def test_d4_views_are_the_dihedral_group():
    img = torch.randn(1, 1, 6, 6)
    key = lambda vs: sorted(tuple(v.flatten().tolist()) for v in vs)
    for f in (d4_views, _d4_local):
        vs = f(img)
        assert len(vs) == 8 and len(set(key(vs))) == 8
        assert key(f(torch.rot90(img, 1, dims=(-2, -1)))) == key(vs) and key(f(img.transpose(-2, -1))) == key(vs)
    with pytest.raises(EvaluationError, match="square images"): d4_views(torch.zeros(1, 1, 4, 6))


def test_soft_ensemble_is_the_mean_of_members_and_models_are_restored():
    nets = [_random_cnn(seed=s) for s in (0, 1)]
    x, y = torch.randn(10, 1, 24, 24), torch.arange(10) % 3
    with torch.no_grad(): member = [n(x).softmax(1).double().numpy() for n in nets]
    nets[0].eval(); nets[1].train()
    pr = predict_probs(nets, (x, y), batch_size=4, device="cpu")
    np.testing.assert_allclose(pr.probs, np.mean(member, 0), atol=1e-6)
    assert pr.n_models == 2 and not nets[0].training and nets[1].training
    np.testing.assert_array_equal(pr.targets, y.numpy())


def test_bad_inputs_are_clear_errors(tmp_path):
    net = _random_cnn()
    x, y = torch.randn(4, 1, 24, 24), torch.arange(4) % 3
    cases = [
        (lambda: evaluate(net, (x, y), split="training"), "expected one of 'auto', 'all', 'train', 'val', 'test'"),
        (lambda: evaluate(net, (x, y[:3])), "to match x"),
        (lambda: evaluate(net, (x, y), classes=["a", "b"]), "pass 3 names"),
        (lambda: evaluate(net, {"x": x}), "cannot evaluate on data of type dict"),
        (lambda: evaluate(net, tmp_path / "missing"), "does not exist"),
        (lambda: evaluate(tmp_path / "no_run", (x, y)), "does not exist"),
        (lambda: evaluate(tmp_path, (x, y)), "no best.ckpt or last.ckpt"),
        (lambda: evaluate(nn.Linear(24, 1), (x, y)), "num_classes >= 2"),
        (lambda: evaluate(net, (x, torch.full((4,), 7))), "labels must lie in [0, 3)"),
        (lambda: evaluate(net, (x, y), threshold="best", n_boot=0), "expected one of 'youden'"),
    ]
    for f, msg in cases:
        if msg is None: f(); continue
        with pytest.raises(DeepLenseError, match=None) as e: f()
        assert msg in str(e.value), (msg, str(e.value))


# ---------------------------------------------------------------- the report from a tiny trained model
def _separable(n, seed, K=3, size=16):
    "Class 0: noise; class 1: a bright centred blob; class 2: a ring. Easy, but not trivially so."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    yy, xx = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    r = (xx ** 2 + yy ** 2).sqrt()
    shapes = torch.stack([torch.zeros(size, size), torch.exp(-r ** 2 / 8), torch.exp(-(r - 5) ** 2 / 2)])[:K]
    x = shapes[y] + 0.6 * torch.randn(n, size, size, generator=g)
    return x[:, None].float(), y


def _train(x, y, K, steps=40, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K))
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    hist, g = [], torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 10 == 9:
            hist.append({"epoch": step // 10 + 1, "train_loss": loss.item(), "valid_loss": loss.item() * 1.1, "roc_auc": 0.5 + step / 100})
    return net.eval(), hist


def _check_png(path):
    assert path.stat().st_size > 1000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 150 and img.shape[1] >= 150 and img.shape[2] in (3, 4), (path, img.shape)
    assert img[..., :3].std() > 0.01, f"{path} is a constant image"


@pytest.mark.parametrize("K", [3, 2])
def test_report_from_a_tiny_trained_model(K, tmp_path):
    x, y = _separable(300, seed=0, K=K)
    xv, yv = _separable(240, seed=1, K=K)
    net, hist = _train(x, y, K)
    classes = ["no", "sphere", "vort"] if K == 3 else ["nonlens", "lens"]
    rep = evaluate(net, (xv, yv), tta=True, classes=classes, history=hist, n_boot=100, device="cpu")
    m = rep.metrics
    assert (MULTI_KEYS if K == 3 else BINARY_KEYS) <= set(m)
    headline = m["auc_macro"] if K == 3 else m["auc"]
    assert headline > 0.9, m  # it learned the easy problem
    out = rep.save(tmp_path / "report")
    pngs = ["roc", "confusion_matrix", "score_hist", "reliability", "mistakes", "history"] + (["pr"] if K == 2 else [])
    for name in pngs: _check_png(out / f"{name}.png")
    assert (out / "pr.png").exists() == (K == 2)
    on_disk = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert on_disk["classes"] == classes and on_disk["evaluation"]["tta"] is True
    if K == 3: assert set(on_disk["auc_per_class"]) == set(classes) and on_disk["auc_macro"] == m["auc_macro"]
    else: assert set(on_disk["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"} and on_disk["threshold"] == 0.5
    md = (out / "report.md").read_text()
    for name in pngs: assert f"]({name}.png)" in md
    npz = np.load(out / "predictions.npz")
    np.testing.assert_array_equal(npz["targets"], yv.numpy())
    assert "ROC-AUC" in rep._repr_markdown_() and repr(rep).startswith(f"Report({m['kind']}")


def test_compare_runs(tmp_path):
    for i, (auc, t) in enumerate([(0.9, 10.0), (0.95, 100.0), (0.8, None)]):
        d = tmp_path / f"run{i}"; d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"model": f"m{i}", "roc_auc": auc, "train_time_s": t, "n_params": 10 * i}))
    tab = compare_runs(sorted(tmp_path.iterdir()))
    assert list(tab["model"]) == ["m1", "m0", "m2"] and list(tab["auc"]) == [0.95, 0.9, 0.8]
    from deeplense_nb.evaluation import plot_auc_vs_time
    fig = plot_auc_vs_time(tab); fig.savefig(tmp_path / "s.png"); _check_png(tmp_path / "s.png")
    with pytest.raises(EvaluationError, match="no metrics.json"): compare_runs([tmp_path / "nope"])


# ---------------------------------------------------------------- checkpoints + dataset folders (deeplense_nb.training/data)
@pytest.fixture(scope="module")
def task1_run(tmp_path_factory):
    from deeplense_nb.data import make_toy_dataset
    from deeplense_nb.classify import train_classifier
    root = tmp_path_factory.mktemp("eval_task1")
    data = make_toy_dataset(root / "data", layout="task1", n_per_class=12, img_size=32)
    train_classifier(data, model="cnn_baseline", epochs=2, batch_size=16, out=root / "run", device="cpu",
                     progress=False, sched="none")
    return data, root / "run"


def test_cli_evaluate_a_run(task1_run, tmp_path, cli):
    data, run = task1_run
    r = cli("evaluate", "--checkpoint", run, "--data", data, "--tta", "--n-boot", "20", "--device", "cpu", "--out", tmp_path / "rep")
    assert "AUC macro" in r.stdout and f"report written to {tmp_path / 'rep' / 'report.md'}" in r.stdout, r.stdout
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["classes"] == ["no", "sphere", "vort"] and m["n"] == 9 and m["evaluation"]["tta"] is True
    assert m["evaluation"]["models"] == [str(run / "best.ckpt")]
    for name in ("roc", "confusion_matrix", "score_hist", "reliability", "mistakes", "history"):
        _check_png(tmp_path / "rep" / f"{name}.png")
    import contextlib, io
    from deeplense_nb.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "x")])
    assert rc == 2 and err.getvalue().count("\n") == 1 and "does not exist" in err.getvalue(), err.getvalue()
    # nothing is replaced unless asked: an existing report needs --overwrite; a training run's folder is refused
    before = {f: f.read_bytes() for f in (*(tmp_path / "rep").iterdir(), *run.iterdir()) if f.is_file()}
    for out, extra, what in ((tmp_path / "rep", (), "already holds a report"), (run, ("--overwrite",), "is a training run")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--out", str(out), "--n-boot", "0", *extra])
        assert rc == 2 and err.getvalue().count("\n") == 1 and what in err.getvalue(), err.getvalue()
    assert before == {f: f.read_bytes() for f in (*(tmp_path / "rep").iterdir(), *run.iterdir()) if f.is_file()}
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "rep"), "--n-boot", "0", "--overwrite"]) == 0


def test_ensemble_of_checkpoints_on_a_folder(task1_run):
    from deeplense_nb.training import load_model
    data, run = task1_run
    one = evaluate(run, data, n_boot=0, device="cpu")
    two = evaluate([run / "best.ckpt", run / "last.ckpt"], data, n_boot=0, device="cpu")
    model, _ = load_model(run / "last.ckpt")
    last = evaluate(model, data, n_boot=0, device="cpu")
    np.testing.assert_allclose(two.probs, (one.probs + last.probs) / 2, atol=1e-6)
    assert two.metrics["evaluation"]["n_models"] == 2 and one.history is not None  # the run folder's history.csv
    with pytest.raises(EvaluationError, match="no 'test' split"): evaluate(run, data, split="test", n_boot=0)


def test_binary_checkpoint_on_the_test_split(tmp_path):
    from deeplense_nb.data import make_toy_dataset
    from deeplense_nb.classify import train_classifier
    data = make_toy_dataset(tmp_path / "data", layout="task2", n_per_class=6, n_val_per_class=3, img_size=32)
    train_classifier(data, model="cnn_baseline", epochs=1, batch_size=16, out=tmp_path / "run", device="cpu",
                     progress=False, sched="none")
    rep = evaluate(tmp_path / "run", data, split="test", n_boot=20, device="cpu")
    assert rep.metrics["classes"] == ["nonlens", "lens"] and rep.metrics["n"] == 3 + 12
    assert rep.metrics["class_counts"] == {"nonlens": 12, "lens": 3} and BINARY_KEYS <= set(rep.metrics)
    rep.save(tmp_path / "rep")
    _check_png(tmp_path / "rep" / "pr.png")
    with pytest.raises(EvaluationError, match="trained on classes"):
        evaluate(tmp_path / "run", make_toy_dataset(tmp_path / "t1", layout="task1", n_per_class=4, img_size=32), n_boot=0)
    big = make_toy_dataset(tmp_path / "t48", layout="task2", n_per_class=2, img_size=48)   # adaptive pooling would score it
    with pytest.raises(EvaluationError, match="the images are 48x48 but the model was trained on 32x32 images"):
        evaluate(tmp_path / "run", big, split="test", n_boot=0)


def test_checkpoints_are_evaluated_with_their_runs_preprocessing(tmp_path):
    "A run trained with standardisation and resizing is evaluated, predicted and exported behind the same input pipeline."
    from deeplense_nb.classify import train_classifier
    from deeplense_nb.checkpoint import load_model
    from deeplense_nb.data import make_toy_dataset
    from deeplense_nb.evaluation import WithPreprocessing, load_models
    root = make_toy_dataset(tmp_path / "toy", layout="task1", n_per_class=24, img_size=32)
    m = train_classifier(root, out=tmp_path / "run", model="cnn_baseline", epochs=3, batch_size=8, device="cpu", progress=False,
                         normalize="standardize", resize=16, augment=False)
    (net,), _, _ = load_models(tmp_path / "run" / "best.ckpt")
    assert isinstance(net, WithPreprocessing) and net.num_classes == 3
    rep = evaluate(tmp_path / "run" / "best.ckpt", root, split="val", device="cpu")
    assert abs(rep.metrics["auc_macro"] - m["roc_auc"]) < 1e-9   # the validation AUC of training, reproduced
    raw, _ = load_model(tmp_path / "run" / "best.ckpt")        # the bare network sees unnormalised full-size images
    assert abs(evaluate(raw, root, split="val", device="cpu").metrics["auc_macro"] - m["roc_auc"]) > 1e-6
    other = make_toy_dataset(tmp_path / "toy24", layout="task1", n_per_class=2, img_size=24)   # the run resizes: any size
    assert evaluate(tmp_path / "run", other, split="val", device="cpu", n_boot=0).metrics["n"] == 3
