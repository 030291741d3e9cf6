"""The laptop recipe end to end (issue: real scans out of the box): `brats-nb train --preset laptop` on a full-resolution
folder builds its 2 mm training cache outside the (read-only) data folder; the checkpoint records spacing and crop, so
`brats-nb predict CHECKPOINT DATA` writes full resolution in the input's space and convention with no extra flag;
`brats-nb real-model` writes a slim model with its card; `brats-nb predict DATA --out OUT` uses the shipped model."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_nb.data import find_cases, labels_to_regions, load_case
from brats_nb.metrics import dice
from brats_nb.checkpoints import read_checkpoint, real_checkpoint, real_model_card
from brats_nb.synth import SAMPLES_DIR

BIN = Path(sys.executable).parent
REAL = Path(os.environ.get("BRATS_NB_REAL", Path(__file__).resolve().parents[2] / "shared" / "real"))


def run(*args, cache):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", BRATS_NB_CACHE=str(cache))
    return subprocess.run([str(BIN / "brats-nb"), *map(str, args)], capture_output=True, text=True, env=env)


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def readonly_samples(tmp_path):
    "Three bundled samples copied into a folder that nobody may write into."
    src = tmp_path / "data"
    for c in find_cases(SAMPLES_DIR)[:3]: shutil.copytree(c, src / c.name)
    for p in [src, *src.rglob("*")]: p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield src
    for p in [src, *src.rglob("*")]: p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_laptop_preset_trains_from_full_resolution_and_predicts_without_flags(tmp_path, readonly_samples):
    before = digest(readonly_samples)
    r = run("train", "--preset", "laptop", "--data", readonly_samples, "--out", tmp_path / "run", "--epochs", "1",
            "--samples-per-case", "1", "--val-fraction", "0", "--val-every", "0", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    assert digest(readonly_samples) == before                                   # nothing written into the data folder
    entries = sorted((tmp_path / "cache" / "train").iterdir())
    assert len(entries) == 3
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["settings"]["spacing"] == 2.0 and meta["spacing"] == [2.0, 2.0, 2.0] and meta["source_shape"] == [96, 96, 96]
    assert all(s <= 50 for s in np.load(entries[0] / "image.npy", mmap_mode="r").shape[1:])   # 96 mm of 1 mm voxels -> at most 48+2
    ck = read_checkpoint(tmp_path / "run" / "latest.pt")
    assert ck["config"]["train"]["spacing"] == 2.0 and ck["config"]["train"]["crop_size"] == 64
    r = run("predict", tmp_path / "run" / "latest.pt", readonly_samples, "--out", tmp_path / "pred", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "through a 2 mm copy" in r.stdout and "sliding window 64" in r.stdout
    for c in find_cases(readonly_samples):
        img, ref = nib.load(str(tmp_path / "pred" / f"{c.name}.nii.gz")), nib.load(str(next(c.glob("*_t1.nii.gz"))))
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)     # full resolution, in the input's space
        assert set(np.unique(np.asanyarray(img.dataobj))) <= {0, 1, 2, 4}         # the input's label convention
    assert digest(readonly_samples) == before


def test_real_model_command_writes_a_slim_model_and_its_card(tmp_path, readonly_samples):
    (tmp_path / "notes.md").write_text("Synthetic samples made by brats_nb (Apache-2.0).\n")
    r = run("real-model", "--data", readonly_samples, "--out", tmp_path / "m.pt", "--epochs", "1", "--work", tmp_path / "work",
            "--notes", tmp_path / "notes.md", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = read_checkpoint(tmp_path / "m.pt")
    assert all(v.dtype == torch.float16 for v in ck["model"].values() if v.is_floating_point())
    assert ck["cases"] == [c.name for c in find_cases(readonly_samples)] and ck["config"]["train"]["spacing"] == 2.0
    card = (tmp_path / "m.md").read_text()
    assert "Not for clinical use" in card and "Synth_000" in card and "Apache-2.0" in card and "2 mm" in card
    r = run("predict", tmp_path / "m.pt", readonly_samples / "Synth_000", "--out", tmp_path / "p", cache=tmp_path / "cache")
    assert r.returncode == 0 and (tmp_path / "p" / "Synth_000.nii.gz").is_file(), r.stderr[-2000:]
    r = run("real-model", "--data", readonly_samples, "--out", tmp_path / "nowhere" / "m.pt", cache=tmp_path / "cache")
    assert r.returncode == 2 and "no such folder" in r.stderr


def test_the_shipped_real_model_is_small_float16_and_has_a_card():
    ck = read_checkpoint(real_checkpoint())
    assert real_checkpoint().stat().st_size < 4_000_000
    assert all(v.dtype == torch.float16 for v in ck["model"].values() if v.is_floating_point())
    t = ck["config"]["train"]
    assert t["spacing"] == 2.0 and t["fg_balance"] == "class" and len(ck["cases"]) == 14 and t["val_tta"]
    card = real_model_card()
    for words in ("Not for clinical use", "Cross-validated scores", "Sources and licences", *ck["cases"]):
        assert words in card, words


def test_predict_without_a_checkpoint_uses_the_shipped_model(tmp_path):
    r = run("predict", SAMPLES_DIR / "Synth_000", "--out", tmp_path / "p", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no CHECKPOINT given: using the real-data model shipped with brats_nb" in r.stdout and "not for clinical use" in r.stdout
    assert "8-flip TTA" in r.stdout                  # the recipe's protocol (val_tta), chosen by cross-validation
    assert nib.load(str(tmp_path / "p" / "Synth_000.nii.gz")).shape == (96, 96, 96)
    r = run("predict", SAMPLES_DIR / "Synth_000", "--out", tmp_path / "q", "--no-tta", cache=tmp_path / "cache")
    assert r.returncode == 0 and "no TTA" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(not (REAL / "brats21" / "BraTS2021_00000").is_dir(), reason="the real BraTS cases of ../shared/real are not here")
def test_the_shipped_model_segments_a_real_case_at_full_resolution(tmp_path):
    src = REAL / "brats21" / "BraTS2021_00000"
    r = run("predict", src, "--out", tmp_path / "p", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    case = load_case(src)
    pred = np.asanyarray(nib.load(str(tmp_path / "p" / "BraTS2021_00000.nii.gz")).dataobj)
    assert pred.shape == (240, 240, 155) == case.shape
    d = [dice(a, b) for a, b in zip(labels_to_regions(pred, "brats2017"), labels_to_regions(case.label, case.label_convention))]
    assert d[0] > 0.7 and d[1] > 0.5, d     # a case it was trained on: a broken resampling or label mapping scores near 0
