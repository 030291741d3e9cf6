"""Issue 24, findings 2, 3, 4 and 6: faults in the data a user hands to `brats-nb`, each refused by name (or, for the
CPU preset, a data folder left untouched). Each test failed on the code before its fix."""
import hashlib
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_nb.cli import main
from brats_nb.core import BratsError
from brats_nb.synth import SAMPLES_DIR


def copy_cases(dst, names=("Synth_000", "Synth_001")):
    "A data folder holding copies of the named samples (without key point files an older brats_nb left beside them)."
    dst.mkdir(parents=True, exist_ok=True)
    for n in names: shutil.copytree(SAMPLES_DIR / n, dst / n, ignore=shutil.ignore_patterns("*_keypoints*"))
    return dst


def seg_of(case_dir):
    return next(Path(case_dir).glob("*_seg.nii.gz"))


def rewrite_seg(path, change, dtype=np.int16):
    "Rewrite the label map at `path` as `dtype` after `change(array)`."
    img = nib.load(str(path))
    data = change(np.asarray(img.dataobj).astype(np.int64))
    hdr = img.header.copy()
    hdr.set_data_dtype(dtype)
    nib.save(nib.Nifti1Image(data.astype(dtype), img.affine, hdr), str(path))


def write_predictions(data, pred_dir, change=lambda a: a, dtype=np.uint8):
    "Predictions that are the ground truth of each case of `data` (after `change`), as <case>.nii.gz in `pred_dir`."
    pred_dir.mkdir(parents=True, exist_ok=True)
    for d in sorted(p for p in data.iterdir() if p.is_dir()):
        img = nib.load(str(seg_of(d)))
        hdr = img.header.copy()
        hdr.set_data_dtype(dtype)
        arr = change(np.asarray(img.dataobj).astype(np.int64)).astype(dtype)
        nib.save(nib.Nifti1Image(arr, img.affine, hdr), str(pred_dir / f"{d.name}.nii.gz"))
    return pred_dir


def cli(capsys, *args):
    "Run `brats-nb args` in this process: (exit status, stdout, stderr)."
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def tree_digest(root):
    "Every file's relative path, bytes and mode under `root`: equal digests mean an untouched folder."
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file(): h.update(p.read_bytes())
        h.update(str(stat.S_IMODE(p.stat().st_mode)).encode())
    return h.hexdigest()


# Finding 3: label maps are range-checked before any cast to uint8

def test_prediction_with_et_256_is_refused(tmp_path, capsys):
    data = copy_cases(tmp_path / "data")
    pred = write_predictions(data, tmp_path / "pred", lambda a: np.where(a == 4, 256, a), np.int16)
    rc, out, err = cli(capsys, "evaluate", pred, data, "--out", tmp_path / "m.csv")
    assert rc != 0 and "Synth_000.nii.gz" in err and "[256]" in err and "outside 0..255" in err, (rc, out, err)
    assert not (tmp_path / "m.csv").exists()


def test_ground_truth_with_260_is_not_cached(tmp_path, capsys):
    data = copy_cases(tmp_path / "data", ("Synth_000",))
    rewrite_seg(seg_of(data / "Synth_000"), lambda a: np.where(a == 4, 260, a))
    rc, out, err = cli(capsys, "preprocess", data, "--cache-dir", tmp_path / "cache", "--workers", 1)
    assert rc != 0 and "[260]" in out + err and "Synth_000_seg.nii.gz" in out + err, (rc, out, err)
    assert "1 written" not in out
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_seg_label_minus_one_is_reported_as_minus_one(tmp_path):
    from brats_nb.data import load_case, label_convention_of
    from brats_nb.pipeline import preprocess_case
    data = copy_cases(tmp_path / "data", ("Synth_000",))
    rewrite_seg(seg_of(data / "Synth_000"), lambda a: np.where(a == 2, -1, a))
    for f in (load_case, label_convention_of, preprocess_case):
        with pytest.raises(BratsError) as e: f(data / "Synth_000")
        assert "[-1]" in str(e.value) and "255" not in str(e.value).replace("0..255", ""), (f, e.value)
        assert "Synth_000_seg.nii.gz" in str(e.value)


# Finding 2: no folder of predictions is taken for the ground truth, and predict never writes into its data

@pytest.mark.parametrize("where", [".", "preds"])
def test_predict_out_in_the_data_folder_is_refused(tmp_path, capsys, where):
    data = copy_cases(tmp_path / "data")
    before = tree_digest(data)
    out = data / where
    rc, _, err = cli(capsys, "predict", tmp_path / "never-read.pt", data, "--out", out)
    assert rc != 0 and "never writes where it reads" in err and str(data) in err, err
    assert tree_digest(data) == before


def test_evaluate_refuses_predictions_beside_the_case_folders(tmp_path, capsys):
    data = copy_cases(tmp_path / "data")
    write_predictions(data, data)          # what `predict --out DATA` used to leave: <case>.nii.gz at the top
    pred = write_predictions(data, tmp_path / "pred", lambda a: np.where(a == 4, 1, a))   # no ET: far from Dice 1
    rc, out, err = cli(capsys, "evaluate", pred, data, "--out", tmp_path / "m.csv")
    assert rc != 0 and "1.000" not in out, (out, err)
    assert f"{data}: holds case folders" in err and "Synth_000.nii.gz" in err, err
    assert not (tmp_path / "m.csv").exists()


def test_evaluate_refuses_one_folder_as_predictions_and_ground_truth(tmp_path, capsys):
    flat = write_predictions(copy_cases(tmp_path / "data"), tmp_path / "flat")
    rc, out, err = cli(capsys, "evaluate", flat, flat, "--out", tmp_path / "m.csv")
    assert rc != 0 and "one folder" in err and "1.000" not in out, (out, err)


def test_evaluate_refuses_two_label_maps_of_one_case(tmp_path, capsys):
    data = copy_cases(tmp_path / "data")
    gt = write_predictions(data, tmp_path / "gt")
    shutil.copy(gt / "Synth_000.nii.gz", gt / "Synth_000_seg.nii.gz")
    pred = write_predictions(data, tmp_path / "pred")
    rc, _, err = cli(capsys, "evaluate", pred, gt, "--out", tmp_path / "m.csv")
    assert rc != 0 and "'Synth_000' is held by two label maps" in err, err
    assert "Synth_000.nii.gz" in err and "Synth_000_seg.nii.gz" in err


# Finding 4: a case id held by two folders is refused, with both paths, before anything is written

@pytest.fixture
def twice(tmp_path):
    "A data folder whose a/ and b/ both hold a case Synth_000 (and b/ also Synth_001)."
    data = tmp_path / "data"
    copy_cases(data / "a", ("Synth_000",))
    copy_cases(data / "b", ("Synth_000", "Synth_001"))
    return data


def assert_both_named(err, data):
    assert "case id 'Synth_000' is held by two folders" in err, err
    assert str(data / "a" / "Synth_000") in err and str(data / "b" / "Synth_000") in err, err


def test_predict_refuses_a_case_id_twice(tmp_path, capsys, twice):
    out = tmp_path / "pred"
    rc, _, err = cli(capsys, "predict", tmp_path / "never-read.pt", twice, "--out", out)
    assert rc != 0 and not out.exists()
    assert_both_named(err, twice)


def test_evaluate_refuses_a_case_id_twice(tmp_path, capsys, twice):
    pred = tmp_path / "pred"
    write_predictions(twice / "b", pred)
    rc, out, err = cli(capsys, "evaluate", pred, twice, "--out", tmp_path / "m.csv")
    assert rc != 0 and not (tmp_path / "m.csv").exists(), out
    assert_both_named(err, twice)
    from brats_nb.metrics import evaluate_folder
    with pytest.raises(BratsError, match="held by two folders"):       # a list of case folders too
        evaluate_folder(pred, [twice / "a" / "Synth_000", twice / "b" / "Synth_000"])


def test_preprocess_refuses_a_case_id_twice(tmp_path, capsys, twice):
    cache = tmp_path / "cache"
    rc, _, err = cli(capsys, "preprocess", twice, "--cache-dir", cache, "--workers", 1)
    assert rc != 0 and not cache.exists()
    assert_both_named(err, twice)
    before = tree_digest(twice)
    rc, _, err = cli(capsys, "preprocess", twice, "--beside", "--workers", 1)
    assert rc != 0 and tree_digest(twice) == before
    assert_both_named(err, twice)


def test_train_refuses_a_case_id_twice(tmp_path, capsys, twice):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--preset", "cpu", "--data", twice, "--out", out, "--epochs", 1)
    assert rc != 0 and not (out.exists() and any(out.iterdir()))
    assert_both_named(err, twice)


# Finding 6: training without the training cache (the CPU preset) writes nothing into the data folder

def make_read_only(root):
    for p in [root, *Path(root).rglob("*")]: p.chmod(p.stat().st_mode & ~0o222)


def test_cpu_preset_leaves_a_read_only_data_folder_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BRATS_NB_CACHE", str(tmp_path / "cache"))
    data = copy_cases(tmp_path / "data")
    make_read_only(data)
    before = tree_digest(data)
    try:
        rc, out, err = cli(capsys, "train", "--preset", "cpu", "--data", data, "--out", tmp_path / "run", "--epochs", 1)
        assert rc == 0, (out, err[-3000:])
        assert tree_digest(data) == before                       # no key point file (nor anything else) in the data
        assert not list(data.rglob("*keypoints*"))
        stored = sorted((tmp_path / "cache" / "keypoints").rglob("*_keypoints.nii.gz"))
        assert len(stored) == 1, stored                          # the training case's map is in the cache
    finally:
        for p in [data, *data.rglob("*")]: p.chmod(p.stat().st_mode | 0o200)


def test_stored_keypoint_maps_equal_those_beside_the_case(tmp_path, monkeypatch):
    "Only the place of the maps changed: the cache's map holds the bytes `preprocess --beside` writes, and is read."
    from brats_nb.pipeline import (BratsDataset, keypoint_files, keypoint_store, keypoints_up_to_date, preprocess_case,
                                   training_dataset)
    from brats_nb.keypoints import KeypointSettings
    monkeypatch.setenv("BRATS_NB_CACHE", str(tmp_path / "cache"))
    data = copy_cases(tmp_path / "data", ("Synth_000",))
    beside = copy_cases(tmp_path / "beside", ("Synth_000",))
    kp = KeypointSettings(t=5)
    ds = training_dataset([data / "Synth_000"], 32, keypoints=kp, bsc=True)
    assert isinstance(ds, BratsDataset) and not list(data.rglob("*keypoints*"))
    stored, side = keypoint_files(data / "Synth_000", keypoint_store(), kp)
    assert stored.is_file() and side.is_file() and str(stored).startswith(str(tmp_path / "cache" / "keypoints"))
    assert keypoints_up_to_date(data / "Synth_000", kp, keypoint_store())
    assert keypoint_files(data / "Synth_000", keypoint_store(), KeypointSettings(t=6))[0] != stored   # keyed by settings
    assert keypoint_files(beside / "Synth_000", keypoint_store(), kp)[0] != stored                    # and by path
    assert preprocess_case(beside / "Synth_000", kp) == "written"                # --beside: beside the case, on request
    here = keypoint_files(beside / "Synth_000")[0]
    assert here.parent == beside / "Synth_000"
    np.testing.assert_array_equal(np.asarray(nib.load(str(stored)).dataobj), np.asarray(nib.load(str(here)).dataobj))
    b = ds[0]
    assert b["keypoints"].shape == (3, 32, 32, 32)
    stored.unlink()                                                              # the dataset reads the stored map
    ds._cache.clear()
    with pytest.raises(BratsError, match="missing"): ds[0]


def test_an_undecidable_label_names_the_option_of_every_command(tmp_path, capsys, monkeypatch):
    """Issue 24, finding 8: a label map whose convention its values do not decide sent every command's user to
    `brats-nb evaluate --convention`; the message now names the option of the command in hand."""
    import nibabel as nib
    import numpy as np
    monkeypatch.setenv("BRATS_NB_CACHE", str(tmp_path / "cache"))
    data = copy_cases(tmp_path / "data", names=("Synth_000",))
    seg = seg_of(data / "Synth_000")
    img = nib.load(str(seg))
    lab = np.asarray(img.dataobj).astype(np.uint8)
    lab[lab == 4] = 7                                            # a value no BraTS convention uses
    nib.save(nib.Nifti1Image(lab, img.affine), str(seg))
    rc, out, err = cli(capsys, "preprocess", data, "--workers", "1", "--t", "2", "--no-progress")
    text = out + err
    assert "evaluate --convention" not in text and "--convention (preprocess, train, predict, evaluate)" in text
