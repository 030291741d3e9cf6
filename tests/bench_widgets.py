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

from brats_nb.data import find_cases, load_case
from brats_nb.viz import slice_viewer

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
    "(name, build function, control names) of every widget that shows a case."
    from brats_nb.viz import keypoint_viewer
    from brats_nb.viz import prediction_viewer
    from brats_nb.viz import attention_viewer
    from brats_nb.model import build_model
    import numpy as np
    shifted = np.roll(case.label, 3, axis=0)     # a "prediction" with errors on every tumour slice
    return [("slice_viewer", lambda: slice_viewer(case), ["slice"]),
            ("attention_viewer", lambda: attention_viewer(case, build_model("mie", channels=8, mid_channels=16, groups=4)), ["slice"]),
            ("prediction_viewer", lambda: prediction_viewer(case, shifted), ["slice"]),
            # "n" reruns the key point selection of one region (t=30 candidates): a recomputation by design
            ("keypoint_viewer", lambda: keypoint_viewer(case, t=30), ["slice", "n"])]


def curve_rows(n):
    return [dict(epoch=e, loss=1 / e, gdl=1 / e, bsc=0.0, val_WT=0.5, val_TC=0.4, val_ET=0.3, val_mean=0.4) for e in range(1, n + 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=20)
    a = ap.parse_args(argv)
    case, what = full_size_case()
    print(f"{what} {case.name}, shape {case.shape}; {a.moves} slider moves per widget")
    print(f"{'widget and control':<26}{'build_s':>10}{'move_median_s':>16}{'move_max_s':>12}{'build/move':>12}")
    for name, build, ctrls in viewers(case):
        t0 = time.perf_counter(); w = build(); t_build = time.perf_counter() - t0
        for ctrl in ctrls:
            c = w.controls[ctrl]
            start = c.value
            moves = a.moves if ctrl == "slice" else max(3, a.moves // 4)
            vals = [min(c.max, max(c.min, start + (i % 10) - 5)) for i in range(1, moves + 1)]
            ts = time_moves(w, c, vals)
            med = statistics.median(ts)
            print(f"{name + ' ' + ctrl:<26}{t_build:>10.3f}{med:>16.4f}{max(ts):>12.4f}{t_build / med:>12.1f}")
    # the training curves: one epoch's row appended to a live figure of 100 epochs
    from brats_nb.viz import curve_widget
    t0 = time.perf_counter(); fig = curve_widget(curve_rows(100)); t_build = time.perf_counter() - t0
    ts = []
    for r in curve_rows(100 + a.moves)[100:]:
        t1 = time.perf_counter(); fig.update(r); ts.append(time.perf_counter() - t1)
    med = statistics.median(ts)
    print(f"{'curve_widget update':<26}{t_build:>10.3f}{med:>16.4f}{max(ts):>12.4f}{t_build / med:>12.1f}")


if __name__ == "__main__":
    sys.exit(main())
