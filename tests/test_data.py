"The data layer on real files: both namings, both label conventions, every bad input, the real case, the samples."
import filecmp
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_nb.cli import main
from brats_nb.pipeline import BratsDataset
from brats_nb.data import (BratsError, case_files, find_cases, labels_to_regions, load_case,
                           normalize, regions_to_labels)
from brats_nb.viz import slice_viewer
from brats_nb.synth import SAMPLES_DIR, make_case, make_samples, write_case


@pytest.fixture(scope="module")
def arrays():
    return make_case(seed=5, shape=(32, 32, 32))


def _write(tmp_path, arrays, naming="brats2017", seg=True, name="Case_001"):
    return write_case(arrays, tmp_path, name, naming=naming, seg=seg)


@pytest.mark.parametrize("naming,et", [("brats2017", 4), ("brats2023", 3)])
def test_both_namings_load_the_same_case(tmp_path, arrays, naming, et):
    d = _write(tmp_path, arrays, naming)
    names = sorted(p.name for p in d.iterdir())
    expected = {"brats2017": ["Case_001_flair.nii.gz", "Case_001_seg.nii.gz", "Case_001_t1.nii.gz", "Case_001_t1ce.nii.gz", "Case_001_t2.nii.gz"],
                "brats2023": ["Case_001-seg.nii.gz", "Case_001-t1c.nii.gz", "Case_001-t1n.nii.gz", "Case_001-t2f.nii.gz", "Case_001-t2w.nii.gz"]}[naming]
    assert names == expected
    case = load_case(d)
    assert case.files.naming == naming and case.label_convention == naming
    assert case.image.shape == (4, 32, 32, 32) and case.image.dtype == np.float32
    assert et in np.unique(case.label)
    # channel order T1, T1ce, T2, FLAIR whatever the naming
    np.testing.assert_array_equal(case.image[1], np.round(arrays["t1ce"]))
    np.testing.assert_array_equal(case.image[3], np.round(arrays["flair"]))
    regions = labels_to_regions(case.label, case.label_convention)
    np.testing.assert_array_equal(regions, labels_to_regions(arrays["label"], "brats2017"))
    np.testing.assert_array_equal(regions_to_labels(regions, naming), case.label)


def test_find_cases_mixed_namings_and_unlabelled(tmp_path, arrays):
    _write(tmp_path / "a", arrays, "brats2017", name="A_1")
    _write(tmp_path / "b" / "deeper", arrays, "brats2023", name="BraTS-GLI-00001-000")
    _write(tmp_path / "c", arrays, "brats2017", seg=False, name="Val_7")
    found = find_cases(tmp_path)
    assert [p.name for p in found] == ["A_1", "BraTS-GLI-00001-000", "Val_7"]
    val = load_case(found[2])
    assert val.label is None and val.files.seg is None
    assert load_case(found[1]).files.name == "BraTS-GLI-00001-000"


def test_label_convention_given_and_detected(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    with pytest.raises(BratsError, match=r"unknown label values \[4\] for brats2023"):
        load_case(d, label_convention="brats2023")
    # no ET voxel: the naming decides, and a given convention is respected
    no_et = dict(arrays, label=np.where(arrays["label"] == 4, 1, arrays["label"]).astype(np.uint8))
    d2 = _write(tmp_path / "x", no_et, "brats2023")
    assert load_case(d2).label_convention == "brats2023"
    assert load_case(d2, label_convention="brats2017").label_convention == "brats2017"


def _replace(path, data, affine=None):
    img = nib.load(str(path))
    hdr = img.header.copy(); hdr.set_data_dtype(data.dtype)
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine, hdr), str(path))


def test_missing_modality(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    (d / "Case_001_flair.nii.gz").unlink()
    with pytest.raises(BratsError, match=r"missing modality 'flair' \(expected Case_001_flair.nii.gz\)"):
        load_case(d)


def test_shapes_differ(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    _replace(d / "Case_001_t2.nii.gz", np.zeros((32, 32, 30), np.int16))
    with pytest.raises(BratsError, match=r"Case_001_t2.nii.gz: shape \(32, 32, 30\) differs"):
        load_case(d)


def test_affines_differ(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    p = d / "Case_001_t1ce.nii.gz"
    aff = nib.load(str(p)).affine.copy(); aff[0, 3] += 5
    _replace(p, np.asarray(nib.load(str(p)).dataobj), aff)
    with pytest.raises(BratsError, match=r"Case_001_t1ce.nii.gz: affine differs"):
        load_case(d)


def test_label_shape_differs(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    _replace(d / "Case_001_seg.nii.gz", np.zeros((31, 32, 32), np.uint8))
    with pytest.raises(BratsError, match=r"Case_001_seg.nii.gz: shape"):
        load_case(d)


@pytest.mark.parametrize("bad", [5, 7])
def test_unknown_labels(tmp_path, arrays, bad):
    d = _write(tmp_path, arrays)
    lab = arrays["label"].copy(); lab[0, 0, 0] = bad
    _replace(d / "Case_001_seg.nii.gz", lab)
    with pytest.raises(BratsError, match=rf"Case_001_seg.nii.gz: label values \[[0-9, ]*\] include \[{bad}\].*label_convention="):
        load_case(d)


def test_labels_3_and_4_together(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    lab = arrays["label"].copy(); lab[0, 0, 0] = 3
    _replace(d / "Case_001_seg.nii.gz", lab)
    with pytest.raises(BratsError, match="Case_001_seg.nii.gz: label values .* hold both 3 and 4 .*label_convention="):
        load_case(d)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, arrays, value):
    d = _write(tmp_path, arrays)
    data = np.round(arrays["t1"]).astype(np.float32); data[3, 4, 5] = value
    _replace(d / "Case_001_t1.nii.gz", data)
    with pytest.raises(BratsError, match=r"Case_001_t1.nii.gz: 1 voxels are NaN or infinite"):
        load_case(d)


def test_not_nifti(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    (d / "Case_001_seg.nii.gz").write_bytes(b"<html>not a scan</html>")
    with pytest.raises(BratsError, match=r"Case_001_seg.nii.gz: not a readable NIfTI file"):
        load_case(d)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(BratsError, match="no BraTS case found"):
        find_cases(tmp_path)
    with pytest.raises(BratsError, match="no such folder"):
        find_cases(tmp_path / "nope")
    with pytest.raises(BratsError, match="no BraTS image files"):
        case_files(tmp_path)


def test_bad_input_writes_nothing(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    (d / "Case_001_t2.nii.gz").unlink()
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(BratsError):
        BratsDataset([d], crop_size=16)[0]
    assert sorted(p.name for p in d.iterdir()) == before


def test_cli_error_for_bad_data(tmp_path, capsys, arrays):
    d = _write(tmp_path, arrays)
    (d / "Case_001_t1.nii.gz").unlink()
    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "missing modality 't1'" in capsys.readouterr().err


def test_normalize_clips_and_standardises():
    rng = np.random.default_rng(0)
    img = np.zeros((4, 20, 20, 20), np.float32)
    img[:, 5:15, 5:15, 5:15] = rng.gamma(2, 100, (4, 10, 10, 10))
    img[0, 10, 10, 10] = 1e6  # an outlier that the clip must tame
    out = normalize(img)
    m = img[0] != 0
    assert np.allclose(out[:, m].mean(1), 0, atol=1e-4) and np.allclose(out[:, m].std(1), 1, atol=1e-3)
    assert out[0].max() < 10 and (out[:, ~m] == 0).all()


def test_dataset_crops_pads_and_is_deterministic(tmp_path, arrays):
    d = _write(tmp_path, arrays)
    ds = BratsDataset([d], crop_size=(40, 24, 40), seed=3)
    s = ds[0]
    assert s["image"].shape == (4, 40, 24, 40) and s["label"].dtype == torch.int64
    assert torch.equal(BratsDataset([d], crop_size=(40, 24, 40), seed=3)[0]["image"], s["image"])
    # per-channel scale/shift: each channel moved by its own factor, so the augmented sample differs from the plain crop
    plain = BratsDataset([d], crop_size=32, augment=False)[0]
    assert plain["image"].shape == (4, 32, 32, 32)
    np.testing.assert_array_equal(plain["label"].numpy(), (load_case(d).label.astype(np.int64) * 1).clip(0, 4) - (load_case(d).label == 4) * 1)


def test_real_brats_case(real_case_dir):
    case = load_case(real_case_dir)
    assert case.image.shape == (4, 240, 240, 155)
    assert case.label_convention == "brats2017" and case.files.naming == "brats2017"
    counts = labels_to_regions(case).reshape(3, -1).sum(1).tolist()
    assert counts == [61085, 26191, 21677]
    assert case.spacing == (1.0, 1.0, 1.0)
    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")
    assert find_cases(real_case_dir.parent) == [real_case_dir]


def test_samples_regenerate_byte_identical(tmp_path):
    assert len(find_cases(SAMPLES_DIR)) >= 8
    total = sum(p.stat().st_size for p in SAMPLES_DIR.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    assert main(["make-samples", str(tmp_path)]) == 0
    ours = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.nii.gz"))
    shipped = sorted(p.relative_to(SAMPLES_DIR) for p in SAMPLES_DIR.rglob("*.nii.gz") if "_keypoints" not in p.name and "-keypoints" not in p.name)
    assert ours == shipped
    mismatch, errors = filecmp.cmpfiles(tmp_path, SAMPLES_DIR, [str(p) for p in ours], shallow=False)[1:]
    assert not mismatch and not errors


def test_slice_viewer_state_follows_controls(samples):
    case = load_case(find_cases(samples)[0])
    v = slice_viewer(case)
    c, first = v.controls, v.image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    c["slice"].value = c["slice"].value + 3
    second = v.image.value
    assert second != first and f"axial {c['slice'].value}/" in v.info.value
    c["modality"].value = "t1ce"
    assert v.image.value != second
    c["overlay"].value = False
    no_overlay = v.image.value
    c["overlay"].value = True
    assert v.image.value != no_overlay
    c["axis"].value = "sagittal"
    assert c["slice"].max == case.shape[0] - 1 and "sagittal" in v.info.value
