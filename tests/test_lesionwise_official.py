"""`lesion_scores_2025` against the official BraTS 2025 evaluation (panoptica 2.1.7 with the BraTS-evaluation 0.0.10
configuration `gli`), on real BraTS 2021 cases from ../shared/real with perturbed predictions.

The official packages pin versions that clash with brats_nb's (numpy < 2.3), so the test installs them into a throwaway
virtual environment of its own and runs them there on label maps written as .npy files; it skips when the packages
cannot be installed (no registry) or the real cases are absent. The official code is given the arrays and the voxel
spacing (its NIfTI-path input applies the spacing to the wrong axes for anisotropic volumes: SimpleITK's array is
z, y, x while the spacing stays x, y, z)."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from brats_nb.data import find_cases, labels_to_regions, load_case
from brats_nb.metrics import lesion_scores_2025
from official import compare, throwaway_venv

REAL = Path(__file__).resolve().parents[2] / "shared" / "real" / "brats21"
PINS = ["panoptica==2.1.7", "BraTS-evaluation==0.0.10", "numpy<2.3"]
RUNNER = r'''
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np
from panoptica import Panoptica_Evaluator
from brats_evaluation import config_path
ev = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
keys = ["tp", "fp", "fn", "sq_dsc", "sq_nsd", "sq_hd95", "global_bin_dsc", "global_bin_nsd", "global_bin_hd95"]
out = []
for job in json.load(open(sys.argv[1])):
    res = ev.evaluate(np.load(job["pred"]), np.load(job["gt"]), voxelspacing=tuple(job["spacing"]), skip_groups=["snfh", "netc", "rc"])
    out.append({g: {k: (None if r.to_dict(True).get(k) is None else float(r.to_dict(True)[k])) for k in keys} for g, r in res.items()})
json.dump(out, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    if not REAL.is_dir(): pytest.skip(f"{REAL}: the real BraTS cases are not here")
    return throwaway_venv(tmp_path_factory.mktemp("official"), PINS, RUNNER)


def ball(shape, centre, r):
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((gi - c) ** 2 for gi, c in zip(g, centre)) <= r * r


def perturbed(gt):
    "Predictions made from a 2023-convention label map: a split, a far false positive, a dropped lesion, shifted."
    out = {"identity": gt.copy()}
    et = gt == 3
    zc = int(round(ndimage.center_of_mass(et if et.any() else gt > 0)[2]))
    split = gt.copy(); split[:, :, zc - 2:zc + 2] = 0                   # a 4-slice slab removed: lesions split in two
    out["split"] = split
    wt = gt > 0
    far = np.array(ndimage.center_of_mass(wt)).round().astype(int); far[0] = gt.shape[0] - 1 - far[0]
    fp = gt.copy(); fp[ball(gt.shape, far, 5) & ~ndimage.binary_dilation(wt, iterations=8)] = 3   # an ET blob far away
    out["fp_blob"] = fp
    drop = gt.copy()
    cc, n = ndimage.label(et, np.ones((3, 3, 3), bool))
    if n: drop[cc == int(np.argmin(np.bincount(cc.ravel())[1:])) + 1] = 2   # the smallest ET lesion turned to edema
    out["drop_small_et"] = drop
    shifted = np.roll(gt, (2, -1, 1), axis=(0, 1, 2)); shifted[:, :, zc - 2:zc + 2] = 0
    out["shift_split"] = shifted
    out["empty"] = np.zeros_like(gt)
    return out


def test_lesion_scores_2025_equal_the_official_evaluation(official, tmp_path):
    python, root = official
    jobs, ours = [], []
    for case_dir in find_cases(REAL)[:2]:
        case = load_case(case_dir)
        gt = np.where(case.label == 4, 3, case.label).astype(np.uint8)         # the 2023 convention, as the config expects
        for name, pred in perturbed(gt).items():
            for spacing in ((1.0, 1.0, 1.0), (1.0, 1.0, 2.5)):               # declared, not resampled: anisotropic works too
                i = len(jobs)
                np.save(tmp_path / f"gt{i}.npy", gt); np.save(tmp_path / f"pred{i}.npy", pred)
                jobs.append(dict(gt=str(tmp_path / f"gt{i}.npy"), pred=str(tmp_path / f"pred{i}.npy"), spacing=spacing,
                                 id=f"{case.name} {name} {spacing}"))
                g, p = labels_to_regions(gt, "brats2023"), labels_to_regions(pred, "brats2023")
                ours.append({r.lower(): lesion_scores_2025(p[k], g[k], spacing) for k, r in enumerate(("WT", "TC", "ET"))})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    r = subprocess.run([str(python), str(root / "runner.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    pairs = [("tp", "tp", 0), ("fp", "fp", 0), ("fn", "fn", 0), ("sq_dsc", "lesion_dsc", 1e-6), ("sq_nsd", "lesion_nsd", 1e-6),
             ("sq_hd95", "lesion_hd95", 1e-3), ("global_bin_dsc", "dsc", 1e-6), ("global_bin_nsd", "nsd", 1e-6),
             ("global_bin_hd95", "hd95", 1e-3)]
    worst, bad = compare([(f"{job['id']} {region}", t[region], o[region]) for job, t, o in zip(jobs, theirs, ours)
                          for region in ("wt", "tc", "et")], pairs)
    print(f"{len(jobs)} prediction/ground-truth pairs x 3 regions; largest differences: {worst}")
    assert not bad, "\n".join(bad[:20])
