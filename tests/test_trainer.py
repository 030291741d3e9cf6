"The trainer for real: a SIGKILLed run resumed, two processes under torchrun, bad checkpoints, the command line."
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brats_nb.cli import main
from brats_nb.data import BratsError, find_cases
from brats_nb.synth import SAMPLES_DIR
from brats_nb.checkpoints import load_model, read_checkpoint
from brats_nb.trainer import read_log, split_cases

BIN = Path(sys.executable).parent
SMALL = ["--preset", "cpu", "--variant", "dmfnet", "--max-cases", "4", "--workers", "0", "--crop-size", "32",
         "--samples-per-case", "2", "--data", str(SAMPLES_DIR)]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def brats_nb(*args, **kw):
    return subprocess.run([str(BIN / "brats-nb"), *args], capture_output=True, text=True, env=ENV, **kw)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    epochs = "4"
    r = brats_nb("train", *SMALL, "--epochs", epochs, "--out", str(tmp_path / "straight"))
    assert r.returncode == 0, r.stderr[-2000:]
    # the same run, killed with SIGKILL as soon as its first epoch is logged
    killed = tmp_path / "killed"
    p = subprocess.Popen([str(BIN / "brats-nb"), "train", *SMALL, "--epochs", epochs, "--out", str(killed)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(read_log(killed)) < 1:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    done = len(read_log(killed))
    assert 1 <= done < int(epochs), f"the run was not interrupted mid-training ({done} epochs logged)"
    assert read_checkpoint(killed / "latest.pt")["epoch"] == done - 1
    assert not list(killed.glob(".*.tmp")), "a temporary checkpoint was left behind"
    # without --resume the run refuses to overwrite; with it, it continues
    r = brats_nb("train", *SMALL, "--epochs", epochs, "--out", str(killed))
    assert r.returncode == 2 and "--resume" in r.stderr
    r = brats_nb("train", *SMALL, "--epochs", epochs, "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_log(killed)) == int(epochs)
    assert same_weights(weights(tmp_path / "straight" / "latest.pt"), weights(killed / "latest.pt"))
    # and a second uninterrupted run with the same seed is the same run (deterministic on the CPU)
    r = brats_nb("train", *SMALL, "--epochs", "2", "--out", str(tmp_path / "again"))
    assert r.returncode == 0
    r = brats_nb("train", *SMALL, "--epochs", "2", "--out", str(tmp_path / "again2"))
    assert same_weights(weights(tmp_path / "again" / "latest.pt"), weights(tmp_path / "again2" / "latest.pt"))
    r = brats_nb("train", *SMALL, "--epochs", "2", "--seed", "1", "--out", str(tmp_path / "seed1"))
    assert not same_weights(weights(tmp_path / "again" / "latest.pt"), weights(tmp_path / "seed1" / "latest.pt"))


def test_two_processes_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "brats-nb"),
                        "train", *SMALL, "--max-cases", "5", "--batch-size", "2", "--epochs", "1", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = {int(m[1]): set(m[2].split(",")) for m in re.finditer(r"\[rank (\d)/2\] epoch 1: \d+ steps on \d+ crops: (\S+)", r.stdout)}
    assert set(lines) == {0, 1}, r.stdout
    train_cases, _ = split_cases(find_cases(SAMPLES_DIR)[:5], 0.2, 0)
    assert lines[0] | lines[1] == {c.name for c in train_cases}  # together the ranks saw every training case
    log = read_log(out)
    assert len(log) == 1 and log[0]["world"] == 2           # one log row: written once, by rank 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("tb")) == ["best.pt", "config.json", "latest.pt", "metrics.csv"]
    model, cfg = load_model(out / "latest.pt")
    assert cfg["variant"] == "dmfnet"


def test_bad_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"; junk.write_bytes(os.urandom(2000))
    with pytest.raises(BratsError, match="junk.pt: not a readable checkpoint"):
        load_model(junk)
    foreign = tmp_path / "foreign.pt"; torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(BratsError, match="foreign.pt: not a brats_nb checkpoint"):
        load_model(foreign)
    with pytest.raises(BratsError, match="no such checkpoint"):
        load_model(tmp_path / "missing.pt")
    truncated = tmp_path / "cut.pt"
    r = brats_nb("train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    truncated.write_bytes((tmp_path / "run" / "latest.pt").read_bytes()[:5000])
    with pytest.raises(BratsError, match="cut.pt: not a readable checkpoint"):
        load_model(truncated)
    with pytest.raises(BratsError, match="holds a 'dmfnet' model, not 'all'"):
        load_model(tmp_path / "run" / "latest.pt", variant="all")
    # resuming with another network is refused by name
    r = brats_nb("train", *SMALL, "--epochs", "2", "--variant", "mie", "--out", str(tmp_path / "run"), "--resume")
    assert r.returncode == 2 and "cannot resume it as 'mie'" in r.stderr


def test_cli_config_errors(tmp_path, capsys):
    assert main(["train", "--variant", "unet", "--out", str(tmp_path)]) == 2
    assert "unknown variant 'unet'" in capsys.readouterr().err
    assert main(["train", "--preset", "cpu", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    bad = tmp_path / "c.json"; bad.write_text('{"lr": 0.1, "learning_rate": 2}')
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown configuration fields ['learning_rate']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--poly-power" in capsys.readouterr().out


def test_channels_last_checkpoints_load_either_way(tmp_path):
    "A run trained in channels-last order gives a checkpoint that loads in either order and predicts the same."
    from brats_nb.data import load_case, normalize
    from brats_nb.inference import predict_volume
    r = brats_nb("train", *SMALL, "--epochs", "1", "--channels-last", "on", "--out", str(tmp_path / "cl"))
    assert r.returncode == 0, r.stderr[-2000:]
    ck = tmp_path / "cl" / "latest.pt"
    assert read_checkpoint(ck)["config"]["train"]["channels_last"] == "on"
    on, _ = load_model(ck, channels_last="on")
    off, _ = load_model(ck, channels_last="off")
    assert on.stem.weight.is_contiguous(memory_format=torch.channels_last_3d) and not on.stem.weight.is_contiguous()
    assert off.stem.weight.is_contiguous()
    image = normalize(load_case(find_cases(SAMPLES_DIR)[0]).image)
    p_on, p_off = predict_volume(on, image), predict_volume(off, image)
    assert p_on.shape == p_off.shape and torch.allclose(p_on, p_off, atol=1e-4)
    r = brats_nb("train", *SMALL, "--epochs", "1", "--channels-last", "sometimes", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "channels_last 'sometimes'" in r.stderr


def test_checkpoint_from_before_mie_residual_still_resumes(tmp_path):
    "Checkpoints written before the `mie_residual` option have no such key in their network config: they load and resume."
    out = tmp_path / "old"
    r = brats_nb("train", *SMALL, "--variant", "mie", "--epochs", "1", "--mie-residual", "false", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["config"]["model"].pop("mie_residual") is False   # the old checkpoints were all plain MIE
    torch.save(ck, out / "latest.pt")
    model, _ = load_model(out / "latest.pt")
    assert model.mie is not None and not model.mie.residual
    r = brats_nb("train", *SMALL, "--variant", "mie", "--epochs", "2", "--mie-residual", "false", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_log(out)) == 2
    # a residual run is a different network: it does not resume the plain one
    r = brats_nb("train", *SMALL, "--variant", "mie", "--epochs", "3", "--mie-residual", "true", "--out", str(out), "--resume")
    assert r.returncode == 2 and "cannot resume" in r.stderr


def test_heldout_cases_of_the_samples():
    "val_data='heldout': train on all ten samples, judge on the eight generated companions (never among the ten)."
    from brats_nb.trainer import config_cases, preset
    train, val = config_cases(preset("cpu", val_data="heldout"))
    assert [c.name for c in train] == [f"Synth_{i:03d}" for i in range(10)]
    assert [c.name for c in val] == [f"Synth_{i:03d}" for i in range(10, 18)]
    train, val = config_cases(preset("cpu"))                                   # empty val_data: the seeded split
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)


@pytest.mark.parametrize("layout,classes", [("brats2024-post", 4), ("brats2024-ped", 4)])
def test_training_classes_follow_the_convention(tmp_path, layout, classes):
    """2024 post-treatment data (a resection cavity, label 4) and pediatric data (a cyst, label 3) train a network with a
    class of its own for that tissue; BSC key points and validation use the convention's regions; predictions come back
    in the convention's numbers; the network refuses a case whose convention has fewer classes than it predicts."""
    import numpy as np
    from brats_nb.data import load_case, labels_to_regions
    from brats_nb.inference import predict_case
    data = tmp_path / layout
    r = brats_nb("make-samples", str(data), "--n", "4", "--shape", "48", "48", "48", "--layout", layout)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "run"
    r = brats_nb("train", "--preset", "cpu", "--variant", "bsc", "--workers", "0", "--crop-size", "32", "--epochs", "1",
                 "--data", str(data), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = read_checkpoint(out / "latest.pt")
    assert ck["config"]["convention"] == layout and ck["config"]["model"]["out_channels"] == 1 + classes
    model, _ = load_model(out / "latest.pt")
    case = load_case(find_cases(data)[0])
    label = predict_case(model, case, postprocess=False)
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4}
    assert labels_to_regions(label, layout).shape == (3, *case.shape)
    with pytest.raises(BratsError, match="the network predicts 4 tissue classes; the brats2017 labels"):
        predict_case(model, load_case(find_cases(SAMPLES_DIR)[0]))
    # a run given the convention by name reads the labels in it (here the same as detected)
    r = brats_nb("train", "--preset", "cpu", "--variant", "dmfnet", "--workers", "0", "--crop-size", "32", "--epochs", "1",
                 "--data", str(data), "--out", str(tmp_path / "named"), "--convention", layout, "--val-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    # a three-class (2017) network on these cases: it cannot train on their labels ...
    r = brats_nb("train", "--preset", "cpu", "--variant", "dmfnet", "--workers", "0", "--crop-size", "32", "--epochs", "1",
                 "--data", str(data), "--out", str(tmp_path / "wrong"), "--convention", "brats2017")
    assert r.returncode != 0 and "unknown label values" in r.stderr
    r = brats_nb("train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "men"), "--convention", "men-rt")
    assert r.returncode == 2 and "cannot be trained" in r.stderr


def test_training_from_the_cache_with_augmentation_on_the_device(tmp_path):
    """The instructor's pipeline on the CPU: the training cache (read-only data folder left untouched), crops from memory
    maps, the augmentation on the training device (here the CPU), persistent loader workers; the same weights with 0 or
    2 workers (each crop's randomness travels with its index), and again on a second run."""
    import shutil, stat
    data = tmp_path / "data"
    for c in sorted(SAMPLES_DIR.glob("Synth_00[0-3]")): shutil.copytree(c, data / c.name)
    for q in data.rglob("*"): q.chmod(q.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = sorted((str(q), q.stat().st_mtime_ns) for q in data.rglob("*"))
    args = ["--preset", "cpu", "--variant", "bsc", "--crop-size", "32", "--samples-per-case", "2", "--epochs", "2", "--data", str(data),
            "--cache-dir", str(tmp_path / "cache"), "--augment-on", "device", "--cache", "false"]
    for name, workers in (("w0", "0"), ("w2", "2"), ("w2b", "2")):
        r = brats_nb("train", *args, "--workers", workers, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
    assert sorted((str(q), q.stat().st_mtime_ns) for q in data.rglob("*")) == before      # nothing written beside the cases
    assert len(list((tmp_path / "cache").glob("Synth_00*"))) == 3                          # the training cases (one is for validation)
    w0, w2, w2b = (weights(tmp_path / n / "latest.pt") for n in ("w0", "w2", "w2b"))
    assert same_weights(w2, w2b) and same_weights(w0, w2)
    assert read_log(tmp_path / "w2")[-1]["val_mean"] > 0
    r = brats_nb("train", *args, "--workers", "0", "--augment-on", "gpu", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "augment_on 'gpu'" in r.stderr
