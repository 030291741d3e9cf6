"""GPU-only paths proven on a CPU (issue 23, findings 1, 4 and 6): the SIE gate keeps the autocast dtype, a checkpoint
saved on more GPUs than are visible resumes, and amp='auto' takes bf16 only where the GPU computes it natively."""
import torch

from brats_nb.core import amp_dtype
from brats_nb.model import build_model
from brats_nb.sie import SIE
from brats_nb.trainer import _rng_state, _set_rng_state


def test_sie_keeps_the_autocast_dtype_and_float32_is_unchanged():
    torch.manual_seed(0)
    sie = SIE(8)
    x = torch.randn(1, 8, 12, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sie(x.bfloat16()).dtype == torch.bfloat16          # float32 gate parameters promoted the block to float32
    ref = x + x * torch.sigmoid(sie.fuse(sie.stack(x)))          # the unfused definition, in float32
    torch.testing.assert_close(sie(x), ref, atol=1e-5, rtol=1e-5)


def test_every_sie_block_of_the_all_network_returns_bf16_under_autocast():
    net = build_model("all", channels=8, mid_channels=16, groups=4, norm="group").eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in net.modules() if isinstance(m, SIE)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(1, 4, 32, 32, 32))
    for h in hooks: h.remove()
    assert len(seen) == 31 and set(seen) == {torch.bfloat16}, seen


def test_a_checkpoint_of_more_gpus_resumes_on_fewer(monkeypatch):
    st = _rng_state()
    st["cuda"] = [torch.ByteTensor(16).zero_() for _ in range(8)]   # saved by an 8-GPU run
    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    def set_all(states):   # torch raises IndexError for more states than devices
        if len(states) > torch.cuda.device_count(): raise IndexError("list index out of range")
        got.append(len(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    _set_rng_state(st)
    assert got == [4]


def test_auto_amp_is_fp16_where_bf16_is_only_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)   # a V100 / T4
    assert amp_dtype("cuda", "auto") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)                  # an A100 / H100
    assert amp_dtype("cuda", "auto") == torch.bfloat16
    assert amp_dtype("cuda", "bf16") == torch.bfloat16 and amp_dtype("cpu", "auto") is None


def test_a_training_step_makes_no_host_sync():
    """Issue 23, finding 10: nothing in the loss reads a device value on the host (`int(t.max())`, `bool(t.any())`,
    `float(loss)`), so a GPU step never waits. On fake tensors such a read is impossible (it raises
    DataDependentOutputException), so a whole step running under FakeTensorMode proves it on a CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from brats_nb.losses import BratsLoss
    with FakeTensorMode():
        net = build_model("all", channels=8, mid_channels=16, groups=4, norm="group")
        loss_fn = BratsLoss(bsc_weight=0.1, ce_weight=1.0)
        loss_fn.sync = False                                   # as the trainer sets it on a GPU
        x, y = torch.empty(2, 4, 32, 32, 32), torch.zeros(2, 32, 32, 32, dtype=torch.int64)
        kp = torch.zeros(2, 3, 32, 32, 32)
        loss, parts = loss_fn(net(x), y, kp)
        loss.backward()
    assert loss.shape == () and isinstance(parts["bsc"], torch.Tensor)


def test_the_bsc_mean_is_unchanged_and_zero_without_key_points():
    "The sync-free BSC mean equals the mean over the samples that have key points, and is 0 (zero gradient) without."
    from brats_nb.losses import bsc_loss
    torch.manual_seed(0)
    p = torch.rand(3, 3, 6, 6, 6, requires_grad=True)
    kp = (torch.rand(3, 3, 6, 6, 6) > 0.8).float()
    kp[1] = 0                                                  # a sample without key points
    per = [bsc_loss(p[i:i + 1], kp[i:i + 1]) for i in (0, 2)]
    assert torch.allclose(bsc_loss(p, kp), torch.stack(per).mean())
    zero = bsc_loss(p, torch.zeros_like(kp))
    zero.backward()
    assert zero.item() == 0 and p.grad.abs().sum().item() == 0


def test_the_ablation_scores_a_run_on_its_own_device(tmp_path):
    """Issue 23, finding 5: `evaluate_run` used the CPU whatever the run trained on. It now takes the run's device: a
    run configured for CUDA is evaluated on CUDA (here, with no GPU, that is refused before any file is read)."""
    import dataclasses
    import pytest
    from brats_nb.ablation import evaluate_run
    from brats_nb.core import BratsError
    from brats_nb.trainer import preset
    if torch.cuda.is_available(): pytest.skip("the check needs a machine without CUDA")
    cfg = dataclasses.replace(preset("cpu"), device="cuda")
    with pytest.raises(BratsError, match="no CUDA GPU"):
        evaluate_run(tmp_path / "no_run", cfg)


def test_tta_sends_fewer_flips_per_pass_where_the_memory_is_short():
    """Issue 23, finding 2: 8 flips of the `all` network on a whole 240x240x160 volume do not fit a 16 GB card; the
    planner picks fewer per pass (and all 8 where they fit). 12 GiB free: a 16 GB card with a little in use."""
    from brats_nb.inference import tta_flips_that_fit
    net = build_model("all")
    assert tta_flips_that_fit(net, (240, 240, 160), 12.0) < 8
    assert tta_flips_that_fit(net, (240, 240, 160), 12.0, "fp32") < tta_flips_that_fit(net, (240, 240, 160), 12.0)
    assert tta_flips_that_fit(net, (240, 240, 160), 75.0) == 8


def test_the_planner_counts_a_real_cpu_step_within_15_percent():
    """Issue 23, item 2: the planner's count of a step (fake tensors) against the resident memory of the same real step
    on the CPU (tests/bench_planner.py prints the full table: median error 5.6%). The real step runs in a fresh
    process, so that what earlier tests left in this one's heap does not hide part of its allocations."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    from brats_nb.memory import step_peak
    code = ("import json, torch\n"
            "from bench_planner import measured_peak\n"
            "from brats_nb.bench import _fix_malloc\n"
            "torch.set_num_threads(1)\n"
            "_fix_malloc()\n"
            "print(json.dumps(measured_peak('all', 1, 48)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr[-2000:]
    real = json.loads(r.stdout.split()[-1])
    est = step_peak("all", 1, 48, amp="fp32")["tensors"]
    assert abs(est - real) / real < 0.15, (est, real)


def test_the_planner_fits_a_smaller_batch_on_a_smaller_card():
    "The largest batch grows with the card, and a step of that batch fits the card while one more crop would not."
    from brats_nb.memory import card_gib, largest_batch, needed_gib, step_peak
    b16, b40 = largest_batch("all", 16), largest_batch("all", 40)
    assert 1 <= b16 < 8 <= b40                                  # the paper's batch of 8 needs more than 16 GB
    assert needed_gib(step_peak("all", b16)["total"]) <= card_gib(16) < needed_gib(step_peak("all", b16 + 1)["total"])


def _one_entry(tmp_path):
    "A training cache entry of one bundled sample (few key point candidates: fast)."
    from brats_nb.pipeline import cache_case
    from brats_nb.synth import SAMPLES_DIR
    status, entry = cache_case(SAMPLES_DIR / "Synth_000", tmp_path / "cache", t=2)
    assert status == "written"
    return entry


def test_preprocessing_opens_no_gpu_unless_asked(tmp_path, monkeypatch):
    """Issue 23, finding 9: preprocessing scored on CUDA whenever a GPU was visible (each of up to 16 worker processes
    opened a context on GPU 0). Here CUDA claims to be there (this torch has none): any use of it would fail."""
    import shutil
    from brats_nb.pipeline import cache_case, preprocess_case, prepare_training_data
    from brats_nb.synth import SAMPLES_DIR
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    d = tmp_path / "data" / "Synth_000"
    shutil.copytree(SAMPLES_DIR / "Synth_000", d)
    assert preprocess_case(d, t=2) == "written"
    assert cache_case(d, tmp_path / "cache", t=2)[0] == "written"
    before = sorted(p.name for p in d.iterdir())
    prepare_training_data([d], tmp_path / "cache2", bsc=True, keypoints=None)   # the paper preset's path: a cache
    assert sorted(p.name for p in d.iterdir()) == before                      # nothing beside the case


def test_workers_ship_the_cache_dtypes_and_key_points_only_for_bsc(tmp_path):
    """Issue 23, finding 8: crops left the workers as float32/int64/float32 (75 MB per 128³ crop, most of /dev/shm)
    and with key point maps even when BSC was off. Augmented on the device, they now travel as cached."""
    from brats_nb.pipeline import CachedDataset, augment_batch
    entry = _one_entry(tmp_path)
    compact = CachedDataset([entry], 32, keypoints=False)[0]
    assert (compact["image"].dtype, compact["label"].dtype, "keypoints" in compact) == (torch.float16, torch.uint8, False)
    with_kp = CachedDataset([entry], 32, keypoints=True)[0]
    assert with_kp["keypoints"].dtype == torch.uint8
    loader = CachedDataset([entry], 32, augment=True)[0]        # augmented in the worker: float32, as before
    assert (loader["image"].dtype, loader["label"].dtype, loader["keypoints"].dtype) == (
        torch.float32, torch.int64, torch.float32)
    wide = augment_batch({k: v[None] for k, v in with_kp.items() if k != "case"}, torch.Generator().manual_seed(0))
    assert (wide["image"].dtype, wide["label"].dtype, wide["keypoints"].dtype) == (torch.float32, torch.int64, torch.float32)
    assert torch.equal(compact["image"], with_kp["image"])      # the same crop, whatever is shipped with it


def test_a_cache_of_400_cases_trains_under_256_file_descriptors(tmp_path):
    """Issue 23, finding 7: every open memory map holds a file descriptor and the dataset kept every entry open
    (3 per case and worker: 855 for 285 cases, against a common soft limit of 1024). Now the least recently used
    entries close. 400 entries (hard links of one) are read in a process limited to 256 descriptors."""
    import os
    import subprocess
    import sys
    entry = _one_entry(tmp_path)
    for i in range(400):
        e = tmp_path / "many" / f"case{i:03d}-x"
        e.mkdir(parents=True)
        for f in entry.iterdir(): os.link(f, e / f.name)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
            "from pathlib import Path\n"
            "from brats_nb.pipeline import CachedDataset\n"
            "ds = CachedDataset(sorted(Path(sys.argv[1]).iterdir()), 16, fg_fraction=0.5)\n"
            "print(sum(int(ds[i]['label'].sum() >= 0) for i in range(len(ds))))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "many")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "400"


def test_bench_gpu_dry_run_prints_every_row_and_writes_nothing_outside(tmp_path, monkeypatch, capsys):
    """Issue 23, item 3: `brats-nb bench gpu --device cpu` at tiny sizes executes every line of the GPU check: each row
    is printed as it is measured (training, loader, fit, inference, projected), JSON lines are written as they come,
    and nothing is written outside a temporary folder (the cache goes there, not to $BRATS_NB_CACHE)."""
    import json
    from brats_nb.cli import main
    monkeypatch.setenv("BRATS_NB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rows.jsonl"
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--crop", "32", "--batch", "2", "--channels", "8",
                 "--mid-channels", "16", "--groups", "4", "--volume", "32", "32", "32", "--cards", "1", "2",
                 "--json", str(out)]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    tables = [json.loads(line)["table"] for line in out.read_text().splitlines()]
    assert tables == ["train", "train", "loader", "fit", "fit", "inference", "inference", "projected", "projected"]
    assert len([line for line in lines if ": " in line]) == len(tables)
    assert not (tmp_path / "cache").exists()


def test_train_refuses_a_batch_the_planner_says_cannot_fit():
    """Issue 23, item 2: on a GPU `train` asks the planner before building anything (`memory_verdict` with the GPU's
    free memory). The paper's batch of 8 for `all` fits 78 GiB free but not 12, and the message names a batch that
    fits, which the planner confirms."""
    import re
    from brats_nb.memory import CONTEXT_GIB, needed_gib, step_peak
    from brats_nb.trainer import memory_verdict, preset
    cfg = preset("paper", variant="all")
    assert memory_verdict(cfg, 8, 78.0) is None
    msg = memory_verdict(cfg, 8, 12.0)
    b = int(re.search(r"largest batch per GPU that fits is (\d+)", msg).group(1))
    assert 1 <= b < 8
    kw = {k: v for k, v in cfg.model_kwargs().items() if k != "variant"}
    assert needed_gib(step_peak("all", b, 128, **kw)["total"]) <= 12.0 + CONTEXT_GIB
    assert memory_verdict(cfg, b, 12.0) is None
