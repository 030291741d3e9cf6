"""Judge trained demo runs on synthetic cases that nobody looked at while the CPU recipe was chosen.

    python tests/bench_fresh_cases.py RUN_DIR [RUN_DIR ...] [--start 18] [--n 8] [--tta] [--out results.csv]

The CPU recipe was designed while looking at the held-out cases Synth_010-017, which makes them a validation set.
The seeded generator makes as many more as we like: this writes Synth_018... (default 8) to a temporary folder and
scores each run's `latest.pt` on them with the demo's protocol (sliding windows of the crop size, ET post-processing, tumour without a core dropped;
`--tta` adds the 8-flip TTA as `brats-nb demo --tta` does). Prints one row per run and the mean.
(The recipe's later choices were made on a third set, Synth_026-033: notebook 09_trainer.)
"""
import argparse
import csv
import tempfile
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+"); p.add_argument("--start", type=int, default=18); p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", default=None); p.add_argument("--tta", action="store_true")
    a = p.parse_args()
    import dataclasses
    from brats_nb.data import find_cases
    from brats_nb.inference import evaluate_cases
    from brats_nb.checkpoints import load_model
    from brats_nb.synth import make_samples
    from brats_nb.trainer import TrainConfig
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_samples(tmp, a.n, start=a.start)
        cases = find_cases(tmp)
        for run in a.runs:
            model, config = load_model(Path(run) / "latest.pt")
            cfg = TrainConfig.from_dict(config["train"])
            protocol = dataclasses.replace(cfg.val_protocol(), tta=a.tta, postprocess=True, need_core=True)
            _, m = evaluate_cases(model, cases, protocol)
            rows.append(dict(run=Path(run).parent.name if Path(run).name == "run" else Path(run).name, seed=cfg.seed,
                             cases=f"Synth_{a.start:03d}-{a.start + a.n - 1:03d}",
                             **{r: round(m[f"Dice_{r}"], 4) for r in ("WT", "TC", "ET")}))
            print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0])); w.writeheader(); w.writerows(rows)
    mean = {r: sum(x[r] for x in rows) / len(rows) for r in ("WT", "TC", "ET")}
    print("mean over runs:", {k: round(v, 3) for k, v in mean.items()})


if __name__ == "__main__":
    main()
