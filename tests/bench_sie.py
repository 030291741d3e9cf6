"""SIE's gate as one sum (`SIE.fused_sum`) against the literal stack + grouped conv, forward and backward on the CPU.

    python tests/bench_sie.py [--threads 2] [--repeats 15]

Prints the median time of one SIE (forward + backward, channels-last as training runs it) at the shapes of the CPU
preset's network, and of one training step of the `all` arm at 64³ with each form. Not a test: times depend on the machine.
"""
import argparse
import time

import torch


def median_ms(f, repeats):
    for _ in range(3): f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2); p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from brats_nb.sie import SIE
    from brats_nb.model import build_model
    from brats_nb.trainer import preset
    cl = torch.channels_last_3d
    print(f"SIE gate, forward + backward, channels-last, {a.threads} threads, median of {a.repeats}")
    print("| channels | size | stack + grouped conv ms | one sum ms | speed-up |\n|---|---|---|---|---|")
    for c, n in ((8, 64), (8, 32), (16, 16), (32, 8)):
        s = SIE(c); x = torch.randn(1, c, n, n, n).to(memory_format=cl).requires_grad_()
        lit = median_ms(lambda: (x * torch.sigmoid(s.fuse(s.stack(x)))).sum().backward(), a.repeats)
        fast = median_ms(lambda: (x * s.gate(x)).sum().backward(), a.repeats)
        print(f"| {c} | {n}³ | {lit:.2f} | {fast:.2f} | {lit / fast:.2f}x |")
    cfg = preset("cpu")
    m = build_model(**{**cfg.model_kwargs(), "variant": "all"}).to(memory_format=cl)
    x = torch.randn(1, 4, 64, 64, 64).to(memory_format=cl)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    def step():
        opt.zero_grad(); m(x).square().mean().backward(); opt.step()
    fast = median_ms(step, a.repeats)
    sies = [mod for mod in m.modules() if isinstance(mod, SIE)]
    for s in sies: s.gate = (lambda s: lambda t: torch.sigmoid(s.fuse(s.stack(t))))(s)   # the literal form
    lit = median_ms(step, a.repeats)
    print(f"\ntraining step of the 'all' arm (CPU preset, 64³, {len(sies)} SIEs): literal {lit:.0f} ms, one sum {fast:.0f} ms, {lit / fast:.2f}x")


if __name__ == "__main__":
    main()
