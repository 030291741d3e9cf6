"""Threads that degrade gracefully: the demo's training on an idle CPU and beside one busy process.

    python tests/bench_threads.py [--epochs 4] [--repeats 1]

Each row trains the CPU preset's `all` arm for a few epochs in a fresh process, with torch's default thread count
(one per core, what brats_nb did before) or `threads=0` (auto: `ThreadGovernor` gives torch the cores other processes
leave idle, re-checked after every epoch), on an idle machine and beside one CPU-bound process (a Python busy loop)
started 2 s earlier. Prints the wall time of each and the ratio loaded / idle (the goal: at most ~2.5). Not a test.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

TRAIN = """
import sys, time, torch
from brats_nb.trainer import preset, train
threads = int(sys.argv[2])
if threads < 0: torch.set_num_threads(torch.get_num_threads()); threads = torch.get_num_threads()   # torch's default, fixed
cfg = preset("cpu", out=sys.argv[1], epochs=int(sys.argv[3]), val_every=0, threads=threads)
t = time.perf_counter(); train(cfg, quiet=True); print("SECONDS", time.perf_counter() - t)
"""
BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass"


def run(threads, epochs, loaded):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if loaded else None
    try:
        if busy: time.sleep(2)
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-c", TRAIN, f"{tmp}/run", str(threads), str(epochs)], env=env,
                               capture_output=True, text=True)
    finally:
        if busy: busy.kill(); busy.wait()
    line = [l for l in r.stdout.splitlines() if l.startswith("SECONDS")]
    if not line: raise SystemExit(r.stderr[-2000:])
    return float(line[0].split()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    import statistics
    rows = []
    for name, threads in (("torch default (one per core)", -1), ("auto (ThreadGovernor)", 0)):
        idle = statistics.median(run(threads, a.epochs, False) for _ in range(a.repeats))
        loaded = statistics.median(run(threads, a.epochs, True) for _ in range(a.repeats))
        rows.append((name, idle, loaded))
    print(f"training the CPU preset's 'all' arm for {a.epochs} epochs ({os.cpu_count()} CPUs), median of {a.repeats}")
    print("| threads | idle s | beside one busy process s | loaded / idle |")
    print("|---|---|---|---|")
    for name, idle, loaded in rows: print(f"| {name} | {idle:.1f} | {loaded:.1f} | {loaded / idle:.2f} |")
    print(f"auto vs default: idle {rows[1][1] / rows[0][1]:.2f}x the time, loaded {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
