"""ipex_lite interaction: parity with the DLRM bmm + tril reference, autograd,
opcheck, autocast, torch.compile, every ISA level, and bad inputs."""
import textwrap

import pytest
import torch

from ipex_lite.nn.functional import interaction
from isa_levels import LEVELS, run_at_level

ops = torch.ops.ipex_lite


def reference(xs):
    """DLRM's interact_features('dot'), computed in float64."""
    n = len(xs)
    t = torch.stack([x.double() for x in xs], dim=1)
    z = torch.bmm(t, t.transpose(1, 2))
    li, lj = torch.tril_indices(n, n, offset=-1)
    return torch.cat([xs[0].double(), z[:, li, lj]], dim=1)


def make_inputs(n, batch, dim, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(n)]


# bf16: inputs are exact bf16 values, products are exact in fp32 and sums are
# accumulated in fp32, so the only large error is the final rounding to bf16
# (relative 2^-8); allow 2^-7 of the magnitude plus a small absolute term.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-12, atol=1e-10),
       torch.bfloat16: dict(rtol=8e-3, atol=2e-2)}

SHAPES = [(1, 4, 8), (2, 3, 1), (5, 7, 17), (8, 9, 33), (27, 16, 128), (13, 5, 130), (27, 3, 64), (4, 2, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,batch,dim", SHAPES)
def test_forward_matches_reference(n, batch, dim, dtype):
    xs = make_inputs(n, batch, dim, dtype)
    out = interaction(*xs)
    assert out.dtype == dtype and out.shape == (batch, dim + n * (n - 1) // 2)
    torch.testing.assert_close(out.double(), reference(xs), **TOL[dtype])
    # the dense part is copied exactly
    assert torch.equal(out[:, :dim], xs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,batch,dim", SHAPES)
def test_backward_matches_reference(n, batch, dim, dtype):
    xs = make_inputs(n, batch, dim, dtype, requires_grad=True)
    out = interaction(xs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, xs, grad)
    ref_xs = [x.detach().double().requires_grad_(True) for x in xs]
    want = torch.autograd.grad(reference(ref_xs), ref_xs, grad.double())
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol["atol"] = 5e-2 * max(1.0, (n ** 0.5))  # N-term sums rounded once to bf16
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), w, **tol)


def test_gradcheck_double():
    xs = make_inputs(4, 3, 5, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: interaction(*t), xs)
    xs = make_inputs(7, 2, 19, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: interaction(*t), xs)


def test_list_and_varargs_agree():
    xs = make_inputs(3, 4, 8, torch.float32)
    assert torch.equal(interaction(xs), interaction(*xs))
    assert torch.equal(interaction(tuple(xs)), ops.interaction_forward(xs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    xs = make_inputs(5, 6, 20, dtype, requires_grad=dtype != torch.bfloat16)
    torch.library.opcheck(ops.interaction_forward, (xs,))
    grad = torch.randn(6, 20 + 10).to(dtype)
    plain = [x.detach() for x in xs]
    torch.library.opcheck(ops.interaction_backward, (grad, plain))
    torch.library.opcheck(ops.interaction_backward_stacked, (grad, plain))


def test_backward_ops_agree():
    # the list op (separate tensors) and the stacked one autograd uses
    xs = make_inputs(4, 7, 16, torch.float32)
    grad = torch.randn(7, 16 + 6)
    grads = ops.interaction_backward(grad, xs)
    stacked = ops.interaction_backward_stacked(grad, xs)
    assert stacked.shape == (4, 7, 16)
    for g, s in zip(grads, stacked):
        assert torch.equal(g, s)
    assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)


def test_non_contiguous_inputs():
    base = torch.randn(6, 40, 3)
    xs = [base[:, i * 8:(i + 1) * 8, 0] for i in range(5)]  # strided along D
    assert not xs[0].is_contiguous()
    wide = torch.randn(6, 64)
    xs += [wide[:, 10:26], wide.t().contiguous().t()[:, :8]]  # row stride 64; column-major
    xs = [x[:, :8] for x in xs]
    xs.append(torch.randn(1, 8).expand(6, 8))  # broadcast row (stride 0)
    out = interaction(*xs)
    torch.testing.assert_close(out.double(), reference(xs), **TOL[torch.float32])
    xs_g = [x.clone().requires_grad_(True) for x in xs]
    views = [x[:, :] for x in xs_g]
    out = interaction(*views)
    grad = torch.randn_like(out)[:, :].t().contiguous().t()  # non-contiguous grad_out
    got = torch.autograd.grad(out, xs_g, grad)
    ref_xs = [x.detach().double().requires_grad_(True) for x in xs]
    want = torch.autograd.grad(reference(ref_xs), ref_xs, grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-4)


def test_autocast_runs_in_bf16():
    xs = make_inputs(4, 5, 16, torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = interaction(*xs)
    assert out.dtype == torch.bfloat16
    want = interaction(*[x.detach().bfloat16() for x in xs])
    assert torch.equal(out, want)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in xs)
    # mixed fp32 / bf16 inputs are cast to the autocast dtype
    mixed = [xs[0].detach(), xs[1].detach().bfloat16(), xs[2].detach(), xs[3].detach()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert interaction(*mixed).dtype == torch.bfloat16


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(a, b, c):
        return torch.relu(interaction(a, b, c)).sum(dim=1)

    xs = make_inputs(3, 8, 16, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*xs), f(*xs))
    xs_g = make_inputs(3, 8, 16, torch.float32, requires_grad=True)
    compiled(*xs_g).sum().backward()
    got = [x.grad.clone() for x in xs_g]
    for x in xs_g:
        x.grad = None
    f(*xs_g).sum().backward()
    for g, x in zip(got, xs_g):
        torch.testing.assert_close(g, x.grad)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        xs = [torch.empty(10, 12) for _ in range(6)]
        out = ops.interaction_forward(xs)
        assert out.shape == (10, 12 + 15)
        grads = ops.interaction_backward(torch.empty(10, 27), xs)
        assert [tuple(g.shape) for g in grads] == [(10, 12)] * 6
        assert ops.interaction_backward_stacked(torch.empty(10, 27), xs).shape == (6, 10, 12)


BAD = [
    ([], "at least one tensor"),
    ([torch.randn(4)], "must be 2-D"),
    ([torch.randn(2, 3, 4)], "must be 2-D"),
    ([torch.randn(4, 8), torch.randn(5, 8)], "batch size"),
    ([torch.randn(4, 8), torch.randn(4, 9)], "dim"),
    ([torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64)], "dtype"),
    ([torch.randint(0, 5, (4, 8))], "dtype"),
    ([torch.randn(4, 8).half()], "dtype"),
    ([torch.randn(4, 8).to_sparse()], "dense"),
]


@pytest.mark.parametrize("inputs,message", BAD)
def test_bad_inputs_raise(inputs, message):
    with pytest.raises(RuntimeError, match=message):
        ops.interaction_forward(inputs)


def test_bad_inputs_python_face():
    with pytest.raises(TypeError, match="argument 1"):
        interaction(torch.randn(2, 3), "not a tensor")
    with pytest.raises(RuntimeError, match="inputs\\[1\\].*batch size"):
        interaction(torch.randn(2, 3), torch.randn(3, 3))


def test_bad_backward_inputs_raise():
    xs = make_inputs(3, 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.interaction_backward(torch.randn(4, 10), xs)
    with pytest.raises(RuntimeError, match="grad_out has dtype"):
        ops.interaction_backward(torch.randn(4, 11, dtype=torch.float64), xs)
    with pytest.raises(RuntimeError, match="grad_out must be a dense"):
        ops.interaction_backward(torch.randn(4, 11).to_sparse(), xs)
    with pytest.raises(RuntimeError, match="interaction_backward_stacked: grad_out must have shape"):
        ops.interaction_backward_stacked(torch.randn(4, 10), xs)


def test_meta_device_rejected_by_cpu_kernel():
    with pytest.raises((RuntimeError, NotImplementedError)):
        ops.interaction_forward([torch.randn(2, 3), torch.randn(2, 3, device="meta")])


def test_large_values_and_nonfinite_propagate():
    xs = [torch.full((2, 4), 1e20), torch.full((2, 4), 1e20), torch.tensor([[float("nan")] * 4] * 2)]
    out = interaction(*xs)
    assert torch.isinf(out[:, 4]).all()  # (1, 0) overflows to inf, as in the reference
    assert torch.isnan(out[:, 5:]).all()


_LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch, ipex_lite
    from ipex_lite.nn.functional import interaction
    results = {"level": ipex_lite.cpu_capability(), "errors": {}}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for n, b, d in ((27, 37, 128), (6, 5, 21), (3, 4, 1), (9, 3, 40)):
            g = torch.Generator().manual_seed(n * 100 + d)
            xs = [torch.randn(b, d, generator=g).to(dtype).requires_grad_() for _ in range(n)]
            out = interaction(*xs)
            t = torch.stack([x.detach().double() for x in xs], 1)
            z = torch.bmm(t, t.transpose(1, 2))
            li, lj = torch.tril_indices(n, n, offset=-1)
            ref = torch.cat([xs[0].detach().double(), z[:, li, lj]], 1)
            grad = torch.randn(out.shape, generator=g).to(dtype)
            grads = torch.autograd.grad(out, xs, grad)
            s = torch.zeros(b, n, n, dtype=torch.float64)
            s[:, li, lj] = grad[:, d:].double()
            s = s + s.transpose(1, 2)
            gref = torch.bmm(s, t)
            gref[:, 0] += grad[:, :d].double()
            scale = max(1.0, ref.abs().max().item())
            ferr = (out.double() - ref).abs().max().item() / scale
            gscale = max(1.0, gref.abs().max().item())
            berr = max((gi.double() - gref[:, i]).abs().max().item() for i, gi in enumerate(grads)) / gscale
            results["errors"][f"{dtype}-{n}-{b}-{d}"] = [ferr, berr]
    print(json.dumps(results))
""")


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level_matches_reference(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    for key, (ferr, berr) in res["errors"].items():
        limit = 1e-2 if "bfloat16" in key else 1e-5
        assert ferr < limit and berr < limit, (key, ferr, berr)


def test_double_backward_raises_instead_of_silent_zero():
    xs = make_inputs(3, 2, 4, torch.float64, requires_grad=True)
    out = interaction(*xs)
    grads = torch.autograd.grad(out.pow(2).sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum(g.sum() for g in grads), xs)


def test_concurrent_callers_match_sequential():
    from concurrent.futures import ThreadPoolExecutor
    inputs = [make_inputs(6, 33, 40, torch.float32, seed=s) for s in range(8)]
    want = [interaction(*xs) for xs in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda xs: interaction(*xs), inputs * 3))
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % len(inputs)])
