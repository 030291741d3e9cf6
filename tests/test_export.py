"""`brats-nb export` as a user runs it (the console script in a subprocess), in its three formats, for the lesson model
and for a fresh 5-output-channel network (the 2024 post-treatment convention): each file, run by its own runtime
(torch.jit, ONNX Runtime, `load_safetensors`), gives the brats_nb network's logits within 1e-4 on an input of another
shape than the export's (for the paper-width network, whose logits reach about 25: within twice float32's own rounding,
as `export` checks; see nbs/04a_checkpoints.ipynb); the configuration travels with the file; bad input names what is wrong."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brats_nb.checkpoints import (CONFIG_KEY, float32_rounding, lesson_checkpoint, load_model, load_safetensors,
                                  read_checkpoint, save_checkpoint)
from brats_nb.cli import main
from brats_nb.core import BratsError
from brats_nb.data import n_classes
from brats_nb.model import build_model

BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")   # PYTHONPATH kept: a worktree's brats_nb runs
SHAPE = (1, 4, 48, 64, 32)   # the export traces 32³


def export(*args):
    return subprocess.run([str(BIN / "brats-nb"), "export", *map(str, args)], capture_output=True, text=True, env=ENV)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The lesson model, and an untrained paper-width network with 1 + 4 classes (brats2024-post) saved as the trainer does,
    its batch-norm statistics taken from three random batches as training would (with the initial ones its logits reach
    about 5e5, where float32 rounding alone exceeds 1e-4)."""
    torch.manual_seed(0)
    net = build_model(out_channels=1 + n_classes("brats2024-post"))
    assert net.config["out_channels"] == 5
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d): m.reset_running_stats(); m.momentum = None   # a plain average
    with torch.no_grad():
        for _ in range(3): net(torch.randn(2, 4, 32, 32, 32))
    post = save_checkpoint(tmp_path_factory.mktemp("ck") / "post.pt", model=net.state_dict(),
                           config={"model": net.config, "variant": "all", "convention": "brats2024-post", "train": {}})
    return {"lesson": lesson_checkpoint(), "post5": post}


def largest(a, b):
    return float((torch.as_tensor(a) - b).abs().max())


@pytest.mark.parametrize("which", ["lesson", "post5"])
def test_three_formats_give_the_network(which, checkpoints, tmp_path):
    import onnx
    import onnxruntime as ort
    from safetensors import safe_open
    ck = checkpoints[which]
    config = json.loads(json.dumps(read_checkpoint(ck)["config"]))
    for fmt in ("torchscript", "onnx", "safetensors") if which == "lesson" else ("onnx", "safetensors"):
        r = export(ck, "--format", fmt, "--out", tmp_path / f"net.{fmt}")
        assert r.returncode == 0 and "largest logit difference" in r.stdout, (fmt, r.stderr[-2000:])
    net = load_model(ck, channels_last="off")[0]
    torch.manual_seed(1)
    x, x2 = torch.randn(*SHAPE), torch.randn(2, 4, 16, 32, 48)     # x2: another batch and another shape
    with torch.no_grad(): ref, ref2 = net(x), net(x2)
    assert ref.shape[1] == config["model"]["out_channels"]

    model = onnx.load(str(tmp_path / "net.onnx"))
    onnx.checker.check_model(model)
    assert json.loads({p.key: p.value for p in model.metadata_props}[CONFIG_KEY]) == config
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), opts, providers=["CPUExecutionProvider"])
    d_onnx = largest(session.run(None, {"image": x.numpy()})[0], ref)
    d_onnx2 = largest(session.run(None, {"image": x2.numpy()})[0], ref2)

    again, back = load_safetensors(tmp_path / "net.safetensors", channels_last="off")
    with torch.no_grad(): d_st = largest(again(x), ref)
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as f: meta = f.metadata()
    assert back == config == json.loads(meta[CONFIG_KEY]) == json.loads((tmp_path / "net.safetensors.json").read_text())

    d_ts = 0.0
    if which == "lesson":                                            # TorchScript once: the same trace as the ONNX file
        with torch.no_grad(): d_ts = largest(torch.jit.load(str(tmp_path / "net.torchscript"))(x), ref)
    rounding = float32_rounding(net, x) if max(d_onnx, d_onnx2) > 1e-4 else 0.0
    print(f"{which}: largest logit difference (|logit| up to {float(ref.abs().max()):.0f}): ONNX Runtime {d_onnx:.1e} "
          f"(other batch and shape {d_onnx2:.1e}), safetensors {d_st:.1e}" + (f", TorchScript {d_ts:.1e}" if which == "lesson" else "")
          + (f"; torch float32 vs float64 {rounding:.1e}" if rounding else ""))
    assert d_st <= 1e-4 and d_ts <= 1e-4, (d_st, d_ts)
    assert d_onnx <= 1e-4 or d_onnx <= 2 * rounding, (d_onnx, rounding)
    assert d_onnx2 <= 1e-4 or d_onnx2 <= 2 * float32_rounding(net, x2), d_onnx2


def test_bad_input_is_named(checkpoints, tmp_path, capsys):
    "Two through the console script (a bad checkpoint, a missing folder), the rest in-process through the same `main`."
    junk = tmp_path / "junk.pt"; junk.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"; torch.save({"weights": torch.zeros(3)}, foreign)
    post, out = checkpoints["post5"], tmp_path / "net.out"
    for args, says in (([junk, "--format", "onnx", "--out", out], f"{junk}: not a readable checkpoint"),
                       ([post, "--format", "onnx", "--out", tmp_path / "nowhere" / "net.onnx"], f"{tmp_path / 'nowhere'}: no such folder")):
        r = export(*args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr[-2000:])
    for args, says in (([foreign, "--format", "safetensors"], f"{foreign}: not a brats_nb checkpoint"),
                       ([post, "--format", "keras"], "unknown export format 'keras'"),
                       ([post, "--format", "onnx", "--onnx-exporter", "tf"], "unknown ONNX exporter 'tf'"),
                       ([post, "--format", "safetensors", "--onnx-exporter", "dynamo"], "--onnx-exporter is for --format onnx")):
        assert main(["export", *map(str, args), "--out", str(out)]) == 2
        assert says in capsys.readouterr().err, args
    assert not (tmp_path / "nowhere").exists() and not out.exists()


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BratsError, match="foreign.safetensors: no brats_nb configuration"):
        load_safetensors(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BratsError, match="junk.safetensors: not a readable safetensors file"):
        load_safetensors(tmp_path / "junk.safetensors")


def test_missing_onnx_packages_say_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # as if it were not installed
    assert main(["export", str(lesson_checkpoint()), "--format", "onnx", "--out", str(tmp_path / "net.onnx")]) == 2
    assert "pip install onnx onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "net.onnx").exists()


@pytest.mark.skipif(os.environ.get("BRATS_NB_SLOW", "") != "1",
                    reason="the dynamo ONNX exporter takes 30-60 s on 2 cores; BRATS_NB_SLOW=1 runs it")
def test_dynamo_onnx_exporter(tmp_path):
    "The torch.export-based exporter (torch's default, needs onnxscript), kept for the torch that drops the other one."
    import onnxruntime as ort
    r = export(lesson_checkpoint(), "--format", "onnx", "--onnx-exporter", "dynamo", "--out", tmp_path / "net.onnx")
    assert r.returncode == 0, r.stderr[-2000:]
    net = load_model(lesson_checkpoint(), channels_last="off")[0]
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    for shape in (SHAPE, (2, 4, 16, 32, 48)):
        x = torch.randn(*shape)
        with torch.no_grad(): d = largest(session.run(None, {"image": x.numpy()})[0], net(x))
        print(f"dynamo exporter, lesson model, {'x'.join(map(str, shape))}: largest difference {d:.1e}")
        assert d <= 1e-4, d
