"""Every registered model: contract (shapes, gradients, features, config), weight files, pretrained adaptation
without network, errors, the optional timm path, and `deeplense list-models`."""
import json, pathlib, sys, types, urllib.error, warnings
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from safetensors.torch import save_file
from deeplense_nb.core import DeepLenseError
from deeplense_nb.models import (DeepLenseNet, MissingDependencyError, UnknownModelError, WeightsError, WeightsWarning,
                                 adapt_input_conv, create_model, list_models, load_weights, model_entry, num_params,
                                 read_state_dict, tv_weights_file)

# models whose 150 px pass is checked without gradients (their backward pass is checked at 64 px)
BIG = {"resnet50", "resnet101", "resnet152", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5",
       "convnext_tiny", "convnextv2_tiny", "mobilenetv3_large", "densenet121"}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads(); torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def _need(name):
    e = model_entry(name)
    if not e.available: pytest.skip(f"{name} needs the optional package {e.requires}")


def _grads_ok(m):
    gs = [p.grad for p in m.parameters() if p.requires_grad]
    assert gs and all(g is not None and torch.isfinite(g).all() for g in gs)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_model_contract(name, in_chans):
    _need(name)
    torch.manual_seed(0)
    m = create_model(name, in_chans=in_chans, num_classes=3)
    assert isinstance(m, DeepLenseNet) and isinstance(m.num_features, int) and m.num_features > 0
    assert m.model_config == {"builder": "deeplense_nb.models:create_model",
                              "kwargs": {"name": name, "in_chans": in_chans, "num_classes": 3}}
    json.dumps(m.model_config)
    y = torch.tensor([0, 2])
    # 64 px, train mode: logits, features, backward
    x = torch.randn(2, in_chans, 64, 64)
    f = m.forward_features(x)
    out = m.forward_head(f)
    assert f.shape == (2, m.num_features) and out.shape == (2, 3)
    assert torch.isfinite(out).all() and torch.isfinite(f).all()
    F.cross_entropy(out, y).backward()
    _grads_ok(m)
    # 150 px: with gradients for the small models, without for the big ones
    m.zero_grad(set_to_none=True)
    x = torch.randn(2, in_chans, 150, 150)
    if name in BIG:
        m.eval()
        with torch.no_grad(): f = m.forward_features(x); out = m.forward_head(f)
    else:
        f = m.forward_features(x); out = m.forward_head(f)
        F.cross_entropy(out, y).backward(); _grads_ok(m)
    assert f.shape == (2, m.num_features) and out.shape == (2, 3) and torch.isfinite(out).all()
    # forward == forward_head(forward_features) in eval mode
    m.eval()
    with torch.no_grad(): torch.testing.assert_close(m(x[..., :64, :64]), m.forward_head(m.forward_features(x[..., :64, :64])))


@pytest.mark.parametrize("name", list_models())
def test_weights_path_roundtrip(name, tmp_path):
    _need(name)
    torch.manual_seed(0)
    m = create_model(name, in_chans=1, num_classes=3).eval()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    files = ["w.safetensors"] if name in BIG else ["w.safetensors", "w.pt"]  # both formats on the small models
    save_file(sd, tmp_path / "w.safetensors")
    if "w.pt" in files: torch.save(sd, tmp_path / "w.pt")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad(): ref = m(x)
    for f in files:
        torch.manual_seed(1)  # a different initialisation, overwritten by the file
        with warnings.catch_warnings():
            warnings.simplefilter("error", WeightsWarning)  # a full state dict loads without warnings
            m2 = create_model(name, in_chans=1, num_classes=3, weights_path=tmp_path / f).eval()
        with torch.no_grad(): torch.testing.assert_close(m2(x), ref, rtol=0, atol=0)


def test_model_config_rebuilds_with_settings():
    m = create_model("resnet18", in_chans=3, num_classes=2, small_input=True, drop_rate=0.1)
    cfg = json.loads(json.dumps(m.model_config))
    assert cfg["kwargs"] == {"name": "resnet18", "in_chans": 3, "num_classes": 2, "small_input": True, "drop_rate": 0.1}
    m2 = create_model(**cfg["kwargs"])
    assert m2.backbone.conv1.kernel_size == (3, 3) and isinstance(m2.backbone.maxpool, nn.Identity)
    m2.load_state_dict(m.state_dict())  # same architecture, strict


def test_reset_classifier_keeps_config():
    m = create_model("cnn_baseline", in_chans=1, num_classes=3).reset_classifier(5)
    assert m(torch.randn(2, 1, 40, 40)).shape == (2, 5) and m.model_config["kwargs"]["num_classes"] == 5


def test_list_models():
    names = list_models()
    for n in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", *[f"efficientnet_b{i}" for i in range(6)],
              "mobilenetv3_small", "mobilenetv3_large", "convnext_tiny", "convnextv2_tiny", "resnet20", "cnn_baseline"]:
        assert n in names
    assert list_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(6)]
    assert list_models("resnet1*") == ["resnet18", "resnet101", "resnet152"]
    pre = list_models(pretrained=True)
    assert "resnet18" in pre and "resnet20" not in pre and "cnn_baseline" not in pre
    assert list_models("nothing*") == []


def test_known_parameter_counts():
    # torchvision's ImageNet models, and He et al.'s CIFAR ResNet-20 (0.27M)
    assert num_params("resnet18", in_chans=3, num_classes=1000) == 11_689_512
    assert num_params("efficientnet_b0", in_chans=3, num_classes=1000) == 5_288_548
    assert num_params("convnext_tiny", in_chans=3, num_classes=1000) == 28_589_128
    assert num_params("mobilenetv3_small", in_chans=3, num_classes=1000) == 2_542_856
    assert 265_000 < num_params("resnet20", in_chans=3, num_classes=10) < 275_000


def test_resnet20_architecture():
    m = create_model("resnet20", in_chans=1, num_classes=3)
    b = m.backbone
    assert [len(getattr(b, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert [getattr(b, f"layer{i}")[0].conv2.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    assert m.num_features == 64
    assert sum(isinstance(l, nn.Conv2d) and l.kernel_size == (3, 3) for l in m.modules()) == 19  # + linear = 20 layers


def test_cnn_baseline_any_size():
    m = create_model("cnn_baseline", in_chans=3, num_classes=2).eval()
    with torch.no_grad():
        for s in (16, 33, 64, 150, 200): assert m(torch.randn(1, 3, s, s)).shape == (1, 2)


def test_small_input_stem():
    m = create_model("resnet34", in_chans=3, num_classes=2, small_input=True)
    assert m.backbone.conv1.kernel_size == (3, 3) and m.backbone.conv1.stride == (1, 1)
    assert isinstance(m.backbone.maxpool, nn.Identity)
    with pytest.raises(DeepLenseError, match="small_input"):
        create_model("efficientnet_b0", in_chans=3, num_classes=2, small_input=True)  # ResNets only


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownModelError, match="Did you mean: resnet18"): create_model("resnet-18", in_chans=1, num_classes=3)
    with pytest.raises(UnknownModelError, match="efficientnet_b0"): create_model("efficientnetb0", in_chans=1, num_classes=3)
    with pytest.raises(UnknownModelError) as e: create_model("zzzz", in_chans=1, num_classes=3)
    assert "cnn_baseline" in str(e.value)  # no close match: all names listed
    assert issubclass(UnknownModelError, DeepLenseError)


def test_bad_settings():
    with pytest.raises(DeepLenseError, match="its settings are: .*drop_rate"):
        create_model("resnet20", in_chans=1, num_classes=3, width=2)
    with pytest.raises(DeepLenseError, match="JSON-able"):
        create_model("cnn_baseline", in_chans=1, num_classes=3, hidden=torch.tensor(3))
    with pytest.raises(DeepLenseError, match="in_chans"): create_model("resnet18", in_chans=0, num_classes=3)
    with pytest.raises(DeepLenseError, match="num_classes"): create_model("resnet18", in_chans=1, num_classes=-1)
    with pytest.raises(WeightsError, match="no downloadable pretrained weights"):
        create_model("cnn_baseline", in_chans=1, num_classes=3, pretrained=True)


# ---------------------------------------------------------------------------------------------- pretrained / adaptation
def test_adapt_input_conv():
    w = torch.randn(16, 3, 7, 7)
    torch.testing.assert_close(adapt_input_conv(1, w), w.sum(1, keepdim=True))
    assert torch.equal(adapt_input_conv(3, w), w)
    w5 = adapt_input_conv(5, w)
    torch.testing.assert_close(w5, torch.cat([w, w[:, :2]], 1) * 3 / 5)
    # with a multiple of 3 channels, a constant image gives the same response as the RGB kernel
    torch.testing.assert_close(adapt_input_conv(6, w).sum(1), w.sum(1))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    "An empty torch hub folder and a download that always fails: no test may reach the network."
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    def fail(url, *a, **k): raise urllib.error.URLError(f"offline test: refused to download {url}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_offline_error(offline_hub):
    f = tv_weights_file("resnet18")
    assert f.parent == offline_hub and f.name.startswith("resnet18-") and f.suffix == ".pth"
    with pytest.raises(WeightsError) as e: create_model("resnet18", in_chans=1, num_classes=3, pretrained=True)
    msg = str(e.value)
    assert str(f) in msg and "weights_path" in msg and "TORCH_HOME" in msg and "download.pytorch.org" in msg


@pytest.mark.parametrize("name,arch,first", [("resnet18", "resnet18", "conv1"),
                                             ("efficientnet_b0", "efficientnet_b0", "features.0.0"),
                                             ("mobilenetv3_small", "mobilenet_v3_small", "features.0.0"),
                                             ("convnext_tiny", "convnext_tiny", "features.0.0")])
def test_pretrained_from_cache_adapts_first_conv(offline_hub, name, arch, first):
    torch.manual_seed(0)
    rgb = getattr(tvm, arch)(weights=None)  # stands in for the ImageNet file
    f = tv_weights_file(arch); f.parent.mkdir(parents=True, exist_ok=True); torch.save(rgb.state_dict(), f)
    w_rgb = rgb.get_submodule(first).weight
    m1 = create_model(name, in_chans=1, num_classes=3, pretrained=True)
    torch.testing.assert_close(m1.get_submodule(m1.first_conv).weight, w_rgb.sum(1, keepdim=True))
    m3 = create_model(name, in_chans=3, num_classes=3, pretrained=True)
    assert torch.equal(m3.get_submodule(m3.first_conv).weight, w_rgb)
    # everything but the ImageNet classifier came from the file
    sd = m1.state_dict()
    n_loaded = sum(torch.equal(sd[k], v) for k, v in m3.state_dict().items() if k in sd and not k.startswith("head."))
    assert n_loaded == len([k for k in sd if not k.startswith("head.")]) - 1  # all but the adapted first conv
    assert m1.head.out_features == 3
    # the cached file loads through weights_path too (torchvision key layout; its 1000-class head is skipped)
    with pytest.warns(WeightsWarning, match="head.weight"):
        m = create_model(name, in_chans=1, num_classes=3, weights_path=f)
    torch.testing.assert_close(m.get_submodule(m.first_conv).weight, w_rgb.sum(1, keepdim=True))


def test_weights_path_adapts_first_conv(tmp_path):
    torch.manual_seed(0)
    rgb = create_model("resnet20", in_chans=3, num_classes=3)
    save_file(rgb.state_dict(), tmp_path / "rgb.safetensors")
    m = create_model("resnet20", in_chans=1, num_classes=3, weights_path=tmp_path / "rgb.safetensors")
    torch.testing.assert_close(m.backbone.conv1.weight, rgb.backbone.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(m.head.weight, rgb.head.weight)
    m4 = create_model("resnet20", in_chans=4, num_classes=3, weights_path=tmp_path / "rgb.safetensors")
    torch.testing.assert_close(m4.backbone.conv1.weight[:, 3], rgb.backbone.conv1.weight[:, 0] * 3 / 4)


def test_head_mismatch_is_skipped_with_warning(tmp_path):
    torch.manual_seed(0)
    src = create_model("resnet18", in_chans=1, num_classes=3)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with pytest.warns(WeightsWarning, match="head.weight"):
        m = create_model("resnet18", in_chans=1, num_classes=2, weights_path=tmp_path / "w.pth")
    assert m.head.out_features == 2
    assert torch.equal(m.backbone.layer4[1].conv2.weight, src.backbone.layer4[1].conv2.weight)


def test_backbone_only_file(tmp_path):
    torch.manual_seed(0)
    src = create_model("mobilenetv3_small", in_chans=3, num_classes=2).eval()
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, tmp_path / "bb.safetensors")
    with pytest.warns(WeightsWarning, match="backbone-only"):
        m = create_model("mobilenetv3_small", in_chans=3, num_classes=2, weights_path=tmp_path / "bb.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(m.forward_features(x), src.forward_features(x), rtol=0, atol=0)


def test_wrong_architecture_is_an_error(tmp_path):
    torch.save(create_model("resnet18", in_chans=1, num_classes=3).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="do not fit model 'resnet34'.*missing from the file"):
        create_model("resnet34", in_chans=1, num_classes=3, weights_path=tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="unexpected"):
        load_weights(create_model("resnet20", in_chans=1, num_classes=3), {**create_model("resnet20", in_chans=1, num_classes=3).state_dict(),
                                                                         "extra.weight": torch.zeros(2)})


def test_weight_files_are_never_unpickled(tmp_path):
    flag = tmp_path / "pwned"
    class Evil:
        def __reduce__(self): return (pathlib.Path.touch, (flag,))
    torch.save({"conv.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="can execute code"):
        create_model("cnn_baseline", in_chans=1, num_classes=3, weights_path=tmp_path / "evil.pt")
    assert not flag.exists()
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("cnn_baseline", in_chans=1, num_classes=3, weights_path=tmp_path / "missing.safetensors")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(WeightsError, match="neither safetensors nor"): read_state_dict(tmp_path / "text.pt")


def test_checkpoint_wrappers_and_prefixes(tmp_path):
    torch.manual_seed(0)
    src = create_model("resnet20", in_chans=1, num_classes=3).eval()
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "ddp.ckpt")
    m = create_model("resnet20", in_chans=1, num_classes=3, weights_path=tmp_path / "ddp.ckpt").eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad(): assert torch.equal(m(x), src(x))


# ---------------------------------------------------------------------------------------------- timm
def test_timm_missing_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    for name in ("timm/resnet18d", "convnextv2_tiny"):
        with pytest.raises(MissingDependencyError, match=r'pip install "deeplense-nb\[timm\]"'):
            create_model(name, in_chans=1, num_classes=3)
    assert "convnextv2_tiny" in list_models() and not model_entry("convnextv2_tiny").available


def _fake_timm():
    "A stand-in following timm's documented API: create_model(name, pretrained=, in_chans=, num_classes=)."
    calls = []
    class Net(nn.Module):
        def __init__(self, in_chans, num_classes, **kw):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_chans, 12, 3))
            self.num_features = 12
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(12, num_classes) if num_classes else nn.Identity()
            self.pretrained_cfg = {"first_conv": "stem.0", "classifier": "fc"}
        def forward(self, x): return self.fc(self.pool(self.stem(x)))
    def create_model(model_name, pretrained=False, **kw):
        calls.append((model_name, pretrained, kw))
        if pretrained: raise OSError("We couldn't connect to 'https://huggingface.co'")
        return Net(kw["in_chans"], kw["num_classes"])
    mod = types.SimpleNamespace(create_model=create_model, is_model=lambda n: n.split(".")[0] in ("tinynet", "convnextv2_tiny"),
                                list_models=lambda pattern="*", pretrained=False: ["convnextv2_tiny", "tinynet"])
    return mod, calls


def test_timm_wrapper_with_documented_api(monkeypatch):
    fake, calls = _fake_timm()
    monkeypatch.setitem(sys.modules, "timm", fake)
    m = create_model("timm/tinynet", in_chans=1, num_classes=4, drop_path_rate=0.1)
    assert calls[-1] == ("tinynet", False, {"in_chans": 1, "num_classes": 0, "drop_path_rate": 0.1})
    assert m.num_features == 12 and m.first_conv == "backbone.stem.0"
    x = torch.randn(2, 1, 20, 20)
    assert m(x).shape == (2, 4) and m.forward_features(x).shape == (2, 12)
    assert m.model_config["kwargs"] == {"name": "timm/tinynet", "in_chans": 1, "num_classes": 4, "drop_path_rate": 0.1}
    assert create_model("convnextv2_tiny", in_chans=3, num_classes=2)(torch.randn(1, 3, 20, 20)).shape == (1, 2)
    with pytest.raises(UnknownModelError, match="Did you mean: tinynet"): create_model("timm/tinynett", in_chans=1, num_classes=2)
    with pytest.raises(WeightsError, match="Hugging Face hub cache"):
        create_model("timm/tinynet", in_chans=1, num_classes=2, pretrained=True)
    # a checkpoint of the timm model in timm's own layout (classifier "fc") loads, first conv adapted
    rgb = fake.create_model("tinynet", in_chans=3, num_classes=4)
    m = create_model("timm/tinynet", in_chans=1, num_classes=4)
    rep = load_weights(m, rgb.state_dict())
    assert rep.layout == "timm" and rep.adapted == ["backbone.stem.0.weight"]
    assert torch.equal(m.head.weight, rgb.fc.weight)


@pytest.mark.skipif(not model_entry("convnextv2_tiny").available, reason="timm is not installed")
def test_real_timm_model():
    m = create_model("timm/resnet10t", in_chans=1, num_classes=3)
    x = torch.randn(2, 1, 64, 64)
    assert m(x).shape == (2, 3) and m.forward_features(x).shape == (2, m.num_features)
    assert m.get_submodule(m.first_conv).in_channels == 1
    assert "timm/resnet10t" in list_models("timm/resnet10*")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_list_models(cli, capsys):
    from deeplense_nb.cli import main
    r = cli("list-models", "resnet*")  # the console path, in a subprocess
    assert r.stdout.split() == list_models("resnet*")
    assert main(["list-models"]) == 0
    assert capsys.readouterr().out.split() == list_models()
    assert main(["list-models", "resnet*", "--params", "--in-chans", "3", "--num-classes", "1000"]) == 0
    rows = {l.split()[0]: l.split() for l in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == list_models("resnet*")
    assert rows["resnet18"][1:3] == ["11,689,512", "512"]
    assert main(["list-models", "vit*"]) == 2
    err = capsys.readouterr().err
    assert "No model matches 'vit*'" in err and err.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------------- equivariant model, aliases
@pytest.mark.parametrize("n", [64, 75])
def test_p4m_cnn_logits_are_d4_invariant(n):
    torch.manual_seed(0)
    m = create_model("p4m_cnn", in_chans=1, num_classes=3, widths=(4, 8, 16))
    x = torch.rand(2, 1, n, n)
    for mode in (m.train, m.eval):  # batch statistics and running statistics alike
        mode()
        with torch.no_grad():
            ref = m(x)
            for k in range(4):
                for flip in (False, True):
                    xv = torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))
                    torch.testing.assert_close(m(xv), ref, atol=1e-4, rtol=1e-4)
    plain = create_model("cnn_baseline", in_chans=1, num_classes=3).eval()  # the check can fail: a plain CNN is not invariant
    with torch.no_grad(): assert (plain(torch.rot90(x, 1, dims=(-2, -1))) - plain(x)).abs().max() > 1e-4


def test_model_aliases(cli):
    m = create_model("mobilenet_v3_small", in_chans=1, num_classes=2)
    assert m.name == "mobilenetv3_small" and m.model_config["kwargs"]["name"] == "mobilenetv3_small"
    assert model_entry("D4_CNN").name == "p4m_cnn" and model_entry("gcnn").name == "p4m_cnn"
    assert {"densenet121", "p4m_cnn"} <= set(list_models())
    assert list_models("mobilenet_v3*") == ["mobilenetv3_large", "mobilenetv3_small"]
    r = cli("list-models", "--aliases")
    assert "mobilenet_v3_small -> mobilenetv3_small" in r.stdout.splitlines() and "d4_cnn -> p4m_cnn" in r.stdout


def test_a_tensor_of_another_shape_is_not_also_missing():
    "A tensor of another shape is reported once (as another shape), not a second time as missing from the file."
    src = create_model("lensnet", in_chans=1, num_classes=3).state_dict()
    k = [k for k, v in src.items() if v.ndim == 4 and not k.startswith("head")][-1]
    src[k] = torch.zeros(*src[k].shape[:-1], src[k].shape[-1] + 2)
    with pytest.raises(WeightsError, match="1 of another shape") as e: load_weights(create_model("lensnet", in_chans=1, num_classes=3), src)
    assert "missing" not in str(e.value)


def test_json_weight_files_read_like_any_state_dict(tmp_path):
    "A JSON weight file (name -> nested lists, optionally wrapped) loads through `read_state_dict` and `load_weights`."
    net = create_model("lensnet", in_chans=1, num_classes=3)
    (tmp_path / "w.json").write_text(json.dumps({"model": {k: v.tolist() for k, v in net.state_dict().items()}}))
    other = create_model("lensnet", in_chans=1, num_classes=3)
    load_weights(other, tmp_path / "w.json")
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
