"2D extension: generators, readers (synthetic and the real DSB 2018 layout), key points, metrics, modules in 2D."
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from brats_nb.data import BratsError
from brats_nb.mie import MIE
from brats_nb.sie import SIE
from brats_nb.losses import bsc_loss
from brats_nb.twod import (
    NUCLEI_STYLES, make_nuclei, make_lesion, read_dsb_case, find_dsb_cases, read_isic_pair, find_isic_pairs,
    contour_pixels, draw_candidates, fill_candidates, fill_reference, select_keypoints_2d,
    select_keypoints_2d_reference, keypoint_map_2d, bench_keypoints_2d, format_bench_2d, dice_2d, iou_2d, hd95_2d,
    build_model_2d, loss_2d, train_2d, predict_2d, evaluate_2d, keypoint_maps_2d, ring_shares, _blob)

DSB = Path(__file__).resolve().parents[2] / "shared/real/dsb2018"


@pytest.fixture
def one_thread():
    "Tiny convolutions on a shared 2-core CPU run many times faster on one thread than on two."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- generators -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", NUCLEI_STYLES)
def test_make_nuclei_shapes_seeded(style):
    img, m = make_nuclei(3, (96, 80), style)
    assert img.shape == (3, 96, 80) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert m.shape == (96, 80) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    img2, m2 = make_nuclei(3, (96, 80), style)
    assert np.array_equal(img, img2) and np.array_equal(m, m2)
    assert not np.array_equal(m, make_nuclei(4, (96, 80), style)[1])
    # the image tells nuclei from background: mean intensity differs clearly
    grey = img.mean(0)
    assert abs(grey[m > 0].mean() - grey[m == 0].mean()) > 0.2


def test_make_nuclei_touching_and_instances():
    touching = 0
    for s in range(6):
        _, m, lab = make_nuclei(s, return_instances=True)
        assert np.array_equal(m, (lab > 0).astype(np.uint8))
        # instances that share an edge merge into one component of the union mask
        touching += lab.max() - ndimage.label(m)[1]
    assert touching > 0


def test_make_lesion():
    img, m = make_lesion(5, (128, 112))
    assert img.shape == (3, 128, 112) and m.shape == (128, 112) and m.dtype == np.uint8
    assert ndimage.label(m)[1] == 1 and 0.05 < m.mean() < 0.6
    assert img.mean(0)[m > 0].mean() < img.mean(0)[m == 0].mean()         # pigmented: darker
    assert np.array_equal(img, make_lesion(5, (128, 112))[0])
    with pytest.raises(BratsError, match="size"): make_lesion(0, (8, 8))
    with pytest.raises(BratsError, match="style"): make_nuclei(0, style="xray")


# --- readers ----------------------------------------------------------------------------------------------------
def _write_dsb(root, cid="abc", size=(20, 24), masks=((2, 6), (10, 16)), mode="RGBA"):
    d = root / cid
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    rgba = np.random.default_rng(0).integers(0, 256, size + (4,), dtype=np.uint8)
    Image.fromarray(rgba if mode == "RGBA" else rgba[..., 0], mode).save(d / "images" / f"{cid}.png")
    for i, (a, b) in enumerate(masks):
        m = np.zeros(size, np.uint8); m[a:b, a:b] = 255
        Image.fromarray(m).save(d / "masks" / f"m{i}.png")
    return d, rgba


def test_read_dsb_synthetic_layout(tmp_path):
    d, rgba = _write_dsb(tmp_path)
    img, m = read_dsb_case(d)
    assert img.shape == (3, 20, 24) and img.dtype == np.float32
    assert np.allclose(img, rgba[..., :3].transpose(2, 0, 1) / 255.0)
    assert m.sum() == 16 + 36 and set(np.unique(m)) == {0, 1}
    lab = read_dsb_case(d, instances=True)[1]
    assert lab.max() == 2 and (lab == 1).sum() == 16
    assert find_dsb_cases(tmp_path) == [d]
    g, _ = _write_dsb(tmp_path, "grey", mode="L")
    assert read_dsb_case(g)[0].shape == (3, 20, 24)


def test_read_dsb_bad_input(tmp_path):
    d, _ = _write_dsb(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(d / "masks" / "small.png")
    with pytest.raises(BratsError, match="small.png.*differs"): read_dsb_case(d)
    (d / "masks" / "small.png").unlink()
    Image.fromarray(np.full((20, 24), 7, np.uint8)).save(d / "masks" / "odd.png")
    with pytest.raises(BratsError, match="odd.png.*not binary"): read_dsb_case(d)
    (d / "masks" / "odd.png").unlink()
    (d / "masks" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BratsError, match="broken.png"): read_dsb_case(d)
    e, _ = _write_dsb(tmp_path, "nomask")
    for f in (e / "masks").iterdir(): f.unlink()
    (e / "masks").rmdir()
    with pytest.raises(BratsError, match="no masks/ folder"): read_dsb_case(e)
    assert read_dsb_case(e, require_mask=False)[1] is None
    with pytest.raises(BratsError, match="no Data Science Bowl case"): find_dsb_cases(tmp_path / "nomask" / "images")


def test_isic_pairs(tmp_path):
    (tmp_path / "in").mkdir(); (tmp_path / "gt").mkdir()
    rgb = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for i, suffix in enumerate(("_segmentation", "_Segmentation")):
        Image.fromarray(rgb).save(tmp_path / "in" / f"ISIC_000000{i}.jpg", quality=95)
        m = np.zeros((30, 40), np.uint8); m[5:20, 10:30] = 255
        Image.fromarray(m).save(tmp_path / "gt" / f"ISIC_000000{i}{suffix}.png")
    Image.fromarray(rgb).save(tmp_path / "in" / "ISIC_0000009.jpg")           # no mask: left out
    pairs = find_isic_pairs(tmp_path)
    assert [p[0].name for p in pairs] == ["ISIC_0000000.jpg", "ISIC_0000001.jpg"]
    img, m = read_isic_pair(*pairs[1])
    assert img.shape == (3, 30, 40) and m.sum() == 15 * 20
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(tmp_path / "gt" / "ISIC_0000009_segmentation.png")
    with pytest.raises(BratsError, match="ISIC_0000009_segmentation.png.*differs"):
        read_isic_pair(tmp_path / "in" / "ISIC_0000009.jpg", tmp_path / "gt" / "ISIC_0000009_segmentation.png")
    with pytest.raises(BratsError, match="nothere.jpg"): read_isic_pair(tmp_path / "nothere.jpg", pairs[0][1])


def test_read_real_dsb2018():
    if not DSB.exists(): pytest.skip(f"real DSB 2018 images not present at {DSB}")
    cases = find_dsb_cases(DSB)
    assert len(cases) == 6
    for c in cases:
        img, lab = read_dsb_case(c, instances=True)
        n_files = len(list((c / "masks").glob("*.png")))
        assert img.shape[0] == 3 and img.shape[1:] == lab.shape and 0 <= img.min() and img.max() <= 1
        assert lab.max() == n_files                                       # every nucleus file has its label
        # the union equals the OR of the files (they do not overlap)
        union = np.zeros(lab.shape, bool)
        for f in (c / "masks").glob("*.png"): union |= np.asarray(Image.open(f)) > 0
        assert np.array_equal(union, lab > 0)
        assert np.array_equal(read_dsb_case(c)[1], union.astype(np.uint8))
    kmap, info = select_keypoints_2d(read_dsb_case(cases[0])[1], t=20)
    assert info["iou"] > 0.6 and kmap.sum() > 0


# --- key points -------------------------------------------------------------------------------------------------
def _random_shape(rng, H, W):
    m = np.zeros((H, W), bool)
    for _ in range(rng.integers(1, 5)):
        m |= _blob(rng, (H, W), rng.uniform(0, (H, W)), rng.uniform(0.5, 14), wobble=0.35)
    if rng.random() < 0.5: m &= rng.random((H, W)) < 0.75
    return m


def test_fill_equals_bruteforce_on_random_shapes():
    rng = np.random.default_rng(123)
    checked = 0
    for trial in range(120):
        m = _random_shape(rng, *rng.integers(4, 48, 2))
        pts, rings = contour_pixels(m)
        boundary = m & ~ndimage.binary_erosion(m, border_value=0)
        assert len(pts) == boundary.sum() and boundary[pts[:, 0], pts[:, 1]].all()
        assert len(np.unique(pts[:, 0] * 1000 + pts[:, 1])) == len(pts)
        if not len(pts): continue
        idx = draw_candidates(rings, int(rng.integers(1, min(len(pts), 60) + 1)), 6, seed=trial)
        fast = fill_candidates(pts[idx], rings[idx], m.shape)
        for c in range(len(idx)):
            assert np.array_equal(fast[c], fill_reference(pts[idx[c]], rings[idx[c]], m.shape)), trial
            checked += 1
    assert checked > 300


def test_fill_reference_known_polygons():
    tri = np.array([[1, 1], [1, 7], [6, 1]])                  # right triangle, legs 6 and 5 on the axes
    f = fill_reference(tri, np.zeros(3, int), (8, 9))
    assert f[1, 1:8].all() and f[1:7, 1].all() and not f[6, 2] and f.sum() == 7 + 5 + 4 + 3 + 2 + 1   # rows 1..6, hypotenuse x = 7 - 6(y - 1)/5
    sq = np.array([[2, 2], [2, 6], [6, 6], [6, 2]])
    assert fill_reference(sq, np.zeros(4, int), (9, 9)).sum() == 25
    # a hole: the even-odd rule cuts the inner ring out
    ring2 = np.array([[0, 0], [0, 8], [8, 8], [8, 0], [3, 3], [3, 5], [5, 5], [5, 3]])
    f = fill_reference(ring2, np.array([0] * 4 + [1] * 4), (9, 9))
    assert not f[4, 4] and f[3, 4] and f[1, 1]
    assert np.array_equal(fill_candidates(ring2[None], np.array([[0] * 4 + [1] * 4]), (9, 9))[0], f)


def test_select_keypoints_exact_and_matches_reference():
    m = make_lesion(2)[1]
    kmap, info = select_keypoints_2d(m, t=30, radius=2, seed=3)
    _, ref = select_keypoints_2d_reference(m, t=30, radius=2, seed=3)
    assert np.array_equal(info["ious"], ref["ious"]) and info["iou"] == ref["iou"]
    assert np.array_equal(info["points"], ref["points"])
    mb = m > 0
    assert info["iou"] == (info["shape"] & mb).sum() / (info["shape"] | mb).sum()     # IoU exact
    assert np.array_equal(info["history"], np.maximum.accumulate(info["ious"])) and info["history"][-1] == info["iou"]
    assert np.array_equal(kmap, keypoint_map_2d(info["points"], m.shape, 2))
    assert mb[info["points"][:, 0], info["points"][:, 1]].all()                     # points are mask pixels
    assert kmap.dtype == np.uint8 and kmap.shape == m.shape
    k2, i2 = select_keypoints_2d(m, t=30, radius=2, seed=3)
    assert np.array_equal(k2, kmap) and np.array_equal(i2["ious"], info["ious"])   # seeded
    assert not np.array_equal(select_keypoints_2d(m, t=30, seed=4)[1]["ious"], info["ious"])


def test_keypoint_degenerate_cases():
    kmap, info = select_keypoints_2d(np.zeros((10, 12), np.uint8))
    assert kmap.shape == (10, 12) and kmap.sum() == 0 and len(info["points"]) == 0 and info["iou"] == 1.0
    one = np.zeros((7, 7), np.uint8); one[3, 3] = 1
    k, i = select_keypoints_2d(one, n=10, radius=1)
    assert i["n"] == 1 and i["iou"] == 1.0 and k.sum() == 5                         # a plus-shaped disk
    two = np.zeros((7, 7), np.uint8); two[3, 2:4] = 1
    assert select_keypoints_2d(two, n=10)[1]["n"] == 2                              # < 3 points: the points only
    line = np.zeros((11, 11), np.uint8); line[5, 1:10] = 1
    _, i = select_keypoints_2d(line, n=4, t=10)
    assert i["shape"].sum() == 4                                                    # collinear: no polygon
    sq = np.zeros((12, 12), np.uint8); sq[2:10, 2:10] = 1
    _, i = select_keypoints_2d(sq, n=500)
    assert i["n"] == 28 and i["iou"] == 1.0 and len(i["history"]) == 100           # all contour pixels
    edge = np.zeros((6, 6), np.uint8); edge[:, :3] = 1                              # touching the image border
    assert select_keypoints_2d(edge, n=100)[1]["iou"] == 1.0
    ring = np.zeros((12, 12), np.uint8); ring[1:11, 1:11] = 1; ring[4:8, 4:8] = 0   # a hole
    _, i = select_keypoints_2d(ring, n=1000)
    assert i["iou"] == 1.0 and not i["shape"][5, 5]
    for bad, msg in ((np.zeros((3, 3, 3)), "2D"), (np.full((3, 3), 3), "binary")):
        with pytest.raises(BratsError, match=msg): select_keypoints_2d(bad)
    with pytest.raises(BratsError, match="t must"): select_keypoints_2d(sq, t=0)
    with pytest.raises(BratsError, match="n must"): select_keypoints_2d(sq, n=0)


def test_ring_shares_every_nucleus_gets_points():
    m = make_nuclei(0)[1]
    pts, rings = contour_pixels(m)
    share = ring_shares(rings, 40)
    assert (share >= np.minimum(6, np.bincount(rings))).all()
    _, info = select_keypoints_2d(m, n=40, t=5)
    assert set(np.unique(info["rings"])) == set(np.unique(rings))


def test_keypoint_benchmark_smoke():
    rows = bench_keypoints_2d({"lesion": make_lesion(1, (64, 64))[1]}, t=10, repeats=1)
    assert rows[0]["same"] and rows[0]["ratio"] > 0
    assert "ratio" in format_bench_2d(rows)


# --- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_2d():
    g = np.zeros((40, 40), bool); g[10:20, 10:20] = True
    p = np.roll(g, 3, 1)
    assert dice_2d(p, g) == 2 * 70 / 200 and iou_2d(p, g) == 70 / 130
    assert hd95_2d(p, g) == 3.0 and hd95_2d(p, g, spacing=(1, 0.5)) == 1.5
    assert hd95_2d(g, np.zeros_like(g)) == pytest.approx(np.hypot(40, 40))
    assert (dice_2d(g & False, g & False), iou_2d(g & False, g & False), hd95_2d(g & False, g & False)) == (1.0, 1.0, 0.0)
    with pytest.raises(BratsError): iou_2d(g, g[:-1])


# --- modules in 2D ----------------------------------------------------------------------------------------------
def test_modules_in_2d_shapes(one_thread):
    x = torch.randn(2, 3, 32, 48)
    mie = MIE(3, spatial_dims=2)
    assert mie(x).shape == x.shape and mie.last_spatial_map.shape == (2, 1, 32, 48)
    assert SIE(3, spatial_dims=2)(x).shape == x.shape
    for v in ("baseline", "full"):
        net = build_model_2d(v)
        assert net(x).shape == (2, 2, 32, 48)
    net = build_model_2d("full", in_channels=1, pad_input=True)
    assert net(torch.randn(1, 1, 40, 50)).shape == (1, 2, 40, 50)
    assert any(isinstance(m, SIE) for m in build_model_2d("full").modules())
    assert not any(isinstance(m, SIE) for m in build_model_2d("baseline").modules())
    rp = torch.rand(2, 3, 16, 16); km = torch.zeros(2, 3, 16, 16); km[:, 0, 3:5, 3:5] = 1
    assert bsc_loss(rp, km).shape == ()


def test_loss_2d_and_training_reduces_loss(one_thread):
    torch.manual_seed(0)
    imgs, masks = zip(*[make_nuclei(s, (32, 32)) for s in range(4)])
    imgs, masks = np.stack(imgs), np.stack(masks)
    kmaps = keypoint_maps_2d(masks, t=10)
    logits = torch.zeros(4, 2, 32, 32); logits[:, 1] = torch.from_numpy(masks * 20.0 - 10)   # confident and right
    assert loss_2d(logits, torch.from_numpy(masks)) < 1e-3
    # the key point disks reach outside the mask: a perfect prediction leaves BSC = the share of them outside
    outside = np.mean([1 - (k * m).sum() / k.sum() for k, m in zip(kmaps.astype(float), masks) if k.sum()])
    bsc = loss_2d(logits, torch.from_numpy(masks), torch.from_numpy(kmaps)) - loss_2d(logits, torch.from_numpy(masks))
    assert float(bsc) == pytest.approx(0.1 * outside, abs=1e-5)
    assert loss_2d(-logits, torch.from_numpy(masks), torch.from_numpy(kmaps)) > 1.05
    net = build_model_2d("full")
    losses = train_2d(net, imgs, masks, steps=12, kmaps=kmaps, lr=3e-3, batch=2)
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4])
    pred = predict_2d(net, imgs)
    assert pred.shape == masks.shape and pred.dtype == np.uint8
    summary, rows = evaluate_2d(pred, masks)
    assert set(summary) == {"dice", "iou", "hd95"} and len(rows) == 4
    with pytest.raises(BratsError): train_2d(net, imgs, masks[:, :-1], steps=1)
