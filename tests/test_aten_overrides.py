"""Opt-in ATen overrides (ipex_lite.enable_aten_overrides).

The override of aten::_embedding_bag_backward is checked against ATen's own
kernel (the same process with the override off) and, for bf16, against an
fp32 reference: ours accumulates in fp32 and rounds once, so each gradient
element is within half a bf16 ulp (2^-9 relative) of the fp32 result;
ATen's bf16 kernel accumulates in bf16 and is only compared for shape.
"""
import copy
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import ipex_lite
from isa_levels import run_at_every_level

OP = "_embedding_bag_backward"
ATEN_OP = torch.ops.aten._embedding_bag_backward.default


@pytest.fixture(autouse=True)
def overrides_off():
    ipex_lite.disable_aten_overrides()
    yield
    ipex_lite.disable_aten_overrides()


def weight_grad(weight, indices, offsets, grad_out, on, **kw):
    (ipex_lite.enable_aten_overrides if on else ipex_lite.disable_aten_overrides)([OP])
    w = weight.detach().clone().requires_grad_()
    F.embedding_bag(indices, w, offsets, **kw).backward(grad_out)
    return w.grad


def bags(rows=50, batch=12, max_len=6, idx_dtype=torch.int64, empty=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0 if empty else 1, max_len + 1, (batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
    indices = torch.randint(0, rows, (int(lens.sum()),), generator=g)
    return indices.to(idx_dtype), offsets.to(idx_dtype)


def test_nothing_is_registered_until_asked():
    code = ("import torch, ipex_lite; d = torch._C._dispatch_dump('aten::_embedding_bag_backward');"
            "print(ipex_lite.enabled_aten_overrides(), 'aten_overrides' in d)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


def test_enable_disable_restore_stock_exactly():
    before = torch._C._dispatch_dump("aten::_embedding_bag_backward")
    assert ipex_lite.available_aten_overrides() == [OP]
    assert ipex_lite.enable_aten_overrides() == [OP]
    assert ipex_lite.enable_aten_overrides(["aten::" + OP]) == []  # already on; prefix accepted
    assert ipex_lite.enabled_aten_overrides() == [OP]
    assert "aten_overrides.cpp" in torch._C._dispatch_dump("aten::_embedding_bag_backward")
    assert ipex_lite.disable_aten_overrides(OP) == [OP]
    assert ipex_lite.disable_aten_overrides() == []
    assert torch._C._dispatch_dump("aten::_embedding_bag_backward") == before


def test_context_manager_nests_and_keeps_outer_state():
    with ipex_lite.aten_overrides() as added:
        assert added == [OP]
        with ipex_lite.aten_overrides([OP]) as inner:
            assert inner == []
        assert ipex_lite.enabled_aten_overrides() == [OP]  # the inner block did not turn it off
    assert ipex_lite.enabled_aten_overrides() == []
    ipex_lite.enable_aten_overrides()
    with ipex_lite.aten_overrides():
        pass
    assert ipex_lite.enabled_aten_overrides() == [OP]  # enabled outside, stays on


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="embedding_dense"):
        ipex_lite.enable_aten_overrides(["embedding_dense"])
    with pytest.raises(ValueError, match="add"):
        with ipex_lite.aten_overrides(["aten::add"]):
            pass
    assert ipex_lite.enabled_aten_overrides() == []


def test_no_warnings_when_enabling(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ipex_lite.enable_aten_overrides()
        ipex_lite.disable_aten_overrides()
        ipex_lite.enable_aten_overrides()
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("include_last", [False, True])
def test_fp32_matches_stock(mode, idx_dtype, include_last):
    weight = torch.randn(50, 7)
    indices, offsets = bags(idx_dtype=idx_dtype)
    if include_last:
        offsets = torch.cat([offsets, torch.tensor([indices.numel()], dtype=idx_dtype)])
    grad_out = torch.randn(12, 7)
    kw = dict(mode=mode, include_last_offset=include_last)
    want = weight_grad(weight, indices, offsets, grad_out, False, **kw)
    got = weight_grad(weight, indices, offsets, grad_out, True, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bf16_within_half_ulp_of_fp32(mode):
    weight = torch.randn(40, 33).bfloat16()
    indices, offsets = bags(rows=40, batch=64, max_len=30)
    grad_out = torch.randn(64, 33).bfloat16()
    ref = weight_grad(weight.float(), indices, offsets, grad_out.float(), False, mode=mode)
    got = weight_grad(weight, indices, offsets, grad_out, True, mode=mode)
    stock = weight_grad(weight, indices, offsets, grad_out, False, mode=mode)
    assert got.dtype == stock.dtype == torch.bfloat16 and got.shape == stock.shape
    torch.testing.assert_close(got.float(), ref, rtol=2.0 ** -8, atol=1e-6)


def test_per_sample_weights_padding_idx_and_2d_input():
    weight = torch.randn(30, 8)
    indices, offsets = bags(rows=30)
    indices[::3] = 4
    psw = torch.randn(indices.numel())
    grad_out = torch.randn(12, 8)
    for kw in (dict(mode="sum", per_sample_weights=psw), dict(mode="sum", padding_idx=4),
               dict(mode="sum", per_sample_weights=psw, padding_idx=4)):
        want = weight_grad(weight, indices, offsets, grad_out, False, **kw)
        got = weight_grad(weight, indices, offsets, grad_out, True, **kw)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if "padding_idx" in kw:
            assert torch.count_nonzero(got[4]) == 0
    two_d = torch.randint(0, 30, (6, 5))
    want = weight_grad(weight, two_d, None, torch.ones(6, 8), False, mode="mean")
    got = weight_grad(weight, two_d, None, torch.ones(6, 8), True, mode="mean")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["sparse", "max", "freq", "mean_padding", "float64", "float16"])
def test_arguments_it_does_not_handle_go_to_aten(case):
    dtype = {"float64": torch.float64, "float16": torch.float16}.get(case, torch.float32)
    weight = torch.randn(30, 8, dtype=dtype)
    indices, offsets = bags(rows=30, empty=False)
    indices[::4] = 2
    grad_out = torch.randn(12, 8, dtype=dtype)
    kw = {"sparse": dict(sparse=True), "max": dict(mode="max"), "freq": dict(scale_grad_by_freq=True),
          "mean_padding": dict(mode="mean", padding_idx=2)}.get(case, {})
    want = weight_grad(weight, indices, offsets, grad_out, False, **kw)
    got = weight_grad(weight, indices, offsets, grad_out, True, **kw)
    if want.is_sparse:
        want, got = want.to_dense(), got.to_dense()
    assert torch.equal(got, want)


def test_empty_batch_and_empty_bags():
    weight = torch.randn(10, 4)
    got = weight_grad(weight, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                      torch.empty(0, 4), True)
    assert got.shape == (10, 4) and torch.count_nonzero(got) == 0
    got = weight_grad(weight, torch.tensor([1, 1]), torch.tensor([0, 0, 2, 2]), torch.ones(4, 4), True,
                      mode="sum")
    assert torch.equal(got[1], torch.full((4,), 2.0)) and torch.count_nonzero(got) == 4


def call_direct(indices, offsets, grad, num_weights=20, psw=None, mode=0):
    return ATEN_OP(grad, indices, offsets, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                   torch.empty(0, dtype=torch.long), num_weights, False, mode, False, psw)


def test_bad_input_raises_a_clear_error():
    ipex_lite.enable_aten_overrides()
    grad = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"indices\[0\]\[1\] = 20 is out of range"):
        call_direct(torch.tensor([1, 20, 3]), torch.tensor([0, 1, 2]), grad)
    with pytest.raises(RuntimeError, match="indices.*-1 is out of range"):
        call_direct(torch.tensor([1, -1, 3]), torch.tensor([0, 1, 2]), grad)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        call_direct(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]), grad)
    with pytest.raises(RuntimeError, match=r"offsets\[0\]\[0\] must be 0"):
        call_direct(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]), grad)
    with pytest.raises(RuntimeError, match="past the"):
        call_direct(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 5]), grad)
    with pytest.raises(RuntimeError, match="per_sample_weights"):
        call_direct(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), grad, psw=torch.ones(2))


def test_deterministic_and_thread_safe():
    weight = torch.randn(1000, 64).bfloat16()
    indices, offsets = bags(rows=1000, batch=256, max_len=40)
    grad_out = torch.randn(256, 64).bfloat16()
    want = weight_grad(weight, indices, offsets, grad_out, True)
    results = [None] * 4

    def work(i):
        results[i] = [weight_grad(weight, indices, offsets, grad_out, True) for _ in range(3)]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, want) for r in results for g in r)


def test_opcheck():
    ipex_lite.enable_aten_overrides()
    indices, offsets = bags(rows=20)
    args = (torch.randn(12, 5), indices, offsets, torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 20, False, 0, False, None)
    torch.library.opcheck(ATEN_OP, args)


_LEVEL_SCRIPT = """
import json, torch, ipex_lite, torch.nn.functional as F
torch.manual_seed(0)
ipex_lite.enable_aten_overrides()
w = torch.randn(300, 40, requires_grad=True)
idx = torch.randint(0, 300, (900,)); off = torch.arange(0, 900, 9)
F.embedding_bag(idx, w, off, mode="mean").backward(torch.randn(100, 40))
print(json.dumps({"level": ipex_lite.cpu_capability(), "g": w.grad.double().abs().sum().item()}))
"""


def test_every_isa_level_agrees():
    results = run_at_every_level(_LEVEL_SCRIPT)
    for r in results[1:]:
        assert abs(r["g"] - results[0]["g"]) <= 1e-5 * results[0]["g"], (r, results[0])


def test_stock_model_trains_the_same():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(200, 16, mode="sum"), torch.nn.Linear(16, 1))
    indices, offsets = bags(rows=200, batch=32, max_len=8)
    snapshots = []
    for on in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        (ipex_lite.enable_aten_overrides if on else ipex_lite.disable_aten_overrides)()
        for _ in range(5):
            opt.zero_grad()
            m[1](m[0](indices, offsets)).square().mean().backward()
            opt.step()
        snapshots.append(m[0].weight.detach().clone())
    torch.testing.assert_close(snapshots[1], snapshots[0], rtol=1e-6, atol=1e-6)
