"""Real scans on a laptop: train on five real BraTS cases at 2 mm, judge the model on a sixth at full resolution.

    python tests/bench_real.py [--arm all] [--epochs 60] [--heldout BraTS2021_00019] [--keep DIR]

The data are the six real cases of ../shared/real (or $BRATS_NB_REAL): brats18/ and brats21/. Each is cut to its brain
and resampled to 2 mm (`brats-nb downsample`); the model trains on five with the CPU recipe and predicts the sixth
through the same 2 mm copy, back at 1 mm in its own space (`predict_resampled`), scored against its own 1 mm labels.
The held-out case is fixed in advance (the last case by name), never chosen by its score. Prints one table: the time of
each step and the Dice per region, beside the Dice of labelling the whole brain as tumour. Not a test: it takes minutes.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def real_root():
    env = os.environ.get("BRATS_NB_REAL")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "real"
    return root if root.is_dir() else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", default="all")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--samples-per-case", type=int, default=4)
    p.add_argument("--heldout", default=None, help="name of the case to hold out (default: the last by name)")
    p.add_argument("--tta", action="store_true", help="8-flip TTA at prediction")
    p.add_argument("--keep", default=None, help="keep the 2 mm copies and the run here")
    a = p.parse_args(argv)

    from brats_nb.data import brain_mask, downsample_case, find_cases, labels_to_classes, labels_to_regions, load_case, write_case_folder
    from brats_nb.inference import drop_coreless, predict_resampled
    from brats_nb.metrics import dice
    from brats_nb.checkpoints import load_model
    from brats_nb.trainer import preset, train

    root = real_root()
    if root is None: raise SystemExit("no real data: set BRATS_NB_REAL to a folder holding brats18/ and brats21/")
    cases = sorted([c for sub in ("brats18", "brats21") if (root / sub).is_dir() for c in find_cases(root / sub)], key=lambda c: c.name)
    held = next((c for c in cases if c.name == a.heldout), None) if a.heldout else cases[-1]
    if held is None: raise SystemExit(f"no case named {a.heldout!r}; cases: {[c.name for c in cases]}")
    train_cases = [c for c in cases if c != held]
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="brats_nb_real_"))
    rows = []
    try:
        t0 = time.perf_counter()
        for c in train_cases: write_case_folder(downsample_case(c, 2.0), work / "train2mm")   # one folder of five 2 mm cases
        t_down = time.perf_counter() - t0
        cfg = preset("cpu", data=str(work / "train2mm"), out=str(work / "run"), variant=a.arm, epochs=a.epochs,
                     samples_per_case=a.samples_per_case, val_fraction=0.0, val_every=0)
        t1 = time.perf_counter(); train(cfg, resume=(work / "run" / "latest.pt").exists(), quiet=True); t_train = time.perf_counter() - t1
        model, _ = load_model(work / "run" / "latest.pt")
        case = load_case(held)
        t2 = time.perf_counter()
        label = predict_resampled(model, case, 2.0, sliding_window=True, roi_size=cfg.crop_size, tta=a.tta)
        t_pred = time.perf_counter() - t2
        gt = labels_to_regions(case.label, case.label_convention)
        d = [dice(x, y) for x, y in zip(labels_to_regions(label, case.label_convention), gt)]
        cored = np.where(drop_coreless(labels_to_classes(label, case.label_convention)) > 0, label, 0)   # the demo's rule
        dc = [dice(x, y) for x, y in zip(labels_to_regions(cored, case.label_convention), gt)]
        floor = dice(brain_mask(case.image), case.label > 0)
        rows.append(dict(arm=a.arm, train_cases=len(train_cases), heldout=held.name, epochs=a.epochs,
                         steps=a.epochs * len(train_cases) * a.samples_per_case // cfg.batch_size, downsample_s=t_down,
                         train_s=t_train, predict_s=t_pred, WT=d[0], TC=d[1], ET=d[2], WT_core=dc[0], whole_brain_WT=floor))
    finally:
        if not a.keep: shutil.rmtree(work, ignore_errors=True)
    r = rows[0]
    print(f"real data: train on {r['train_cases']} cases at 2 mm, predict {r['heldout']} at 1 mm ({'8-flip TTA' if a.tta else 'no TTA'})")
    print("| arm | epochs | steps | downsample s | train s | predict s | total min | Dice WT | Dice TC | Dice ET | WT, core-less dropped | whole-brain WT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    total = (r["downsample_s"] + r["train_s"] + r["predict_s"]) / 60
    print(f"| {r['arm']} | {r['epochs']} | {r['steps']} | {r['downsample_s']:.0f} | {r['train_s']:.0f} | {r['predict_s']:.0f} | "
          f"{total:.1f} | {r['WT']:.3f} | {r['TC']:.3f} | {r['ET']:.3f} | {r['WT_core']:.3f} | {r['whole_brain_WT']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
