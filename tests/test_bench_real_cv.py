"""The cross-validation bench's own logic, without training: folds fixed by name, the `--set` experiment overrides,
the prediction rules and the scores it reports (the bench itself takes an hour or more; see tests/bench_real_cv.py)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("bench_real_cv", Path(__file__).with_name("bench_real_cv.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_folds_fixed_by_name_order():
    names = [f"case{i:02d}" for i in range(14)][::-1]            # the order given must not matter
    folds = bench.folds_of(names, 4)
    assert [len(f) for f in folds] == [4, 4, 3, 3]
    assert folds[0] == ["case00", "case04", "case08", "case12"]
    assert sorted(sum(folds, [])) == sorted(names)


def test_overrides_typed_as_the_config_fields():
    out = bench.parse_overrides(["aug_field=0.3", "epochs=45", "val_tta=false", "fg_balance=tumour"])
    assert out == dict(aug_field=0.3, epochs=45, val_tta=False, fg_balance="tumour")
    assert isinstance(out["epochs"], int) and isinstance(out["aug_field"], float)
    from brats_nb.trainer import preset
    assert preset("laptop", **out).aug_field == 0.3                 # the preset accepts them


@pytest.mark.parametrize("item", ["nosuchfield=1", "epochs", "epochs=4.5", "aug_field=abc"])
def test_bad_override_is_refused_by_name(item):
    with pytest.raises(SystemExit, match="--set"):
        bench.parse_overrides([item])


def test_rule_and_scores():
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[5:10, 5:10, 5:10] = 2                                       # edema only: a glioma without ET
    gt[6:9, 6:9, 6:9] = 1
    pred = gt.copy()
    pred[7, 7, 7] = 3                                              # one false ET voxel
    pred[15:18, 15:18, 15:18] = 2                                  # a tumour component with no core
    d, h = bench.scores(pred, gt, (1.0, 1.0, 1.0))
    assert d[2] == 0.0 and h[2] > 300                              # any false ET scores 0
    assert d[0] < 1.0
    cleaned = bench.apply_rule(pred, (500, True))                  # ET < 500 voxels -> NCR, core-less dropped
    assert not (cleaned == 3).any() and not cleaned[15:18, 15:18, 15:18].any()
    d, h = bench.scores(cleaned, gt, (1.0, 1.0, 1.0))
    assert d == [1.0, 1.0, 1.0] and h == [0.0, 0.0, 0.0]


def test_interval_is_a_t_interval():
    m, h = bench.interval([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7)
    assert h == pytest.approx(4.302652729911275 * 0.2 / np.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
