"""How good is the memory planner's count? Real training steps on the CPU against `brats_nb.memory.step_peak`.

    python tests/bench_planner.py [--out nbs/results/planner_cpu.md]

For each small configuration a real step (forward, loss, backward; float32, one thread) runs once to warm up and once
measured: the process's resident memory is sampled every 0.5 ms (glibc serves every block over 128 KiB by its own
mapping, returned when freed, so that the resident size follows the live tensors), and the rise at the peak plus what
was alive before the step (parameters, the batch) is the measured peak. The planner counts the same step on fake
tensors. Prints a Markdown table: measured MiB, planner MiB and the error, and the median absolute error.
Run it alone: other processes do not change a process's resident memory, but they slow the sampling thread.
"""
import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

from brats_nb.bench import _PeakRSS, _fix_malloc
from brats_nb.losses import BratsLoss
from brats_nb.memory import step_peak
from brats_nb.model import arm_network, arm_uses_bsc, build_model

CPU_NET = dict(channels=8, mid_channels=16, groups=4, norm="group")
CONFIGS = [("all", 1, 32, {}), ("all", 2, 48, {}), ("dmfnet", 2, 48, {}), ("sie", 1, 64, {}), ("all", 1, 64, {}),
           ("all", 2, 64, CPU_NET), ("all", 4, 64, CPU_NET)]


def measured_peak(variant, batch, crop, **model_kwargs):
    "Bytes at the peak of a real CPU training step (no optimiser step; the planner counts the optimiser apart)."
    torch.manual_seed(0)
    net = build_model(arm_network(variant), **model_kwargs)
    bsc = arm_uses_bsc(variant)
    loss_fn = BratsLoss(bsc_weight=0.1 if bsc else 0.0)
    x = torch.randn(batch, 4, crop, crop, crop)
    y = torch.randint(0, 4, (batch, crop, crop, crop))
    kp = (torch.rand(batch, 3, crop, crop, crop) > 0.99).float() if bsc else None

    def step():
        loss, _ = loss_fn(net(x), y, kp)
        loss.backward()

    step()                                   # warm-up: thread pools, oneDNN's caches, the gradients' first allocation
    net.zero_grad(set_to_none=True)
    gc.collect()
    with _PeakRSS(0.0005) as m:
        step()
    before = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers(), x, y]
                 + ([kp] if kp is not None else []))
    return m.peak + before


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not _fix_malloc():
        print("glibc's mallopt is not available: the resident size does not follow the live tensors", file=sys.stderr)
    lines = ["| arm | batch | crop | network | measured MiB | planner MiB | error |", "|---|---|---|---|---|---|---|"]
    errors = []
    for variant, batch, crop, mk in CONFIGS:
        real = measured_peak(variant, batch, crop, **mk)
        est = step_peak(variant, batch, crop, amp="fp32", **mk)["tensors"]
        errors.append((est - real) / real)
        lines.append(f"| {variant} | {batch} | {crop}³ | {'cpu preset' if mk else 'paper'} | {real / 2**20:.0f} | "
                     f"{est / 2**20:.0f} | {errors[-1]:+.1%} |")
        print(lines[-1], flush=True)
    summary = (f"\nmedian absolute error {statistics.median(abs(e) for e in errors):.1%}, "
               f"largest {max(errors, key=abs):+.1%} ({len(errors)} configurations, float32, 1 thread)")
    print(summary)
    if a.out: Path(a.out).write_text("\n".join(lines) + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
