"Metrics against MONAI, the BraTS empty-mask conventions, and `brats-nb evaluate` end to end with its bad inputs."
import csv
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from brats_nb.cli import main
from brats_nb.data import REGIONS, find_cases, labels_to_regions, load_case, save_nifti
from brats_nb.metrics import HD95_EMPTY, METRIC_COLUMNS, dice, evaluate_folder, hd95, region_metrics
from brats_nb.synth import SAMPLES_DIR


def monai_scores(pred_regions, gt_regions, spacing):
    "MONAI's Dice and HD95 (percentile=95) of region stacks (3, X, Y, Z)."
    from monai.metrics import DiceMetric, compute_hausdorff_distance
    p = torch.as_tensor(np.asarray(pred_regions))[None].float()
    g = torch.as_tensor(np.asarray(gt_regions))[None].float()
    dm = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    d = dm(p, g)[0].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing))[0].numpy()
    return d, h


def perturbations(label, rng):
    "A few plausible wrong predictions of a label map: eroded, dilated, shifted, with stray voxels."
    wt = label > 0
    yield np.where(ndimage.binary_erosion(wt, iterations=2), label, 0)
    grown = ndimage.binary_dilation(wt, iterations=2)
    yield np.where(grown & ~wt, 2, label).astype(np.uint8)
    yield np.roll(label, (3, -2, 1), axis=(0, 1, 2))
    noisy = label.copy()
    idx = rng.integers(0, label.shape, size=(40, 3))
    noisy[tuple(idx.T)] = 4
    yield noisy


def test_dice_and_hd95_match_monai_on_samples():
    rng = np.random.default_rng(0)
    worst_d = worst_h = 0.0
    for i, c in enumerate(find_cases(SAMPLES_DIR)[:2]):
        case = load_case(c)
        gt = labels_to_regions(case)
        spacing = [(1.0, 1.0, 1.0), (1.0, 1.5, 0.8)][i]  # an anisotropic spacing too
        for pred_label in perturbations(case.label, rng):
            pr = labels_to_regions(pred_label, case.label_convention)
            md, mh = monai_scores(pr, gt, spacing)
            ours_d = np.array([dice(p, g) for p, g in zip(pr, gt)])
            ours_h = np.array([hd95(p, g, spacing) for p, g in zip(pr, gt)])
            worst_d = max(worst_d, np.abs(ours_d - md).max())
            worst_h = max(worst_h, np.abs(ours_h - mh).max())
    print(f"max |Dice - MONAI| = {worst_d:.2e}, max |HD95 - MONAI| = {worst_h:.2e} mm")
    assert worst_d < 1e-6
    assert worst_h < 1e-4  # MONAI's quantile runs in float32


def test_hd95_matches_monai_on_random_blobs():
    rng = np.random.default_rng(1)
    for _ in range(6):
        a = ndimage.gaussian_filter(rng.random((30, 26, 22)), 2) > 0.53
        b = ndimage.gaussian_filter(rng.random((30, 26, 22)), 2) > 0.53
        if not a.any() or not b.any(): continue
        sp = tuple(rng.uniform(0.5, 2.0, 3))
        _, mh = monai_scores(a[None], b[None], sp)
        assert abs(hd95(a, b, sp) - mh[0]) < 1e-4
        # the union pooling is never larger than the max of the two directed percentiles
        assert hd95(a, b, sp, mode="union") <= hd95(a, b, sp) + 1e-12


def test_empty_conventions():
    z = np.zeros((8, 8, 8), bool)
    m = z.copy(); m[2:5, 2:5, 2:5] = True
    assert dice(z, z) == 1.0 and hd95(z, z) == 0.0
    assert dice(m, z) == 0.0 and dice(z, m) == 0.0
    assert hd95(m, z) == HD95_EMPTY == hd95(z, m) == 373.13
    # the same through region_metrics: a case without ET, predicted without ET
    gt = np.zeros((8, 8, 8), np.uint8); gt[2:6, 2:6, 2:6] = 2; gt[3:5, 3:5, 3:5] = 1
    r = region_metrics(gt, gt, (1, 1, 1), "brats2017")
    assert r["ET"] == {"dice": 1.0, "hd95": 0.0}
    pred = gt.copy(); pred[3, 3, 3] = 4
    r = region_metrics(pred, gt, (1, 1, 1), "brats2017")
    assert r["ET"] == {"dice": 0.0, "hd95": HD95_EMPTY}
    assert r["WT"] == {"dice": 1.0, "hd95": 0.0}


def test_metrics_on_the_real_case_match_monai(real_case_dir):
    case = load_case(real_case_dir)
    gt = labels_to_regions(case.label, case.label_convention)
    assert gt.reshape(3, -1).sum(1).tolist() == [61085, 26191, 21677]
    pred_label = np.roll(case.label, (2, -3, 1), axis=(0, 1, 2))
    pr = labels_to_regions(pred_label, case.label_convention)
    md, mh = monai_scores(pr, gt, case.spacing)
    m = region_metrics(pred_label, case.label, case.spacing, case.label_convention)
    ours_d = np.array([m[r]["dice"] for r in REGIONS]); ours_h = np.array([m[r]["hd95"] for r in REGIONS])
    print("real case, shifted labels: ours", ours_d.round(4), ours_h.round(3), "MONAI", md.round(4), mh.round(3))
    np.testing.assert_allclose(ours_d, md, atol=1e-6)
    np.testing.assert_allclose(ours_h, mh, atol=1e-4)
    assert np.all(ours_h >= 1.0)  # a 2-3 voxel shift moves the surfaces by at least a voxel


def _prediction_folder(tmp_path, n=3):
    "A data folder with `n` sample cases and a prediction folder with perturbed ground truths."
    data, preds = tmp_path / "data", tmp_path / "preds"
    rng = np.random.default_rng(2)
    for c in find_cases(SAMPLES_DIR)[:n]:
        shutil.copytree(c, data / c.name)
        case = load_case(c)
        pred = list(perturbations(case.label, rng))[rng.integers(0, 4)]
        save_nifti(pred, preds / f"{case.name}.nii.gz", case.affine, case.header, dtype=np.uint8)
    return data, preds


def test_evaluate_command_end_to_end(tmp_path, capsys):
    data, preds = _prediction_folder(tmp_path)
    out = tmp_path / "m" / "metrics.csv"
    assert main(["evaluate", str(preds), str(data), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["case"] for r in rows] == ["Synth_000", "Synth_001", "Synth_002", "mean", "median", "std"]
    assert list(rows[0]) == ["case", *METRIC_COLUMNS]
    # every per-case number equals region_metrics on the files, and the summary is their mean/median/std
    vals = []
    for r in rows[:3]:
        case = load_case(data / r["case"])
        pred = np.asanyarray(nib.load(str(preds / f"{r['case']}.nii.gz")).dataobj)
        m = region_metrics(pred, case.label, case.spacing, case.label_convention)
        for reg in REGIONS:
            assert abs(float(r[f"Dice_{reg}"]) - m[reg]["dice"]) < 1e-6
            assert abs(float(r[f"HD95_{reg}"]) - m[reg]["hd95"]) < 1e-6
        vals.append([float(r[c]) for c in METRIC_COLUMNS])
    vals = np.array(vals)
    for name, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
        row = next(r for r in rows if r["case"] == name)
        np.testing.assert_allclose([float(row[c]) for c in METRIC_COLUMNS], fn(vals, 0), atol=2e-6)
    assert "mean" in capsys.readouterr().out
    # default output: PRED_DIR/metrics.csv
    assert main(["evaluate", str(preds), str(data), "-q"]) == 0
    assert (preds / "metrics.csv").read_text() == out.read_text()


def test_evaluate_bad_inputs(tmp_path, capsys):
    data, preds = _prediction_folder(tmp_path, n=2)
    out = tmp_path / "out.csv"

    def fails(args, *fragments):
        rc = main(["evaluate", *map(str, args), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, err
        for f in fragments: assert f in err, err
        assert not out.exists()
        assert not [p for p in tmp_path.rglob(".*.tmp")]

    fails([tmp_path / "nope", data], "nope: no such prediction folder")
    fails([preds, tmp_path / "nodata"], "nodata: no such folder")
    (preds / "Synth_001.nii.gz").rename(tmp_path / "saved.nii.gz")
    fails([preds, data], "Synth_001.nii.gz: missing prediction for case 'Synth_001'")
    case = load_case(data / "Synth_001")
    save_nifti(case.label[:, :, :-2], preds / "Synth_001.nii.gz", case.affine)
    fails([preds, data], "Synth_001.nii.gz: shape (96, 96, 94) differs")
    save_nifti(case.label, preds / "Synth_001.nii.gz", case.affine * np.array([2, 1, 1, 1])[:, None])
    fails([preds, data], "Synth_001.nii.gz: affine differs")
    save_nifti(np.full(case.shape, 7, np.uint8), preds / "Synth_001.nii.gz", case.affine)
    fails([preds, data], "Synth_001.nii.gz: label values [7] are not labels of the brats2017 convention of case 'Synth_001'")
    (preds / "Synth_001.nii.gz").write_bytes(b"garbage")
    fails([preds, data], "Synth_001.nii.gz: not a readable NIfTI")
    shutil.move(tmp_path / "saved.nii.gz", preds / "Synth_001.nii.gz")
    (data / "Synth_001" / "Synth_001_seg.nii.gz").unlink()
    fails([preds, data], "has no label file")


def test_evaluate_help():
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0


def test_evaluate_real_case(real_case_dir, tmp_path):
    case = load_case(real_case_dir)
    save_nifti(case.label, tmp_path / f"{case.name}.nii.gz", case.affine, case.header, dtype=np.uint8)
    rows, summary = evaluate_folder(tmp_path, real_case_dir.parent, tmp_path / "metrics.csv")
    assert rows == [{"case": case.name, **{f"Dice_{r}": 1.0 for r in REGIONS}, **{f"HD95_{r}": 0.0 for r in REGIONS}}]
    assert summary["std"]["Dice_WT"] == 0.0


def _balls(shape, spacing, *centres_and_radii):
    "A mask of balls given in millimetres (centre, radius) on a grid of `shape` voxels of `spacing` mm."
    mm = np.indices(shape) * np.array(spacing, float)[:, None, None, None]
    return np.logical_or.reduce([sum((x - c) ** 2 for x, c in zip(mm, centre)) <= r * r for centre, r in centres_and_radii])


def test_spacing_order_official_reverses_the_spacing_on_an_anisotropic_case(tmp_path, capsys):
    """On 1 x 1 x 3 mm voxels the official BraTS 2025 tool measures lesion distances with the spacing reversed (it reads
    NIfTI files with SimpleITK, array z, y, x and spacing x, y, z). `spacing_order='official'` gives its numbers, in the
    library and in `brats-nb evaluate --spacing-order official`; the default keeps the right ones: a lesion missed by
    3 mm in-plane and one missed by one 3 mm slice both score 3 mm."""
    from brats_nb.core import BratsError
    from brats_nb.metrics import lesion_scores_2023, lesion_scores_2025, lesion_spacing
    shape, spacing = (40, 40, 14), (1.0, 1.0, 3.0)
    gt = _balls(shape, spacing, ((12, 20, 21), 6), ((29, 20, 21), 6))
    pred = _balls(shape, spacing, ((15, 20, 21), 6), ((29, 20, 24), 6))   # 3 mm off in-plane; one slice (3 mm) off
    right = lesion_scores_2025(pred, gt, spacing)
    official = lesion_scores_2025(pred, gt, spacing, spacing_order="official")
    by_hand = lesion_scores_2025(pred, gt, spacing[::-1])
    scalars = [k for k in right if k != "lesions"]
    assert {k: official[k] for k in scalars} == {k: by_hand[k] for k in scalars}
    assert lesion_spacing(spacing, "official") == (3.0, 1.0, 1.0) and lesion_spacing(spacing) == spacing
    for k in ("tp", "fp", "fn", "f1", "lesion_dsc", "dsc", "nsd", "hd95"):       # counted in voxels: the same in both orders
        assert official[k] == right[k], k
    assert (right["tp"], right["fp"], right["fn"]) == (2, 0, 0)
    assert all(abs(row["hd95"] - 3.0) < 0.5 for row in right["lesions"]), right["lesions"]
    slice_miss, in_plane_miss = sorted(row["hd95"] for row in official["lesions"])
    assert slice_miss < 2.0 and in_plane_miss > 4.0, official["lesions"]        # 1 mm and about 5 mm in the official order
    assert official["lesion_nsd"] > right["lesion_nsd"] + 0.05
    with pytest.raises(BratsError, match="spacing order 'sitk': use one of nifti, official"):
        lesion_scores_2025(pred, gt, spacing, spacing_order="sitk")
    # the same through NIfTI files and the command line
    gt_dir, pr_dir = tmp_path / "gt", tmp_path / "pred"
    affine = np.diag([*spacing, 1.0])
    save_nifti(gt.astype(np.uint8) * 3, gt_dir / "BraTS-MET-00001-000-seg.nii.gz", affine, dtype=np.uint8)
    save_nifti(pred.astype(np.uint8) * 3, pr_dir / "BraTS-MET-00001-000.nii.gz", affine, dtype=np.uint8)
    for order, want in (("official", official), ("nifti", right)):
        out = tmp_path / f"{order}.csv"
        assert main(["evaluate", str(pr_dir), str(gt_dir), "--lesionwise", "2025", "--spacing-order", order,
                     "--out", str(out), "-q"]) == 0
        rows = {r["region"]: r for r in csv.DictReader(open(tmp_path / f"{order}_lesionwise.csv")) if r["case"] != "mean"}
        assert set(rows) == {"WT", "TC", "ET"}
        for region in rows:
            for k in ("tp", "fp", "fn", "lesion_dsc", "lesion_nsd", "lesion_hd95", "dsc", "nsd", "hd95"):
                assert float(rows[region][k]) == pytest.approx(want[k], abs=1e-5), (order, region, k)
    capsys.readouterr()
    # a wrong value, or an order with nothing to apply to, is refused in one line before anything is written
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(pr_dir), str(gt_dir), "--lesionwise", "2025", "--spacing-order", "sitk"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'sitk' (choose from 'nifti', 'official')" in err, err
    out = tmp_path / "none.csv"
    assert main(["evaluate", str(pr_dir), str(gt_dir), "--spacing-order", "official", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spacing order 'official' applies to the lesion-wise scores only" in err, err
    assert "--lesionwise 2025" in err and not out.exists()
    with pytest.raises(BratsError, match="use one of nifti, official"):
        evaluate_folder(pr_dir, gt_dir, lesionwise="2025", spacing_order="SITK")
    # the 2023-2024 scripts read spacing and array in the same order: there the official order is the header's
    r23 = {o: evaluate_folder(pr_dir, gt_dir, tmp_path / f"r23_{o}.csv", lesionwise="2023", spacing_order=o)
           for o in ("nifti", "official")}
    assert (tmp_path / "r23_nifti_lesionwise.csv").read_text() == (tmp_path / "r23_official_lesionwise.csv").read_text()
    assert r23["nifti"] == r23["official"]
    assert lesion_scores_2023(pred, gt, spacing, dilation=1, min_volume=2)["tp"] == 2
