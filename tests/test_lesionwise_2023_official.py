"""`lesion_scores_2023` against the BraTS 2023-2024 lesion-wise evaluation rule of the organisers' BraTS-2023-Metrics
script (`get_LesionWiseScores` / `get_LesionWiseResults`), run with the libraries that script uses (cc3d, scipy.ndimage,
DeepMind's surface-distance) on cropped real BraTS 2021 cases from ../shared/real with perturbed predictions.

The reference below is a plain per-lesion loop written from the rule, and it runs in a throwaway virtual environment of
its own with the organisers' pins (numpy 1.24.3, scipy 1.11.4, connected-components-3d 3.12.1 from their requirements.txt)
and surface-distance 0.1 from PyPI: surface-distance 0.1 uses `np.Inf`, which NumPy 2 removed, so under brats_nb's
NumPy it fails (AttributeError) whenever one of the two masks has no surface. The test skips when the packages cannot be
installed (no registry, or a Python without wheels for these pins) or the real cases are absent.

The whole-region HD95 is compared as the organisers' final table reports it: 374 where exactly one mask is empty (their
`results_df.replace(np.inf, 374)`)."""
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from brats_nb.data import find_cases, labels_to_regions, load_case
from official import compare, throwaway_venv

REAL = Path(__file__).resolve().parents[2] / "shared" / "real" / "brats21"
PINS = ["numpy==1.24.3", "scipy==1.11.4", "connected-components-3d==3.12.1", "surface-distance==0.1"]
PENALTY = 374.0
SETTINGS = {"gli": (3, 50.0), "met": (1, 2.0), "men": (1, 50.0)}   # (dilation in voxels, lesion volume threshold in mm³)
SPACINGS = ((1.0, 1.0, 1.0), (1.0, 1.0, 2.5))                      # declared, not resampled
MARGIN = 20                                                          # voxels kept around the tumour's bounding box
RUNNER = r'''
import json, sys, warnings
warnings.filterwarnings("ignore")              # surface-distance 0.1 calls the deprecated scipy.ndimage.filters/morphology
import numpy as np
import cc3d
import surface_distance
from scipy.ndimage import binary_dilation, generate_binary_structure

PENALTY = 374.0

def hd95(gt, pred, spacing):
    return float(surface_distance.compute_robust_hausdorff(surface_distance.compute_surface_distances(gt, pred, spacing), 95))

def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())

def whole(gt, pred, spacing):
    if not gt.any() and not pred.any(): return {"dsc": 1.0, "hd95": 0.0}
    h = hd95(gt, pred, spacing)                                                             # inf when exactly one is empty ...
    return {"dsc": float(dice(gt, pred)), "hd95": PENALTY if np.isinf(h) else h}          # ... which their table reports as 374

def scores(gt, pred, spacing, dilation, min_volume):
    out = {}
    struct = generate_binary_structure(3, 2)
    gt_cc = cc3d.connected_components(gt, connectivity=26)
    pred_cc = cc3d.connected_components(pred, connectivity=26)
    gt_dil_cc = cc3d.connected_components(binary_dilation(gt, struct, iterations=dilation), connectivity=26)
    combined = np.where(gt_cc > 0, gt_dil_cc, 0)        # gt lesions whose dilations touch are one lesion
    voxel = spacing[0] * spacing[1] * spacing[2]
    touched, kept_dice, kept_hd, tp, fn = [], [], [], 0, 0
    for lesion in range(1, int(combined.max()) + 1):
        gt_tmp = combined == lesion
        volume = gt_tmp.sum() * voxel
        near = binary_dilation(gt_tmp, struct, iterations=dilation)
        hits = np.unique(pred_cc[near]); hits = hits[hits != 0]
        touched.extend(int(h) for h in hits)              # touching any lesion, kept or not: never a false positive
        pred_tmp = np.isin(pred_cc, hits)
        d = float(dice(pred_tmp, gt_tmp))
        h = hd95(gt_tmp, pred_tmp, spacing)
        if np.isinf(h): h = PENALTY
        if volume <= min_volume: continue
        kept_dice.append(d); kept_hd.append(h)
        if len(hits): tp += 1
        else: fn += 1
    fp = [int(c) for c in np.unique(pred_cc) if c != 0 and int(c) not in touched]
    n = len(kept_dice) + len(fp)
    out.update(tp=tp, fp=len(fp), fn=fn,
               lesion_dsc=sum(kept_dice) / n if n else 1.0,
               lesion_hd95=(sum(kept_hd) + PENALTY * len(fp)) / n if n else 0.0)
    return out

cache = {}
def masks(path):
    if path not in cache: cache[path] = np.load(path)
    return cache[path]

out, regions = [], {}
for job in json.load(open(sys.argv[1])):
    k, spacing = job["region"], tuple(job["spacing"])
    gt, pred = masks(job["gt"])[k], masks(job["pred"])[k]
    key = (job["gt"], job["pred"], k, spacing)           # the whole-region scores do not depend on the lesion settings
    if key not in regions: regions[key] = whole(gt, pred, spacing)
    out.append({**regions[key], **scores(gt, pred, spacing, job["dilation"], job["min_volume"])})
json.dump(out, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    if not REAL.is_dir(): pytest.skip(f"{REAL}: the real BraTS cases are not here")
    return throwaway_venv(tmp_path_factory.mktemp("official2023"), PINS, RUNNER)


def crop(label, margin=MARGIN):
    "The label map cut to the tumour's bounding box plus `margin` voxels (within the volume)."
    idx = np.argwhere(label > 0)
    lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + margin + 1, label.shape)
    return label[tuple(slice(a, b) for a, b in zip(lo, hi))].copy()


def ball(shape, centre, r):
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((gi - c) ** 2 for gi, c in zip(g, centre)) <= r * r


def blob_offsets(n):
    "A compact blob of `n` voxels: the `n` voxels of a 4³ cube nearest its centre."
    o = np.argwhere(np.ones((4, 4, 4), bool))
    return o[np.lexsort((o[:, 2], o[:, 1], o[:, 0], ((o - 1.5) ** 2).sum(1)))][:n]


def scatter_blobs(label, rng):
    """Small blobs (2-30 voxels) of different labels: just outside the whole tumour (2-3.5 voxels from it: one lesion with it
    after a dilation of 3, apart after a dilation of 1), far from it, and enhancing specks in the oedema near the ET."""
    out = label.copy()
    wt, et = label > 0, label == 4
    d_wt = ndimage.distance_transform_edt(~wt)
    d_et = ndimage.distance_transform_edt(~et) if et.any() else np.full(label.shape, np.inf)
    taken = np.zeros(label.shape, bool)
    plans = [  # (voxels, label, where all its voxels may lie, where at least one must lie)
        *[(n, v, d_wt >= 2, d_wt <= 3.5) for n, v in ((2, 4), (8, 1), (30, 2), (5, 4))],
        *[(n, v, d_wt > 12, None) for n, v in ((3, 4), (12, 1), (27, 4))],
        *[(n, 4, (label == 2) & (d_et >= 2), d_et <= 3.5) for n in (2, 6, 20)],
    ]
    for n, value, allowed, near in plans:
        cand = np.argwhere(allowed & (near if near is not None else True))
        for p in cand[rng.permutation(len(cand))[:300]]:
            vox = p + blob_offsets(n) - 1
            if (vox < 0).any() or (vox >= label.shape).any(): continue
            vox = tuple(vox.T)
            if allowed[vox].all() and not taken[vox].any():
                out[vox] = value
                taken |= ndimage.binary_dilation(out != label, iterations=2)   # blobs stay apart from each other
                break
    return out


def perturbed(gt, rng):
    "(name, ground truth, prediction) triples made from a 2017-convention label map (1 NCR, 2 ED, 4 ET)."
    et, wt = gt == 4, gt > 0
    zc = int(round(ndimage.center_of_mass(et if et.any() else wt)[2]))
    out = [("identity", gt, gt.copy())]
    split = gt.copy(); split[:, :, zc - 2:zc + 2] = 0                       # a 4-slice slab removed: lesions split
    out.append(("split", gt, split))
    com = np.array(ndimage.center_of_mass(wt))
    corners = [np.array([6 if c == 0 else n - 7 for c, n in zip(bits, gt.shape)]) for bits in np.ndindex(2, 2, 2)]
    far = max(corners, key=lambda c: np.linalg.norm(c - com))
    fp = gt.copy(); fp[ball(gt.shape, far, 5) & ~ndimage.binary_dilation(wt, iterations=8)] = 4   # an ET ball far away
    out.append(("fp_ball", gt, fp))
    drop = gt.copy()
    cc, n = ndimage.label(et, np.ones((3, 3, 3), bool))
    if n: drop[cc == int(np.argmin(np.bincount(cc.ravel())[1:])) + 1] = 2   # the smallest ET lesion turned to oedema
    out.append(("drop_small_et", gt, drop))
    shifted = np.roll(gt, (2, -1, 1), axis=(0, 1, 2)); shifted[:, :, zc - 2:zc + 2] = 0
    out.append(("shift_split", gt, shifted))
    out.append(("empty", gt, np.zeros_like(gt)))
    blobs = scatter_blobs(gt, rng)
    out.append(("small_blobs", gt, blobs))
    out.append(("blobs_as_gt", blobs, gt.copy()))                           # small ground-truth lesions: the volume threshold
    return out


def test_lesion_scores_2023_equal_the_official_rule(official, tmp_path):
    from brats_nb.metrics import lesion_scores_2023
    python, root = official
    t0 = time.time()
    jobs, pairs = [], []
    for c, case_dir in enumerate(find_cases(REAL)[:2]):
        case = load_case(case_dir)
        label = crop(case.label)
        for name, gt, pred in perturbed(label, np.random.default_rng(c)):
            g, p = tmp_path / f"gt{len(pairs)}.npy", tmp_path / f"pred{len(pairs)}.npy"
            gm, pm = labels_to_regions(gt, "brats2017"), labels_to_regions(pred, "brats2017")   # WT, TC, ET
            np.save(g, gm); np.save(p, pm)
            pairs.append((gm, pm))
            for spacing in SPACINGS:
                for setting, (dilation, min_volume) in SETTINGS.items():
                    for k, region in enumerate(("wt", "tc", "et")):
                        jobs.append(dict(gt=str(g), pred=str(p), pair=len(pairs) - 1, region=k, spacing=spacing,
                                         dilation=dilation, min_volume=min_volume,
                                         id=f"{case.name} {name} {region} spacing={spacing} {setting}"))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    ref = subprocess.Popen([str(python), str(root / "runner.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)   # runs while ours are computed
    ours = []
    for job in jobs:
        gm, pm = pairs[job["pair"]]
        ours.append(lesion_scores_2023(pm[job["region"]], gm[job["region"]], spacing=tuple(job["spacing"]),
                                       dilation=job["dilation"], min_volume=job["min_volume"], penalty=PENALTY))
    t_ours = time.time() - t0
    _, err = ref.communicate(timeout=1200)
    assert ref.returncode == 0, err[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    keys = [("tp", 0), ("fp", 0), ("fn", 0), ("lesion_dsc", 1e-6), ("lesion_hd95", 1e-3), ("dsc", 1e-6), ("hd95", 1e-3)]
    worst, bad = compare([(job["id"], t, o) for job, t, o in zip(jobs, theirs, ours)], [(k, k, tol) for k, tol in keys])
    n_fp = sum(t["fp"] for t in theirs); n_tp = sum(t["tp"] for t in theirs); n_fn = sum(t["fn"] for t in theirs)
    print(f"\n{len(jobs)} region jobs ({len(pairs)} prediction/ground-truth pairs x {len(SPACINGS)} spacings x "
          f"{len(SETTINGS)} settings x 3 regions), official totals tp {n_tp} fp {n_fp} fn {n_fn}; ours took {t_ours:.1f} s, "
          f"all {time.time() - t0:.1f} s; largest differences: {worst}")
    assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad[:30])
