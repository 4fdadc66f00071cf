"""Losses: focal loss equals torch's cross-entropy at gamma=0 (weights, smoothing, soft targets, binary and
multiclass), agrees with torchvision's sigmoid focal loss, class weights, the SSIM loss and the registry."""
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.ops import sigmoid_focal_loss
from deeplense_nb.core import DeepLenseError
from deeplense_nb.losses import (FocalLoss, SSIMLoss, class_weights, get_loss, smooth_targets, weighted_bce,
                                 weighted_cross_entropy)

B, C = 32, 4


@pytest.fixture
def mc():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, C, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g)
    soft = torch.softmax(torch.randn(B, C, generator=g) * 2, 1)
    return z, y, soft


@pytest.fixture
def bin_():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, generator=g) * 3, torch.randint(0, 2, (B,), generator=g), torch.rand(B, generator=g)


W = torch.tensor([0.3, 2.0, 1.0, 5.0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", [{}, {"weight": W}, {"label_smoothing": 0.1}, {"weight": W, "label_smoothing": 0.25}],
                         ids=["plain", "weight", "smooth", "weight+smooth"])
def test_focal_gamma0_is_cross_entropy(mc, reduction, kw):
    z, y, soft = mc
    torch.testing.assert_close(FocalLoss(0.0, reduction=reduction, **kw)(z, y), F.cross_entropy(z, y, reduction=reduction, **kw))
    torch.testing.assert_close(FocalLoss(0.0, reduction=reduction, **kw)(z, soft), F.cross_entropy(z, soft, reduction=reduction, **kw))


def test_focal_gamma0_gradients_match_cross_entropy(mc):
    z, y, _ = mc
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    FocalLoss(0.0, weight=W, label_smoothing=0.1)(a, y).backward()
    F.cross_entropy(b, y, weight=W, label_smoothing=0.1).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_gamma0_is_bce(bin_, reduction):
    z, t, ts = bin_
    ref = F.binary_cross_entropy_with_logits(z, t.float(), reduction=reduction)
    torch.testing.assert_close(FocalLoss(0.0, reduction=reduction)(z, t), ref)
    torch.testing.assert_close(FocalLoss(0.0, reduction=reduction)(z[:, None], t[:, None]), ref)  # (B, 1) logits
    torch.testing.assert_close(FocalLoss(0.0, reduction=reduction)(z, ts),  # soft targets
                               F.binary_cross_entropy_with_logits(z, ts, reduction=reduction))
    # class weights (w_neg, w_pos) == BCE(weight=w_neg, pos_weight=w_pos/w_neg)
    torch.testing.assert_close(FocalLoss(0.0, weight=(0.5, 3.0), reduction=reduction)(z, ts),
                               F.binary_cross_entropy_with_logits(z, ts, weight=torch.tensor(0.5), pos_weight=torch.tensor(6.0),
                                                                  reduction=reduction))


def test_binary_label_smoothing_matches_torch(bin_):
    z, t, _ = bin_
    eps = 0.2
    torch.testing.assert_close(FocalLoss(0.0, label_smoothing=eps)(z, t),
                               F.binary_cross_entropy_with_logits(z, t.float() * (1 - eps) + eps / 2))
    # one logit z is the softmax of (0, z): torch's 2-class cross-entropy with the same smoothing
    z2 = torch.stack([torch.zeros_like(z), z], 1)
    torch.testing.assert_close(FocalLoss(0.0, label_smoothing=eps)(z, t), F.cross_entropy(z2, t, label_smoothing=eps))
    for g in (0.5, 2.0):  # and the focal term too: binary and 2-class agree
        torch.testing.assert_close(FocalLoss(g, label_smoothing=eps)(z, t), FocalLoss(g, label_smoothing=eps)(z2, t))


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.0, 0.5), (0.5, None), (3.0, 0.9)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_focal_matches_torchvision(bin_, gamma, alpha, reduction):
    z, t, _ = bin_
    ref = sigmoid_focal_loss(z, t.float(), alpha=-1 if alpha is None else alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(FocalLoss(gamma, alpha=alpha, reduction=reduction)(z, t), ref)


def test_multiclass_focal_formula(mc):
    "An independent per-element loop of -sum_c w_c a_c q_c (1-p_c)^gamma log p_c."
    z, y, soft = mc
    gamma, eps, a = 1.5, 0.1, torch.tensor([0.25, 0.5, 1.0, 2.0])
    p = torch.softmax(z.double(), 1)
    for target in (y, soft):
        q = smooth_targets(target, C, eps).double()
        ref = torch.stack([-sum(W[c] * a[c] * q[i, c] * (1 - p[i, c]) ** gamma * torch.log(p[i, c]) for c in range(C))
                           for i in range(B)])
        got = FocalLoss(gamma, alpha=a, weight=W, label_smoothing=eps, reduction="none")(z, target)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # mean with int targets is normalised by the targets' total weight (as torch), with soft targets by B
    l = FocalLoss(gamma, weight=W, reduction="none")(z, y)
    torch.testing.assert_close(FocalLoss(gamma, weight=W)(z, y), l.sum() / W[y].sum())
    ls = FocalLoss(gamma, weight=W, reduction="none")(z, soft)
    torch.testing.assert_close(FocalLoss(gamma, weight=W)(z, soft), ls.mean())


def test_focal_downweights_easy_examples():
    z = torch.tensor([[6.0, 0, 0], [0.5, 0, 0]])
    y = torch.tensor([0, 0])
    ce = F.cross_entropy(z, y, reduction="none")
    fl = FocalLoss(2.0, reduction="none")(z, y)
    p = torch.softmax(z, 1)[:, 0]
    torch.testing.assert_close(fl, ce * (1 - p) ** 2)
    assert fl[0] / ce[0] < 1e-4 and fl[1] / ce[1] > 0.3


def test_label_smoothing_matches_torch(mc):
    z, y, _ = mc
    for eps in (0.0, 0.1, 0.5, 1.0):
        q = smooth_targets(y, C, eps)
        torch.testing.assert_close(q.sum(1), torch.ones(B))
        torch.testing.assert_close(F.cross_entropy(z, q), F.cross_entropy(z, y, label_smoothing=eps))
        torch.testing.assert_close(FocalLoss(0.0, label_smoothing=eps)(z, y), F.cross_entropy(z, y, label_smoothing=eps))


def test_class_weights_schemes():
    counts = [28_675, 1_730]
    w = class_weights(counts)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[1] / w[0], torch.tensor(28_675 / 1_730))
    ws = class_weights(counts, scheme="sqrt_inverse")
    torch.testing.assert_close(ws[1] / ws[0], torch.tensor((28_675 / 1_730) ** 0.5))
    we = class_weights(counts, scheme="effective", beta=0.999)
    expect = torch.tensor([(1 - 0.999) / (1 - 0.999 ** n) for n in counts])
    torch.testing.assert_close(we, (expect / expect.mean()).float())
    assert 1 < we[1] / we[0] < w[1] / w[0]  # effective numbers are milder than inverse frequency
    with pytest.raises(DeepLenseError, match="expected one of 'inverse', 'sqrt_inverse', 'effective'"): class_weights(counts, scheme="x")
    with pytest.raises(DeepLenseError, match="positive"): class_weights([3, 0])


def test_class_weights_change_the_loss_as_documented():
    # a batch of 8 non-lenses and 2 lenses: inverse-frequency weights make both classes count equally
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(10, 2, generator=g), torch.tensor([0] * 8 + [1] * 2)
    per = F.cross_entropy(z, y, reduction="none")
    w = class_weights([8, 2])
    torch.testing.assert_close(weighted_cross_entropy(w)(z, y), (per[:8].mean() + per[8:].mean()) / 2)
    torch.testing.assert_close(FocalLoss(0.0, weight=w)(z, y), (per[:8].mean() + per[8:].mean()) / 2)
    # up-weighting the lens class increases the loss exactly when the lenses are the harder class
    hard_lens = torch.tensor([[2.0, -2.0]] * 10)  # everything predicted "non-lens"
    assert weighted_cross_entropy([1.0, 4.0])(hard_lens, y) > F.cross_entropy(hard_lens, y)
    zb = z[:, 1] - z[:, 0]
    torch.testing.assert_close(weighted_bce((1.0, 4.0))(zb, y),
                               F.binary_cross_entropy_with_logits(zb, y.float(), pos_weight=torch.tensor(4.0)))
    with pytest.raises(DeepLenseError, match="two weights"): weighted_bce((1.0, 2.0, 3.0))


def test_focal_validation(mc):
    z, y, soft = mc
    with pytest.raises(DeepLenseError, match="expected one of 'mean', 'sum', 'none'"): FocalLoss(reduction="avg")
    with pytest.raises(DeepLenseError, match="gamma"): FocalLoss(gamma=-0.5)
    with pytest.raises(DeepLenseError, match="label_smoothing"): FocalLoss(label_smoothing=1.5)
    with pytest.raises(DeepLenseError, match="one alpha per class"): FocalLoss(alpha=0.25)(z, y)
    with pytest.raises(DeepLenseError, match="weight has 2 values"): FocalLoss(weight=[1.0, 2.0])(z, y)
    with pytest.raises(DeepLenseError, match="Soft targets must have"): FocalLoss()(z, soft[:, :2])
    with pytest.raises(DeepLenseError, match="Integer targets must have"): FocalLoss()(z, y[:3])


def test_focal_state_dict_and_device_moves():
    fl = FocalLoss(2.0, alpha=[1.0, 2.0], weight=[0.5, 1.5])
    assert set(fl.state_dict()) == {"alpha", "weight"}
    assert "gamma=2.0" in repr(fl)


def test_ssim_loss():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 1, 48, 48, generator=g)
    torch.testing.assert_close(SSIMLoss()(img, img), torch.tensor(0.0), atol=1e-6, rtol=0)
    other = (img + 0.2 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    loss = SSIMLoss(data_range=1.0)(img, other)
    assert loss > 0
    torch.testing.assert_close(loss, 1 - structural_similarity_index_measure(other, img, data_range=1.0))
    assert SSIMLoss(reduction="none")(img, other).shape == (3,)
    p = other.clone().requires_grad_()
    SSIMLoss()(p, img).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(DeepLenseError, match="smaller than the 11-px window"): SSIMLoss()(img[..., :6, :6], img[..., :6, :6])
    with pytest.raises(DeepLenseError, match="one shape"): SSIMLoss()(img, img[:2])


def test_get_loss(mc, bin_):
    z, y, soft = mc
    torch.testing.assert_close(get_loss("ce")(z, y), F.cross_entropy(z, y))
    torch.testing.assert_close(get_loss("ce")(z, soft), F.cross_entropy(z, soft))
    torch.testing.assert_close(get_loss("CE", class_weights=W, label_smoothing=0.1)(z, y),
                               F.cross_entropy(z, y, weight=W, label_smoothing=0.1))
    torch.testing.assert_close(get_loss("focal", gamma=0.0, class_weights=W)(z, y), F.cross_entropy(z, y, weight=W))
    assert get_loss("focal").gamma == 2.0
    zb, tb, _ = bin_
    torch.testing.assert_close(get_loss("bce")(zb, tb), F.binary_cross_entropy_with_logits(zb, tb.float()))
    assert isinstance(get_loss("ssim"), SSIMLoss)
    with pytest.raises(DeepLenseError, match="Did you mean: focal"): get_loss("focall")
    with pytest.raises(DeepLenseError, match="Bad settings for loss 'focal'"): get_loss("focal", gama=2)
