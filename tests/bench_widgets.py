"""Benchmark: how long a widget takes to redraw after a control moves, on a full-size 240x240x155 case.

Uses the real BraTS case of ../shared/real when present, else a synthetic case of the same size.
Prints a table (median and max over moves) and the ratio to the time of building the widget, which
includes the one-off work (windowing the volume) that a move must not repeat.
Run: python tests/bench_widgets.py [--moves 20]"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from brats_nb.data import find_cases, load_case, slice_viewer

REAL = Path(__file__).resolve().parents[2] / "shared" / "real" / "brats18"


def full_size_case():
    if REAL.is_dir():
        return load_case(find_cases(REAL)[0]), "real BraTS 2018 case"
    from brats_nb.synth import make_case, write_case
    d = write_case(make_case(seed=0, shape=(240, 240, 155)), tempfile.mkdtemp(), "Big_000")
    return load_case(d), "synthetic case"


def time_moves(widget, control, values):
    times = []
    for v in values:
        t0 = time.perf_counter(); control.value = v; times.append(time.perf_counter() - t0)
    return times


def viewers(case):
    "(name, build function, control name) of every widget that shows a case."
    out = [("slice_viewer", lambda: slice_viewer(case), "slice")]
    try:
        from brats_nb.keypoints import keypoint_viewer
        out.append(("keypoint_viewer", lambda: keypoint_viewer(case), "slice"))
    except ImportError:
        pass
    try:
        from brats_nb.inference import prediction_viewer
        out.append(("prediction_viewer", lambda: prediction_viewer(case, case.label), "slice"))
    except ImportError:
        pass
    try:
        from brats_nb.mie import attention_viewer
        from brats_nb.model import build_model
        out.append(("attention_viewer", lambda: attention_viewer(case, build_model("mie", channels=8, mid_channels=16, groups=4)), "slice"))
    except ImportError:
        pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=20)
    a = ap.parse_args(argv)
    case, what = full_size_case()
    print(f"{what} {case.name}, shape {case.shape}; {a.moves} slider moves per widget")
    print(f"{'widget':<20}{'build_s':>10}{'move_median_s':>16}{'move_max_s':>12}{'build/move':>12}")
    for name, build, ctrl in viewers(case):
        t0 = time.perf_counter(); w = build(); t_build = time.perf_counter() - t0
        c = w.controls[ctrl]
        start = c.value
        vals = [min(c.max, max(c.min, start + (i % 10) - 5)) for i in range(1, a.moves + 1)]
        ts = time_moves(w, c, vals)
        med = statistics.median(ts)
        print(f"{name:<20}{t_build:>10.3f}{med:>16.4f}{max(ts):>12.4f}{t_build / med:>12.1f}")


if __name__ == "__main__":
    sys.exit(main())
