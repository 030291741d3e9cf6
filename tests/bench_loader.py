"""Does the data pipeline keep up? Crops per second per loader worker on a real BraTS case (240x240x155), the paper's
128³ crops with key point maps: today's path (NIfTI read per crop, whole-volume normalisation, MONAI rotation/flips/
intensity on the CPU) against the training cache (memory-mapped float16 arrays cut to the brain; the augmentation on the
training device), measured in the same run, one process (= one loader worker), one thread.

Usage: python tests/bench_loader.py [--crops N] [--case DIR]   (default: the first case of ../shared/real/brats21)
Goal (issue 15): >= 10x today's per-worker rate and <= 50 ms of CPU per crop."""
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from brats_nb.data import find_cases
from brats_nb.pipeline import BratsDataset, CachedDataset, augment_batch, cache_case, preprocess_case

REAL = Path(__file__).resolve().parents[2] / "shared" / "real" / "brats21"


def timed(ds, n):
    "Median wall and CPU seconds per crop over `n` crops (different indices, so different crops)."
    wall, cpu = [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        ds[i]
        wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--case", default=None)
    ap.add_argument("--crop-size", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    case = Path(a.case) if a.case else find_cases(REAL)[0]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "data" / case.name                     # today's path writes its key point maps beside the case
        shutil.copytree(case, copy)
        t0 = time.perf_counter(); preprocess_case(copy); t_kp = time.perf_counter() - t0
        t0 = time.perf_counter(); _, entry = cache_case(case, Path(tmp) / "cache"); t_cache = time.perf_counter() - t0
        today = BratsDataset([copy], a.crop_size, augment=True, extra=("keypoints",), seed=0, samples_per_case=a.crops)
        new = CachedDataset([entry], a.crop_size, seed=0, samples_per_case=a.crops)
        rows = [("today: NIfTI + MONAI augmentation, per crop", *timed(today, a.crops))]
        rows.append(("cache: memory-mapped crop (augmentation on the device)", *timed(new, a.crops)))
        batch = {k: torch.stack([new[i][k] for i in range(2)]) for k in ("image", "label", "keypoints")}
        g = torch.Generator().manual_seed(0)
        w, c = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time(); augment_batch(batch, g)
            w.append((time.perf_counter() - t0) / 2); c.append((time.process_time() - c0) / 2)
        rows.append(("augment_batch on the CPU (no GPU), per crop", statistics.median(w), statistics.median(c)))
        rows.append(("cache + augmentation in the worker (CPU only), per crop", rows[1][1] + rows[2][1], rows[1][2] + rows[2][2]))
    base = rows[0][1]
    print(f"case {case.name}, {a.crop_size}³ crops with key point maps, median of {a.crops}; one process, one thread")
    print(f"one-off per case: key point maps {t_kp:.1f} s; cache entry (read, normalise, key points, write) {t_cache:.1f} s\n")
    print(f"{'path':58s} {'ms/crop':>9s} {'CPU ms':>8s} {'crops/s':>8s} {'vs today':>9s}")
    for name, wall, cpu in rows:
        print(f"{name:58s} {1000 * wall:9.1f} {1000 * cpu:8.1f} {1 / wall:8.2f} {base / wall:8.1f}x")
    ok = base / rows[1][1] >= 10 and rows[1][2] <= 0.05
    print(f"\ngoal (>= 10x today per worker, <= 50 ms CPU per crop): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
