"""Beyond one machine: two torchrun "nodes" that meet at a c10d rendezvous train as one machine with two processes; a run
stopped by SIGTERM in the middle of an epoch (one process, or `--nproc 2` through its launcher) resumes to the weights of
one never stopped; a global batch that does not divide among the processes is refused."""
import os
import signal
import socket
import subprocess
import threading
import time

import torch

from brats_nb.inference import evaluate_cases
from brats_nb.checkpoints import load_model, read_checkpoint
from brats_nb.trainer import TrainConfig, config_cases, read_log
from test_trainer import BIN, ENV, SMALL, brats_nb, same_weights, weights

# 3 training cases x 2 crops = 6 crops, a global batch of 2: 3 steps an epoch on each of 2 ranks; 2 validation cases, one a rank
TWO = [*SMALL, "--max-cases", "5", "--val-fraction", "0.4", "--batch-size", "2", "--epochs", "2", "--val-every", "1", "--threads", "1"]
LOGGED = ["epoch", "lr", "loss", "gdl", "ce", "bsc", "val_WT", "val_TC", "val_ET", "val_mean", "world"]   # the log less its timings


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_in_epoch_2(p, send, timeout=300):
    """Wait until the run `p` (pipes for stdout and stderr) shows epoch 2's progress bar, then `send` it the signal and
    wait for it to end: the bar is drawn after the check that ends a run between epochs, so the stop comes inside epoch 2
    whatever the machine's load (the first epoch's log row alone came before that check: a stop right after it was
    taken between the epochs). Returns (returncode, stdout, stderr)."""
    bufs = {"out": [], "err": []}
    def pump(f, key):
        for chunk in iter(lambda: os.read(f.fileno(), 4096), b""): bufs[key].append(chunk.decode(errors="replace"))
    threads = [threading.Thread(target=pump, args=(f, k), daemon=True) for f, k in ((p.stdout, "out"), (p.stderr, "err"))]
    for t in threads: t.start()
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and "epoch 2/2" not in "".join(bufs["err"]):
        time.sleep(0.01)
    send()
    p.wait(timeout=180)
    for t in threads: t.join(timeout=30)
    return p.returncode, "".join(bufs["out"]), "".join(bufs["err"])


def logged(run):
    return [{k: None if r[k] != r[k] else r[k] for k in LOGGED} for r in read_log(run)]   # NaN (no validation): None


def test_two_nodes_train_as_one_node_with_two_processes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = brats_nb("train", *TWO, "--nproc", "2", "--out", str(one), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    port = free_port()
    logs = [tmp_path / f"node{k}.log" for k in (0, 1)]   # files, not pipes: a full pipe would stall one node and both with it
    files = [open(f, "w") for f in logs]
    nodes = [subprocess.Popen([str(BIN / "brats-nb"), "train", *TWO, "--nproc", "1", "--nnodes", "2", "--node-rank", str(k),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test", "--out", str(two)],
                              stdout=f, stderr=subprocess.STDOUT, env=ENV) for k, f in enumerate(files)]
    codes = [p.wait(timeout=300) for p in nodes]
    for f in files: f.close()
    assert codes == [0, 0], "\n".join(f.read_text()[-2500:] for f in logs)
    # the same two ranks on one machine or on two: the same sums in the same order, so the very same weights and log
    assert same_weights(weights(one / "latest.pt"), weights(two / "latest.pt"))
    assert len(logged(one)) == 2 and logged(one) == logged(two)
    assert all(r["world"] == 2 for r in read_log(two))
    # the shared validation (one case a rank) gives what one process scoring both cases gets
    torch.set_num_threads(1)
    cfg = TrainConfig.from_file(one / "config.json")
    model, _ = load_model(one / "latest.pt")
    _, mean = evaluate_cases(model, config_cases(cfg)[1], cfg.val_protocol())
    last = read_log(one)[-1]
    assert [last[f"val_{k}"] for k in ("WT", "TC", "ET", "mean")] == [mean[f"Dice_{k}"] for k in ("WT", "TC", "ET", "mean")]


def test_sigterm_stops_after_a_step_and_resume_is_exact(tmp_path):
    args = [*SMALL, "--samples-per-case", "20", "--epochs", "2"]   # 3 training cases x 20 crops: 60 steps an epoch
    def start(out, **kw): return subprocess.Popen([str(BIN / "brats-nb"), "train", *args, "--out", str(out)],
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, **kw)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    ps, p = start(straight, text=True), start(stopped)   # the run never stopped alongside (one thread each: the same bits)
    code, out, err = stop_in_epoch_2(p, lambda: p.send_signal(signal.SIGTERM))   # early in the second epoch: as Slurm at a time limit
    assert code == 0, err[-2000:]
    ck = read_checkpoint(stopped / "latest.pt")
    assert ck["epoch"] == 0 and 1 <= ck["step"] < 60, (ck["epoch"], ck["step"])   # after epoch 1 and some steps of epoch 2
    assert len(read_log(stopped)) == 1 and "stopped (SIGTERM, in epoch 2)" in out and "done:" not in out
    assert not list(stopped.glob(".*.tmp")), "a temporary checkpoint was left behind"
    r = brats_nb("train", *args, "--out", str(stopped), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"in epoch 2 after step {ck['step']}" in r.stdout
    _, err = ps.communicate(timeout=300)
    assert ps.returncode == 0, err[-2000:]
    assert same_weights(weights(straight / "latest.pt"), weights(stopped / "latest.pt"))
    assert logged(straight) == logged(stopped)   # the stopped epoch's mean loss too


def test_a_signal_to_the_launcher_stops_every_rank_at_one_step(tmp_path):
    """SIGTERM to `brats-nb train --nproc 2` and its torchrun (as Slurm signals every process of a job step): torchrun lives
    on, the workers stop after the same step through the stop file, rank 0 writes latest.pt, every process exits with 0,
    and the resumed run ends with the weights of the run never stopped."""
    args = [*SMALL, "--samples-per-case", "10", "--batch-size", "2", "--epochs", "2", "--threads", "1", "--nproc", "2"]   # 15 steps an epoch
    def start(out, **kw): return subprocess.Popen([str(BIN / "brats-nb"), "train", *args, "--out", str(out)], stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, env=ENV, **kw)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    ps, p = start(straight, text=True), start(stopped, start_new_session=True)   # the launcher and torchrun in a process group of their own
    code, out, err = stop_in_epoch_2(p, lambda: os.killpg(p.pid, signal.SIGTERM))
    assert code == 0, out[-1500:] + err[-2500:]
    ck = read_checkpoint(stopped / "latest.pt")
    assert ck["epoch"] == 0 and 1 <= ck["step"] < 15 and ck["partial"]["world"] == 2, (ck["epoch"], ck["step"])
    assert "stopped (the stop file, in epoch 2)" in out
    r = brats_nb("train", *args, "--out", str(stopped), "--resume", timeout=300)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2500:]
    _, err = ps.communicate(timeout=300)
    assert ps.returncode == 0, err[-2000:]
    assert same_weights(weights(straight / "latest.pt"), weights(stopped / "latest.pt"))
    assert logged(straight) == logged(stopped)


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path):
    out = tmp_path / "run"
    r = brats_nb("train", *SMALL, "--batch-size", "3", "--nproc", "2", "--out", str(out))
    assert r.returncode == 2 and "batch_size 3 is the global batch" in r.stderr and "among 2 processes" in r.stderr, r.stderr
    r = brats_nb("train", *SMALL, "--batch-size", "4", "--nproc", "3", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1", "--out", str(out))
    assert r.returncode == 2 and "batch_size 4" in r.stderr and "among 6 processes" in r.stderr, r.stderr
    assert not out.exists()   # refused before torchrun started
    # started by torchrun itself, every rank refuses it
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "brats-nb"),
                        "train", *SMALL, "--batch-size", "3", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0 and "batch_size 3 is the global batch" in r.stderr + r.stdout
