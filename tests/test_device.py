"""The device-resident training path (data.device) across modules: loaders, augmentation, the auto rule, the train
config/CLI flag, and benchmarks/gpu_check.sh (dry run always; the CPU run marked slow)."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from deeplense_nb.data import (DeviceAugment, DeviceData, DeviceLoader, FolderDataset, d4, d4_batch, device_nbytes,
                               get_dataloaders, make_toy_dataset, use_device_data)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("dev") / "task1", layout="task1", n_per_class=10, img_size=24)


def test_device_loader_is_a_permutation_of_the_ordinary_loader(toy):
    "Per epoch, device_data='on' visits exactly the items the ordinary loader visits (same seed, another order)."
    kw = dict(batch_size=7, seed=3, augment=False, drop_last=False)
    on, off = get_dataloaders(toy, device_data="on", **kw), get_dataloaders(toy, device_data="off", **kw)
    assert isinstance(on.train, DeviceLoader) and not isinstance(off.train, DeviceLoader)
    key = lambda x: x.flatten(1).sum(1).double().numpy().round(4)   # an image's fingerprint
    for epoch in range(2):
        xa, ya = map(torch.cat, zip(*on.train)); xb, yb = map(torch.cat, zip(*off.train))
        assert sorted(zip(key(xa), ya.tolist())) == sorted(zip(key(xb), yb.tolist()))
        assert len(set(key(xa))) == len(on.train.dataset)          # every item once
    xv, yv = map(torch.cat, zip(*on.valid)); xw, yw = map(torch.cat, zip(*off.valid))
    assert torch.equal(yv, yw) and torch.equal(xv, xw)             # validation: same images, same order


def test_device_loader_order_depends_on_seed_only(toy):
    ds = FolderDataset(toy).take_split("train")
    dd = DeviceData(ds, "cpu"); dd.x = torch.arange(len(ds), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, *ds.shape).contiguous()
    order = lambda bs, seed: torch.cat([x[:, 0, 0, 0] for x, _ in DeviceLoader(dd, batch_size=bs, shuffle=True, seed=seed)]).long()
    a = order(4, 0)
    assert sorted(a.tolist()) == list(range(len(ds)))
    assert torch.equal(a, order(9, 0)) and not torch.equal(a, order(4, 1))


def test_device_augment_shape_dtype_and_d4_exactness():
    x = torch.rand(32, 2, 10, 10)
    for dtype in (torch.float32, torch.float16):
        y = DeviceAugment(seed=0)(x.to(dtype))
        assert y.shape == x.shape and y.dtype == dtype
    y = DeviceAugment(seed=0)(x)
    assert all(any(torch.equal(y[i], d4(x[i], g)) for g in range(8)) for i in range(len(x)))
    r = x
    for _ in range(4): r = d4_batch(r, torch.ones(len(x), dtype=torch.long))   # four quarter turns
    assert torch.equal(r, x)
    for g in range(8):                                                         # every element has an inverse in D4
        z = d4_batch(x, torch.full((len(x),), g))
        assert any(torch.equal(d4_batch(z, torch.full((len(x),), h)), x) for h in range(8))
    a = DeviceAugment(seed=0, rotate=10, translate=0.05)(x)
    assert a.shape == x.shape and torch.isfinite(a).all()


def test_auto_rule():
    cuda, cpu, GiB = torch.device("cuda"), torch.device("cpu"), 2 ** 30
    demo = device_nbytes(37_500, (1, 150, 150), torch.float16)
    assert demo < 2 * GiB
    assert use_device_data("auto", nbytes=demo, device=cuda, free=70 * GiB)
    assert not use_device_data("auto", nbytes=demo, device=cuda, free=3 * GiB)          # over half the free memory
    assert use_device_data("auto", nbytes=demo, device=cuda, free=3 * GiB, max_share=0.7)
    assert not use_device_data("auto", nbytes=1, device=torch.device("mps"), free=GiB)
    assert use_device_data("on", nbytes=10 * GiB, device=cpu, free=1) and not use_device_data("off", nbytes=1, device=cuda, free=GiB)
    with pytest.raises(Exception, match="expected one of"): use_device_data("maybe", nbytes=1, device=cpu)


def test_train_config_field_and_flag():
    from deeplense_nb.classify import TrainConfig, _cli_train
    import argparse
    assert TrainConfig().device_data == "auto"
    p = argparse.ArgumentParser(); _cli_train(p)
    assert p.parse_args(["--out", "x", "--device-data", "off"]).device_data == "off"
    with pytest.raises(SystemExit): p.parse_args(["--out", "x", "--device-data", "sometimes"])


def _gpu_check(out, *args, timeout):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_dry_run(tmp_path):
    r = _gpu_check(tmp_path, "--dry-run", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry_run"] is True and set(res["steps"]) == {"simulate", "train", "demo", "diffusion", "fit", "sim2real", "pytest"}
    assert all(s["status"] == "planned" for s in res["steps"].values())
    assert "== train" in r.stdout

def test_gpu_check_steps_selects(tmp_path):
    "--steps runs only the named steps; the others are reported as skipped, with the reason."
    r = _gpu_check(tmp_path, "--steps", "simulate", timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["steps"]["simulate"]["status"] == "ok" and res["steps"]["simulate"]["figures"]["complete"] is True
    assert set(res["skipped"]) == {"train", "demo", "diffusion", "fit", "sim2real", "pytest"}
    assert res["skipped"]["train"] == "not in --steps simulate"
    steps = [json.loads(l) for l in (tmp_path / "gpu_check.steps.jsonl").read_text().splitlines()]   # each step's record as it ends
    assert [s["name"] for s in steps] == list(res["steps"]) and steps[0] == res["steps"]["simulate"]


@pytest.mark.slow
def test_gpu_check_runs_without_a_gpu(tmp_path):
    if torch.cuda.is_available(): pytest.skip("this checks the no-GPU run")
    r = _gpu_check(tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["gpu"] is None and set(res["skipped"]) == {"demo", "sim2real", "pytest"}
    assert {k: s["status"] for k, s in res["steps"].items() if k not in res["skipped"]} == {"simulate": "ok", "train": "ok", "diffusion": "ok", "fit": "ok"}
    assert res["steps"]["train"]["figures"]["speedup_resident_vs_plain"] > 0
    assert res["steps"]["fit"]["figures"]["smooth_img_per_s"]["32"] > 0 and res["steps"]["fit"]["figures"]["study_fit_s_estimate"] > 0
