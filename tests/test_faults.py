"""Fault injection (issue 24, findings 5, 7 and 8): a user's bad options, bad files, unwritable outputs and a full disk,
replayed through `brats_nb.cli.main` in this process on copies of two bundled samples. Each answer must be exit status 2
and one line on stderr, `brats-nb COMMAND: error: ...`, that names the option or path and says what to do; nothing
is written before an option is refused, and a full disk leaves no partial file. A full disk is a real one: the
temporary file that `atomic_path` writes is a link to /dev/full, whose writes fail with ENOSPC."""
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_nb import core
from brats_nb.checkpoints import lesson_checkpoint, read_checkpoint
from brats_nb.cli import main
from brats_nb.synth import SAMPLES_DIR
from brats_nb.trainer import preset

TINY = ["--preset", "cpu", "--epochs", "1", "--crop-size", "32", "--samples-per-case", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Copies of two bundled samples (the tests never write into the repository's samples)."
    d = tmp_path_factory.mktemp("data")
    for name in ("Synth_000", "Synth_001"): shutil.copytree(SAMPLES_DIR / name, d / name)
    return d


@pytest.fixture(scope="module")
def preds(data, tmp_path_factory):
    "A prediction folder that `evaluate` accepts: each case's own label map as <case>.nii.gz."
    p = tmp_path_factory.mktemp("preds")
    for c in data.iterdir(): shutil.copy(c / f"{c.name}_seg.nii.gz", p / f"{c.name}.nii.gz")
    return p


def cli(capsys, *args):
    "Run `brats-nb ARGS` in this process: (exit status, stdout, stderr)."
    try: rc = main([str(a) for a in args])
    except SystemExit as e: rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc, err, command, *words):
    "Exit status 2, one line on stderr from `command`, no traceback, and each of `words` in it."
    lines = [seg for ln in err.split("\n") if (seg := ln.split("\r")[-1].strip())]   # a progress bar's \r end
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"brats-nb {command}: error: "), lines[0]
    for w in words: assert w in lines[0], (w, lines[0])
    return lines[0]


# -- finding 5: options and configuration fields, refused with their range before anything is written
OPTIONS = [
    (["train", "--max-cases", "-1"], "max_cases (--max-cases) -1 must be >= 0"),
    (["train", "--val-fraction", "2"], "val_fraction (--val-fraction) 2.0 must be in [0, 1)"),
    (["train", "--crop-size", "0"], "crop_size (--crop-size) 0 must be >= 16"),
    (["train", "--lr", "-1"], "lr (--lr) -1.0 must be > 0"),
    (["train", "--workers", "-2"], "workers (--workers) -2 must be >= 0"),
    (["train", "--nproc", "0"], "--nproc 0 and --nnodes 1 must be at least 1"),
]


@pytest.mark.parametrize("args,words", OPTIONS, ids=[" ".join(a[1:]) for a, _ in OPTIONS])
def test_train_option_out_of_range(capsys, data, tmp_path, args, words):
    rc, _, err = cli(capsys, "train", *TINY, *args[1:], "--data", data, "--out", tmp_path / "run")
    one_line(rc, err, "train", words)
    assert not (tmp_path / "run").exists()


COMMANDS = [
    (lambda d, ck, o: ["downsample", d, "--out", o, "--margin", "-5"], "--margin -5 must be >= 0"),
    (lambda d, ck, o: ["predict", ck, d, "--out", o, "--roi-size", "32"], "--roi-size 32 is the window of --sliding"),
    (lambda d, ck, o: ["make-samples", o, "--n", "1", "--shape", "-8", "16", "16"], "--shape -8 16 16: each edge"),
]


@pytest.mark.parametrize("make,words", COMMANDS, ids=["downsample-margin", "predict-roi-size", "make-samples-shape"])
def test_command_option_out_of_range(capsys, data, tmp_path, make, words):
    args = make(data, lesson_checkpoint(), tmp_path / "out")
    one_line(*cli(capsys, *args)[::2], args[0], words)
    assert not (tmp_path / "out").exists()


def tiny_config(path, data, **fields):
    "A JSON configuration of the tiny CPU run (so that code which accepted a bad one would still end quickly)."
    base = preset("cpu", epochs=1, crop_size=32, samples_per_case=1, threads=1, data=str(data)).to_dict()
    path.write_text(json.dumps({**base, **fields}))
    return path


def test_preset_and_config_together_refused(capsys, data, tmp_path):
    cfg = tiny_config(tmp_path / "c.json", data, out=str(tmp_path / "run"))
    rc, _, err = cli(capsys, "train", "--preset", "cpu", "--config", cfg)
    one_line(rc, err, "train", "--preset cpu and --config", "give one")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,words", [("epochs", "one", "epochs 'one' (a whole number)"),
                                               ("epochs", 1.7, "epochs 1.7 (a whole number)"),
                                               ("amsgrad", "no", "amsgrad 'no' (true or false)")])
def test_config_file_of_wrong_types(capsys, data, tmp_path, field, value, words):
    cfg = tiny_config(tmp_path / "c.json", data, out=str(tmp_path / "run"), **{field: value})
    one_line(*cli(capsys, "train", "--config", cfg)[::2], "train", "configuration fields of the wrong type", words)
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_a_newer_format_refused(capsys, data, tmp_path):
    ck = read_checkpoint(lesson_checkpoint())
    torch.save({**ck, "version": 99}, tmp_path / "future.pt")
    rc, _, err = cli(capsys, "predict", tmp_path / "future.pt", data, "--out", tmp_path / "out")
    one_line(rc, err, "predict", "future.pt: checkpoint format version 99", "upgrade brats_nb")
    assert not (tmp_path / "out").exists()


# -- finding 8: files that are not what the command needs, named with what to do instead
def _torchscript(path): torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def _safetensors(path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(path))


@pytest.mark.parametrize("name,make,words", [("m.ts", _torchscript, ("a TorchScript file", "torch.jit.load")),
                                             ("m.safetensors", _safetensors, ("a safetensors file", "load_safetensors",
                                                                              "no training state"))])
def test_exported_file_given_as_checkpoint(capsys, data, tmp_path, name, make, words):
    make(tmp_path / name)
    line = one_line(*cli(capsys, "predict", tmp_path / name, data, "--out", tmp_path / "out")[::2], "predict", *words)
    assert "weights_only" not in line and "format tag" not in line


@pytest.fixture(scope="module")
def blank(data, tmp_path_factory):
    "A case whose four modalities are 0 everywhere, beside a normal one."
    d = tmp_path_factory.mktemp("blank")
    shutil.copytree(data / "Synth_000", d / "Synth_000")
    shutil.copytree(data / "Synth_001", d / "Synth_001")
    for f in (d / "Synth_001").glob("*.nii.gz"):
        if f.name.endswith("_seg.nii.gz"): continue
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine, img.header), f)
    return d


@pytest.mark.parametrize("command", ["train", "predict"])
def test_all_zero_case_named(capsys, blank, tmp_path, command):
    args = (["train", *TINY, "--data", blank, "--val-fraction", "0", "--out", tmp_path / "run"] if command == "train"
            else ["predict", lesson_checkpoint(), blank, "--out", tmp_path / "run"])
    line = one_line(*cli(capsys, *args)[::2], command, "case Synth_001", "Synth_001", "all four modalities are 0")
    assert "normalize:" not in line


def test_no_validation_said_and_leftover_removed_on_resume(capsys, data, tmp_path):
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", *TINY, "--data", data, "--val-fraction", "0", "--out", run)
    assert rc == 0, err[-2000:]
    assert "no validation was run" in out and "-1.0000" not in out
    (run / ".latest.pt.k2j1x9.tmp").touch()          # what a SIGKILL during a checkpoint write leaves
    rc, out, err = cli(capsys, "train", *TINY, "--data", data, "--val-fraction", "0", "--out", run, "--resume",
                       "--epochs", "2")
    assert rc == 0, err[-2000:]
    assert not list(run.glob(".*.tmp")) and "resuming" in out and "no validation yet" in out and "-1.0000" not in out


# -- finding 7: the file system's errors, one line each; --debug shows the traceback
def test_out_is_an_existing_file(capsys, data, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line(*cli(capsys, "train", *TINY, "--data", data, "--out", f)[::2], "train", str(f),
             "exists already, and is not a folder")
    one_line(*cli(capsys, "make-samples", f / "sub", "--n", "1", "--shape", "16", "16", "16")[::2], "make-samples",
             "is a file, not a folder")
    assert f.read_text() == "x"


def test_evaluate_out_is_a_folder(capsys, data, preds, tmp_path):
    (tmp_path / "m.csv").mkdir()
    one_line(*cli(capsys, "evaluate", preds, data, "--out", tmp_path / "m.csv", "-q")[::2], "evaluate",
             str(tmp_path / "m.csv"), "is a folder, not a file")
    assert not list(tmp_path.glob(".*.tmp"))


def test_debug_shows_the_traceback(capsys, data, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError): main(["--debug", "train", *TINY, "--data", str(data), "--out", str(f)])
    with pytest.raises(SystemExit) as e: main(["train", "--lr", "fast"])   # argparse's own usage error
    assert e.value.code == 2


def _fault(monkeypatch, errno_, only=""):
    """Make every file that `atomic_path` writes (whose name holds `only`) fail: a link to /dev/full for ENOSPC (a real
    full disk), else an OSError from the kernel's answer `errno_` (read-only disk, permission) when it is created."""
    real = tempfile.mkstemp

    def mkstemp(prefix="", suffix="", dir=None):
        if only not in prefix: return real(prefix=prefix, suffix=suffix, dir=dir)
        name = os.path.join(dir, f"{prefix}fault{suffix}")
        if errno_ != errno.ENOSPC: raise OSError(errno_, os.strerror(errno_), name)
        os.symlink("/dev/full", name)
        return os.open(name, os.O_WRONLY), name
    monkeypatch.setattr(core, "tempfile", SimpleNamespace(mkstemp=mkstemp))


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")


def _predict(data, out, preds): return ["predict", lesson_checkpoint(), data, "--out", out]
def _train(data, out, preds): return ["train", *TINY, "--data", data, "--out", out]
def _evaluate(data, out, preds): return ["evaluate", preds, data, "--out", out / "m.csv", "-q"]


@needs_dev_full
@pytest.mark.parametrize("make,only,words", [(_predict, "", ("Synth_000.nii.gz: no space left",)),
                                             (_train, "", ("config.json: no space left",)),
                                             (_train, "latest.pt", ("latest.pt: no space left on the device for a "
                                                                    "checkpoint of", "MB")),
                                             (_evaluate, "", ("m.csv: no space left",))],
                         ids=["predict", "train-config", "train-checkpoint", "evaluate"])
def test_disk_full_leaves_no_partial_file(capsys, monkeypatch, data, preds, tmp_path, make, only, words):
    out = tmp_path / "out"
    out.mkdir()
    args = make(data, out, preds)
    _fault(monkeypatch, errno.ENOSPC, only)
    one_line(*cli(capsys, *args)[::2], args[0], *words, "nothing half-written is left")
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert not [n for n in left if n.endswith((".tmp", ".nii.gz", ".pt", ".csv"))], left


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
@pytest.mark.parametrize("make", [_predict, _train, _evaluate], ids=["predict", "train", "evaluate"])
def test_unwritable_out(capsys, monkeypatch, data, preds, tmp_path, make, code, words):
    out = tmp_path / "out"
    out.mkdir()
    args = make(data, out, preds)
    _fault(monkeypatch, code)
    one_line(*cli(capsys, *args)[::2], args[0], str(out), words)
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="a read-only folder does not stop root")
def test_read_only_folder_really(capsys, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try: one_line(*cli(capsys, "predict", lesson_checkpoint(), data, "--out", out)[::2], "predict", "permission denied")
    finally: out.chmod(0o755)


def test_ablation_preset_and_config(capsys, data, tmp_path):
    "ablation refuses both too, and a configuration file alone still starts from it (not from the cpu preset)."
    from brats_nb.cli import build_parser
    from brats_nb.trainer import config_from_args
    cfg = tiny_config(tmp_path / "c.json", data, channels=12)
    rc, _, err = cli(capsys, "ablation", "--preset", "cpu", "--config", cfg, "--out", tmp_path / "abl")
    one_line(rc, err, "ablation", "--preset cpu and --config", "give one")
    a = build_parser().parse_args(["ablation", "--config", str(cfg), "--out", str(tmp_path / "abl")])
    assert config_from_args(a, "cpu").channels == 12
    assert not (tmp_path / "abl").exists()
