"The network (brats_nb.model, .mie, .sie): shapes, sizes, gradients, attention, SIE identity, overfitting, CLI bench."
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brats_nb.data import BratsError, find_cases, load_case
from brats_nb.pipeline import BratsDataset
from brats_nb.mie import MIE, SCSE, mie_attention
from brats_nb.viz import attention_viewer, show_attention
from brats_nb.model import VARIANTS, build_model, conv_macs, count_parameters, reference_parameters
from brats_nb.sie import SIE

SMALL = dict(channels=8, mid_channels=16, groups=4)


@pytest.mark.parametrize("spatial_dims,shape", [(3, (2, 4, 32, 32, 16)), (2, (2, 3, 48, 32))])
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes(variant, spatial_dims, shape):
    m = build_model(variant, in_channels=shape[1], out_channels=5, spatial_dims=spatial_dims, **SMALL)
    with torch.no_grad():
        y = m(torch.randn(shape))
    assert y.shape == (shape[0], 5, *shape[2:])
    assert m.variant == variant and m.config["variant"] == variant
    assert (m.mie is not None) == (variant in ("mie", "all"))
    assert any(isinstance(x, SIE) for x in m.modules()) == (variant in ("sie", "all"))


def test_reference_parameter_counts():
    p = reference_parameters()
    assert abs(p["dmfnet"] / 3.876e6 - 1) < 0.01, p
    assert abs(p["all"] / 4.28e6 - 1) < 0.01, p
    assert p["dmfnet"] < p["mie"] < p["sie"] < p["all"]
    # a real (not meta) build agrees, with 31 SIE gates in the full model
    m = build_model("all")
    assert count_parameters(m) == p["all"]
    assert sum(isinstance(x, SIE) for x in m.modules()) == 31


def test_macs_at_128():
    macs = {v: conv_macs(build_model(v), (1, 4, 128, 128, 128)) for v in ("dmfnet", "sie")}
    assert abs(macs["dmfnet"] / 26.4e9 - 1) < 0.01, macs
    assert 0.2 < macs["sie"] / macs["dmfnet"] - 1 < 0.3


def test_config_round_trip_and_errors():
    m = build_model("sie", norm="group", **SMALL)
    cfg = json.loads(json.dumps(m.config))
    m2 = build_model(**cfg)
    assert m2.config == m.config
    m2.load_state_dict(m.state_dict())
    with pytest.raises(BratsError, match="unknown variant 'bsc'.*dmfnet, mie, sie, all"):
        build_model("bsc")
    with pytest.raises(BratsError, match="unknown norm"):
        build_model(norm="layer")
    with pytest.raises(BratsError, match="spatial_dims"):
        build_model(spatial_dims=1)
    with pytest.raises(BratsError, match="multiple of groups"):
        build_model(channels=12, mid_channels=16, groups=8)
    with pytest.raises(BratsError, match="divisible by 16"):
        m(torch.randn(1, 4, 24, 32, 32))
    with pytest.raises(BratsError, match="expected input"):
        m(torch.randn(1, 3, 32, 32, 32))
    mp = build_model("all", pad_input=True, **SMALL)
    with torch.no_grad():
        assert mp(torch.randn(1, 4, 20, 36, 17)).shape == (1, 4, 20, 36, 17)


@pytest.mark.parametrize("norm", ["batch", "group", "instance", None])
def test_norms(norm):
    m = build_model("all", norm=norm, **SMALL)
    with torch.no_grad():
        assert m(torch.randn(1, 4, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    torch.manual_seed(0)
    m = build_model(variant, **SMALL)
    F.cross_entropy(m(torch.randn(2, 4, 16, 16, 16)), torch.randint(0, 4, (2, 16, 16, 16))).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_attention_values(spatial_dims):
    m = build_model("all", spatial_dims=spatial_dims, **SMALL)
    x = torch.randn(3, 4, *([16] * spatial_dims), requires_grad=True)
    m(x).sum().backward()
    s, q = m.mie.last_channel_weights, m.mie.last_spatial_map
    assert s.shape == (3, 4) and q.shape == (3, 1, *([16] * spatial_dims))
    for a in (s, q):
        assert not a.requires_grad and a.grad_fn is None
        assert ((a > 0) & (a < 1)).all()
    # the stored map is the one that multiplied the features
    mie = m.mie.eval()
    with torch.no_grad():
        u = mie.act2(mie.norm2(mie.conv2(mie.act1(mie.norm1(mie.conv1(x))))))
        out = mie(x)
    s2 = mie.last_channel_weights.reshape(3, 4, *([1] * spatial_dims))
    torch.testing.assert_close(out, u * s2 + u * mie.last_spatial_map)


def test_sie_identity_when_gate_closed():
    for sd in (2, 3):
        sie = SIE(6, spatial_dims=sd)
        with torch.no_grad():
            sie.fuse.weight.zero_()
            sie.fuse.bias.fill_(-1e4)
            x = torch.randn(2, 6, *([12] * sd))
            assert torch.equal(sie(x), x)
            assert torch.equal(sie.gate(x), torch.zeros_like(x))
            # an open gate changes the input: the test above can fail
            sie.fuse.bias.fill_(0.0)
            assert not torch.equal(sie(x), x)


def test_sie_interleaving():
    sie = SIE(4, spatial_dims=2)
    x = torch.randn(1, 4, 9, 9)
    st = sie.stack(x)
    b = [br(x) for br in sie.branches]
    for c in range(4):
        for k in range(4):
            torch.testing.assert_close(st[:, 4 * c + k], b[k][:, c])


@pytest.fixture(scope="module")
def crop(samples):
    return BratsDataset(find_cases(samples)[:1], crop_size=32, augment=False, seed=0)[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_model_overfits_one_crop(variant, crop):
    torch.manual_seed(0)
    m = build_model(variant, **SMALL)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = crop["image"][None], crop["label"][None]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (variant, losses[0], losses[-1])


def test_attention_viewer_and_figure(samples):
    import matplotlib
    matplotlib.use("Agg")
    case = load_case(find_cases(samples)[0])
    m = build_model("all", **SMALL)
    w = attention_viewer(case, m)
    first = w.image.value
    w.controls["slice"].value = w.controls["slice"].value - 7
    assert w.image.value != first
    w.controls["modality"].value = "t2"
    assert "t2" in w.bars.value and "#d62728" in w.bars.value
    w.controls["axis"].value = "sagittal"
    assert w.controls["slice"].max == case.shape[0] - 1
    before = w.image.value
    w.controls["stretch"].value = not w.controls["stretch"].value
    assert w.image.value != before
    fig = show_attention(case, m)
    assert len(fig.axes) >= 6
    with pytest.raises(BratsError, match="has no MIE"):
        mie_attention(case, build_model("sie", **SMALL))


def test_bench_cli_smoke(capsys):
    from brats_nb.cli import main
    rc = main(["bench", "model", "--size", "32", "--repeats", "1", "--warmup", "0", "--device", "cpu",
               "--channels", "8", "--mid-channels", "16", "--groups", "4", "--variants", "mie", "sie"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [l for l in out.splitlines() if l.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["dmfnet", "mie", "sie"]
    assert rows[0].split("|")[3].strip() == "1.000"  # the reference's own ratio
    assert main(["bench", "model", "--size", "30", "--repeats", "1"]) == 2  # bad size: a clear error, exit 2
