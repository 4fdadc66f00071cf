"""Faults a user can cause (issue: reliability and security), one test per point: crafted checkpoints stay inert,
a finished run is never silently overwritten, best.ckpt matches metrics.json after a kill between the two checkpoint
writes, divergence stops with a message, bad data is found before training, every CLI failure is one line, no
hidden evaluation subset, the nested-layout mistake is named, and what DDP guarantees."""
import contextlib, io, json, os, shutil, subprocess, sys, traceback
from pathlib import Path
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from deeplense_nb.core import DeepLenseError
from deeplense_nb.cli import main
from deeplense_nb.checkpoint import CheckpointError, build_model, checkpoint_meta, load_model
from deeplense_nb.data import BadFileError, LayoutError, make_toy_dataset
from deeplense_nb.evaluation import EvaluationError, evaluate
from deeplense_nb.training import Callback
from deeplense_nb.classify import TrainConfig, train_classifier
import deeplense_nb.training as training

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
FAST = dict(model="cnn_baseline", batch_size=8, device="cpu", progress=False, sched="none")


def deeplense(*args):
    "Run `deeplense ARGS` in this process (the console script's `main`); returns (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main([str(a) for a in args])
        except BaseException: traceback.print_exc(); rc = 1  # what a user would see: a traceback
    return rc, out.getvalue(), err.getvalue()


def deeplense_process(*args):
    "The same in a fresh process, as a shell runs it."
    r = subprocess.run([sys.executable, "-m", "deeplense_nb.cli", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)
    return r.returncode, r.stdout, r.stderr


def one_line_error(rc, err, *must):
    "Exit 2, no traceback, one `deeplense X: error:` line that names what it must."
    errs = [l for l in err.splitlines() if ": error: " in l]
    assert rc == 2 and "Traceback" not in err, err
    assert len(errs) == 1 and errs[0].lstrip().startswith("deeplense "), err  # on its own line, after any progress bar
    for m in must: assert m in errs[0], (m, err)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("faults") / "task1", layout="task1", n_per_class=8, img_size=32)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_run") / "run"
    train_classifier(data, out=out, epochs=1, **FAST)
    return out


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def craft(src: Path, dst: Path, model_config) -> Path:
    "A copy of checkpoint `src` whose metadata names `model_config` (what an attacker can write)."
    with safe_open(str(src), "pt") as f: md = dict(f.metadata())
    meta = json.loads(md["meta"]); meta["model_config"] = model_config; md["meta"] = json.dumps(meta)
    save_file(load_file(str(src)), str(dst), metadata=md)
    return dst


# 1 ------------------------------------------------------------------------------------------------------------------
def test_1_crafted_checkpoints_run_no_code(run, data, tmp_path):
    marker, victim = tmp_path / "pwned", tmp_path / "victim"
    shutil.copytree(data, victim)
    before = sorted(p.relative_to(victim) for p in victim.rglob("*"))
    evil = {
        "os_system": {"builder": "os:system", "kwargs": {"command": f"touch {marker}"}},
        "rmtree": {"builder": "shutil:rmtree", "kwargs": {"path": str(victim)}},
        "simulate": {"builder": "deeplense_nb.simulate:simulate_task1", "kwargs": {"out": str(victim), "n_train": 3, "n_val": 3, "overwrite": True}},
        "write": {"builder": "deeplense_nb.core:atomic_write_text", "kwargs": {"path": str(marker), "text": "x"}},
        "weights_path": {"builder": "deeplense_nb.models:create_model", "kwargs": {"name": "cnn_baseline", "in_chans": 1, "num_classes": 3, "weights_path": str(marker)}},
        "pretrained": {"builder": "deeplense_nb.models:create_model", "kwargs": {"name": "resnet18", "in_chans": 1, "num_classes": 3, "pretrained": True}},
        "unknown_model": {"builder": "deeplense_nb.models:create_model", "kwargs": {"name": "evil", "in_chans": 1, "num_classes": 3}},
        "unet_file": {"builder": "deeplense_nb.diffusion:build_unet", "kwargs": {"checkpoint_path": str(marker)}},
        "pinn_extra": {"builder": "deeplense_nb.pinn:create_pinn", "kwargs": {"kind": "plain", "backbone_file": str(marker)}},
        "not_a_dict": "os:system",
    }
    for name, cfg in evil.items():
        ck = craft(run / "best.ckpt", tmp_path / f"{name}.ckpt", cfg)
        with pytest.raises(CheckpointError): load_model(ck)
        rc, _, err = deeplense("evaluate", "--checkpoint", ck, "--data", data, "--out", tmp_path / f"rep_{name}", "--n-boot", 0)
        one_line_error(rc, err, f"{name}.ckpt")
    assert not marker.exists()
    assert sorted(p.relative_to(victim) for p in victim.rglob("*")) == before
    # the feature extractor of the diffusion metrics loads through the same gate
    from deeplense_nb.diffusion import LensFeatureExtractor
    with pytest.raises(CheckpointError, match="refusing"): LensFeatureExtractor(tmp_path / "os_system.ckpt")
    # pickle stays refused
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "pickled.ckpt")
    rc, _, err = deeplense("evaluate", "--checkpoint", tmp_path / "pickled.ckpt", "--data", data, "--out", tmp_path / "rp")
    one_line_error(rc, err, "pickled.ckpt")


# 2 ------------------------------------------------------------------------------------------------------------------
def test_2_a_finished_run_is_never_silently_overwritten(run, data, tmp_path):
    keep = snapshot(run)
    with pytest.raises(DeepLenseError, match="already holds a run"): train_classifier(data, out=run, epochs=1, **FAST)
    rc, _, err = deeplense("train", "--data", data, "--out", run, "--model", "cnn_baseline", "--epochs", 1, "--device", "cpu")
    one_line_error(rc, err, str(run), "--resume", "--overwrite")
    # resuming with another model, or other data (other classes / image size), fails before RUN is touched
    with pytest.raises(DeepLenseError, match="cannot resume.*model"):
        train_classifier(data, out=run, epochs=2, resume=True, **{**FAST, "model": "resnet20"})
    other = make_toy_dataset(tmp_path / "folders", layout="folders", n_per_class=6, img_size=48)
    rc, _, err = deeplense("train", "--data", other, "--out", run, "--model", "cnn_baseline", "--epochs", 2, "--device", "cpu", "--resume")
    one_line_error(rc, err, "cannot resume")
    assert snapshot(run) == keep
    # --overwrite starts again; --resume continues
    fresh = tmp_path / "again"; shutil.copytree(run, fresh)
    m = train_classifier(data, out=fresh, epochs=1, overwrite=True, **FAST)
    assert m["epochs"] == 1
    with pytest.raises(DeepLenseError, match="not both"): train_classifier(data, out=fresh, resume=True, overwrite=True, **FAST)
    (tmp_path / "afile").write_text("x")
    rc, _, err = deeplense("train", "--data", data, "--out", tmp_path / "afile", "--model", "cnn_baseline", "--device", "cpu")
    one_line_error(rc, err, "afile", "is a file")


# 3 ------------------------------------------------------------------------------------------------------------------
class Killed(BaseException): pass

def test_3_kill_between_last_and_best_then_resume(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(training, "_improved", lambda *a, **k: True)  # every epoch is the best: best.ckpt is written each time
    real = training.atomic_write
    def dies_at_epoch_1(path, write):
        if Path(path).name == "best.ckpt" and checkpoint_meta(out / "last.ckpt")["epoch"] == 1: raise Killed()
        return real(path, write)
    monkeypatch.setattr(training, "atomic_write", dies_at_epoch_1)
    with pytest.raises(Killed): train_classifier(data, out=out, epochs=3, **FAST)
    monkeypatch.setattr(training, "atomic_write", real)
    assert checkpoint_meta(out / "last.ckpt")["epoch"] == 1 and checkpoint_meta(out / "best.ckpt")["epoch"] == 0  # the bad pair
    (out / ".last.ckpt.tmp999999999").write_bytes(b"half a checkpoint")  # a stray temp file of a killed write
    m = train_classifier(data, out=out, epochs=2, resume=True, **FAST)  # nothing left to train: just the repair
    assert m["best_epoch"] == 1 == checkpoint_meta(out / "best.ckpt")["epoch"]
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1
    assert not list(out.glob(".*.tmp*"))
    # evaluate refuses a run folder whose pair disagrees
    mj = json.loads((out / "metrics.json").read_text()); mj["best_epoch"] = 0
    (out / "metrics.json").write_text(json.dumps(mj))
    with pytest.raises(CheckpointError, match="inconsistent"): load_model(out)
    rc, _, err = deeplense("evaluate", "--checkpoint", out, "--data", data, "--out", tmp_path / "rep")
    one_line_error(rc, err, "inconsistent")


# 4 ------------------------------------------------------------------------------------------------------------------
class Explode(Callback):
    "After a good first epoch, set a learning rate that makes the next one diverge."
    order = 90
    def after_epoch(self):
        if self.learn.epoch == 0: self.learn.set_lr(1e9)

def test_4_divergence_stops_with_a_message_and_keeps_the_good_epoch(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(training.DivergenceError, match=r"epoch 1, batch \d+.*--lr.*--clip"):
        train_classifier(data, out=out, epochs=3, opt="sgd", lr=1e-3, cbs=[Explode()], **FAST)
    assert checkpoint_meta(out / "last.ckpt")["epoch"] == 0 and len(json.loads((out / "history.json").read_text())) == 1
    rc, _, err = deeplense_process("train", "--data", data, "--out", tmp_path / "cli", "--model", "cnn_baseline", "--lr", "1e6",
                           "--opt", "sgd", "--epochs", 2, "--batch-size", 8, "--device", "cpu", "--sched", "none")
    one_line_error(rc, err, "diverged", "--lr", "--clip")


# 5 ------------------------------------------------------------------------------------------------------------------
class NoBatch(Callback):
    def before_batch(self): raise AssertionError("training started")

@pytest.mark.parametrize("bad", ["nan", "inf", "constant", "uint8"])
def test_5_bad_data_is_found_before_any_training_step(data, tmp_path, bad):
    d = tmp_path / "data"; shutil.copytree(data, d)
    f = sorted((d / "val/vort").glob("*.npy"))[-1]  # the last file of the last folder
    a = np.load(f).astype(np.float32)
    if bad == "nan": a[0, 3, 3] = np.nan
    elif bad == "inf": a[0, 3, 3] = np.inf
    elif bad == "constant": a[:] = 0.5
    else: a = (np.random.default_rng(0).random(a.shape) * 255).round()
    np.save(f, a)
    with pytest.raises(BadFileError, match=f.name): train_classifier(d, out=tmp_path / "run", epochs=1, cbs=[NoBatch()], **FAST)
    m = train_classifier(d, out=tmp_path / "skip", epochs=1, on_error="skip", **FAST)  # skip-with-report
    assert m["epochs"] == 1
    rc, out, err = deeplense("evaluate", "--checkpoint", tmp_path / "skip", "--data", d, "--out", tmp_path / "rep",
                             "--on-error", "skip", "--n-boot", 0)
    assert rc == 0 and f.name in out + err, out + err
    rc, _, err = deeplense("evaluate", "--checkpoint", tmp_path / "skip", "--data", d, "--out", tmp_path / "rep2")
    one_line_error(rc, err, f.name)


# 6 ------------------------------------------------------------------------------------------------------------------
def test_6_every_cli_failure_is_one_line(run, data, tmp_path):
    loop = tmp_path / "loop"; shutil.copytree(data, loop)
    (loop / "train/no/zz.npy").symlink_to("zz.npy")  # a file symlink loop
    rc, _, err = deeplense("train", "--data", loop, "--out", tmp_path / "r1", "--model", "cnn_baseline", "--device", "cpu")
    one_line_error(rc, err, "zz.npy")
    dloop = tmp_path / "dloop"; shutil.copytree(data, dloop)
    (dloop / "train/no/sub").symlink_to("sub")  # a folder symlink loop
    (dloop / "train/sphere/up").symlink_to("..")  # a folder link back up the tree
    rc, _, err = deeplense("train", "--data", dloop, "--out", tmp_path / "r2", "--model", "cnn_baseline", "--device", "cpu", "--epochs", 1)
    assert "Traceback" not in err and rc in (0, 2), err
    # an unreadable checkpoint is reported as unreadable, and no message advises deleting anything
    (tmp_path / "dir.ckpt").mkdir()
    half = tmp_path / "half.ckpt"; half.write_bytes((run / "best.ckpt").read_bytes()[:500])
    for ck, what in ((tmp_path / "dir.ckpt", "folder"), (half, "incomplete or corrupt")):
        rc, _, err = deeplense("evaluate", "--checkpoint", ck, "--data", data, "--out", tmp_path / "rep")
        one_line_error(rc, err, what); assert "delete" not in err
    if os.geteuid() != 0:  # root reads anything: permission cases only mean something for other users
        ro = tmp_path / "ro.ckpt"; shutil.copy(run / "best.ckpt", ro); ro.chmod(0)
        rc, _, err = deeplense("evaluate", "--checkpoint", ro, "--data", data, "--out", tmp_path / "rep")
        one_line_error(rc, err, "cannot be read")
        locked = tmp_path / "locked"; shutil.copytree(data, locked); (locked / "train/no").chmod(0)
        rc, _, err = deeplense("train", "--data", locked, "--out", tmp_path / "r3", "--model", "cnn_baseline", "--device", "cpu")
        (locked / "train/no").chmod(0o755)
        one_line_error(rc, err, "train/no")
    # a config that does not fit is a DeepLenseError (and still a ValueError), which the CLI reports in one line
    with pytest.raises(DeepLenseError, match="unknown field"): TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError): TrainConfig.from_dict({"epochz": 3})
    # an unexpected error is one line too, and --debug shows the traceback
    rc, _, err = deeplense("evaluate", "--checkpoint", run, "--data", data, "--out", tmp_path / "rep3", "--batch-size", 0)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    rc, _, err = deeplense("evaluate", "--checkpoint", run, "--data", data, "--out", tmp_path / "rep4", "--batch-size", 0, "--debug")
    assert rc != 0 and "Traceback" in err


# 7 ------------------------------------------------------------------------------------------------------------------
def test_7_no_silent_subsetting(run, tmp_path):
    flat = make_toy_dataset(tmp_path / "flat", layout="folders", n_per_class=5, img_size=32)  # no split at all
    rep = evaluate(run, flat, n_boot=0, device="cpu")
    assert rep.metrics["n"] == 15 and any("scored every image (15)" in n for n in rep.metrics["notes"]), rep.metrics["notes"]
    with pytest.raises(EvaluationError, match="no 'val' split"): evaluate(run, flat, split="val", n_boot=0)
    rc, out, err = deeplense("evaluate", "--checkpoint", run, "--data", flat, "--out", tmp_path / "rep", "--n-boot", 0)
    assert rc == 0 and "scored every image (15)" in out, out + err
    # training on data without val/ says that it carves a validation split off train
    rc, out, err = deeplense("train", "--data", flat, "--out", tmp_path / "r", "--model", "cnn_baseline", "--epochs", 1,
                             "--device", "cpu", "--no-progress", "--batch-size", 8)
    assert rc == 0 and "carved off" in out, out + err
    assert "carved off" in json.loads((tmp_path / "r/metrics.json").read_text())["validation"]


# 8 ------------------------------------------------------------------------------------------------------------------
def test_8_nested_layout_is_named_with_the_fix(data, tmp_path):
    nested = tmp_path / "ds"
    for s in ("train", "val"): shutil.copytree(data / s, nested / s / s)
    with pytest.raises(LayoutError, match="nested one level too deep"): train_classifier(nested, out=tmp_path / "r", **FAST)
    rc, _, err = deeplense("train", "--data", nested, "--out", tmp_path / "r", "--model", "cnn_baseline", "--device", "cpu")
    one_line_error(rc, err, "nested one level too deep", f"mv {nested / 'train/train'}/* {nested / 'train'}/")
    fix = [l for l in err.splitlines() if "fix it with: " in l][0].split("fix it with: ")[1].split(" (details:")[0]
    assert os.system(fix) == 0  # the printed command really fixes it
    assert train_classifier(nested, out=tmp_path / "fixed", epochs=1, **FAST)["epochs"] == 1


# 9 ------------------------------------------------------------------------------------------------------------------
def test_9_ddp_contract_is_documented():
    """2 processes equal 1 to float tolerance without augmentation (tests/test_training.py checks it under torchrun); the
    training notebook says why augmented runs differ."""
    nb = json.loads((Path(__file__).resolve().parent.parent / "nbs/06_training.ipynb").read_text())
    text = " ".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "per-rank random streams" in text and "float tolerance" in text
