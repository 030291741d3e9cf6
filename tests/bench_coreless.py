"""What dropping core-less tumour components (`drop_coreless`, `need_core=True`) does to trained runs, on tuning cases.

    python tests/bench_coreless.py RUN_DIR [RUN_DIR ...] [--start 26] [--n 24] [--out results.csv]

Writes Synth_026... (default 24 cases: the tuning cases of the CPU recipe, never the held-out Synth_010-017 nor the
fresh Synth_018-025) to a temporary folder, predicts them once with each run's `latest.pt` by the demo's protocol
without the rule, and scores the prediction as it is and with core-less components dropped. Prints one row per run.
Not a test: it takes about half a minute per run on 2 cores.
"""
import argparse
import csv
import dataclasses
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+"); p.add_argument("--start", type=int, default=26); p.add_argument("--n", type=int, default=24)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import nibabel as nib
    from brats_nb.data import find_cases, labels_to_classes, labels_to_regions, load_case
    from brats_nb.inference import drop_coreless, evaluate_cases
    from brats_nb.metrics import dice
    from brats_nb.checkpoints import load_model
    from brats_nb.synth import make_samples
    from brats_nb.trainer import TrainConfig
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_samples(Path(tmp) / "cases", a.n, start=a.start)
        cases = find_cases(Path(tmp) / "cases")
        for run in a.runs:
            model, config = load_model(Path(run) / "latest.pt")
            cfg = TrainConfig.from_dict(config["train"])
            out = Path(tmp) / "pred"
            evaluate_cases(model, cases, dataclasses.replace(cfg.val_protocol(), postprocess=True), out_dir=out)
            scores = {"plain": [], "need_core": []}
            for c in cases:
                case = load_case(c); conv = case.label_convention
                pred = np.asanyarray(nib.load(str(out / f"{case.name}.nii.gz")).dataobj)
                gt = labels_to_regions(case.label, conv)
                kept = np.where(drop_coreless(labels_to_classes(pred, conv)) > 0, pred, 0)   # the rule works on classes
                for name, lab in (("plain", pred), ("need_core", kept)):
                    scores[name].append([dice(x, y) for x, y in zip(labels_to_regions(lab, conv), gt)])
            run_name = Path(run).parent.name if Path(run).name == "run" else Path(run).name
            for name, v in scores.items():
                m = np.mean(v, 0)
                rows.append(dict(run=run_name, seed=cfg.seed, cases=f"Synth_{a.start:03d}-{a.start + a.n - 1:03d}", rule=name,
                                 WT=round(float(m[0]), 4), TC=round(float(m[1]), 4), ET=round(float(m[2]), 4)))
                print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0])); w.writeheader(); w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
