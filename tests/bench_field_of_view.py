"""Group norm and the field of view: one trained model, judged on the held-out cases with windows of several sizes.

    python tests/bench_field_of_view.py RUN_DIR_OR_CHECKPOINT [--out nbs/results/recipe_cpu/field_of_view.md]

A group-norm network normalises every input over its own voxels, so its prediction of a voxel depends on the window it
sits in. This prints the held-out mean Dice (no TTA) for sliding windows of 48³, 64³ and 80³ voxels and for the whole
volume at once, beside the crop size the model was trained on.
"""
import argparse
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint"); p.add_argument("--out", default=None)
    a = p.parse_args()
    from brats_nb.inference import EvalProtocol, evaluate_cases
    from brats_nb.checkpoints import load_model
    from brats_nb.synth import heldout_dir
    from brats_nb.data import find_cases
    ck = Path(a.checkpoint); ck = ck / "latest.pt" if ck.is_dir() else ck
    model, config = load_model(ck)
    crop = config["train"]["crop_size"]
    cases = find_cases(heldout_dir())
    lines = [f"model: {config['variant']} trained on {crop}³ crops ({config['model']['norm']} norm); 8 held-out cases, no TTA",
             "", "| prediction | WT | TC | ET |", "|---|---|---|---|"]
    for name, proto in [(f"sliding {r}³ windows" + (" (the training crop)" if r == crop else ""), EvalProtocol(sliding_window=True, roi_size=r))
                        for r in (48, 64, 80)] + [("whole volume at once", EvalProtocol())]:
        _, m = evaluate_cases(model, cases, proto)
        lines.append(f"| {name} | {m['Dice_WT']:.3f} | {m['Dice_TC']:.3f} | {m['Dice_ET']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out: Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
