"Key boundary point selection: exactness against brute force, degenerate regions, determinism, the cache, CLI, viewer."
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_nb.cli import main
from brats_nb.data import BratsError, REGIONS, labels_to_regions, load_case
from brats_nb.keypoints import (ball_offsets, boundary_voxels, draw_balls, fill_hull, fill_hull_bruteforce,
                                score_candidates, select_keypoints, select_region_keypoints, select_region_reference)
from brats_nb.viz import keypoint_viewer, show_keypoints
from brats_nb.pipeline import BratsDataset, keypoint_files, keypoints_up_to_date, preprocess, preprocess_case
from brats_nb.synth import SAMPLES_DIR, make_case, write_case


def _iou(a, b):
    i = int((a & b).sum()); return i / (int(a.sum()) + int(b.sum()) - i)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("seed", range(4))
def test_fill_hull_equals_bruteforce_on_random_point_sets(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(15):
        shape = tuple(int(s) for s in rng.integers(3, 30, 3))
        k = int(rng.integers(4, 60))
        pts = np.stack([rng.integers(0, s, k) for s in shape], 1)
        np.testing.assert_array_equal(fill_hull(pts, shape, device="cpu"), fill_hull_bruteforce(pts, shape))


def test_fill_hull_equals_bruteforce_far_from_the_origin_and_on_boundary_points():
    # large coordinates (integer sizes as in a 240 x 240 x 155 case) and points drawn from a real boundary surface
    rng = np.random.default_rng(7)
    shape = (240, 40, 30)
    pts = np.stack([rng.integers(150, 240, 80), rng.integers(0, 40, 80), rng.integers(0, 30, 80)], 1)
    np.testing.assert_array_equal(fill_hull(pts, shape), fill_hull_bruteforce(pts, shape))
    ball = np.linalg.norm(np.indices((30, 30, 30)) - 14.5, axis=0) <= 12
    bv = boundary_voxels(ball)
    for _ in range(5):
        p = bv[rng.choice(len(bv), 50, replace=False)]
        np.testing.assert_array_equal(fill_hull(p, ball.shape), fill_hull_bruteforce(p, ball.shape))


def test_fill_hull_known_counts():
    cube = np.array([[x, y, z] for x in (2, 8) for y in (1, 5) for z in (0, 3)])
    assert fill_hull(cube, (10, 10, 10)).sum() == 7 * 5 * 4          # faces and edges are in
    tet = np.array([[0, 0, 0], [6, 0, 0], [0, 6, 0], [0, 0, 6]])      # x + y + z <= 6: C(9, 3) lattice points
    assert fill_hull(tet, (8, 8, 8)).sum() == 84
    with pytest.raises(BratsError, match="outside the grid"):
        fill_hull(np.array([[0, 0, 0], [20, 0, 0], [0, 1, 0], [0, 0, 1]]), (10, 10, 10))


def test_score_candidates_is_the_exact_voxel_iou():
    rng = np.random.default_rng(3)
    region = np.zeros((26, 22, 18), bool)
    region[3:20, 4:18, 2:15] = True
    region[10:20, 10:18, 8:15] = False                                  # not convex
    bv = boundary_voxels(region)
    sets = [bv[rng.choice(len(bv), k, replace=False)] for k in (4, 10, 40, 200)]
    sets.append(np.array([[3, 4, 2], [3, 10, 2], [3, 4, 9], [3, 12, 12]]))  # coplanar (x = 3): the points themselves
    sets.append(bv[:2])                                                  # fewer than 4 points
    got = score_candidates(region, sets)
    want = [_iou(fill_hull_bruteforce(s, region.shape), region) for s in sets]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[4] == pytest.approx(4 / region.sum()) and got[5] == pytest.approx(2 / region.sum())


def test_reference_gives_the_same_ious_as_ours_on_a_sample():
    reg = labels_to_regions(load_case(SAMPLES_DIR / "Synth_002"))
    r = select_region_keypoints(reg[2], n=100, t=3, radius=1, seed=4, region_index=2)
    ref = select_region_reference(reg[2], n=100, t=3, seed=4, region_index=2)
    np.testing.assert_allclose(ref, r["history"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the selection
def test_select_keypoints_outputs_and_balls():
    case = load_case(SAMPLES_DIR / "Synth_000")
    maps, info = select_keypoints(case, t=8)
    assert maps.shape == (3, *case.shape) and maps.dtype == np.uint8 and set(np.unique(maps)) <= {0, 1}
    regions = labels_to_regions(case)
    for i, (name, n, R) in enumerate(zip(REGIONS, (300, 200, 100), (2, 1, 1))):
        inf = info[name]
        assert len(inf["points"]) == n and len(inf["history"]) == 8 and inf["kind"] == "hull"
        assert inf["iou"] == inf["history"].max()
        assert regions[i][tuple(inf["points"].T)].all()                      # points are region boundary voxels
        np.testing.assert_array_equal(maps[i], draw_balls(inf["points"], case.shape, R))
        # the best set's IoU is the exact IoU of its filled hull
        assert inf["iou"] == pytest.approx(_iou(fill_hull(inf["points"], case.shape), regions[i]), abs=1e-12)
    assert len(ball_offsets(2)) == 33 and len(ball_offsets(1)) == 7 and len(ball_offsets(0)) == 1


def test_deterministic_and_regions_scored_independently():
    lab = load_case(SAMPLES_DIR / "Synth_003").label
    m1, i1 = select_keypoints(lab, t=6, seed=5)
    m2, i2 = select_keypoints(lab, t=6, seed=5)
    np.testing.assert_array_equal(m1, m2)
    for r in REGIONS: np.testing.assert_array_equal(i1[r]["points"], i2[r]["points"])
    m3, _ = select_keypoints(lab, t=6, seed=6)
    assert not np.array_equal(m1, m3)
    # another n for ET leaves WT and TC alone (each region has its own random stream and its own score)
    m4, i4 = select_keypoints(lab, n=(300, 200, 50), t=6, seed=5)
    np.testing.assert_array_equal(m4[:2], m1[:2]); assert not np.array_equal(m4[2], m1[2])


def test_degenerate_regions():
    z = np.zeros((14, 14, 14), bool)
    maps, info = select_keypoints(np.stack([z, z, z]), t=5)
    assert maps.sum() == 0 and all(info[r]["kind"] == "empty" and info[r]["iou"] == 1.0 and len(info[r]["points"]) == 0
                                   for r in REGIONS)
    small = z.copy(); small[3:6, 3:5, 3:5] = True                        # 12 voxels, all on the boundary
    r = select_region_keypoints(small, n=300, t=7)
    assert len(r["points"]) == 12 and r["iou"] == 1.0 and len(r["history"]) == 7 and r["kind"] == "hull"
    flat = z.copy(); flat[2:12, 3:9, 7] = True                           # one voxel thick and flat: no 3D hull
    r = select_region_keypoints(flat, n=20, t=4, radius=0)
    assert r["kind"] == "points" and r["iou"] == pytest.approx(20 / flat.sum()) and r["map"].sum() == 20
    line = z.copy(); line[2:12, 5, 5] = True                             # collinear
    r = select_region_keypoints(line, n=3, t=4)
    assert r["kind"] == "points" and r["iou"] == pytest.approx(3 / 10)
    one = z.copy(); one[0, 0, 0] = True                                  # one voxel in the corner of the volume
    r = select_region_keypoints(one, n=100, t=3, radius=2)
    assert r["iou"] == 1.0 and r["map"].sum() == len([o for o in ball_offsets(2) if (o >= 0).all()])
    shell = np.linalg.norm(np.indices((14, 14, 14)) - 6.5, axis=0)
    shell = (shell <= 6) & (shell > 5.2)                                 # one voxel thick, curved
    r = select_region_keypoints(shell, n=40, t=5)
    assert r["kind"] == "hull" and 0 < r["iou"] < 0.6
    edge = z.copy(); edge[:, :, :4] = True                               # a slab touching the volume's border
    assert len(boundary_voxels(edge)) == edge.sum() - 12 * 12 * 2        # only the border-free interior is inner
    assert np.isfinite(select_region_keypoints(edge, n=50, t=3)["iou"])


def test_bad_input_is_refused():
    with pytest.raises(BratsError, match="shape"): select_keypoints(np.zeros((4, 4)))
    with pytest.raises(BratsError, match="n >= 1"): select_region_keypoints(np.ones((4, 4, 4), bool), n=0)
    with pytest.raises(BratsError, match="three"): select_keypoints(np.zeros((4, 4, 4), np.uint8), n=(1, 2))


def test_real_case_selection(real_case_dir):
    case = load_case(real_case_dir)
    maps, info = select_keypoints(case)                                 # the paper's settings, t = 100
    assert maps.shape == (3, 240, 240, 155)
    assert {r: info[r]["n_boundary"] for r in REGIONS} == {"WT": 12537, "TC": 5449, "ET": 9418}
    assert all(0.3 < info[r]["iou"] < 1 for r in REGIONS)
    # the first ET candidate filled over the whole volume by brute force has the same IoU
    reg = labels_to_regions(case)
    ref = select_region_reference(reg[2], n=100, t=1, seed=0, region_index=2)
    assert ref[0] == pytest.approx(info["ET"]["history"][0], abs=1e-12)


# ---------------------------------------------------------------- the cache
def _copy_samples(tmp_path, names=("Synth_000", "Synth_001")):
    for n in names: shutil.copytree(SAMPLES_DIR / n, tmp_path / n)
    return tmp_path


def test_preprocess_writes_skips_and_redoes(tmp_path):
    root = _copy_samples(tmp_path)
    kw = dict(workers=1, t=4, progress=False)
    s = preprocess(root, **kw)
    assert s["written"] == ["Synth_000", "Synth_001"] and not s["skipped"] and not s["failed"]
    nii, side = keypoint_files(root / "Synth_000")
    assert nii.name == "Synth_000_keypoints.nii.gz" and side.name == "Synth_000_keypoints.json"
    img = nib.load(str(nii)); seg = nib.load(str(root / "Synth_000" / "Synth_000_seg.nii.gz"))
    data = np.asanyarray(img.dataobj)
    assert data.shape == (96, 96, 96, 3) and data.dtype == np.uint8
    np.testing.assert_array_equal(img.affine, seg.affine)
    maps, _ = select_keypoints(np.asanyarray(seg.dataobj).astype(np.uint8), t=4)
    np.testing.assert_array_equal(np.moveaxis(data, -1, 0), maps)
    meta = json.loads(side.read_text())
    assert meta["n"] == [300, 200, 100] and meta["t"] == 4 and meta["radius"] == [2, 1, 1] and meta["seed"] == 0
    mtime = nii.stat().st_mtime_ns
    assert preprocess(root, **kw)["skipped"] == ["Synth_000", "Synth_001"]
    assert nii.stat().st_mtime_ns == mtime
    for change in (dict(t=5), dict(n=(300, 200, 90)), dict(radius=(2, 1, 2)), dict(seed=1)):
        assert preprocess(root, **{**kw, **change})["written"] == ["Synth_000", "Synth_001"], change
        assert preprocess(root, **{**kw, **change})["skipped"] == ["Synth_000", "Synth_001"], change
    assert preprocess(root, **kw)["written"] == ["Synth_000", "Synth_001"]   # back to the first parameters: redone
    assert preprocess(root, force=True, **kw)["written"] == ["Synth_000", "Synth_001"]
    # a changed label file: only that case is redone
    segp = root / "Synth_001" / "Synth_001_seg.nii.gz"
    s1 = nib.load(str(segp)); lab = np.asanyarray(s1.dataobj).copy(); lab[lab == 2] = 1
    nib.save(nib.Nifti1Image(lab, s1.affine, s1.header), str(segp))
    s = preprocess(root, **kw)
    assert s["written"] == ["Synth_001"] and s["skipped"] == ["Synth_000"]
    # a missing or broken sidecar: redone
    side.write_text("{ not json")
    assert preprocess(root, **kw)["written"] == ["Synth_000"]
    side.unlink()
    assert preprocess(root, **kw)["written"] == ["Synth_000"]
    assert not [p for p in root.rglob("*.tmp*")]


def test_crash_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    root = _copy_samples(tmp_path, ("Synth_000",))
    d = root / "Synth_000"
    assert preprocess_case(d, t=3) == "written"
    nii, side = keypoint_files(d)
    before = nii.read_bytes()
    real_save = nib.save
    def crashing_save(img, path):          # fault injection: write half a file, then die
        real_save(img, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(nib, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        preprocess_case(d, t=4)
    monkeypatch.setattr(nib, "save", real_save)
    assert nii.read_bytes() == before                        # the old map is intact, under the real name
    assert json.loads(side.read_text())["t"] == 3            # and its sidecar still describes it
    assert not [p for p in d.iterdir() if ".tmp" in p.name]
    assert not keypoints_up_to_date(d, t=4) and keypoints_up_to_date(d, t=3)
    assert preprocess_case(d, t=4) == "written"


def test_killed_preprocess_leaves_only_complete_files(tmp_path):
    root = _copy_samples(tmp_path, ("Synth_000", "Synth_001", "Synth_002", "Synth_003"))
    code = "import sys; from brats_nb.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", code, "preprocess", str(root), "--beside", "--workers", "1", "--t", "30", "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(root.rglob("*_keypoints.json")) and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL); p.wait()
    for nii in root.rglob("*_keypoints.nii.gz"):                        # whatever exists is a whole, readable map
        assert np.asanyarray(nib.load(str(nii)).dataobj).shape == (96, 96, 96, 3)
    s = preprocess(root, workers=1, t=30, progress=False)
    assert len(s["written"]) + len(s["skipped"]) == 4 and not s["failed"]
    assert all(keypoints_up_to_date(root / n, t=30) for n in ("Synth_000", "Synth_001", "Synth_002", "Synth_003"))


def test_2023_naming_and_dataset_reads_maps_like_the_label(tmp_path):
    d = write_case(make_case(seed=3, shape=(40, 40, 40)), tmp_path, "BraTS-GLI-00001-000", naming="brats2023")
    assert preprocess_case(d, t=5, radius=0) == "written"               # radius 0: every key voxel is in its region
    nii, side = keypoint_files(d)
    assert nii.name == "BraTS-GLI-00001-000-keypoints.nii.gz" and side.name == "BraTS-GLI-00001-000-keypoints.json"
    ds = BratsDataset([d], crop_size=32, augment=True, extra=("keypoints",), seed=0)
    for e in range(2):
        ds.set_epoch(e); s = ds[0]
        kp, lab = s["keypoints"], s["label"]
        assert kp.shape == (3, 32, 32, 32)
        assert (lab[kp[0] > 0] > 0).all()                                # WT key voxels stay on WT voxels
        assert (lab[kp[2] > 0] == 3).all()                               # ET key voxels on ET (class 3)
        tc = (lab == 1) | (lab == 3)
        assert tc[kp[1] > 0].all()


# ---------------------------------------------------------------- CLI, benchmark, viewer
def test_cli_preprocess_in_worker_processes(tmp_path):
    root = _copy_samples(tmp_path)
    code = "import sys; from brats_nb.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "preprocess", str(root), "--beside", "--workers", "2", "--t", "3",
                        "--n", "100", "--radius", "1"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "2 written, 0 up to date" in r.stdout
    meta = json.loads(keypoint_files(root / "Synth_001")[1].read_text())
    assert meta["n"] == [100, 100, 100] and meta["radius"] == [1, 1, 1] and meta["t"] == 3
    assert main(["preprocess", str(root), "--beside", "--t", "3", "--n", "100", "--radius", "1", "--workers", "1", "--no-progress"]) == 0
    assert all(keypoints_up_to_date(root / n, n=100, t=3, radius=1) for n in ("Synth_000", "Synth_001"))


def test_cli_training_cache_in_worker_processes_on_read_only_data(tmp_path):
    "`brats-nb preprocess` fills the cache ($BRATS_NB_CACHE by default) from a read-only data folder; killed, it leaves only whole entries."
    import os, stat
    from brats_nb.pipeline import cache_settings, find_cache_entry, read_cache_entry
    root = _copy_samples(tmp_path / "data", ("Synth_000", "Synth_001", "Synth_002"))   # (as root, chmod stops nothing: the snapshot checks)
    for q in root.rglob("*"): q.chmod(q.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root.chmod(root.stat().st_mode & ~stat.S_IWUSR)
    before = sorted((str(q), q.stat().st_mtime_ns) for q in root.rglob("*"))
    env = dict(os.environ, BRATS_NB_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    code = "import sys; from brats_nb.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", code, "preprocess", str(root), "--workers", "1", "--t", "30", "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "cache").glob("train/Synth_*/meta.json")) and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    for entry in (tmp_path / "cache" / "train").glob("Synth_*"):         # whatever has its name is whole
        a = read_cache_entry(entry); assert a["image"].shape[0] == 4 and a["keypoints"].shape[1:] == a["label"].shape
    r = subprocess.run([sys.executable, "-c", code, "preprocess", str(root), "--workers", "2", "--t", "30"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 up to date" in r.stdout or "written" in r.stdout
    assert all(find_cache_entry(root / n, tmp_path / "cache" / "train", cache_settings(t=30)) for n in ("Synth_000", "Synth_001", "Synth_002"))
    assert sorted((str(q), q.stat().st_mtime_ns) for q in root.rglob("*")) == before   # the data folder is untouched
    root.chmod(root.stat().st_mode | stat.S_IWUSR)


def test_cli_bad_input(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    root = _copy_samples(tmp_path, ("Synth_000",))
    assert main(["preprocess", str(root), "--n", "3", "4"]) == 2
    assert "three" in capsys.readouterr().err
    assert main(["preprocess", str(root), "--t", "0"]) == 2


def test_bench_quick_smoke(capsys):
    assert main(["bench", "keypoints", "--quick", "--no-pin"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "Synth_000" in out
    diffs = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("Synth_000") and "ALL" not in line]
    assert len(diffs) == 3 and max(diffs) == 0.0


def test_viewer_state_and_static_fallback():
    import matplotlib; matplotlib.use("Agg")
    case = load_case(SAMPLES_DIR / "Synth_004")
    w = keypoint_viewer(case, t=5)
    assert set(w.controls) == {"region", "n", "t", "radius", "seed", "slice"}
    iou0, png0 = w.state["r"]["iou"], w.image.value
    assert len(w.figure3d.data[1].x) == 300 and len(w.curve.data[0].y) == 5
    w.controls["n"].value = 12
    assert len(w.figure3d.data[1].x) == 12 and w.state["r"]["iou"] < iou0
    w.controls["t"].value = 9
    assert len(w.curve.data[0].y) == 9
    w.controls["region"].value = "TC"
    assert w.controls["n"].value == 200 and w.controls["radius"].value == 1 and "TC" in w.info.value
    w.controls["slice"].value = (w.controls["slice"].value + 7) % 96
    assert w.image.value != png0
    fig = show_keypoints(case, t=3)
    assert len(fig.axes) >= 3
