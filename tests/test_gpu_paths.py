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
