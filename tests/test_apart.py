"""A folder that is read is never written: every command that writes refuses an output that is, lies inside, or holds
an input folder, before it writes anything (issue 24, finding 1: `downsample d --out d` replaced the originals)."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from brats_nb.data import find_cases
from brats_nb.checkpoints import lesson_checkpoint
from brats_nb.synth import SAMPLES_DIR

BIN = Path(sys.executable).parent


def run(*args, cache):
    env = dict(os.environ, OMP_NUM_THREADS="1", BRATS_NB_CACHE=str(cache))
    return subprocess.run([str(BIN / "brats-nb"), *map(str, args)], capture_output=True, text=True, env=env)


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()} | {str(p.relative_to(folder)): "dir" for p in Path(folder).rglob("*") if p.is_dir()}


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    for c in find_cases(SAMPLES_DIR)[:2]: shutil.copytree(c, d / c.name)
    return d


@pytest.mark.parametrize("args, where", [
    (("downsample", "{d}", "--out", "{d}"), "is the input folder"),
    (("downsample", "{d}", "--out", "{d}/small"), "lies inside the input folder"),
    (("predict", "{ck}", "{d}", "--out", "{d}"), "is the input folder"),
    (("predict", "{ck}", "{d}/Synth_000", "--out", "{d}"), "holds the input folder"),
    (("preprocess", "{d}", "--cache-dir", "{d}/cache"), "lies inside the input folder"),
    (("train", "--preset", "cpu", "--data", "{d}", "--out", "{d}/run", "--epochs", "1"), "lies inside the input folder"),
    (("evaluate", "{d}", "{d}", "--out", "{d}/m.csv"), "lies inside the input folder"),
    (("demo", "--data", "{d}", "--out", "{d}/demo", "--epochs", "1"), "lies inside the input folder"),
    (("real-model", "--data", "{d}", "--out", "{d}/m.pt", "--epochs", "1"), "lies inside the input folder"),
])
def test_an_output_inside_an_input_is_refused_and_nothing_changes(tmp_path, data, args, where):
    before = digest(data)
    r = run(*[a.format(d=data, ck=lesson_checkpoint()) for a in args], cache=tmp_path / "cache")
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    assert where in r.stderr and "never writes where it reads" in r.stderr, r.stderr[-2000:]
    assert digest(data) == before                       # not one file added, changed or removed
