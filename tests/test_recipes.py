"""Every named recipe parses and trains one tiny epoch; every training setting is reachable (CLI and Python)."""
import json
import pytest
from deeplense_nb.core import DeepLenseError
import torch
from torch import nn
from deeplense_nb.classify import train_classifier
from deeplense_nb.cli import main
from deeplense_nb.evaluation import evaluate
from deeplense_nb.data import RandomFlip, make_toy_dataset
from deeplense_nb.recipes import RECIPES, TrainConfig, run_recipe
from deeplense_nb.simulate import get_preset, simulate_task1

TINY_UNET = {"base_width": 8, "channel_mults": [1, 2], "attn_levels": [], "blocks_per_level": 1, "heads": 2}
TINY = {"classify": {"epochs": 1, "batch_size": 8, "pretrained": False, "device": "cpu", "progress": False},
        "diffusion": {"epochs": 1, "batch_size": 8, "subset": 8, "unet": TINY_UNET, "timesteps": 20, "grad_accum": 1,
                      "device": "cpu", "progress": False},
        "pinn": {"epochs": 1, "batch_size": 16, "device": "cpu"}}
PINN_SMALL = {"src_npix": 16, "src_pixel_scale": 0.15}  # a coarse source grid: the lens-equation layer is most of the time

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("recipes")
    sim = d / "sim"
    simulate_task1(sim, n_train=12, n_val=6, preset=get_preset("model_i", npix=32, pixel_scale=0.05 * 150 / 32),
                   dtype="float32", progress=False)
    return {"substructure": make_toy_dataset(d / "t1", layout="task1", n_per_class=4, img_size=32),
            "lens-finding": make_toy_dataset(d / "t2", layout="task2", n_per_class=4, img_size=32), "sim": sim}

@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_one_tiny_epoch(name, data, tmp_path):
    r = RECIPES[name]
    if r.trainer == "experiment":  # the zoo is an experiment notebook (tests/test_experiments.py runs it)
        with pytest.raises(Exception, match=f"deeplense run {r.settings['experiment']}"): run_recipe(name, data["sim"], out=tmp_path)
        return
    src = data[r.settings["task"]] if r.trainer == "classify" else data["sim"]
    kw = dict(TINY[r.trainer])
    if r.trainer == "pinn": kw["model_kw"] = {**r.settings.get("model_kw", {}), **PINN_SMALL}
    out = run_recipe(name, src, out=tmp_path / "run", **kw)
    if r.trainer == "classify":
        cfg = json.loads((tmp_path / "run" / "config.json").read_text())
        assert {k: cfg[k] for k in r.settings if k != "pretrained"} == {k: v for k, v in r.settings.items() if k != "pretrained"}
        assert out["epochs"] == 1
    elif r.trainer == "diffusion": assert len(out.history) == 1
    else:
        assert 0 <= out["auc_macro"] <= 1 and out["kind"] == r.settings["kind"]
        for name, auc in (("plain", out["baseline_auc_macro"]), (out["kind"], out["auc_macro"])):  # each model saved, usable by evaluate
            rep = evaluate(tmp_path / "run" / f"{name}.ckpt", data["sim"], split="val", tta=False, device="cpu")
            assert out["checkpoints"][name] == str(tmp_path / "run" / f"{name}.ckpt") and rep.metrics["auc_macro"] == pytest.approx(auc, abs=1e-6)

def test_recipe_cli(data, tmp_path, capsys):  # in-process: `main` is what the console script calls
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(n in listed for n in RECIPES) and "source:" in listed
    cfg = tmp_path / "c.json"; cfg.write_text(json.dumps({"lr": 0.005, "epochs": 3}))
    assert main(["train", "--recipe", "two-conv-cnn-lens-finder", "--data", str(data["lens-finding"]), "--out", str(tmp_path / "o"),
                 "--config", str(cfg), "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"]) == 0
    got = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (got["model"], got["balance"], got["lr"], got["epochs"]) == ("cnn_baseline", "weighted", 0.005, 1)  # recipe < config < flags
    capsys.readouterr()
    assert main(["train", "--recipe", "nope", "--data", str(data["lens-finding"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "Traceback" not in err

def test_every_setting_reachable(data, tmp_path):
    aug = nn.Sequential(RandomFlip(seed=0))  # a Python pipeline: trains, and is recorded by its repr
    m = train_classifier(data["substructure"], out=tmp_path / "a", model="cnn_baseline", epochs=2, batch_size=8, device="cpu",
                         progress=False, augment=aug, class_weights="N/(2.5n)", loss="focal", gamma=1.0, resize=16,
                         normalize="standardize", sched="step", step_size=1, step_gamma=0.5, label_smoothing=0.1)
    assert m["config"]["augment"].startswith("custom:Sequential") and "recorded by its repr" in m["validation"]
    m = train_classifier(data["substructure"], out=tmp_path / "b", model="cnn_baseline", epochs=1, batch_size=8, device="cpu",
                         progress=False, augment="flip,rot90,affine:deg=10", sched="plateau", plateau_patience=1,
                         plateau_factor=0.5, class_weights=[1.0, 2.0, 3.0], normalize="log")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["augment"] == "flip,rot90,affine:deg=10"


@pytest.mark.parametrize("name", ["ddpm-mse-ssim", "physics-twohead"])
def test_recipe_never_replaces_a_finished_run(name, tmp_path, capsys):
    "Diffusion and physics recipes refuse an --out that holds a run, like classifier runs (nothing is touched)."
    out = tmp_path / "run"; out.mkdir(); (out / "metrics.json").write_text("{}")
    assert main(["train", "--recipe", name, "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err and (out / "metrics.json").read_text() == "{}"
    # --overwrite reaches the trainer, which then fails on the missing data: the old run is still there
    assert main(["train", "--recipe", name, "--data", str(tmp_path / "none"), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "none" in err and "no setting" not in err and (out / "metrics.json").read_text() == "{}", err

def test_trainers_refuse_a_finished_run_through_the_api(tmp_path):
    "train_physics (and train_diffusion, tests/test_diffusion.py) check the run folder first, as train_classifier does."
    from deeplense_nb.recipes import train_physics
    out = tmp_path / "run"; out.mkdir(); (out / "metrics.json").write_text("{}")
    with pytest.raises(DeepLenseError, match="already holds a run"): train_physics(tmp_path / "none", out=out)
    with pytest.raises(DeepLenseError, match="inside the training data"): train_physics(tmp_path, out=tmp_path / "sub", overwrite=True)
