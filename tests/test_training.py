"""The training engine across processes: learning on an easy problem, gradient accumulation, EMA and schedules,
checkpoints that survive SIGKILL (exact resume), half-written checkpoints, DDP under torchrun, and `deeplense train`."""
import copy, json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from deeplense_nb.core import DeepLenseError, seed_everything
from deeplense_nb.training import (Callback, CheckpointError, Learner, SaveCheckpoint, accuracy, build_model,
                                   load_checkpoint, load_model, roc_auc, save_checkpoint, synthetic_classification, tiny_cnn)
from deeplense_nb.callbacks import EMA, GradientAccumulation, OneCycle, StepSchedule

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_train_toy.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def toy_learner(*cbs, n_train=256, bs=32, lr=3e-3, norm=True, **kw):
    seed_everything(0)
    tr, va = synthetic_classification(n_train, seed=0), synthetic_classification(128, seed=1)
    tdl = DataLoader(tr, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0))
    return Learner(tiny_cnn(norm=norm), tdl, DataLoader(va, batch_size=64), loss_func=nn.CrossEntropyLoss(), lr=lr,
                   metrics=[roc_auc, accuracy], cbs=cbs, device="cpu", progress=False, **kw)


def weights(ckpt) -> dict:
    return load_checkpoint(ckpt)["model"]


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


def run_toy(out, *args, check=True, **popen):
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, **popen)
    if check and r.returncode: raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


# --- behaviour ----------------------------------------------------------------------------------------------------

def test_learns_easy_problem():
    learn = toy_learner(OneCycle())
    learn.fit(4)
    h = learn.history
    assert h[-1]["train_loss"] < h[0]["train_loss"] and h[-1]["valid_loss"] < h[0]["valid_loss"], h
    assert h[-1]["roc_auc"] > 0.9, h
    probs, targets = learn.predict()
    assert probs.shape == (128, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert roc_auc(probs, targets) == pytest.approx(learn.validate()["roc_auc"])


def test_accumulated_batches_equal_one_big_batch():
    def one_step(bs, *cbs):
        seed_everything(0)
        ds = synthetic_classification(8)
        learn = Learner(tiny_cnn(norm=False), DataLoader(ds, batch_size=bs), loss_func=nn.CrossEntropyLoss(),
                        opt_func=torch.optim.SGD, lr=0.5, wd=0.0, cbs=cbs, device="cpu", progress=False)
        w0 = copy.deepcopy(learn.model.state_dict())
        learn.fit(1)
        return w0, learn.model.state_dict()
    w0, big = one_step(8)
    _, acc = one_step(1, GradientAccumulation(8))
    for k in big:
        assert (big[k] - w0[k]).abs().max() > 1e-4, k  # one real step happened
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)


def test_ema_and_schedules_step_as_documented():
    class Rec(Callback):
        order = 45  # after EMA (40): sees the weights and the lr of every optimizer step
        def before_fit(self): self.w, self.lr = [copy.deepcopy(self.learn.model.state_dict())], []
        def after_step(self): self.w.append(copy.deepcopy(self.learn.model.state_dict())); self.lr.append(self.learn.opt.param_groups[0]["lr"])
    learn = toy_learner(EMA(0.8), OneCycle(pct_start=0.5), Rec(), n_train=128, norm=False, opt_func=torch.optim.SGD)
    learn.fit(2)
    rec, n = learn.rec, 8  # 2 epochs x 4 batches
    for k, shadow in learn.ema.shadow.items():
        e = rec.w[0][k]
        for w in rec.w[1:]: e = 0.8 * e + 0.2 * w[k]
        torch.testing.assert_close(shadow, e, rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=3e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=n, pct_start=0.5, cycle_momentum=False)
    expect = [opt.param_groups[0]["lr"]]
    for _ in range(n - 1): opt.step(); ref.step(); expect.append(opt.param_groups[0]["lr"])
    np.testing.assert_allclose(rec.lr, expect[:n], rtol=1e-12)  # lr in effect when each step was taken
    learn = toy_learner(StepSchedule(step_size=1, gamma=0.1), n_train=64)
    learn.fit(3)
    np.testing.assert_allclose([r["lr"] for r in learn.history], [3e-3, 3e-4, 3e-5], rtol=1e-12)


# --- checkpoints ----------------------------------------------------------------------------------------------------

def test_load_model_and_builder_namespace(tmp_path):
    learn = toy_learner(SaveCheckpoint(monitor="roc_auc"), path=tmp_path, n_train=64)
    learn.fit(2)
    m, meta = load_model(tmp_path, device="cpu")  # run folder -> best.ckpt
    assert meta["model_config"]["builder"] == "deeplense_nb.training:tiny_cnn" and not m.training
    assert meta["epoch"] == learn.save_checkpoint.best_epoch
    bad = {"builder": "subprocess:call", "kwargs": {"args": ["true"]}}
    with pytest.raises(DeepLenseError, match="refusing"): build_model(bad)
    save_checkpoint(tmp_path / "evil.ckpt", m.state_dict(), meta={"model_config": bad})
    with pytest.raises(DeepLenseError, match="refusing"): load_model(tmp_path / "evil.ckpt")
    save_checkpoint(tmp_path / "nocfg.ckpt", m.state_dict(), meta={})
    with pytest.raises(CheckpointError, match="no model_config"): load_model(tmp_path / "nocfg.ckpt")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    learn = toy_learner(SaveCheckpoint(), path=tmp_path, n_train=64)
    learn.fit(1)
    before = (tmp_path / "last.ckpt").read_bytes()
    import safetensors.torch
    def dying_save(tensors, filename, metadata=None):  # writes half a file, then the "process" dies
        Path(filename).write_bytes(b"\x00" * 1000); raise KeyboardInterrupt()
    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt): learn.save(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt" or ".tmp" in p.name) == ["best.ckpt", "last.ckpt"]


def test_truncated_checkpoint_is_rejected(tmp_path):
    learn = toy_learner(SaveCheckpoint(), path=tmp_path, n_train=64)
    learn.fit(1)
    b = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(b[: len(b) - 100])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"): load_checkpoint(tmp_path / "cut.ckpt")
    fresh = toy_learner(n_train=64)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"): fresh.fit(2, resume=tmp_path / "cut.ckpt")
    with pytest.raises(DeepLenseError, match="does not exist"): fresh.fit(2, resume=tmp_path / "nope")


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path):
    "Kill a run (SIGKILL) during epoch 2; resuming from last.ckpt gives the uninterrupted run's weights and metrics."
    args = ["--epochs", 4, "--augment", "--dropout", 0.2, "--ema", 0.9, "--norm"]  # every source of randomness in play
    full, part, marker = tmp_path / "full", tmp_path / "part", tmp_path / "epoch.txt"
    run_toy(full, *args)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(part), *map(str, args), "--marker", str(marker),
                             "--slow", "0.1"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while not (marker.exists() and marker.read_text() >= "2"):
            assert proc.poll() is None, f"training exited early: {proc.communicate()}"
            assert time.time() - t0 < 240, "training did not reach epoch 2"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(part / "last.ckpt")
    assert ck["meta"]["epoch"] in (1, 2), ck["meta"]["epoch"]  # killed during epoch 2 (or, on a very busy box, 3)
    assert not (part / "final.json").exists()
    (part / ".last.ckpt.tmp99999").write_bytes(b"half a checkpoint")  # what a kill during a save leaves behind
    run_toy(part, *args, "--resume")
    a, b = load_checkpoint(full / "last.ckpt"), load_checkpoint(part / "last.ckpt")
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 3
    for k, v in a["model"].items(): assert torch.equal(v, b["model"][k]), k
    for k, v in a["state"]["callbacks"]["ema"]["shadow"].items(): assert torch.equal(v, b["state"]["callbacks"]["ema"]["shadow"][k]), k
    ha, hb = (json.loads((d / "final.json").read_text())["history"] for d in (full, part))
    assert strip_time(ha) == strip_time(hb) and len(ha) == 4
    assert strip_time(json.loads((part / "history.json").read_text())) == strip_time(ha)
    wa, wb = weights(full / "best.ckpt"), weights(part / "best.ckpt")
    for k, v in wa.items(): assert torch.equal(v, wb[k]), k


def test_ddp_two_processes_match_single_process(tmp_path):
    "torchrun --nproc-per-node 2 (gloo, CPU) with the same global batch gives the single-process weights and metrics."
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = ["--epochs", 3, "--bs", 32]  # no BatchNorm, dropout or per-sample augmentation: those differ per process
    run_toy(single, *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--out", str(ddp), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    fs, fd = (json.loads((d / "final.json").read_text()) for d in (single, ddp))
    assert fs["world_size"] == 1 and fd["world_size"] == 2 and fd["env_world_size"] == 2
    for hs, hd in zip(fs["history"], fd["history"]):
        for k in ("train_loss", "valid_loss", "roc_auc", "accuracy", "lr"): assert hd[k] == pytest.approx(hs[k], rel=1e-4, abs=1e-5), (k, hs, hd)
    ws, wd = weights(single / "last.ckpt"), weights(ddp / "last.ckpt")
    for k, v in ws.items(): torch.testing.assert_close(wd[k], v, rtol=1e-4, atol=1e-5)
    assert load_checkpoint(ddp / "last.ckpt")["meta"]["world_size"] == 2
    assert sorted(p.name for p in ddp.iterdir()) == ["best.ckpt", "final.json", "history.csv", "history.json", "last.ckpt"]


# --- the train command --------------------------------------------------------------------------------------------

def test_train_help(cli):
    r = cli("train", "--help")
    for opt in ("--task", "--data", "--model", "--epochs", "--batch-size", "--lr", "--out", "--resume", "--device", "--amp", "--seed"):
        assert opt in r.stdout, opt


# --- train_classifier on deeplense_nb.data folders with deeplense_nb.models networks ----------------------------------

class Crash(Exception): pass

class CrashAt(Callback):
    def __init__(self, epoch): self.at = epoch
    def before_epoch(self):
        if self.learn.epoch == self.at: raise Crash()


@pytest.fixture(scope="module")
def toy_task1(tmp_path_factory):
    from deeplense_nb.data import make_toy_dataset
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "task1", layout="task1", n_per_class=8, img_size=32)


def test_train_classifier_resume_is_exact(toy_task1, tmp_path):
    "An interrupted train_classifier run (augmentation, MixUp, EMA, one-cycle) resumed with resume=True equals an uninterrupted one."
    from deeplense_nb.classify import train_classifier
    kw = dict(task="substructure", model="cnn_baseline", epochs=3, batch_size=8, lr=3e-3, device="cpu", progress=False,
              mixup=0.4, ema=0.9)
    full = train_classifier(toy_task1, out=tmp_path / "full", **kw)
    with pytest.raises(Crash): train_classifier(toy_task1, out=tmp_path / "part", cbs=[CrashAt(2)], **kw)
    assert load_checkpoint(tmp_path / "part/last.ckpt")["meta"]["epoch"] == 1
    part = train_classifier(toy_task1, out=tmp_path / "part", resume=True, **kw)
    wa, wb = weights(tmp_path / "full/last.ckpt"), weights(tmp_path / "part/last.ckpt")
    for k, v in wa.items(): assert torch.equal(v, wb[k]), k
    for key in ("epochs", "best_epoch", "roc_auc", "accuracy", "valid_loss", "best", "final", "classes"): assert full[key] == part[key], key
    m = json.loads((tmp_path / "part/metrics.json").read_text())
    assert m["epochs"] == 3 and m["classes"] == ["no", "sphere", "vort"] and m["config"]["mixup"] == 0.4
    assert {"roc_auc", "accuracy", "valid_loss", "best_epoch", "train_time_s", "epochs"} <= set(m)
    model, meta = load_model(tmp_path / "part")  # best.ckpt, EMA weights
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert meta["config"]["classes"] == ["no", "sphere", "vort"] and meta["model_config"]["kwargs"]["name"] == "cnn_baseline"


def test_train_classifier_lens_finding(tmp_path):
    from deeplense_nb.data import make_toy_dataset
    from deeplense_nb.classify import train_classifier
    root = make_toy_dataset(tmp_path / "task2", layout="task2", n_per_class=6, img_size=32)
    m = train_classifier(root, task="lens-finding", model="cnn_baseline", epochs=1, batch_size=8, out=tmp_path / "run",
                         device="cpu", progress=False, loss="focal", sched="cosine", grad_accum=2, clip=1.0)
    assert m["classes"] == ["nonlens", "lens"] and m["epochs"] == 1 and 0 <= m["roc_auc"] <= 1
    with pytest.raises(DeepLenseError, match="expected one of"): train_classifier(root, out=tmp_path / "x", sched="linear")
    with pytest.raises(DeepLenseError, match="unknown setting"): train_classifier(root, out=tmp_path / "x", epoch=3)


def test_train_command(toy_task1, tmp_path, cli):
    run = tmp_path / "run"
    args = ["train", "--data", toy_task1, "--task", "substructure", "--model", "cnn_baseline", "--epochs", 2,
            "--batch-size", 8, "--lr", 3e-3, "--out", run, "--device", "cpu", "--amp", "off", "--seed", 1, "--no-progress"]
    r = cli(*args)
    assert "best epoch" in r.stdout and "metrics.json" in r.stdout
    assert {p.name for p in run.iterdir()} >= {"best.ckpt", "last.ckpt", "history.csv", "history.json", "metrics.json", "config.json"}
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["config"]["seed"] == 1 and m["model"] == "cnn_baseline"
    r = cli(*args, "--resume")  # already complete: nothing left to train, same metrics
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["best"] == m["best"] and m2["epochs"] == 2
    bad = cli("train", "--data", tmp_path / "missing", "--out", run, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


BAD_SETTINGS = [  # (flags, what the one-line error must say)
    (["--clip", "-1"], "clip"), (["--mixup", "-1"], "mixup"), (["--cutmix", "-2"], "cutmix"), (["--warmup", "3"], "warmup"),
    (["--early-stop", "-1"], "early_stop"), (["--folds", "-2"], "folds"), (["--folds", "1"], "folds"),
    (["--sched", "step", "--step-size", "0"], "step_size"), (["--label-smoothing", "2"], "label_smoothing"),
    (["--ema", "1.5"], "ema"), (["--plateau-factor", "2"], "plateau_factor")]
BAD_FILES = [({"epochs": 1.7}, "epochs=1.7: expected an integer"), ({"epochs": True}, "epochs=True: expected an integer"),
             ({"epochs": "many"}, "epochs='many': expected an integer"), ({"lr": "fast", "epochs": 1}, "lr='fast': expected a number")]

def _train_cli(data, out, *args):
    from deeplense_nb.cli import main
    return main(["train", "--data", str(data), "--model", "cnn_baseline", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                 "--no-progress", "--out", str(out), *map(str, args)])

@pytest.mark.parametrize("flags,says", BAD_SETTINGS + [(cfg, says) for cfg, says in BAD_FILES])
def test_train_rejects_bad_settings_before_writing(flags, says, toy_task1, tmp_path, capsys):
    "A meaningless or mistyped setting (flag or config file) is one line naming it, exit 2, and leaves --out as it was."
    if isinstance(flags, dict):  # a config file: the message names the file and the key
        (tmp_path / "cfg.json").write_text(json.dumps(flags)); flags, says = ["--config", tmp_path / "cfg.json"], f"{tmp_path / 'cfg.json'}: {says}"
        (tmp_path / "out").mkdir(); (tmp_path / "out/notes.txt").write_text("mine")   # something of the user's, kept
    assert _train_cli(toy_task1, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "unexpected" not in err, err
    assert not (tmp_path / "out/config.json").exists() and [p.name for p in tmp_path.glob("out/*")] in ([], ["notes.txt"])

def test_train_refuses_a_run_inside_its_data(toy_task1, tmp_path, capsys):
    "--out the dataset folder (or a folder in it) would mix checkpoints with the data: one line, exit 2, nothing written."
    before = sorted(p.relative_to(toy_task1) for p in toy_task1.rglob("*"))
    for out in (toy_task1, toy_task1 / "runs" / "a"):
        assert _train_cli(toy_task1, out, "--overwrite") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is inside the training data" in err, err
    assert sorted(p.relative_to(toy_task1) for p in toy_task1.rglob("*")) == before

def test_train_config_validates_ranges_and_types():
    "The Python API gets the same checks (`TrainConfig.validate`); 0 keeps meaning off for clip and early_stop."
    from deeplense_nb.classify import TrainConfig
    for kw, says in [({"clip": -1.0}, "clip"), ({"warmup": 1.0}, "warmup"), ({"early_stop": -1}, "early_stop"),
                     ({"step_size": 0}, "step_size"), ({"label_smoothing": 1.0}, "label_smoothing"), ({"mixup": -1.0}, "mixup"),
                     ({"folds": 3, "fold": 3}, "fold"), ({"epochs": 1.7}, "expected an integer"), ({"lr": "fast"}, "expected a number")]:
        with pytest.raises(DeepLenseError, match=says): TrainConfig(**kw).validate()
    TrainConfig(clip=0, early_stop=0, mixup=0.0, warmup=0.0, folds=3, fold=2, epochs=np.int64(2), lr=1).validate()

def test_failed_start_leaves_no_run_behind(toy_task1, tmp_path):
    "A run that fails before its first checkpoint removes the config.json it wrote, so a plain rerun is not refused."
    from deeplense_nb.classify import train_classifier
    kw = dict(model="cnn_baseline", epochs=1, batch_size=8, device="cpu", progress=False)
    with pytest.raises(Crash): train_classifier(toy_task1, out=tmp_path / "run", cbs=[CrashAt(0)], **kw)
    assert not (tmp_path / "run").exists()
    assert train_classifier(toy_task1, out=tmp_path / "run", **kw)["epochs"] == 1


def test_train_command_under_torchrun(toy_task1, tmp_path):
    "`deeplense train` runs unchanged on 2 processes (gloo); only rank 0 writes; metrics see every validation image once."
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "deeplense_nb.cli",
           "train", "--data", str(toy_task1), "--task", "substructure", "--model", "cnn_baseline", "--epochs", "1",
           "--batch-size", "8", "--out", str(run), "--device", "cpu", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    if r.returncode != 0 and "terminate called without an active exception" in r.stderr and "deeplense train: wrote" in r.stdout:
        # a rare abort of one rank inside gloo's teardown at process exit, after the run was complete (seen twice in about
        # 20 loaded `make test` runs, never alone): run once more; a second failure of any kind fails the test
        r = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert r.stdout.count("deeplense train: wrote") == 1  # rank 0 only
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 1
    model, _ = load_model(run)
    from deeplense_nb.data import get_dataloaders
    dls = get_dataloaders(toy_task1, task="substructure", batch_size=8, augment=False)
    learn = Learner(model, dls.train, dls.valid, loss_func=nn.CrossEntropyLoss(), metrics=[roc_auc, accuracy], device="cpu", progress=False)
    res = learn.validate()  # single process, same best weights, all 6 validation images
    assert res["roc_auc"] == pytest.approx(m["roc_auc"], abs=1e-6) and res["accuracy"] == pytest.approx(m["accuracy"])


class _EpochKeyed:
    "A loader whose batches depend on the epoch it is told (like a stream of fresh simulations)."
    def __init__(self, dl): self.dl, self.epochs = dl, []
    def set_epoch(self, e): self.epochs.append(e)
    def __iter__(self): return iter(self.dl)
    def __len__(self): return len(self.dl)


def test_epoch_keyed_loader_is_told_each_epoch_and_resumes(tmp_path):
    "The Learner calls `set_epoch` on a training loader that has it, before each epoch, also after a resume."
    ds = synthetic_classification(32)
    tdl = _EpochKeyed(DataLoader(ds, batch_size=16)); vdl = DataLoader(ds, batch_size=16)
    learn = Learner(tiny_cnn(), tdl, vdl, loss_func=nn.CrossEntropyLoss(), path=tmp_path, cbs=[SaveCheckpoint()], progress=False, device="cpu")
    learn.fit(2)
    assert tdl.epochs == [0, 1]
    tdl2 = _EpochKeyed(DataLoader(ds, batch_size=16))
    learn2 = Learner(tiny_cnn(), tdl2, vdl, loss_func=nn.CrossEntropyLoss(), path=tmp_path, cbs=[SaveCheckpoint()], progress=False, device="cpu")
    learn2.fit(3, resume=tmp_path)
    assert tdl2.epochs == [2]
