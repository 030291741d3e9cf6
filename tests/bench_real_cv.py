"""Cross-validation of the laptop recipe on real BraTS cases: k folds fixed in advance, Dice and HD95 per case and region.

    python tests/bench_real_cv.py [--data DIR] [--k 4] [--epochs N] [--out nbs/results/real_cpu/cv.md] [--keep DIR] [--folds F ...] [--tta]
        [--set KEY=VALUE ...]

The data are the real cases of $BRATS_NB_DATA (or ../shared/real): every BraTS case folder below it, at full resolution.
Folds are fixed before anything runs: the cases sorted by name, case i in fold i % k. For each fold the recipe of
`brats-nb real-model` (`preset("laptop")`: a 2 mm training cache built outside the data, class-balanced tumour crops)
trains on the other folds' cases, then predicts each held-out case at 1 mm through a 2 mm copy (`predict_case(...,
spacing=2)`, sliding windows of the crop), and the label is scored against the case's own 1 mm ground truth.

The ET-absent rule (fewer than T predicted ET voxels become necrotic core; optionally tumour components without a core
dropped) is chosen per fold **on the other folds' held-out predictions only** (nested), from a small family fixed here;
the rule chosen on all folds is the one the shipped model records. Prints and writes one markdown report: per case and
region Dice and HD95 (BraTS conventions: both empty Dice 1 / HD95 0, one empty Dice 0 / HD95 373.13), the mean with a
95% t-interval over cases, the whole-brain floor (every brain voxel called tumour) and false ET in cases without ET.
The held-out cases are predicted with the mean of the 8 flips when the recipe says so (`val_tta`, on in the laptop
preset) or `--tta` is given (`--no-tta`: one pass); with `--keep` the folds' trained runs are reused and only missing
predictions are made. Not a test: it takes about 80 minutes on 2 cores (30 epochs; two processes with `--folds 0 2` and
`--folds 1 3`, then one without `--folds` for the report). `--set KEY=VALUE` runs an experiment: the laptop preset with
that field changed (the same folds; the report names the change and also gives the means under the recipe's own rule).
"""
import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

RULES = [(t, core) for core in (False, True) for t in (0, 500, 1000, 2000, 4000)]   # (ET voxel threshold, drop core-less tumour)


def real_root(arg=None):
    env = arg or os.environ.get("BRATS_NB_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "real"
    return root if root.is_dir() else None


def folds_of(names, k):
    "Fold i holds the cases whose index in name order is i modulo k (fixed in advance, never chosen by a score)."
    names = sorted(names)
    return [[n for i, n in enumerate(names) if i % k == f] for f in range(k)]


def apply_rule(classes, rule):
    from brats_nb.inference import drop_coreless, postprocess_et
    t, core = rule
    out = drop_coreless(classes) if core else classes
    return postprocess_et(out, t) if t else out


def parse_overrides(items):
    "`KEY=VALUE` strings to preset overrides, each value read as the type of that TrainConfig field."
    from dataclasses import fields
    from brats_nb.trainer import TrainConfig
    types = {f.name: type(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types: raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a TrainConfig field")
        t = types[key]
        try:
            if t is not bool: out[key] = t(value)
            elif value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                out[key] = value.lower() in ("1", "true", "yes", "on")
            else: raise ValueError
        except ValueError: raise SystemExit(f"--set {item!r}: {value!r} is not a {t.__name__}") from None
    return out


def scores(classes, gt, spacing):
    from brats_nb.metrics import dice, hd95
    p, g = [classes > 0, np.isin(classes, (1, 3)), classes == 3], [gt > 0, np.isin(gt, (1, 3)), gt == 3]
    return [dice(a, b) for a, b in zip(p, g)], [hd95(a, b, spacing) for a, b in zip(p, g)]


def interval(x):
    "Mean and half-width of the 95% t-interval over cases."
    from scipy import stats
    x = np.asarray(x, float)
    return x.mean(), stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="folder of real BraTS cases (default: $BRATS_NB_DATA or ../shared/real)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the laptop preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an experiment: change one field of the laptop preset (repeatable, e.g. --set aug_field=0.3)")
    p.add_argument("--out", default="nbs/results/real_cpu/cv.md")
    p.add_argument("--keep", default=None, help="keep the runs and the held-out labels here (and reuse finished folds)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="run only these folds and stop before the report (needs --keep; two processes with different "
                        "folds share the cores, and a last run without --folds reports them all)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="predict the held-out cases with 8-flip TTA (default: as the recipe's runs record, val_tta)")
    a = p.parse_args(argv)
    if a.folds is not None and not a.keep: p.error("--folds needs --keep (the folds' runs are kept there for the report)")
    if a.folds is not None and not set(a.folds) <= set(range(a.k)):
        p.error(f"--folds {a.folds}: folds are numbered 0..{a.k - 1} (--k {a.k})")

    import torch
    from brats_nb.data import brain_mask, find_cases, labels_to_classes, load_case
    from brats_nb.inference import predict_case
    from brats_nb.metrics import dice
    from brats_nb.checkpoints import load_model, read_checkpoint
    from brats_nb.trainer import preset, train

    overrides = parse_overrides(a.overrides)
    train_overrides = {**({"epochs": a.epochs} if a.epochs else {}), **overrides}   # --set epochs wins over --epochs
    root = real_root(a.data)
    if root is None: raise SystemExit("no real data: set BRATS_NB_DATA (or --data) to a folder of BraTS cases")
    cases = {c.name: c for c in find_cases(root)}
    folds = folds_of(cases, a.k)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="brats_nb_cv_"))
    raw, info, used = {}, [], set()
    try:
        for f, test in enumerate(folds):
            if a.folds is not None and f not in a.folds: continue
            fdir = work / f"fold{f}"
            data = fdir / "train"
            if not (fdir / "done.json").exists():
                shutil.rmtree(data, ignore_errors=True); data.mkdir(parents=True)
                for n, c in cases.items():
                    if n not in test: (data / n).symlink_to(c.resolve())
                cfg = preset("laptop", data=str(data), out=str(fdir / "run"), val_fraction=0.0, val_every=0,
                             **train_overrides)
                t0 = time.perf_counter()
                train(cfg, resume=(fdir / "run" / "latest.pt").exists(), quiet=True)
                t_train = time.perf_counter() - t0
                (fdir / "done.json").write_text(json.dumps(dict(test=test, train_s=t_train, threads=torch.get_num_threads())))
            done = json.loads((fdir / "done.json").read_text())
            tta = a.tta if a.tta is not None else bool(
                read_checkpoint(fdir / "run" / "latest.pt")["config"]["train"].get("val_tta", False))
            used.add(tta)
            key, suffix = ("predict_tta_s", ".tta") if tta else ("predict_s", "")
            if key not in done:                                   # the held-out predictions of this fold's run
                model, config = load_model(fdir / "run" / "latest.pt")
                done[key] = {}
                for n in test:
                    t1 = time.perf_counter()
                    label = predict_case(model, load_case(cases[n], load_label=False), spacing=config["train"]["spacing"],
                                         sliding_window=True, roi_size=config["train"]["crop_size"], postprocess=False,
                                         convention="brats2017", tta=tta)
                    done[key][n] = time.perf_counter() - t1
                    np.savez_compressed(fdir / f"{n}{suffix}.npz",
                                        classes=labels_to_classes(label, "brats2017"))
                (fdir / "done.json").write_text(json.dumps(done))
            done["predict"] = done[key]
            done["epochs"] = json.loads((fdir / "run" / "config.json").read_text())["epochs"]
            info.append(done)
            print(f"fold {f}: trained in {done['train_s']:.0f} s on {len(cases) - len(test)} cases; held out {test}", flush=True)
            for n in test: raw[n] = dict(fold=f, classes=np.load(fdir / f"{n}{suffix}.npz")["classes"])
        if a.folds is not None:
            print(f"folds {a.folds} done in {work}; run again without --folds for the report")
            return None, None
        for n, r in raw.items():
            case = load_case(cases[n])
            r["gt"], r["spacing"] = labels_to_classes(case.label, case.label_convention), case.spacing
            brain = brain_mask(case.image)
            r["floor"] = [dice(brain, m) for m in (r["gt"] > 0, np.isin(r["gt"], (1, 3)), r["gt"] == 3)]
        mean_dice = {(n, rule): np.mean(scores(apply_rule(r["classes"], rule), r["gt"], r["spacing"])[0]) for n, r in raw.items() for rule in RULES}
        chosen = {}
        for f in range(a.k):
            other = [n for n, r in raw.items() if r["fold"] != f]
            chosen[f] = max(RULES, key=lambda rule: np.mean([mean_dice[(n, rule)] for n in other]))
        overall = max(RULES, key=lambda rule: np.mean([mean_dice[(n, rule)] for n in raw]))
        rows = []
        for n in sorted(raw):
            r = raw[n]
            d, h = scores(apply_rule(r["classes"], chosen[r["fold"]]), r["gt"], r["spacing"])
            rows.append(dict(case=n, fold=r["fold"], rule=chosen[r["fold"]], et=bool((r["gt"] == 3).any()), dice=d, hd95=h, floor=r["floor"],
                             false_et=not (r["gt"] == 3).any() and bool((apply_rule(r["classes"], chosen[r["fold"]]) == 3).any())))
    finally:
        if not a.keep: shutil.rmtree(work, ignore_errors=True)

    recipe = preset("laptop", **overrides)
    recipe_rule = (recipe.et_threshold, recipe.need_core)
    rule_s = lambda rule: (f"ET < {rule[0]} vox -> NCR" if rule[0] else "no ET rule") + (", core-less dropped" if rule[1] else "")
    changed = ", ".join(f"`{k}={v}`" for k, v in overrides.items())
    lines = [f"# Cross-validation of the laptop recipe on {len(rows)} real BraTS cases ({a.k} folds)", "",
             *([f"An experiment: the laptop preset with {changed}.", ""] if overrides else []),
             f"Folds fixed in advance (cases sorted by name, case i in fold i % {a.k}). Each fold: `preset('laptop')` trained on the "
             "other folds' cases, held-out cases predicted at 1 mm through a 2 mm copy" + (" with 8-flip TTA" if used == {True} else "") + " and scored against their own 1 mm labels. "
             "The ET-absent rule is chosen per fold on the other folds' held-out predictions only (nested). Dice: BraTS "
             "conventions (1 when both empty, 0 for any false ET); HD95 in mm, the larger of the two directed 95th percentiles "
             "(373.13 when one mask is empty).", "",
             "| case | fold | has ET | rule (chosen on the other folds) | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['fold']} | {'yes' if r['et'] else '**no**'} | {rule_s(r['rule'])} | "
                     + " | ".join(f"{x:.3f}" for x in r["dice"]) + " | " + " | ".join(f"{x:.1f}" for x in r["hd95"]) + " |")
    stats_d = [interval([r["dice"][i] for r in rows]) for i in range(3)]
    stats_h = [interval([r["hd95"][i] for r in rows]) for i in range(3)]
    floor = [np.mean([r["floor"][i] for r in rows]) for i in range(3)]
    lines += ["| **mean ± 95% CI** | | | | " + " | ".join(f"**{m:.3f}** ± {h:.3f}" for m, h in stats_d) + " | "
              + " | ".join(f"{m:.1f} ± {h:.1f}" for m, h in stats_h) + " |",
              "| whole-brain floor | | | | " + " | ".join(f"{x:.3f}" for x in floor) + " | | | |", "",
              f"Cases without ET: {sum(not r['et'] for r in rows)}; with ET predicted in them: "
              f"{sum(r['false_et'] for r in rows)} ({', '.join(r['case'] for r in rows if r['false_et']) or 'none'}).",
              f"Rule chosen on all folds (the one the shipped model records): {rule_s(overall)}.",
              f"With the recipe's own rule ({rule_s(recipe_rule)}) on every fold: mean Dice WT/TC/ET "
              + "/".join(f"{x:.3f}" for x in np.mean([scores(apply_rule(r["classes"], recipe_rule), r["gt"], r["spacing"])[0]
                                                      for r in raw.values()], axis=0)) + ".",
              "Training time per fold (s): " + ", ".join(f"{d['train_s']:.0f}" for d in info) + f" on {info[0]['threads']} threads"
              + f" ({'/'.join(sorted({str(d['epochs']) for d in info}))} epochs); "
              "prediction per case (s, median): " + f"{np.median([v for d in info for v in d['predict'].values()]):.1f}"
              + (" with 8-flip TTA." if used == {True} else ".")]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return rows, overall


if __name__ == "__main__":
    main()
