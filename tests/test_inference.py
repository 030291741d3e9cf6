"""Inference for real: TTA against its definition, ET post-processing, NIfTI round trips, `brats-nb predict` and
`evaluate` end to end (samples and the real case), the bad inputs, the viewer and the benchmark."""
import csv
import importlib.util
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from brats_nb.cli import main
from brats_nb.data import BratsError, brain_mask, find_cases, labels_to_regions, load_case, normalize, save_nifti
from brats_nb.inference import (benchmark_inference, format_inference_bench, postprocess_et, predict_case, predict_folder,
                                predict_volume, tta_flips, pad_to_multiple)
from brats_nb.viz import ERROR_COLORS, prediction_viewer, show_prediction
from brats_nb.checkpoints import load_model
from brats_nb.model import build_model
from brats_nb.synth import SAMPLES_DIR, make_case, write_case

HAS_TRAINER = importlib.util.find_spec("brats_nb.trainer") is not None
needs_trainer = pytest.mark.skipif(not HAS_TRAINER, reason="brats_nb.trainer (load_model) is not in this checkout yet; "
                                   "the predict command imports it")
TINY = dict(channels=8, mid_channels=16, groups=8)
TINIEST = dict(channels=4, mid_channels=8, groups=4)  # the checkpoints of the command tests: whole 96³ and 240² x 155 volumes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Small tensors on a shared 2-core machine: one thread is much faster than two fighting other processes."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ConvNet(nn.Module):
    "A small honest network that needs sizes divisible by 16 (as DMFNet does) and is not flip-symmetric."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv3d(4, 6, 3, padding=1)
        self.b = nn.Conv3d(6, 4, (3, 1, 5), padding=(1, 0, 2))
        self.calls = []
    def forward(self, x):
        assert all(s % 16 == 0 for s in x.shape[2:]), f"size {tuple(x.shape)} not divisible by 16"
        self.calls.append(tuple(x.shape))
        return self.b(torch.relu(self.a(x)) + x[:, :1].cumsum(2))  # cumsum: depends on the direction of axis 2


class PointNet(nn.Module):
    "A 1x1x1 convolution with DMFNet's size rule: cheap enough for whole 240 x 240 x 155 volumes."
    def __init__(self):
        super().__init__(); torch.manual_seed(0); self.c = nn.Conv3d(4, 4, 1); self.calls = []
    def forward(self, x):
        assert all(s % 16 == 0 for s in x.shape[2:]), f"size {tuple(x.shape)} not divisible by 16"
        self.calls.append(tuple(x.shape))
        return self.c(x)


def test_tta_equals_mean_of_eight_flipped_predictions():
    m = ConvNet().eval()
    x = torch.randn(4, 20, 30, 17)
    out = predict_volume(m, x, tta=True)
    assert out.shape == (4, 20, 30, 17)
    assert len(m.calls) == 8 and set(m.calls) == {(1, 4, 32, 32, 32)}
    xp = torch.nn.functional.pad(x[None], (0, 15, 0, 2, 0, 12))
    preds = []
    with torch.no_grad():
        for f in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
            xi = torch.flip(xp, f) if f else xp
            p = torch.softmax(m(xi), 1)
            preds.append((torch.flip(p, f) if f else p)[0, :, :20, :30, :17])
    torch.testing.assert_close(out, torch.stack(preds).mean(0), atol=1e-6, rtol=1e-5)
    # and it is not the plain prediction: the flips matter for this model
    plain = predict_volume(m, x)
    torch.testing.assert_close(plain, preds[0], atol=1e-6, rtol=1e-5)
    assert (out - plain).abs().max() > 1e-3
    assert sorted(tta_flips()) == sorted([(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)])


def test_tta_with_dmfnet_and_numpy_input():
    m = build_model("all", **TINY).eval()
    x = np.random.default_rng(0).standard_normal((4, 24, 16, 20)).astype(np.float32)
    out = predict_volume(m, x, tta=True)
    xp, size = pad_to_multiple(torch.from_numpy(x)[None])
    with torch.no_grad():
        ref = torch.stack([torch.softmax(m(xp.flip(f)), 1).flip(f) if f else torch.softmax(m(xp), 1) for f in tta_flips()]).mean(0)
    torch.testing.assert_close(out, ref[0, :, :24, :16, :20], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.sum(0), torch.ones(24, 16, 20))


def test_predict_volume_keeps_training_mode_and_refuses_bad_input():
    m = build_model("dmfnet", **TINY).train()
    predict_volume(m, torch.randn(4, 16, 16, 16))
    assert m.training
    with pytest.raises(BratsError, match="expected an image"):
        predict_volume(m, torch.randn(16, 16))
    x = torch.randn(4, 16, 16, 16); x[0, 1, 2, 3] = float("nan")
    with pytest.raises(BratsError, match="1 NaN or infinite"):
        predict_volume(m, x)
    with pytest.raises(BratsError, match="multiples of 16"):
        predict_volume(m, torch.randn(4, 32, 32, 32), sliding_window=True, roi_size=24)
    with pytest.raises(BratsError, match="overlap"):
        predict_volume(m, torch.randn(4, 32, 32, 32), sliding_window=True, roi_size=16, overlap=1.0)


def test_sliding_window():
    m = ConvNet().eval()
    x = torch.randn(4, 40, 36, 30)
    whole = predict_volume(m, x)
    # windows as big as the padded volume: the whole-volume prediction
    torch.testing.assert_close(predict_volume(m, x, sliding_window=True, roi_size=128), whole, atol=1e-5, rtol=1e-4)
    # small windows: a 3x3x3-receptive-field network far from the window borders agrees, and every window has the roi size
    m.calls.clear()
    sw = predict_volume(m, x, sliding_window=True, roi_size=16, overlap=0.5, sw_batch_size=2)
    assert sw.shape == whole.shape and {c[2:] for c in m.calls} == {(16, 16, 16)}
    assert sum(c[0] for c in m.calls) == 5 * 5 * 3  # windows every 8 voxels over 48 x 48 x 32
    torch.testing.assert_close(sw.sum(0), torch.ones(40, 36, 30))
    agree = (sw.argmax(0) == whole.argmax(0)).float().mean()
    assert agree > 0.5, agree
    # TTA over sliding windows: 8 times the windows
    m.calls.clear()
    predict_volume(m, x, tta=True, sliding_window=True, roi_size=32, overlap=0.5)
    assert sum(c[0] for c in m.calls) == 8 * 2 * 2 * 1  # 48 x 48 x 32 in 32³ windows every 16 voxels


def test_postprocess_et_hand_made_cases():
    lab = np.zeros((12, 12, 12), np.uint8); lab[2:10, 2:10, 2:10] = 2; lab[4:8, 4:8, 4:8] = 1
    none = postprocess_et(lab)
    assert np.array_equal(none, lab) and none is not lab                  # no ET: nothing to do, a copy
    few = lab.copy(); few[5:7, 5:7, 5:7] = 3                               # 8 ET voxels
    out = postprocess_et(few)
    assert (out == 3).sum() == 0 and np.array_equal(out[few == 3], np.ones(8)) and np.array_equal(out[few != 3], few[few != 3])
    assert np.array_equal(postprocess_et(few, threshold=8), few)          # 8 is not fewer than 8
    assert (postprocess_et(few, threshold=9) == 3).sum() == 0
    assert np.array_equal(postprocess_et(few, threshold=0), few)          # 0 disables it
    scattered = lab.copy(); scattered[[2, 9], [2, 9], [2, 9]] = 3          # two far-apart ET voxels: counted together
    assert (postprocess_et(scattered, threshold=3) == 3).sum() == 0
    assert (postprocess_et(scattered, threshold=2) == 3).sum() == 2
    many = np.full((10, 10, 10), 3, np.uint8)                              # 1000 ET voxels: kept at 500
    assert np.array_equal(postprocess_et(many), many)
    assert (postprocess_et(many, threshold=1001) == 1).all()
    brats17 = np.where(few == 3, 4, few)                                   # ET = 4 labels
    assert np.array_equal(postprocess_et(brats17, et_value=4), postprocess_et(few))
    assert np.array_equal(postprocess_et(brats17), brats17)               # et_value defaults to the class index 3
    t = torch.from_numpy(few)
    assert torch.equal(postprocess_et(t), torch.from_numpy(out)) and torch.equal(t, torch.from_numpy(few))
    with pytest.raises(BratsError, match="threshold"):
        postprocess_et(few, threshold=-1)


def test_predict_case_nifti_round_trip(tmp_path):
    m = build_model("dmfnet", **TINY).eval()
    case = load_case(find_cases(SAMPLES_DIR)[1])
    out = tmp_path / "sub" / "Synth_001.nii.gz"
    label, probs = predict_case(m, case, out, return_probs=True, postprocess=False)
    img = nib.load(str(out))
    assert img.shape == case.shape and np.allclose(img.affine, case.affine)
    assert img.header.get_zooms() == case.header.get_zooms() and img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(img.dataobj), label)
    classes = probs.argmax(0).numpy()
    brain = brain_mask(case.image)
    assert (classes[~brain] > 0).any()                                    # the untrained network labels the background...
    classes[~brain] = 0                                                   # ...which predict_case sets to 0
    assert np.array_equal(label, np.where(classes == 3, 4, classes))      # BraTS 2017 labels: ET = 4
    raw = predict_case(m, case, postprocess=False, mask_background=False)
    assert np.array_equal(raw[brain], label[brain]) and not np.array_equal(raw, label)
    assert sorted(p.name for p in out.parent.iterdir()) == ["Synth_001.nii.gz"]
    # the 2023 naming and a non-diagonal affine with anisotropic spacing
    aff = np.array([[0, -1.2, 0, 30], [0.9, 0, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    d = write_case(make_case(seed=4, shape=(40, 36, 20)), tmp_path / "data", "BraTS-GLI-00002-000", naming="brats2023", affine=aff)
    lab23 = predict_case(m, d, tmp_path / "p23.nii.gz", postprocess=False)
    img = nib.load(str(tmp_path / "p23.nii.gz"))
    assert img.shape == (40, 36, 20) and np.allclose(img.affine, aff) and np.allclose(img.header.get_zooms(), (0.9, 1.2, 2.5))
    assert set(np.unique(lab23).tolist()) <= {0, 1, 2, 3}
    assert np.array_equal(np.asanyarray(img.dataobj), lab23)


def test_predict_case_real_shapes(real_case_dir, tmp_path):
    m = PointNet().eval()
    case = load_case(real_case_dir)
    label, probs = predict_case(m, case, tmp_path / f"{case.name}.nii.gz", postprocess=False, return_probs=True)
    assert m.calls == [(1, 4, 240, 240, 160)]                              # padded 155 -> 160
    img = nib.load(str(tmp_path / f"{case.name}.nii.gz"))
    ref = nib.load(str(case.files.paths["flair"]))
    assert img.shape == (240, 240, 155) and np.allclose(img.affine, ref.affine)
    assert np.array_equal(img.header.get_qform(), ref.header.get_qform()) and np.array_equal(img.header.get_sform(), ref.header.get_sform())
    assert np.array_equal(np.asanyarray(img.dataobj), label)
    # the label map is the argmax of the probabilities, ET (class 3) written as 4 (BraTS 2018)
    assert probs.shape == (4, 240, 240, 155)
    classes = probs.argmax(0).numpy()
    classes[~brain_mask(case.image)] = 0                                   # nothing outside the brain
    assert np.array_equal(label, np.where(classes == 3, 4, classes))


def write_checkpoint(path, variant="dmfnet", **kw):
    "A checkpoint in the trainer's format, written by hand from a tiny network."
    model = build_model(variant, **(TINIEST | kw))
    torch.save({"format": "brats_nb-checkpoint", "version": 1, "model": model.state_dict(),
                "config": {"variant": variant, "model": model.config}, "epoch": 0}, path)
    return model


def sample_data(tmp_path, n=2):
    data = tmp_path / "data"
    for c in find_cases(SAMPLES_DIR)[:n]: shutil.copytree(c, data / c.name)
    return data


@needs_trainer
def test_predict_and_evaluate_commands_on_samples(tmp_path, capsys):
    data = sample_data(tmp_path)
    model = write_checkpoint(tmp_path / "ck.pt").eval()
    loaded, _ = load_model(tmp_path / "ck.pt")   # channels-last on the CPU, as `brats-nb predict` runs it
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "ck.pt"), str(data), "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Synth_000.nii.gz", "Synth_001.nii.gz"]
    for name in ("Synth_000", "Synth_001"):
        case = load_case(data / name)
        img = nib.load(str(out / f"{name}.nii.gz"))
        assert img.shape == case.shape and np.allclose(img.affine, case.affine)
        assert np.array_equal(np.asanyarray(img.dataobj), predict_case(loaded, case))  # the checkpoint's weights, loaded as the CLI does
    assert main(["evaluate", str(out), str(data), "--out", str(tmp_path / "m.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["case"] for r in rows] == ["Synth_000", "Synth_001", "mean", "median", "std"]
    # TTA, sliding windows and no post-processing, on one case
    assert main(["predict", str(tmp_path / "ck.pt"), str(data / "Synth_000"), "--out", str(tmp_path / "tta"), "--tta"]) == 0
    tta = np.asanyarray(nib.load(str(tmp_path / "tta" / "Synth_000.nii.gz")).dataobj)
    assert tta.shape == (96, 96, 96) and not np.array_equal(tta, np.asanyarray(nib.load(str(out / "Synth_000.nii.gz")).dataobj))
    assert main(["predict", str(tmp_path / "ck.pt"), str(data / "Synth_000"), "--out", str(tmp_path / "sw"),
                 "--sliding-window", "--roi-size", "64", "--no-postprocess"]) == 0
    assert (tmp_path / "sw" / "Synth_000.nii.gz").is_file()
    # --no-brain-mask keeps what the network says outside the brain
    assert main(["predict", str(tmp_path / "ck.pt"), str(data / "Synth_000"), "--out", str(tmp_path / "nomask"), "--no-brain-mask"]) == 0
    masked = np.asanyarray(nib.load(str(out / "Synth_000.nii.gz")).dataobj)
    unmasked = np.asanyarray(nib.load(str(tmp_path / "nomask" / "Synth_000.nii.gz")).dataobj)
    brain = brain_mask(load_case(data / "Synth_000").image)
    assert not masked[~brain].any()
    assert np.array_equal(unmasked, predict_case(loaded, data / "Synth_000", mask_background=False))
    # --drop-coreless: the same label map without the tumour components that hold no NCR/ET voxel
    assert main(["predict", str(tmp_path / "ck.pt"), str(data / "Synth_000"), "--out", str(tmp_path / "core"), "--drop-coreless"]) == 0
    cored = np.asanyarray(nib.load(str(tmp_path / "core" / "Synth_000.nii.gz")).dataobj)
    from scipy import ndimage
    comp, n = ndimage.label(masked > 0, structure=np.ones((3, 3, 3)))
    for i in range(1, n + 1):
        k = comp == i
        expect = masked[k] if np.isin(masked[k], (1, 4)).any() else 0   # label 4 is ET in the samples' 2017 numbering
        assert np.array_equal(cored[k], np.broadcast_to(expect, cored[k].shape))
    assert not cored[comp == 0].any()
    capsys.readouterr()


@needs_trainer
def test_predict_bad_inputs(tmp_path, capsys):
    data = sample_data(tmp_path, n=1)
    write_checkpoint(tmp_path / "ck.pt", "dmfnet")
    out = tmp_path / "pred"

    def fails(args, *fragments):
        rc = main(["predict", *map(str, args)])
        err = capsys.readouterr().err
        assert rc == 2, err
        for f in fragments: assert f in err, err
        assert not out.exists(), "nothing may be written"

    fails([tmp_path / "none.pt", data, "--out", out], "none.pt")
    (tmp_path / "corrupt.pt").write_bytes((tmp_path / "ck.pt").read_bytes()[:5000])
    fails([tmp_path / "corrupt.pt", data, "--out", out], "corrupt.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    fails([tmp_path / "foreign.pt", data, "--out", out], "foreign.pt", "not a brats_nb checkpoint")
    fails([tmp_path / "ck.pt", data, "--out", out, "--variant", "all"], "ck.pt", "'dmfnet'")
    fails([tmp_path / "ck.pt", tmp_path / "nodata", "--out", out], "nodata: no such folder")
    (tmp_path / "empty").mkdir()
    fails([tmp_path / "ck.pt", tmp_path / "empty", "--out", out], "no BraTS case found")
    fails([tmp_path / "ck.pt", data, "--out", out, "--device", "tpu9"], "unknown device")
    if not torch.cuda.is_available():
        fails([tmp_path / "ck.pt", data, "--out", out, "--device", "cuda"], "no CUDA GPU")
    fails([tmp_path / "ck.pt", data, "--out", out, "--sliding-window", "--roi-size", "40"], "multiples of 16")
    fails([tmp_path / "ck.pt", data, "--out", out, "--et-threshold", "-5"], "--et-threshold must be >= 0")
    # a case that breaks half-way: the cases before it are complete files, nothing half-written remains
    shutil.copytree(find_cases(SAMPLES_DIR)[1], data / "Synth_001")
    (data / "Synth_001" / "Synth_001_t2.nii.gz").write_bytes(b"not a nifti")
    rc = main(["predict", str(tmp_path / "ck.pt"), str(data), "--out", str(out)])
    assert rc == 2 and "Synth_001_t2.nii.gz: not a readable NIfTI" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["Synth_000.nii.gz"]
    assert nib.load(str(out / "Synth_000.nii.gz")).shape == (96, 96, 96)
    # a different variant's weights under a matching name would not load: the trainer refuses them
    other = build_model("all", **TINIEST)
    torch.save({"format": "brats_nb-checkpoint", "version": 1, "model": other.state_dict(),
                "config": {"variant": "dmfnet", "model": build_model("dmfnet", **TINIEST).config}}, tmp_path / "mixed.pt")
    shutil.rmtree(out)
    fails([tmp_path / "mixed.pt", data, "--out", out], "mixed.pt")


def test_predict_and_evaluate_help():
    for cmd in ("predict", "evaluate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["predict", "ck.pt"])  # DATA_DIR and --out missing: argparse says so
    assert e.value.code == 2


@needs_trainer
def test_predict_and_evaluate_real_case(real_case_dir, tmp_path, capsys):
    write_checkpoint(tmp_path / "ck.pt", "dmfnet")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "ck.pt"), str(real_case_dir.parent), "--out", str(out)]) == 0
    pred = out / "Brats18_2013_2_1.nii.gz"
    img, ref = nib.load(str(pred)), nib.load(str(real_case_dir / "Brats18_2013_2_1_seg.nii.gz"))
    assert img.shape == ref.shape == (240, 240, 155) and np.allclose(img.affine, ref.affine)
    assert set(np.unique(np.asanyarray(img.dataobj)).tolist()) <= {0, 1, 2, 4}
    assert main(["evaluate", str(out), str(real_case_dir.parent), "--out", str(tmp_path / "m.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert rows[0]["case"] == "Brats18_2013_2_1" and len(rows) == 4
    print(capsys.readouterr().out)


def test_predict_folder_api(tmp_path):
    data = sample_data(tmp_path, n=2)
    m = ConvNet().eval()
    paths = predict_folder(m, data, tmp_path / "o", verbose=False, et_threshold=0)
    assert [p.name for p in paths] == ["Synth_000.nii.gz", "Synth_001.nii.gz"] and all(p.is_file() for p in paths)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BratsError, match="afile: exists and is not a folder"):
        predict_folder(m, data, tmp_path / "afile")


def test_prediction_viewer_and_static_figure(tmp_path):
    case = load_case(find_cases(SAMPLES_DIR)[2])
    shifted = np.roll(case.label, 4, axis=1)
    w = prediction_viewer(case, shifted, region="WT")
    png = w.image.value
    w.controls["slice"].value += 3; assert w.image.value != png
    png = w.image.value
    w.controls["region"].value = "ET"; assert w.image.value != png
    w.controls["worst"].click()
    pr, gr = labels_to_regions(shifted, case.label_convention)[2], labels_to_regions(case)[2]
    err = (pr ^ gr).sum((0, 1))
    assert w.controls["slice"].value == int(np.argmax(err))
    assert f"FP {int((pr & ~gr)[:, :, w.controls['slice'].value].sum())}" in w.info.value
    # the disagreement panel really shows both error colours
    from PIL import Image
    import io
    a = np.asarray(Image.open(io.BytesIO(w.image.value)).convert("RGB")).astype(int)
    third = a[:, 2 * a.shape[1] // 3 + 4:]
    def has(col):  # blended colour: 0.4 gray + 0.6 colour, so the dominant channel stands out
        c = np.array(col) * 255
        return (np.abs(third - (0.6 * c + 0.4 * third.mean(-1, keepdims=True))).max(-1) < 40).any()
    assert has(ERROR_COLORS["FP"]) and has(ERROR_COLORS["FN"])
    w.controls["axis"].value = "coronal"
    assert w.controls["slice"].max == case.shape[1] - 1
    # from a file, and the static fallback
    save_nifti(shifted, tmp_path / "p.nii.gz", case.affine, case.header)
    w2 = prediction_viewer(case, tmp_path / "p.nii.gz")
    assert w2.dice == w.dice
    import matplotlib; matplotlib.use("Agg")
    fig = show_prediction(case, shifted)
    assert len(fig.axes) == 12
    nolabel = load_case(case.files.dir, load_label=False)
    with pytest.raises(BratsError, match="no label file"):
        prediction_viewer(nolabel, shifted)
    with pytest.raises(BratsError, match="differs"):
        prediction_viewer(case, shifted[:-1])


def test_benchmark_inference_smoke():
    m = build_model("dmfnet", **TINY)
    rows = benchmark_inference(m, shape=[(16, 16, 16), (32, 16, 16)], device="cpu", repeats=2, warmup=0)
    assert [(r["shape"], r["tta"]) for r in rows] == [("16x16x16", "none"), ("16x16x16", "8 flips"),
                                                     ("32x16x16", "none"), ("32x16x16", "8 flips")]
    assert all(r["median_s"] > 0 and r["min_s"] <= r["median_s"] for r in rows)
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 1.0  # eight passes take longer than one
    table = format_inference_bench(rows)
    assert "8 flips" in table and len(table.splitlines()) == 5
