"""Deployment: import-weights (torch, JSON, Hugging Face ConvNeXt-V2), ONNX export, predict on real .npy files, and
the wheel (experiment notebooks and subpackages shipped)."""
import json, re, shutil, subprocess, sys, zipfile
import numpy as np
import pandas as pd
import pytest
import torch
from deeplense_nb.checkpoint import load_model
from deeplense_nb.data import open_dataset
from deeplense_nb.deploy import DeployError, export_onnx, find_npy, import_weights, predict_files
from deeplense_nb.evaluation import predict_probs
from deeplense_nb.models import MissingDependencyError, create_model, model_entry


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads(); torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def _same_logits(ckpt, ref, in_chans, size=48):
    m, _ = load_model(ckpt)
    x = torch.rand(2, in_chans, size, size)
    ref.eval()
    with torch.no_grad(): torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- import-weights
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module.", "model.", "backbone."])
def test_import_torch_state_dicts(tmp_path, wrap):
    torch.manual_seed(0)
    ref = create_model("cnn_baseline", in_chans=1, num_classes=3)
    sd = ref.state_dict()
    if wrap in ("state_dict", "model"): obj = {wrap: sd, "epoch": 3}
    elif wrap == "backbone.": obj = {"backbone." + k: v for k, v in sd.items()}  # a wrapper module around our model
    elif wrap != "plain": obj = {wrap + k: v for k, v in sd.items()}
    else: obj = sd
    torch.save(obj, tmp_path / "w.pth")
    rep = import_weights(tmp_path / "w.pth", model="cnn_baseline", out=tmp_path / "m.ckpt")
    assert rep.complete and rep.head == "loaded" and not rep.unexpected and len(rep.matched) == len(sd)
    _same_logits(tmp_path / "m.ckpt", ref, 1)


def test_import_torchvision_names_prefixed(tmp_path):
    import torchvision
    tv = torchvision.models.resnet18(num_classes=2)
    torch.save({"state_dict": {"model.backbone." + k: v for k, v in tv.state_dict().items()}}, tmp_path / "w.pt")
    rep = import_weights(tmp_path / "w.pt", model="resnet18", out=tmp_path / "m.ckpt")  # in_chans 3, classes 2 from the file
    assert rep.complete and rep.layout == "torchvision"
    _same_logits(tmp_path / "m.ckpt", tv, 3, 64)


def test_import_json_weights(tmp_path, cli):
    torch.manual_seed(1)
    ref = create_model("cnn_baseline", in_chans=1, num_classes=3)
    (tmp_path / "w.json").write_text(json.dumps({k: v.tolist() for k, v in ref.state_dict().items()}))
    r = cli("import-weights", tmp_path / "w.json", "--model", "cnn_baseline", "--classes", "no,sphere,vort",
            "--out", tmp_path / "m.ckpt")
    assert "matched" in r.stdout and "0 of another shape" in r.stdout
    _same_logits(tmp_path / "m.ckpt", ref, 1)
    assert load_model(tmp_path / "m.ckpt")[1]["config"]["classes"] == ["no", "sphere", "vort"]


def _timm_to_hf(sd):
    "timm ConvNeXt-V2 names -> Hugging Face ConvNextV2ForImageClassification names (written out independently)."
    block = {"conv_dw": "dwconv", "norm": "layernorm", "mlp.fc1": "pwconv1", "mlp.grn": "grn", "mlp.fc2": "pwconv2"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("stem.0."): n = "embeddings.patch_embeddings." + p[-1]
        elif k.startswith("stem.1."): n = "embeddings.layernorm." + p[-1]
        elif p[0] == "stages" and p[2] == "downsample": n = f"encoder.stages.{p[1]}.downsampling_layer.{p[3]}.{p[4]}"
        elif p[0] == "stages":
            n = f"encoder.stages.{p[1]}.layers.{p[3]}.{block['.'.join(p[4:-1])]}.{p[-1]}"
            if "grn" in k: v = v.reshape(1, 1, 1, -1)
        elif k.startswith("head.norm."): n = "layernorm." + p[-1]
        elif k.startswith("head.fc."): out["classifier." + p[-1]] = v; continue
        else: raise AssertionError(k)
        out["convnextv2." + n] = v
    return out


@pytest.mark.skipif(not model_entry("convnextv2_tiny").available, reason="timm is not installed")
def test_import_hugging_face_convnextv2(tmp_path):
    import timm
    torch.manual_seed(0)
    src = timm.create_model("convnextv2_atto", num_classes=3, in_chans=1).eval()
    hf = _timm_to_hf(src.state_dict())
    assert "convnextv2.encoder.stages.0.layers.0.grn.weight" in hf and "classifier.weight" in hf
    torch.save(hf, tmp_path / "pytorch_model.bin")
    rep = import_weights(tmp_path / "pytorch_model.bin", model="timm/convnextv2_atto", out=tmp_path / "m.ckpt")
    assert rep.reading == "hugging face convnextv2" and rep.complete and not rep.unexpected and rep.head == "loaded"
    _same_logits(tmp_path / "m.ckpt", src, 1, 64)


def test_import_refusals(tmp_path, cli):
    torch.save(create_model("cnn_baseline", in_chans=1, num_classes=3, hidden=64).state_dict(), tmp_path / "w.pt")
    r = cli("import-weights", tmp_path / "w.pt", "--model", "cnn_baseline", "--out", tmp_path / "a.ckpt", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "2 of another shape" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "a.ckpt").exists()
    r = cli("import-weights", tmp_path / "w.pt", "--model", "resnet18", "--out", tmp_path / "a.ckpt", check=False)
    assert r.returncode == 2 and "do not fit model 'resnet18'" in r.stderr and "of another shape" in r.stderr
    torch.save({"x.weight": torch.zeros(3)}, tmp_path / "other.pt")
    r = cli("import-weights", tmp_path / "other.pt", "--model", "resnet18", "--out", tmp_path / "a.ckpt", check=False)
    assert r.returncode == 2 and "no tensor matches model 'resnet18'" in r.stderr
    r = cli("import-weights", tmp_path / "w.pt", "--model", "cnn_baseline", "--allow-partial", "--out", tmp_path / "a.ckpt")
    assert "head of another shape" in r.stdout and (tmp_path / "a.ckpt").exists()
    r = cli("import-weights", tmp_path / "w.pt", "--model", "cnn_baseline", "--model-kwargs", "{\"hidden\": 64}", "--out", tmp_path / "a.ckpt", check=False)
    assert r.returncode == 2 and "pass --overwrite" in r.stderr
    cli("import-weights", tmp_path / "w.pt", "--model", "cnn_baseline", "--model-kwargs", "{\"hidden\": 64}", "--out", tmp_path / "a.ckpt", "--overwrite")
    r = cli("import-weights", tmp_path / "w.pt", "--model", "cnn_baseline", "--model-kwargs", "[64]", "--out", tmp_path / "b.ckpt", check=False)
    assert r.returncode == 2 and "--model-kwargs must be a JSON object" in r.stderr and not (tmp_path / "b.ckpt").exists()



def _one_line_error(r, *parts):
    "A refusal as the project promises it: exit 2, nothing on stdout, one line on stderr naming the problem."
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r
    for p in parts: assert p in r.stderr, (p, r.stderr)


def _main(capsys, *args):
    "`deeplense ARGS` in this process (quicker than `cli` for many refusals), as a CompletedProcess."
    from deeplense_nb.cli import main
    rc = main([str(a) for a in args]); o = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, o.out, o.err)


def test_import_refuses_a_head_of_another_shape_and_bad_counts(tmp_path, capsys):
    "Weights of a 3-class model imported for 2 classes were written with a random head (exit 0); 0 meant 'not given'."
    torch.save(create_model("cnn_baseline", in_chans=1, num_classes=3).state_dict(), tmp_path / "w.pt")
    imp = lambda *a: _main(capsys, "import-weights", tmp_path / "w.pt", "--model", "cnn_baseline", *a, "--out", tmp_path / "c.ckpt")
    _one_line_error(imp("--classes", "a,b"), "w.pt: the file's head has 3 classes but --classes/--num-classes ask for 2", "--allow-partial")
    _one_line_error(imp("--num-classes", "2"), "head has 3 classes")
    _one_line_error(imp("--classes", ",,"), "--classes ',,': give distinct, non-empty class names")
    _one_line_error(imp("--classes", "a,a,a"), "--classes 'a,a,a': give distinct")
    _one_line_error(imp("--num-classes", "0"), "--num-classes must be an integer >= 1, got 0")
    _one_line_error(imp("--in-chans", "0"), "--in-chans must be an integer >= 1, got 0")
    assert not (tmp_path / "c.ckpt").exists()
    r = imp("--classes", "a,b", "--allow-partial")
    assert r.returncode == 0 and "head of another shape" in r.stdout and load_model(tmp_path / "c.ckpt")[0].num_classes == 2

def test_import_never_unpickles_code(tmp_path, cli):
    marker = tmp_path / "pwned"
    class Evil:
        def __reduce__(self): return (open, (str(marker), "w"))
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.pt")
    r = cli("import-weights", tmp_path / "evil.pt", "--model", "cnn_baseline", "--out", tmp_path / "m.ckpt", check=False)
    assert r.returncode == 2 and "unpickling can execute code" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not marker.exists() and not (tmp_path / "m.ckpt").exists()


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture
def ckpt_t1(tmp_path):
    torch.manual_seed(0)
    torch.save(create_model("lensnet", in_chans=1, num_classes=3).state_dict(), tmp_path / "w.pt")
    import_weights(tmp_path / "w.pt", model="lensnet", classes=["no", "sphere", "vort"], out=tmp_path / "t1.ckpt")
    return tmp_path / "t1.ckpt"


def test_export_onnx(ckpt_t1, tmp_path, cli):
    import onnx, onnxruntime as ort
    r = cli("export", ckpt_t1, "--format", "onnx", "--out", tmp_path / "m.onnx", "--img-size", "150")
    assert "max abs difference" in r.stdout
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert json.loads({p.key: p.value for p in m.metadata_props}["classes"]) == ["no", "sphere", "vort"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    net, _ = load_model(ckpt_t1)
    for b in (1, 7):  # dynamic batch axis
        x = torch.rand(b, 1, 150, 150)
        with torch.no_grad(): np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], net(x).numpy(), atol=1e-4)
    r = cli("export", ckpt_t1, "--out", tmp_path / "m.onnx", check=False)
    assert r.returncode == 2 and "pass --overwrite" in r.stderr


def test_export_that_fails_its_check_writes_nothing(ckpt_t1, tmp_path):
    "The onnxruntime check runs on the temporary file: a model that fails it never reaches --out, nor replaces an old one."
    with pytest.raises(DeployError, match="disagrees with PyTorch"): export_onnx(ckpt_t1, tmp_path / "m.onnx", img_size=32, atol=-1)
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx.tmp*"))
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(DeployError, match="nothing was written"):
        export_onnx(ckpt_t1, tmp_path / "m.onnx", img_size=32, atol=-1, overwrite=True)
    assert (tmp_path / "m.onnx").read_bytes() == b"old"



def test_export_failure_is_one_line(tmp_path, cli):
    "cnn_baseline at 150 px: the exporter printed ~59 lines of TorchScript graph on stdout, then 'unexpected SymbolicValueError'."
    torch.save(create_model("cnn_baseline", in_chans=1, num_classes=3).state_dict(), tmp_path / "w.pt")
    import_weights(tmp_path / "w.pt", model="cnn_baseline", out=tmp_path / "c.ckpt")
    r = cli("export", tmp_path / "c.ckpt", "--out", tmp_path / "m.onnx", "--img-size", "150", check=False)
    _one_line_error(r, "c.ckpt: this model cannot be exported to ONNX at 1x150x150", "adaptive_avg_pool2d", "try --img-size 128")
    assert "unexpected" not in r.stderr and not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".m.onnx*"))


@pytest.mark.parametrize("kw, msg", [({"opset": 99}, "--opset 99: torch"), ({"opset": 5}, "exports ONNX opsets 7 to"),
                                     ({"img_size": [0]}, "--img-size must be an integer >= 1, got 0"),
                                     ({"img_size": [64, 64, 64]}, "--img-size 64 64 64: give H, or H and W")])
def test_export_checks_its_options_first(tmp_path, kw, msg):
    "A bad --opset or --img-size is refused before the checkpoint is read (opset 5 printed onnxruntime warnings, 99 a graph)."
    with pytest.raises(DeployError, match=re.escape(msg)): export_onnx(tmp_path / "absent.ckpt", tmp_path / "m.onnx", **kw)
    assert not (tmp_path / "m.onnx").exists()


def test_out_must_not_be_a_folder(ckpt_t1, real_samples, tmp_path, cli):
    "--out FOLDER --overwrite failed after the whole prediction with '.outdir.tmp123 -> outdir: Is a directory'."
    (tmp_path / "outdir").mkdir()
    for cmd in (["predict", ckpt_t1, real_samples / "common_test_I"], ["export", ckpt_t1]):
        r = cli(*cmd, "--out", tmp_path / "outdir", "--overwrite", check=False)
        _one_line_error(r, f"{tmp_path / 'outdir'} is a folder; --out names the file to write")
    assert list((tmp_path / "outdir").iterdir()) == []

def test_export_without_onnx_names_the_extra(ckpt_t1, tmp_path, monkeypatch):
    import deeplense_nb.deploy as D
    real = D.importlib.import_module
    def fake(name, *a, **k):
        if name.startswith("onnx"): raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)
    monkeypatch.setattr(D.importlib, "import_module", fake)
    with pytest.raises(MissingDependencyError, match=r'pip install "deeplense-nb\[onnx\]"'):
        export_onnx(ckpt_t1, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_extra_declared(root):
    import tomllib
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["onnx"] == ["onnx>=1.16", "onnxruntime>=1.18"]


# ---------------------------------------------------------------------------------------------- predict
def test_predict_real_samples_like_evaluation(real_samples, ckpt_t1, tmp_path, cli):
    folder = real_samples / "common_test_I"
    out = tmp_path / "preds.csv"
    r = cli("predict", ckpt_t1, folder, "--out", out, "--batch-size", "4", "--device", "cpu")
    df = pd.read_csv(out)
    assert len(df) == 15 and list(df.columns) == ["file", "p_no", "p_sphere", "p_vort", "pred"] and "15 files" in r.stdout
    np.testing.assert_allclose(df[["p_no", "p_sphere", "p_vort"]].sum(axis=1), 1, atol=1e-6)
    # the same probabilities as evaluation's loop over the dataset reader (same preprocessing)
    ds = open_dataset(folder)
    ref = predict_probs(load_model(ckpt_t1)[0], ds, device="cpu").probs
    got = df.set_index("file").loc[[str(f) for f in ds.files], ["p_no", "p_sphere", "p_vort"]].to_numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    r = cli("predict", ckpt_t1, folder, "--out", out, check=False)  # never overwrites
    assert r.returncode == 2 and "pass --overwrite" in r.stderr
    cli("predict", ckpt_t1, folder / "no" / "1.npy", "--out", out, "--overwrite", "--tta", "d4")
    assert len(pd.read_csv(out)) == 1


def test_predict_lens_finding_samples_recursive(real_samples, tmp_path, cli):
    torch.save(create_model("cnn_baseline", in_chans=3, num_classes=2).state_dict(), tmp_path / "w.pt")
    import_weights(tmp_path / "w.pt", model="cnn_baseline", classes=["nonlens", "lens"], out=tmp_path / "t2.ckpt")
    df = predict_files(tmp_path / "t2.ckpt", [real_samples / "specific_test_II"], device="cpu")
    assert len(df) == 20 and set(df["pred"]) <= {"nonlens", "lens"}
    r = cli("predict", tmp_path / "t2.ckpt", real_samples / "common_test_I", "--out", tmp_path / "p.csv", check=False)
    assert r.returncode == 2 and "has 1 channel(s) but the model takes 3" in r.stderr and not (tmp_path / "p.csv").exists()



@pytest.mark.parametrize("bs", ["0", "-1"])
def test_predict_refuses_batch_size_below_1(ckpt_t1, tmp_path, capsys, bs):
    "--batch-size 0 gave 'unexpected ValueError: range() arg 3 must not be zero'."
    (tmp_path / "a.npy").write_bytes(b"")  # never read: the option is checked first
    r = _main(capsys, "predict", ckpt_t1, tmp_path / "a.npy", "--out", tmp_path / "p.csv", "--batch-size", bs)
    _one_line_error(r, f"--batch-size must be an integer >= 1, got {bs}")
    assert not (tmp_path / "p.csv").exists()

def test_predict_every_layout(ckpt_t1, tmp_path, cli):
    rng = np.random.default_rng(0)
    d = tmp_path / "files" / "deep" / "er"; d.mkdir(parents=True)
    img = rng.random((64, 64))
    np.save(d / "a_chw_f64.npy", img[None])
    np.save(d / "b_hw_f32.npy", img.astype(np.float32))
    np.save(d / "b_hw1_f32.npy", img[:, :, None].astype(np.float32))  # channel-last single band
    obj = np.empty(2, dtype=object); obj[0], obj[1] = img, 1e-23  # Model II/III [image, axion mass]
    np.save(tmp_path / "files" / "c_obj.npy", obj, allow_pickle=True)
    r = cli("predict", ckpt_t1, tmp_path / "files", "--out", tmp_path / "p.csv", check=False)
    assert r.returncode == 2 and "allow_pickle" in r.stderr
    cli("predict", ckpt_t1, tmp_path / "files", "--out", tmp_path / "p.csv", "--allow-pickle")
    df = pd.read_csv(tmp_path / "p.csv")
    assert len(df) == 4
    p = df[["p_no", "p_sphere", "p_vort"]].to_numpy()
    for i in (1, 2, 3): np.testing.assert_allclose(p[0], p[i], atol=1e-6)  # the same image in every layout
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeployError, match="no .npy files"): find_npy([tmp_path / "empty"])


# ---------------------------------------------------------------------------------------------- the wheel
@pytest.mark.slow  # about 10 s alone, a minute on a busy machine
def test_wheel_ships_experiments_and_subpackages(root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"): shutil.copy(root / f, src / f)
    shutil.copytree(root / "deeplense_nb", src / "deeplense_nb", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "nbs" / "experiments", src / "nbs" / "experiments", ignore=shutil.ignore_patterns("_tmp*", ".*"))
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    whl = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    shipped = {n.split("/")[-1] for n in names if n.startswith("deeplense_nb/experiments_nbs/")}
    assert shipped == {p.name for p in (root / "nbs" / "experiments").glob("*.ipynb")} and "task1.ipynb" in shipped
    for sub in ("data/files.py", "diffusion/unet.py", "deploy.py", "equivariant.py"): assert f"deeplense_nb/{sub}" in names
    # installed (here: unpacked) without a checkout, `deeplense run` finds its notebooks in the package
    site = tmp_path / "site"; zipfile.ZipFile(whl).extractall(site)
    code = "from deeplense_nb.experiments import experiment_path; print(experiment_path('task1'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(site / "deeplense_nb" / "experiments_nbs" / "task1.ipynb")


def test_export_a_resized_run(tmp_path):
    "ONNX has no antialiased resize: a run that resized its inputs exports its network for preprocessed images, and says so."
    import onnx
    from deeplense_nb.classify import train_classifier
    from deeplense_nb.data import make_toy_dataset
    root = make_toy_dataset(tmp_path / "toy", layout="task1", n_per_class=8, img_size=32)
    train_classifier(root, out=tmp_path / "run", model="cnn_baseline", epochs=1, batch_size=8, device="cpu", progress=False,
                     normalize="standardize", resize=16, augment=False)
    r = export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    assert r["input"] == ["batch", 1, 16, 16] and "apply the run's preprocessing" in r["note"] and r["max_abs_diff"] < 1e-4
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["preprocess_first"])["resize"] == 16
