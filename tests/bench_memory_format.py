"""Benchmark: training steps and inference of every variant in the default (NCDHW) and channels-last (NDHWC) order.

Both orders are measured in the same run, alternating, on the same weights and inputs; the table gives medians and
the ratio channels-last / default (below 1: channels-last is faster). The trainer and `load_model` use channels-last
on the CPU by default (`--channels-last auto`); this script is the evidence for that default.
The CPU preset's network (8/16 channels, 4 groups, group norm) on 2x4x48^3 crops and one 1x4x96^3 volume (the
samples' size) by default; `--paper` uses the paper's network (32/128 channels, 16 groups, batch norm).
Run: python tests/bench_memory_format.py [--threads 1] [--repeats 7] [--crop 48] [--volume 96] [--device cpu] [--paper]"""
import argparse
import statistics
import time

import torch

from brats_nb.losses import BratsLoss
from brats_nb.model import VARIANTS, build_model


def _sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def _median_pair(fn_a, fn_b, repeats, device):
    "Median seconds of fn_a and fn_b, called alternately after one warm-up each."
    fn_a(); fn_b(); _sync(device)
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter(); fn(); _sync(device); ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench(variant, kw, crop, volume, batch, repeats, device):
    torch.manual_seed(0)
    models = {"default": build_model(variant, **kw).to(device)}
    models["channels_last"] = build_model(variant, **kw).to(device)
    models["channels_last"].load_state_dict(models["default"].state_dict())
    models["channels_last"].channels_last()
    x = torch.randn(batch, 4, *(crop,) * 3, device=device)
    y = torch.randint(0, 4, (batch, *(crop,) * 3), device=device)
    v = torch.randn(1, 4, *(volume,) * 3, device=device)
    loss = BratsLoss(bsc_weight=0.0)
    opts = {k: torch.optim.Adam(m.parameters(), 1e-4) for k, m in models.items()}

    def step(k):
        def f():
            m, o = models[k], opts[k]
            m.train(); o.zero_grad(set_to_none=True)
            loss(m(x), y)[0].backward(); o.step()
        return f

    def infer(k):
        def f():
            m = models[k].eval()
            with torch.no_grad(): m(v)
        return f

    with torch.no_grad():  # the two orders compute the same function
        diff = (models["default"].eval()(v) - models["channels_last"].eval()(v)).abs().max().item()
    train_a, train_b = _median_pair(step("default"), step("channels_last"), repeats, device)
    inf_a, inf_b = _median_pair(infer("default"), infer("channels_last"), repeats, device)
    return dict(variant=variant, train_default=train_a, train_cl=train_b, infer_default=inf_a, infer_cl=inf_b, max_diff=diff)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one ablation job's share of a 2-core machine)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--volume", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true", help="the paper's network instead of the CPU preset's")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    kw = dict(norm="batch") if a.paper else dict(channels=8, mid_channels=16, groups=4, norm="group")
    print(f"{device}, {a.threads} thread(s), {'paper' if a.paper else 'CPU preset'} network, training {a.batch}x4x{a.crop}^3, "
          f"inference 1x4x{a.volume}^3, median of {a.repeats}")
    head = "| variant | train step default (s) | channels-last (s) | ratio | inference default (s) | channels-last (s) | ratio | max abs diff |"
    print(head); print("|---" * 8 + "|")
    rows = []
    for variant in VARIANTS:
        r = bench(variant, kw, a.crop, a.volume, a.batch, a.repeats, device); rows.append(r)
        print(f"| {variant} | {r['train_default']:.3f} | {r['train_cl']:.3f} | {r['train_cl'] / r['train_default']:.2f} | "
              f"{r['infer_default']:.3f} | {r['infer_cl']:.3f} | {r['infer_cl'] / r['infer_default']:.2f} | {r['max_diff']:.1e} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
