"""Reduced resolution end to end: `brats-nb downsample`, training on the copy, `brats-nb predict --downsampled` back at
full resolution in the input's space; and the geometry of the copy on a real BraTS case where ../shared/real is present."""
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_nb.data import downsample_case, find_cases, labels_to_regions, load_case
from brats_nb.metrics import dice
from brats_nb.synth import SAMPLES_DIR

BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
REAL = Path(os.environ.get("BRATS_NB_REAL", Path(__file__).resolve().parents[2] / "shared" / "real"))


def run(*args):
    return subprocess.run([str(BIN / "brats-nb"), *args], capture_output=True, text=True, env=ENV)


def test_downsample_train_predict_full_resolution(tmp_path):
    src = tmp_path / "src"; src.mkdir()
    for c in find_cases(SAMPLES_DIR)[:3]: (src / c.name).symlink_to(c.resolve(), target_is_directory=True)
    r = run("downsample", str(src), "--out", str(tmp_path / "small"), "--spacing", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    small = find_cases(tmp_path / "small")
    assert [c.name for c in small] == [c.name for c in find_cases(src)]
    s0 = load_case(small[0]); big = load_case(find_cases(src)[0])
    assert s0.spacing == (2.0, 2.0, 2.0) and all(a <= b // 2 + 1 for a, b in zip(s0.shape, big.shape))
    r = run("train", "--preset", "cpu", "--variant", "dmfnet", "--data", str(tmp_path / "small"), "--epochs", "1",
            "--crop-size", "32", "--val-every", "0", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("predict", str(tmp_path / "run" / "latest.pt"), str(src), "--out", str(tmp_path / "pred"), "--downsampled", "2",
            "--sliding-window", "--roi-size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    for c in find_cases(src):
        img, ref = nib.load(str(tmp_path / "pred" / f"{c.name}.nii.gz")), nib.load(str(next(c.glob("*_t1.nii.gz"))))
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)        # full resolution, the input's space
        assert set(np.unique(np.asanyarray(img.dataobj))) <= {0, 1, 2, 4}           # the input's label convention
    r = run("predict", str(tmp_path / "run" / "latest.pt"), str(src), "--out", str(tmp_path / "bad"), "--downsampled", "-1")
    assert r.returncode == 2 and "--downsampled" in r.stderr


@pytest.mark.skipif(not (REAL / "brats18").is_dir(), reason="the real BraTS case of ../shared/real is not here")
def test_real_case_at_2mm_keeps_its_regions():
    case = load_case(find_cases(REAL / "brats18")[0])
    small = downsample_case(case, 2.0)
    assert small.spacing == (2.0, 2.0, 2.0) and np.prod(small.shape) < np.prod(case.shape) / 10   # the brain only, 8x fewer voxels per mm³
    for r, a, b in zip(("WT", "TC", "ET"), labels_to_regions(small.label, small.label_convention),
                       labels_to_regions(case.label, case.label_convention)):
        ml_small, ml_big = a.sum() * 8 / 1000, b.sum() / 1000
        assert abs(ml_small / ml_big - 1) < 0.1, (r, ml_small, ml_big)              # region volumes kept within 10%
