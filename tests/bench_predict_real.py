"""Speed of `brats-nb predict` with the shipped real-data model on one real 240x240x155 case, on this machine's CPUs.

    python tests/bench_predict_real.py [--case DIR] [--repeats 3] [--threads 2]

Rows (median of --repeats, after one warm-up): the whole command in a fresh process (Python start, imports, model load,
reading the four NIfTI files, the 2 mm copy, sliding windows, resampling the probabilities back to 1 mm, writing the
label); `predict_case` in this process (the same work without start-up), with and without 8-flip TTA; and the reference
measured in the same run: the same network on the full-resolution volume (240x240x160, whole volume, what predicting
without the 2 mm copy would cost). Goal: the command <= 10 s on 2 cores without TTA. Not a test: it prints a table.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default=None, help="a real BraTS case folder (default: BraTS2021_00000 of $BRATS_NB_DATA or ../shared/real)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    root = Path(os.environ.get("BRATS_NB_DATA") or Path(__file__).resolve().parents[2] / "shared" / "real")
    case_dir = Path(a.case) if a.case else root / "brats21" / "BraTS2021_00000"
    if not case_dir.is_dir(): raise SystemExit(f"{case_dir}: no such case folder; give --case or set BRATS_NB_DATA")

    import torch
    torch.set_num_threads(a.threads)
    from brats_nb.data import load_case, normalize
    from brats_nb.inference import predict_case, predict_volume
    from brats_nb.checkpoints import load_model, real_checkpoint
    model, config = load_model(real_checkpoint())
    t = config["train"]
    kw = dict(spacing=t["spacing"], sliding_window=True, roi_size=t["crop_size"], et_threshold=t["et_threshold"], need_core=t["need_core"])

    def timed(fn):
        fn()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        cmd = [str(Path(sys.executable).parent / "brats-nb"), "predict", str(case_dir), "--out", tmp]
        rows.append(("`brats-nb predict CASE --out OUT` (fresh process)",
                     timed(lambda: subprocess.run(cmd, check=True, capture_output=True, env=env))))
    case = load_case(case_dir, load_label=False)
    rows.append(("`predict_case` (load to label, 2 mm copy, no TTA)", timed(lambda: predict_case(model, case_dir, **kw))))
    rows.append(("`predict_case` with 8-flip TTA", timed(lambda: predict_case(model, case_dir, tta=True, **kw))))
    x = normalize(case.image)
    with torch.no_grad():
        rows.append(("reference: the network on the 1 mm volume (whole, no TTA)", timed(lambda: predict_volume(model, x))))
    ref = rows[-1][1]
    print(f"{case_dir.name} {case.shape}, shipped model {real_checkpoint().name}, {a.threads} threads, median of {a.repeats}")
    print("| what | median s | vs the 1 mm reference |")
    print("|---|---|---|")
    for name, s in rows: print(f"| {name} | {s:.2f} | {s / ref:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
