"""Physics-informed models (deeplense_nb.pinn): the lens-equation layer against the simulator's truth, gradient flow,
both models and their objectives, checkpoints through training.load_model, the truth dataset."""
import json
import pytest
import torch
import torch.nn.functional as F

from deeplense_nb.core import DeepLenseError
from deeplense_nb.pinn import (LENS_PARAMS, PINN_KINDS, LensEquationLayer, LensParamHead, PhysicsObjective, TruthDataset,
                               create_pinn, param_names, physics_weight, splat, relens, truth_to_params)
from deeplense_nb.physics import pixel_grid, sersic
from deeplense_nb.simulate import get_preset, image_rng, render, sample_truth

BACKBONE = "cnn_baseline"  # the registry's smallest model keeps these tests fast on CPU


@pytest.fixture(scope="module")
def lenses():
    "Noise-free simulated images (no, sphere, vort, no) with their truth dicts."
    p = get_preset("model_i")
    truth = [sample_truth(p, c, image_rng(7, "test_pinn", c, i)) for i, c in enumerate(["no", "sphere", "vort", "no"])]
    return render(truth, p, noise=False), truth


def _true_source(truth, layer):
    x, y = pixel_grid(layer.src_npix, layer.src_pixel_scale)
    col = lambda k: torch.tensor([t[k] for t in truth], dtype=torch.float32).view(-1, 1, 1)
    return sersic(x, y, R_e=col("src_R_e"), n=col("src_n"), q=col("src_q"), phi=col("src_phi"),
                  x0=col("src_x"), y0=col("src_y")).unsqueeze(1)


def test_true_parameters_reconstruct_the_true_source(lenses):
    _, truth = lenses
    img = render(truth, get_preset("model_i", psf_fwhm=0.05, psf_wing=None), noise=False)   # a one-pixel PSF: the layer inverts the lens equation, it does not deconvolve
    layer = LensEquationLayer()
    out = layer(img, truth_to_params(truth))
    src = _true_source(truth, layer)
    src = src * ((out["source"] * src).flatten(1).sum(1) / src.pow(2).flatten(1).sum(1)).view(-1, 1, 1, 1)
    err = (out["source"] - src).flatten(1).norm(dim=1) / src.flatten(1).norm(dim=1)
    resid = LensEquationLayer.consistency(img, out["relensed"])
    smooth = [0, 3]  # no substructure: the SIE + shear explains the image
    assert (err[smooth] < 0.08).all(), err
    assert (resid[smooth] < 0.03).all(), resid
    # substructure is what the smooth lens leaves over: the vort image without its vortex is explained much better
    p = get_preset("model_i")
    no_vortex = {k: v for k, v in truth[2].items() if not k.startswith("vort")}
    pair = render([truth[2], no_vortex], p, noise=False)
    r = LensEquationLayer.consistency(pair, layer(pair, truth_to_params([truth[2], no_vortex]))["relensed"])
    assert r[0] > 2 * r[1], r
    # a wrong Einstein radius explains the image much worse, and spreads the ring over the source plane
    comp = LensEquationLayer.compactness(img, out["beta_x"], out["beta_y"])
    for f in (0.6, 1.3):
        wrong = truth_to_params(truth); wrong[:, 0] *= f
        o = layer(img, wrong)
        c = LensEquationLayer.consistency(img, o["relensed"])
        assert (c > resid).all(), (f, c, resid)  # worse for every image, substructure or not
        assert (c[smooth] > 3 * resid[smooth]).all(), (f, c, resid)  # and much worse where the smooth lens is the whole truth
        assert (LensEquationLayer.compactness(img, o["beta_x"], o["beta_y"]) > 1.5 * comp).all(), f


def test_splat_is_the_adjoint_of_relens():
    g = torch.Generator().manual_seed(1)
    bx, by = ((torch.rand(2, 10, 10, generator=g, dtype=torch.float64) - 0.5) * 0.7 for _ in range(2))  # inside the grid
    # (off-grid rays differ by design: relens clamps them to the border, splat drops them)
    img, s = torch.rand(2, 2, 10, 10, generator=g, dtype=torch.float64), torch.rand(2, 2, 7, 7, generator=g, dtype=torch.float64)
    src, w = splat(img, bx, by, npix=7, pixel_scale=0.12, eps=1e-12)
    lhs = (relens(s, bx, by, pixel_scale=0.12) * img).sum()
    assert torch.allclose(lhs, (s * src * w).sum(), atol=1e-10)


def test_gradients_reach_the_parameter_head(lenses):
    img, truth = lenses
    torch.manual_seed(0)
    head, layer = LensParamHead(8), LensEquationLayer()
    out = layer(img, head(torch.randn(len(img), 8)))
    LensEquationLayer.consistency(img, out["relensed"]).mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", PINN_KINDS)
def test_models_and_objectives(kind, lenses):
    img, truth = lenses
    y, t = torch.tensor([0, 1, 2, 0]), truth_to_params(truth)
    torch.manual_seed(0)
    model = create_pinn(kind, backbone=BACKBONE)
    assert model(img).shape == (4, 3)
    out = model.forward_all(img)
    assert out["params"].shape == (4, len(LENS_PARAMS)) and out["source"].shape == (4, 1, 64, 64)
    assert out["relensed"].shape == img.shape
    obj = PhysicsObjective(model, truth_weight=1.0, e0=0.0, steps_per_epoch=2)
    for batch in ((img, y), (img, y, t)):
        loss = obj(*batch)
        assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for p in model.param_head.parameters(): assert p.grad is not None and p.grad.abs().sum() > 0
    assert obj.epoch == 1.0  # two training steps at two steps per epoch
    obj.eval()
    assert obj(img).shape == (4, 3)  # images only: logits, for prediction code


def test_lensiformer_classification_loss_trains_the_lens_head(lenses):
    img, _ = lenses
    torch.manual_seed(0)
    m = create_pinn("lensiformer", backbone=BACKBONE, profile="sis", shear=False)
    assert m.param_names == param_names("sis", shear=False)
    F.cross_entropy(m(img), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad.abs().sum() > 0 for p in m.param_head.parameters())


def test_schedule_and_errors(lenses):
    img, _ = lenses
    assert physics_weight(0.0, w_max=2.0, k=3.0, e0=0.0) == pytest.approx(1.0)
    assert physics_weight(-10, e0=0) < 1e-4 and physics_weight(10, e0=0) > 1 - 1e-4
    with pytest.raises(DeepLenseError, match="'plain', 'twohead', 'lensiformer'"): create_pinn("transformer", backbone=BACKBONE)
    with pytest.raises(DeepLenseError, match="input_norm"): create_pinn("plain", backbone=BACKBONE, input_norm="batch")
    with pytest.raises(DeepLenseError, match="create_pinn"):
        from deeplense_nb.models import create_model
        PhysicsObjective(create_model(BACKBONE, in_chans=1, num_classes=3))
    obj = PhysicsObjective(create_pinn("twohead", backbone=BACKBONE), truth_weight=1.0)
    with pytest.raises(DeepLenseError, match=r"shape \(B, 7\)"): obj(img, torch.zeros(4, dtype=torch.long), torch.zeros(4, 3))
    with pytest.raises(DeepLenseError, match="profile"): LensEquationLayer(profile="nfw")


def test_checkpoint_round_trip(tmp_path, lenses):
    training = pytest.importorskip("deeplense_nb.training")
    if not hasattr(training, "load_model"): pytest.skip("training.load_model not available")
    img, truth = lenses
    y = torch.tensor([0, 1, 2, 0])
    for kind in PINN_KINDS:
        torch.manual_seed(0)
        obj = PhysicsObjective(create_pinn(kind, backbone=BACKBONE, src_npix=48), steps_per_epoch=2, truth_weight=0.5)
        dl = torch.utils.data.DataLoader(TruthDataset(img, y, truth), batch_size=2)
        learn = training.Learner(obj, dl, dl, path=tmp_path / kind, cbs=[training.SaveCheckpoint()], progress=False)
        learn.fit(1)
        back, meta = training.load_model(tmp_path / kind / "last.ckpt")
        assert meta["model_config"]["builder"] == "deeplense_nb.pinn:create_physics_objective"
        assert isinstance(back, PhysicsObjective) and int(back.step) == 2 and back.truth_weight == 0.5
        assert back.model.layer.src_npix == 48
        obj.eval()
        with torch.no_grad(): assert torch.allclose(back(img), obj(img), atol=1e-5)
        # the bare model's own config rebuilds it too
        bare = training.build_model(json.loads(json.dumps(obj.model.model_config)))
        bare.load_state_dict(obj.model.state_dict())
        with torch.no_grad(): assert torch.allclose(bare.eval()(img), obj.model(img), atol=1e-5)
    plain = create_pinn("plain", backbone=BACKBONE).eval()
    again = training.build_model(json.loads(json.dumps(plain.model_config)))
    again.load_state_dict(plain.state_dict())
    with torch.no_grad(): assert torch.allclose(again.eval()(img), plain(img), atol=1e-6)


def test_truth_dataset_from_simulated_folder(tmp_path):
    from deeplense_nb.simulate import simulate_task1
    with pytest.raises(DeepLenseError, match="manifest.json not found"): TruthDataset.from_folder(tmp_path)
    simulate_task1(tmp_path / "sim", n_train=3, n_val=3, seed=5, progress=False)
    ds = TruthDataset.from_folder(tmp_path / "sim", split="val")
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 2]
    x, y, t = ds[1]
    assert x.shape == (1, 150, 150) and x.dtype == torch.float32 and t.shape == (7,)
    rows = [json.loads(l) for l in (tmp_path / "sim" / "truth.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["file"] == "val/sphere/1.npy")
    assert torch.allclose(t, truth_to_params(row)[0])
    assert len(ds.without_truth()[0]) == 2
    with pytest.raises(DeepLenseError, match="no images under split"): TruthDataset.from_folder(tmp_path / "sim", split="test")


def test_compare_physics_tiny():
    "The comparison runs end to end on a tiny set and reports AUCs and Einstein radii for every model."
    pytest.importorskip("deeplense_nb.training")
    from deeplense_nb.pinn_compare import compare_physics, physics_summary
    tr, va = TruthDataset.simulate(18, seed=2, split="train"), TruthDataset.simulate(12, seed=2, split="val")
    res = compare_physics(tr, va, kinds=("twohead",), backbone=BACKBONE, epochs=1, batch_size=9, device="cpu",
                          truth_weight=1.0, n_boot=20)
    t = res["table"]
    assert list(t.index) == ["plain", "twohead"]
    assert {"auc_macro", "auc_no", "auc_sphere", "auc_vort", "valid_theta_E_mae"} <= set(t.columns)
    assert len(res["theta_E"]["twohead"]["pred"]) == 12
    assert "twohead: macro AUC" in physics_summary(res)
