"""Every experiment notebook runs headless through `deeplense run NAME -p quick True` and writes its results."""
import json
import pytest
from matplotlib.image import imread
from deeplense_nb.data import make_toy_dataset

EXPECTED = {  # experiment -> keys its metrics.json must hold
    "task1": {"auc_macro", "auc_per_class", "accuracy", "confusion_matrix", "classes"},
    "lens-finding": {"auc", "average_precision", "tpr_at_fpr", "accuracy", "confusion_matrix", "threshold"},
    "model-zoo": {"table", "best_model", "auc_macro"},
    "diffusion": {"fid"},
    "physics": {"physics", "baseline"},
}

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")

@pytest.mark.parametrize("name", list(EXPECTED))
def test_experiment_quick(name, tmp_path, cli, cache):
    out = tmp_path / name
    real = ["-p", "real_dir", make_toy_dataset(tmp_path / "real", layout="folders", n_per_class=3, img_size=64)] if name == "task1" else []
    r = cli("run", name, "-p", "quick", "True", *real, "--out", out, env={"DEEPLENSE_CACHE": str(cache)}, timeout=900)
    assert r.returncode == 0
    m = json.loads((out / "metrics.json").read_text())
    assert EXPECTED[name] <= set(m), sorted(m)
    if name in ("task1", "model-zoo"): assert m["auc_macro"] > 0.8, m["auc_macro"]   # the quick mode learns (not one class for all)
    if name == "task1": assert sum(map(sum, m["real"]["confusion_matrix"])) == 9   # the extra test set, class folders without splits
    nb = out / {"lens-finding": "lens_finding.ipynb", "model-zoo": "model_zoo.ipynb"}.get(name, f"{name}.ipynb")
    assert nb.exists(), "the executed notebook is kept beside the results"
    pngs = sorted(out.rglob("*.png"))
    assert pngs, "figures are written"
    for p in pngs[:6]:
        img = imread(p); assert img.ndim == 3 and img.std() > 0, p
    if name in ("lens-finding", "diffusion"):   # a classifier and a diffusion trainer: --overwrite trains again into the same folder
        r = cli("run", name, "-p", "quick", "True", "--out", out, "--overwrite", env={"DEEPLENSE_CACHE": str(cache)}, timeout=900)
        assert r.returncode == 0 and (out / "metrics.json").exists()

def test_task1_real_dir_of_another_size_fails_before_training(cli, tmp_path, cache):
    real = make_toy_dataset(tmp_path / "real", layout="folders", n_per_class=2, img_size=150)
    r = cli("run", "task1", "-p", "quick", "True", "-p", "real_dir", real, "--out", tmp_path / "o", env={"DEEPLENSE_CACHE": str(cache)}, check=False)
    assert r.returncode == 2 and "its images are 1x150x150, but this run trains on 1x64x64 ones" in r.stderr, r.stderr
    assert not (tmp_path / "o" / "train").exists()   # refused before any training

def test_run_unknown_param_is_one_line(cli, tmp_path):
    r = cli("run", "task1", "-p", "epochz", "3", "--out", tmp_path / "x", check=False)
    assert r.returncode == 2 and "unknown parameter(s) ['epochz']" in r.stderr and "Traceback" not in r.stderr

def test_run_failure_keeps_notebook(cli, tmp_path):
    r = cli("run", "task1", "-p", "quick", "True", "-p", "data_dir", str(tmp_path / "missing"), "--out", tmp_path / "f", check=False)
    assert r.returncode != 0 and "failed in cell" in r.stderr
    assert (tmp_path / "f" / "task1.ipynb").exists()

def _tiny_notebook(path, parameters: str, body: str):
    "A two-cell experiment notebook: its parameters cell, then `body`, which may call write(dict) to save metrics.json."
    import nbformat
    head = "import json, pathlib\nwrite = lambda m: pathlib.Path(out_dir, 'metrics.json').write_text(json.dumps(m))\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(head + body)])
    nbformat.write(nb, path)   # no kernelspec in its metadata: the run supplies the language

def test_run_overwrite_and_bad_notebooks(cli, tmp_path):
    "--overwrite removes the old metrics.json first (a stopped rerun never looks finished); an unreadable notebook, a missing kernel: one line, no folder."
    _tiny_notebook(tmp_path / "tiny.ipynb", "out_dir = '.'\nfail = False", "assert not fail\nwrite({'auc': 0.5})")
    assert cli("run", tmp_path / "tiny.ipynb", "--out", tmp_path / "r").returncode == 0 and (tmp_path / "r" / "metrics.json").exists()
    r = cli("run", tmp_path / "tiny.ipynb", "--out", tmp_path / "r", "--overwrite", "-p", "fail", "True", check=False)
    assert r.returncode == 2 and "failed in cell" in r.stderr and not (tmp_path / "r" / "metrics.json").exists(), r.stderr
    (tmp_path / "broken.ipynb").write_text("{not json")
    r = cli("run", tmp_path / "broken.ipynb", "--out", tmp_path / "b", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "broken.ipynb is not a readable notebook" in r.stderr, r.stderr
    r = cli("run", tmp_path / "tiny.ipynb", "--out", tmp_path / "k", "--kernel", "nokernel", check=False)
    assert r.returncode == 2 and "no such Jupyter kernel" in r.stderr and not (tmp_path / "k").exists(), r.stderr

def test_run_folder_parameters_are_relative_to_the_caller(cli, tmp_path):
    "The notebook runs in its output folder: `-p data_dir rel` is read from where the command was typed, not from OUT."
    (tmp_path / "data" / "t1").mkdir(parents=True)
    _tiny_notebook(tmp_path / "paths.ipynb", "out_dir = '.'\ndata_dir = ''\nreal_dir_ii = ''",
                   "write({'data_dir': data_dir, 'is_dir': pathlib.Path(data_dir).is_dir(), 'real_dir_ii': real_dir_ii})")
    cli("run", "paths.ipynb", "-p", "data_dir", "data/t1", "--out", "runs/p", cwd=tmp_path)
    m = json.loads((tmp_path / "runs" / "p" / "metrics.json").read_text())
    assert m == {"data_dir": str((tmp_path / "data" / "t1").resolve()), "is_dir": True, "real_dir_ii": ""}, m

def test_demo_simulates_into_a_store_and_reuses_it(tmp_path, capsys):
    import shutil
    from deeplense_nb.core import DeepLenseError
    from deeplense_nb.data import DataError, PackedDataset
    from deeplense_nb.experiments import run_demo
    tiny = dict(n_train=30, n_val=15, epochs=1)
    m = run_demo(tmp_path / "d", device="cpu", **tiny)
    assert {"auc_macro", "accuracy"} <= set(m) and (tmp_path / "d" / "report" / "metrics.json").is_file()
    man = PackedDataset(tmp_path / "d" / "data.store").manifest
    assert [sum(man["counts"][s].values()) for s in ("train", "val")] == [30, 15]
    assert "1/3 simulated" in capsys.readouterr().out
    before = {f: f.read_bytes() for f in (tmp_path / "d").rglob("*") if f.is_file()}
    for kw in (tiny, {**tiny, "n_train": 36}):   # a finished demo is never replaced unless asked
        with pytest.raises(DeepLenseError, match="already holds a demo"): run_demo(tmp_path / "d", device="cpu", **kw)
    assert before == {f: f.read_bytes() for f in (tmp_path / "d").rglob("*") if f.is_file()}
    (tmp_path / "o" / "data.store").parent.mkdir(); shutil.copytree(tmp_path / "d" / "data.store", tmp_path / "o" / "data.store")
    with pytest.raises(DeepLenseError, match="not a store of these demo settings"): run_demo(tmp_path / "o", device="cpu", **{**tiny, "n_val": 18})
    run_demo(tmp_path / "d", device="cpu", overwrite=True, **tiny)
    assert "1/3 reusing" in capsys.readouterr().out                       # same settings: the store is reused
    run_demo(tmp_path / "d", device="cpu", overwrite=True, **{**tiny, "n_train": 36})
    assert "1/3 simulated" in capsys.readouterr().out                     # other settings: simulated again
    assert len(PackedDataset(tmp_path / "d" / "data.store", split="train")) == 36
    (tmp_path / "e" / "data.store").mkdir(parents=True); (tmp_path / "e" / "data.store" / "mine.txt").write_text("keep")
    with pytest.raises(DeepLenseError, match="not a store of these demo settings"): run_demo(tmp_path / "e", device="cpu", **tiny)
    with pytest.raises(DataError, match="not a packed store"): run_demo(tmp_path / "e", device="cpu", overwrite=True, **tiny)
    assert (tmp_path / "e" / "data.store" / "mine.txt").read_text() == "keep"   # a folder that is not a store is never replaced
