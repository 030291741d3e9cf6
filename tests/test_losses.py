"Losses: GDL against MONAI, BSC on hand-made cases, empty maps, gradients, the combined loss and its parts, 2D and 3D."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss

from brats_nb.data import BratsError
from brats_nb.losses import BratsLoss, bsc_loss, generalized_dice_loss, region_probs, target_regions


def _logits(classes, scale=40.0):
    return F.one_hot(classes, 4).movedim(-1, 1).float() * scale


@pytest.mark.parametrize("spatial", [(7, 8, 9), (12, 10)])
def test_gdl_equals_monai(spatial):
    monai = GeneralizedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, w_type="square")
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        logits = torch.randn(3, 4, *spatial, generator=g) * (1 + trial)
        target = torch.randint(0, 4, (3, *spatial), generator=g)
        target[0][target[0] == 3] = 2                       # a class absent from one sample
        target[1] = 0                                       # a sample with no tumour at all
        ours = generalized_dice_loss(torch.softmax(logits, 1), target)
        assert ours.item() == pytest.approx(monai(logits, target[:, None]).item(), abs=1e-6)


def test_gdl_perfect_and_wrong():
    t = torch.randint(0, 4, (2, 6, 6, 6))
    assert generalized_dice_loss(torch.softmax(_logits(t), 1), t).item() == pytest.approx(0, abs=1e-6)
    wrong = (t + 1) % 4
    assert generalized_dice_loss(torch.softmax(_logits(wrong), 1), t).item() == pytest.approx(1, abs=1e-4)


def test_region_probs_mapping():
    # one confident voxel per class: 0 bg, 1 NCR, 2 ED, 3 ET
    p = torch.softmax(_logits(torch.tensor([[0, 1, 2, 3]])), 1)
    rp = region_probs(p)[0].round()
    np.testing.assert_array_equal(rp.numpy(), [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(target_regions(torch.tensor([[0, 1, 2, 3]]))[0].numpy(), rp.numpy())
    with pytest.raises(BratsError, match="4"): region_probs(torch.rand(1, 3, 4, 4))


@pytest.mark.parametrize("spatial", [(20, 20, 20), (32, 32)])
def test_bsc_covering_and_missing(spatial):
    m = torch.zeros(2, 3, *spatial)
    m[:, 0, 2:8, 2:8] = 1; m[:, 1, 10:12, 10:13] = 1; m[0, 2, 15:17, 4:6] = 1
    cover = torch.zeros(2, *spatial, dtype=torch.long); cover[(m[:, 0] > 0)] = 2; cover[(m[:, 1] > 0)] = 1
    cover[(m[:, 2] > 0)] = 3
    cover[0, 10:12, 10:13] = 3                            # TC key points covered by ET (ET is in TC)
    p = region_probs(torch.softmax(_logits(cover), 1))
    assert bsc_loss(p, m).item() == pytest.approx(0, abs=1e-6)
    p0 = region_probs(torch.softmax(_logits(torch.zeros_like(cover)), 1))
    assert bsc_loss(p0, m).item() == pytest.approx(1, abs=1e-6)
    # half the WT key voxels covered, nothing else: coverage 1/2 with weight 1/|m_WT| among 1/|m_r|
    half = torch.zeros_like(cover); half[:, 2:5, 2:8] = 2
    sizes = m.flatten(2).sum(2)
    w = torch.where(sizes > 0, 1 / sizes, torch.zeros(()))
    want = (1 - (0.5 * w[:, 0]) / w.sum(1)).mean()
    assert bsc_loss(region_probs(torch.softmax(_logits(half), 1)), m).item() == pytest.approx(want.item(), abs=1e-6)


def test_bsc_formula_on_soft_values():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(3, 3, 5, 6, 4, generator=g, dtype=torch.float64)
    m = (torch.rand(3, 3, 5, 6, 4, generator=g) > 0.7).double()
    per = []
    for b in range(3):
        num = den = 0.0
        for r in range(3):
            s = m[b, r].sum().item(); w = 1 / s ** 2
            num += w * (p[b, r] * m[b, r]).sum().item(); den += w * s
        per.append(1 - num / den)
    assert bsc_loss(p, m).item() == pytest.approx(float(np.mean(per)), abs=1e-12)


def test_empty_maps_contribute_nothing_and_never_nan():
    lg = torch.randn(3, 4, 6, 6, 6, requires_grad=True)
    tg = torch.randint(0, 4, (3, 6, 6, 6))
    km = torch.zeros(3, 3, 6, 6, 6); km[2, 1, 1:3, 1:3, 1:3] = 1       # only sample 2, only TC
    tot, parts = BratsLoss(bsc_weight=1.0)(lg, tg, km)
    alone = BratsLoss(bsc_weight=1.0)(lg[2:], tg[2:], km[2:])[1]["bsc"]
    assert parts["bsc"] == pytest.approx(alone, abs=1e-6)
    tot.backward()
    assert torch.isfinite(lg.grad).all()
    lg.grad = None
    tot, parts = BratsLoss()(lg, tg, torch.zeros_like(km))
    assert parts["bsc"] == 0.0 and np.isfinite(parts["total"])
    tot.backward(); assert torch.isfinite(lg.grad).all()
    z = bsc_loss(torch.rand(2, 3, 4, 4, requires_grad=True), torch.zeros(2, 3, 4, 4))
    assert z.item() == 0.0 and z.requires_grad


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    lg = torch.randn(2, 4, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    tg = torch.randint(0, 4, (2, 4, 3, 3), generator=g)
    km = (torch.rand(2, 3, 4, 3, 3, generator=g, dtype=torch.float64) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: bsc_loss(region_probs(torch.softmax(x, 1)), km), (lg,))
    assert torch.autograd.gradcheck(lambda x: generalized_dice_loss(torch.softmax(x, 1), tg), (lg,))
    # the BSC gradient asks for more region probability on key voxels only (descent raises p_r there)
    rp = torch.rand(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    mm = torch.zeros(1, 3, 5, 5, dtype=torch.float64); mm[0, 0, 1, 1] = mm[0, 2, 3, 3] = 1
    bsc_loss(rp, mm).backward()
    assert (rp.grad[mm > 0] < 0).all() and (rp.grad[mm == 0] == 0).all()


def test_bratsloss_parts_weight_and_variants():
    t = torch.zeros(1, 16, 16, dtype=torch.long); t[0, 4:12, 4:12] = 2; t[0, 6:10, 6:10] = 3
    km = torch.zeros(1, 3, 16, 16); km[0, 0, 2:7, 2:7] = 1; km[0, 2, 5:8, 5:8] = 1   # balls straddling the boundaries
    lg = _logits(t).requires_grad_()                                                # the ground truth, confidently
    total, parts = BratsLoss()(lg, t, km)
    assert set(parts) == {"gdl", "ce", "bsc", "total"} and all(isinstance(v, float) for v in parts.values())
    assert total.requires_grad and total.ndim == 0
    assert parts["gdl"] == pytest.approx(0, abs=1e-2) and parts["bsc"] > 0.2           # DMFNet's eps over tiny batch weights
    assert BratsLoss(gdl_weights="sample")(lg, t, km)[1]["gdl"] == pytest.approx(0, abs=1e-5)
    assert parts["total"] == pytest.approx(parts["gdl"] + 0.1 * parts["bsc"], abs=1e-6)
    assert BratsLoss(bsc_weight=0.5)(lg, t, km)[1]["total"] == pytest.approx(parts["gdl"] + 0.5 * parts["bsc"], abs=1e-6)
    assert BratsLoss(inside_only=True)(lg, t, km)[1]["bsc"] == pytest.approx(0, abs=1e-6)
    assert BratsLoss()(lg, t)[1] == {"gdl": parts["gdl"], "ce": 0.0, "bsc": 0.0, "total": parts["gdl"]}
    assert BratsLoss(bsc_weight=0)(lg, t, km)[1]["bsc"] == 0.0
    # targets with a channel axis or as floats are accepted
    assert BratsLoss()(lg, t[:, None].float(), km)[1]["total"] == pytest.approx(parts["total"], abs=1e-6)


def test_bratsloss_bad_input():
    lg = torch.randn(2, 4, 8, 8, 8)
    with pytest.raises(BratsError, match="target shape"): BratsLoss()(lg, torch.zeros(2, 8, 8, 7, dtype=torch.long))
    with pytest.raises(BratsError, match="key point maps"): BratsLoss()(lg, torch.zeros(2, 8, 8, 8, dtype=torch.long), torch.zeros(2, 2, 8, 8, 8))
    with pytest.raises(BratsError, match="0..3"): BratsLoss()(lg, torch.full((2, 8, 8, 8), 4))
    with pytest.raises(BratsError, match=r"\(B, 4"): BratsLoss()(torch.randn(2, 3, 8, 8, 8), torch.zeros(2, 8, 8, 8, dtype=torch.long))
    with pytest.raises(BratsError, match="bsc_weight"): BratsLoss(bsc_weight=-1)


def test_training_step_decreases_the_loss():
    torch.manual_seed(0)
    t = torch.zeros(2, 12, 12, 12, dtype=torch.long); t[:, 3:9, 3:9, 3:9] = 2; t[:, 5:7, 5:7, 5:7] = 3
    t[:, 3:5, 3:5, 7:9] = 1                                   # every class present (DMFNet's weights: an absent one weighs 1/eps)
    km = torch.zeros(2, 3, 12, 12, 12); km[:, 0, 2:5, 2:5, 2:5] = 1; km[:, 2, 4:6, 4:6, 4:6] = 1
    lg = torch.zeros(2, 4, 12, 12, 12, requires_grad=True)
    opt = torch.optim.SGD([lg], lr=50.0)
    fn = BratsLoss()
    first = fn(lg, t, km)[1]
    for _ in range(20):
        opt.zero_grad(); total, parts = fn(lg, t, km); total.backward(); opt.step()
    assert parts["gdl"] < first["gdl"] and parts["bsc"] < first["bsc"]


def test_cross_entropy_term_and_batch_weights():
    torch.manual_seed(0)
    lg = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    t = torch.randint(0, 4, (2, 6, 6, 6))
    total, parts = BratsLoss(bsc_weight=0, ce_weight=0.5)(lg, t)
    assert parts["ce"] == pytest.approx(float(torch.nn.functional.cross_entropy(lg.detach(), t)), abs=1e-6)
    assert parts["total"] == pytest.approx(parts["gdl"] + 0.5 * parts["ce"], abs=1e-6)
    total.backward(); assert torch.isfinite(lg.grad).all()
    assert BratsLoss()(lg, t)[1]["ce"] == 0.0                                  # off by default, as in the paper
    # DMFNet's batch weights: a class absent from the whole batch weighs 1/eps, so predicting it costs almost everything
    no_et = torch.where(t == 3, torch.zeros_like(t), t)
    flood_et = torch.full((2, 4, 6, 6, 6), -5.0); flood_et[:, 3] = 5.0
    assert generalized_dice_loss(torch.softmax(flood_et, 1), no_et, weights="batch") > 0.99
    with pytest.raises(BratsError, match="gdl_weights"): BratsLoss(gdl_weights="median")
    with pytest.raises(BratsError, match="ce_weight"): BratsLoss(ce_weight=-1)
