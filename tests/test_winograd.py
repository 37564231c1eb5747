"""ipex_lite::winograd_conv2d (Winograd F(2x2, 3x3) convolution) and the
PackedConv / optimize(conv_winograd=...) path that uses it."""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ipex_lite
from ipex_lite.nn.prepacked import PackedConv, winograd_weight
from tests.isa_levels import LEVELS, run_at_level

op = torch.ops.ipex_lite.winograd_conv2d


def reference(x, w, b, padding, relu):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=padding)
    return y.relu() if relu else y


def check(y, want):
    assert y.shape == want.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    scale = want.abs().max().item() + 1e-6
    torch.testing.assert_close(y.double(), want, atol=2e-6 * scale, rtol=0)


CASES = [  # n, c, k, h, w, padding
    (1, 3, 5, 5, 7, (1, 1)), (2, 16, 32, 9, 8, (1, 1)), (2, 20, 40, 6, 6, (0, 0)), (1, 64, 64, 56, 56, (1, 1)),
    (3, 17, 100, 7, 7, (1, 1)), (1, 8, 130, 3, 3, (2, 1)), (2, 512, 64, 7, 7, (1, 1)), (1, 24, 16, 4, 11, (0, 2)),
]


@pytest.mark.parametrize("n,c,k,h,w,padding", CASES)
@pytest.mark.parametrize("bias,relu", [(True, False), (False, True)])
def test_matches_conv2d(n, c, k, h, w, padding, bias, relu):
    g = torch.Generator().manual_seed(c * 31 + k)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g)
    b = torch.randn(k, generator=g) if bias else None
    y = op(x, winograd_weight(weight), b, list(padding), k, "relu" if relu else "none")
    check(y, reference(x, weight, b, padding, relu))
    y_cl = op(x.contiguous(memory_format=torch.channels_last), winograd_weight(weight), b, list(padding), k,
              "relu" if relu else "none")
    assert torch.equal(y, y_cl)


def test_weight_transform_layout():
    w = torch.randn(70, 5, 3, 3, dtype=torch.float64)
    u = winograd_weight(w)
    assert u.shape == (16, 2, 5, 64) and u.dtype == torch.float32
    g = torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=torch.float64)
    for k, c in ((0, 0), (63, 4), (64, 2), (69, 1)):
        want = g @ w[k, c] @ g.T
        got = u[:, k // 64, c, k % 64].view(4, 4).double()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert bool((u[:, 1, :, 6:] == 0).all())  # the last panel's padding


def test_empty_and_degenerate_shapes():
    weight = torch.randn(32, 16, 3, 3)
    w = winograd_weight(weight)
    assert op(torch.randn(0, 16, 8, 8), w, None, [1, 1], 32, "none").shape == (0, 32, 8, 8)
    for h, wd in ((1, 1), (1, 5), (2, 2)):  # one output row / column: half-used tiles
        x = torch.randn(1, 16, h, wd)
        check(op(x, w, None, [1, 1], 32, "none"), reference(x, weight, None, (1, 1), False))


def test_no_input_channels_gives_the_bias():
    x, b = torch.randn(2, 0, 5, 4), torch.randn(70)
    u = torch.zeros(16, 2, 0, 64)
    for attr in ("none", "relu"):
        y = op(x, u, b, [1, 1], 70, attr)
        want = b.view(1, 70, 1, 1).expand(2, 70, 5, 4)
        assert torch.equal(y, want.relu() if attr == "relu" else want)
    assert bool((op(x, u, None, [1, 1], 70, "relu") == 0).all())


def test_opcheck():
    x = torch.randn(2, 16, 6, 5)
    u = winograd_weight(torch.randn(20, 16, 3, 3))
    torch.library.opcheck(op, (x, u, torch.randn(20), [1, 1], 20, "relu"))
    torch.library.opcheck(op, (x, u, None, [0, 0], 20, "none"))


def _args():
    return torch.randn(1, 16, 6, 6), winograd_weight(torch.randn(32, 16, 3, 3)), torch.randn(32)


@pytest.mark.parametrize("mutate,message", [
    (lambda x, u, b: (x.double(), u, b, [1, 1], 32, "none"), "must be float32"),
    (lambda x, u, b: (x[0], u, b, [1, 1], 32, "none"), "must be 4-D"),
    (lambda x, u, b: (x, u[:, :, :8], b, [1, 1], 32, "none"), "Winograd transform"),
    (lambda x, u, b: (x, u, b, [1, 1], 100, "none"), "Winograd transform"),
    (lambda x, u, b: (x, u, b, [1, 1], 0, "none"), "out_channels must be positive"),
    (lambda x, u, b: (x, u, b, [-1, 1], 32, "none"), "non-negative"),
    (lambda x, u, b: (x[..., :1, :1], u, b, [0, 0], 32, "none"), "smaller than the 3x3 kernel"),
    (lambda x, u, b: (x, u, b, [1, 1], 32, "gelu"), "attr must be"),
    (lambda x, u, b: (x, u, b[:5], [1, 1], 32, "none"), "bias must be"),
    (lambda x, u, b: (x, u, b.double(), [1, 1], 32, "none"), "bias must be"),
    (lambda x, u, b: (x.to("meta"), u, b, [1, 1], 32, "none"), "is on"),
    (lambda x, u, b: (x, u.to("meta"), b, [1, 1], 32, "none"), "is on"),
])
def test_bad_inputs_raise(mutate, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        op(*mutate(*_args()))


def test_gradient_through_the_op_raises():
    x, u, b = _args()
    y = op(x.requires_grad_(), u, b, [1, 1], 32, "none")
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


_LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch, torch.nn.functional as F, ipex_lite
    from ipex_lite.nn.prepacked import winograd_weight
    results = {"level": ipex_lite.cpu_capability(), "errors": {}}
    for n, c, k, h, w, p in ((2, 19, 70, 9, 7, 1), (1, 64, 64, 14, 14, 1), (1, 16, 16, 5, 6, 0)):
        g = torch.Generator().manual_seed(c + k)
        x, wt, b = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g), torch.randn(k, generator=g)
        y = torch.ops.ipex_lite.winograd_conv2d(x, winograd_weight(wt), b, [p, p], k, "relu")
        want = F.conv2d(x.double(), wt.double(), b.double(), padding=p).relu()
        results["errors"][f"{c}-{k}-{h}"] = ((y.double() - want).abs().max() / want.abs().max()).item()
    print(json.dumps(results))
""")


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level_matches_reference(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    for key, err in res["errors"].items():
        assert err < 2e-6, (key, err)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)  # 3 input channels: oneDNN
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.body = nn.Conv2d(32, 48, 3, padding=1, bias=False)  # no activation
        self.down = nn.Conv2d(48, 48, 3, stride=2, padding=1)  # stride 2: oneDNN
        self.res = nn.Conv2d(48, 48, 3, padding=1)  # residual add: oneDNN

    def forward(self, x):
        x = F.relu(self.bn(self.mid(self.stem(x))))
        x = self.down(self.body(x))
        return F.relu(self.res(x) + x)


def _convnet():
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 15, 13)


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_optimize_uses_winograd_where_eligible():
    model, x = _convnet()
    opt = ipex_lite.optimize(model)
    chosen = {n for n, m in opt.named_modules() if isinstance(m, PackedConv) and m.winograd}
    assert chosen == {"mid", "body"}, ipex_lite.explain(opt)
    assert opt.mid.bn is not None and opt.mid.unary == "relu"  # folded BatchNorm and fused ReLU kept
    assert opt.res.binary and not opt.res.inplace_add  # res(x) + x: the sum must not overwrite x
    assert "winograd" in ipex_lite.explain(opt) and "winograd=True" in repr(opt.mid)
    with torch.no_grad():
        want = model(x)
        _assert_close(opt(x), want)
        _assert_close(opt(x), want)  # cached transformed weights
        traced = torch.jit.freeze(torch.jit.trace(opt, x))
        assert str(traced.graph).count("ipex_lite::winograd_conv2d") == 2
        _assert_close(traced(x), want)
        # the frozen graph holds the transformed filters as constants: no per-call filter transform
        kinds = [n.kind() for n in traced.graph.nodes()]
        for op in ("aten::einsum", "aten::pad", "aten::permute", "aten::mul", "aten::rsqrt", "aten::reshape"):
            assert op not in kinds, (op, traced.graph)
        # what is left per layer: the input's dtype/layout (no-ops on channels_last fp32) and the op
        assert set(kinds) <= {"prim::Constant", "prim::ListConstruct", "aten::to", "aten::contiguous",
                              "ipex_lite::winograd_conv2d", "ipex_lite::packed_conv", "ipex_lite::packed_conv_add"}, kinds
    off = ipex_lite.optimize(model, conv_winograd=False)
    assert not any(getattr(m, "winograd", False) for m in off.modules())
    assert not any(getattr(m, "winograd", False) for m in ipex_lite.optimize(model, weights_prepack=False).modules())


def test_weights_edited_or_reloaded_are_transformed_again():
    model, x = _convnet()
    opt = ipex_lite.optimize(model)
    with torch.no_grad():
        opt(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["body.weight"] = torch.randn_like(state["body.weight"])
        model.load_state_dict(state)
        opt.load_state_dict(state)
        _assert_close(opt(x), model(x))
        opt.mid.weight.mul_(0.5)
        model.mid.weight.mul_(0.5)
        _assert_close(opt(x), model(x))


def test_winograd_only_for_fp32_compute_and_inference():
    model, x = _convnet()
    bf16 = ipex_lite.optimize(model, dtype=torch.bfloat16)
    with torch.no_grad():
        y = bf16(x.bfloat16())
    assert y.dtype == torch.bfloat16  # bf16 layers keep oneDNN's bf16 convolution
    opt = ipex_lite.optimize(model)
    xg = x.clone().requires_grad_()
    opt(xg).sum().backward()  # gradients: the reference path
    assert xg.grad is not None
    with pytest.raises(ValueError, match="3x3, stride-1"):
        opt.down.use_winograd(True)
    opt.mid.use_winograd(False)
    with torch.no_grad():
        _assert_close(opt(x), model(x))
