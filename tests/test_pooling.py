"""ipex_lite::max_pool2d (channels-last inference max pooling) and its use by optimize()."""
import itertools
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ipex_lite
from ipex_lite.nn.functional import max_pool2d
from tests.isa_levels import LEVELS, run_at_level

op = torch.ops.ipex_lite.max_pool2d

CONFIGS = [  # kernel, stride, padding, dilation, ceil_mode
    (k, s, p, d, c) for k, s, p, d, c in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (1, 2), (False, True))
    if p <= k // 2
] + [((3, 2), (2, 1), (1, 0), (1, 2), True), ((2, 3), (1, 2), (1, 1), (2, 1), False)]


def _pairs(*vals):
    return [v if isinstance(v, tuple) else (v, v) for v in vals]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,s,p,d,ceil", CONFIGS)
def test_matches_torch(k, s, p, d, ceil, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 19, 11, 9, generator=g).to(dtype)
    want = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    got = op(x, *_pairs(k, s, p, d), ceil)
    assert got.shape == want.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    assert torch.equal(op(x.contiguous(memory_format=torch.channels_last), *_pairs(k, s, p, d), ceil), want)


def test_nan_and_infinities_propagate_like_torch():
    x = torch.randn(1, 20, 6, 6)
    x[0, 3, 1, 1] = float("nan")
    x[0, 4] = float("-inf")
    x[0, 5, 2, 2] = float("inf")
    x[0, 6, 0, 0] = float("nan")
    x[0, 6, 0, 1] = float("inf")  # NaN before inf in one window: NaN wins
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        torch.testing.assert_close(op(xd, [3, 3], [2, 2], [1, 1], [1, 1], False),
                                   F.max_pool2d(xd, 3, 2, 1), equal_nan=True, atol=0, rtol=0)


def test_empty_batch_and_channels():
    assert op(torch.randn(0, 4, 8, 8), [2, 2], [2, 2], [0, 0], [1, 1], False).shape == (0, 4, 4, 4)
    assert op(torch.randn(2, 0, 8, 8), [2, 2], [2, 2], [0, 0], [1, 1], False).shape == (2, 0, 4, 4)


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 7, 8).to(dtype)
        torch.library.opcheck(op, (x, [3, 3], [2, 2], [1, 1], [1, 1], True))
        torch.library.opcheck(op, (x, [2, 3], [1, 2], [0, 1], [2, 1], False))


@pytest.mark.parametrize("args,message", [
    (lambda x: (x.double(), [2, 2], [2, 2], [0, 0], [1, 1], False), "float32 or bfloat16"),
    (lambda x: (x[0], [2, 2], [2, 2], [0, 0], [1, 1], False), "must be 4-D"),
    (lambda x: (x, [0, 2], [2, 2], [0, 0], [1, 1], False), "must be positive"),
    (lambda x: (x, [2, 2], [2, -1], [0, 0], [1, 1], False), "must be positive"),
    (lambda x: (x, [2, 2], [2, 2], [0, 0], [0, 1], False), "must be positive"),
    (lambda x: (x, [2, 2], [2, 2], [2, 0], [1, 1], False), "at most half the kernel"),
    (lambda x: (x, [2, 2], [2, 2], [-1, 0], [1, 1], False), "non-negative"),
    (lambda x: (x, [9, 9], [1, 1], [0, 0], [1, 1], False), "too small"),
    (lambda x: (x, [2], [2, 2], [0, 0], [1, 1], False), "2 values"),
    (lambda x: (x.to_sparse(), [2, 2], [2, 2], [0, 0], [1, 1], False), "dense CPU"),
])
def test_bad_inputs_raise(args, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        op(*args(torch.randn(1, 3, 6, 6)))


def test_gradient_through_the_op_raises():
    y = op(torch.randn(1, 3, 6, 6, requires_grad=True), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


def test_python_face_falls_back_to_torch():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
    assert torch.equal(max_pool2d(x, 2), F.max_pool2d(x, 2))  # stride defaults to the kernel
    xg = x.clone().requires_grad_()
    max_pool2d(xg, 2).sum().backward()  # training: torch's kernel, with gradients
    assert xg.grad is not None and xg.grad.shape == x.shape
    out, idx = max_pool2d(x, 2, return_indices=True)
    assert torch.equal(idx, F.max_pool2d(x, 2, return_indices=True)[1])
    assert torch.equal(max_pool2d(x[0], 2), F.max_pool2d(x[0], 2))  # 3-D input
    assert torch.equal(max_pool2d(x.double(), 2), F.max_pool2d(x.double(), 2))
    with pytest.raises(RuntimeError):  # torch's own error for torch's own bad input
        max_pool2d(x, 2, padding=2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return F.max_pool2d(self.pool(F.relu(self.conv(x))), 2, ceil_mode=True)


def test_optimize_pools_through_the_kernel():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 17, 15)
    opt = ipex_lite.optimize(model)
    assert type(opt.pool).__name__ == "InferenceMaxPool2d" and isinstance(opt.pool, nn.MaxPool2d)
    text = ipex_lite.explain(opt)
    assert "MaxPool2d -> ipex_lite kernel" in text and "F.max_pool2d call(s)" in text, text
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(opt(x), want, rtol=1e-5, atol=1e-5)
        traced = torch.jit.freeze(torch.jit.trace(opt, x))
        assert str(traced.graph).count("ipex_lite::max_pool2d") == 2
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
    assert type(ipex_lite.optimize(model, level="O0").pool) is nn.MaxPool2d


_LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch, torch.nn.functional as F, ipex_lite
    results = {"level": ipex_lite.cpu_capability(), "equal": {}}
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 21, 13, 10, generator=g).to(dtype)
        for k, s, p, d, c in ((3, 2, 1, 1, False), (2, 1, 1, 2, True), (3, 3, 0, 1, True)):
            got = torch.ops.ipex_lite.max_pool2d(x, [k, k], [s, s], [p, p], [d, d], c)
            results["equal"][f"{dtype}-{k}-{s}-{p}-{d}-{c}"] = torch.equal(got, F.max_pool2d(x, k, s, p, d, ceil_mode=c))
    print(json.dumps(results))
""")


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level_matches_torch(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    assert all(res["equal"].values()), res
