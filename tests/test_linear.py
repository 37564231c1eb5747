"""ipex_lite.nn.Fp32ComputeLinear: bf16 Linear layers whose GEMMs run in fp32
(what optimize(..., dtype=bf16) gives training models on CPUs without AMX)."""
import contextlib
import copy
import io

import pytest
import torch
from torch import nn

import ipex_lite
from ipex_lite.nn import Fp32ComputeLinear
from test_frontend import train  # autocast bf16 regression steps on (N, 16) inputs

HAS_AMX = bool(ipex_lite.isa_info().get("amx_bf16"))


def pair(in_f=48, out_f=40, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias)
    lin = copy.deepcopy(ref)
    lin.__class__ = Fp32ComputeLinear
    return ref, lin


def bf16_exact(x, w, b):
    """y = x w^T + b on the bf16-rounded operands, summed in fp64."""
    r = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    y = r(x).reshape(-1, x.shape[-1]) @ r(w).t()
    if b is not None:
        y = y + r(b)
    return y.reshape(*x.shape[:-1], w.shape[0])


def assert_within_bf16_rounding(got, want):
    # fp32 sums of exact bf16 products, then one rounding to bf16: half an ulp
    # plus the (tiny) fp32 accumulation error, relative to the row's magnitude
    scale = want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert ((got.double() - want).abs() / scale).max().item() <= 2 ** -8 + 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(33, 48), (4, 7, 48)])
def test_forward_backward_under_autocast(bias, shape):
    ref, lin = pair(bias=bias)
    x = torch.randn(*shape)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        y_ref = ref(x_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and y.shape == y_ref.shape
    assert_within_bf16_rounding(y, bf16_exact(x, lin.weight, lin.bias))
    g = torch.randn_like(y, dtype=torch.float32).to(torch.bfloat16)
    y.backward(g)
    y_ref.backward(g)
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    g2 = g.double().reshape(-1, g.shape[-1])
    want_gx = (g2 @ lin.weight.detach().to(torch.bfloat16).double()).reshape(x.shape)
    want_gw = g2.t() @ x.detach().to(torch.bfloat16).double().reshape(-1, shape[-1])
    # gradients of fp32 params come out in fp32: only fp32 summation error
    torch.testing.assert_close(x.grad.double(), want_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad.double(), want_gw, rtol=1e-5, atol=1e-4)
    # the stock bf16 kernel rounds its gradients to bf16 on the way: same values within that
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=2 ** -7, atol=1e-2)
    if bias:
        torch.testing.assert_close(lin.bias.grad.double(), g2.sum(0), rtol=1e-5, atol=1e-5)


def test_bf16_weights_and_inputs_without_autocast():
    ref, lin = pair()
    lin.bfloat16()
    ref.bfloat16()
    x = torch.randn(16, 48).to(torch.bfloat16).requires_grad_()
    y = lin(x)
    assert y.dtype == torch.bfloat16
    assert_within_bf16_rounding(y, bf16_exact(x, lin.weight, lin.bias))
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    want_gw = torch.ones(16, 40, dtype=torch.float64).t() @ x.detach().double()
    assert_within_bf16_rounding(lin.weight.grad, want_gw)


def test_other_calls_are_plain_linear():
    ref, lin = pair()
    x = torch.randn(5, 48, dtype=torch.float64)
    ref.double(), lin.double()
    torch.testing.assert_close(lin(x), ref(x), rtol=0, atol=0)  # fp64: F.linear itself
    assert torch.autograd.gradcheck(lin, (x.requires_grad_(),))
    x32 = torch.randn(5, 48)
    ref.float(), lin.float()
    assert torch.equal(lin(x32), ref(x32))
    lin.bfloat16()
    with pytest.raises(RuntimeError):  # mixed dtypes outside autocast fail as they do for nn.Linear
        lin(x32)
    with pytest.raises(RuntimeError):
        lin(torch.randn(5, 47).bfloat16())


def test_state_dict_copy_and_pickle_match_nn_linear():
    ref, lin = pair()
    assert lin.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(lin.state_dict())
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is Fp32ComputeLinear and type(copy.deepcopy(lin)) is Fp32ComputeLinear
    x = torch.randn(3, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(loaded(x), lin(x))


def test_compiles():
    _, lin = pair()
    x = torch.randn(8, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = lin(x)
        got = torch.compile(lin, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-2)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop])
def test_optimize_bf16_training_picks_fp32_gemms_without_amx(opt_cls):
    # RMSprop has no fused ipex_lite step: the master-copy fallback gets the layers too
    runs = {}
    for aks in (None, False):
        base = _mlp()
        kw = dict(lr=0.01) if opt_cls is not torch.optim.SGD else dict(lr=0.05, momentum=0.9)
        with pytest.warns(UserWarning) if opt_cls is torch.optim.RMSprop else contextlib.nullcontext():
            m, o = ipex_lite.optimize(base, dtype=torch.bfloat16, optimizer=opt_cls(base.parameters(), **kw),
                                      auto_kernel_selection=aks)
        kinds = {type(mod) for mod in m.modules() if isinstance(mod, nn.Linear)}
        assert kinds == ({nn.Linear} if (aks is False or HAS_AMX) else {Fp32ComputeLinear})
        assert type(base[0]) is nn.Linear  # inplace=False leaves the user's model alone
        runs[aks] = (train(m, o, 15, seed=3), m.state_dict())
    (fast, sd_fast), (bf16, sd_bf16) = runs[None], runs[False]
    assert sd_fast.keys() == sd_bf16.keys()
    # same bf16 values into every GEMM, fp32 sums in another order: the runs stay together
    for a, b in zip(fast, bf16):
        assert abs(a - b) <= 0.02 * abs(b) + 1e-4, (fast, bf16)


def test_fp32_training_is_unchanged():
    base = _mlp()
    m, _ = ipex_lite.optimize(base, optimizer=torch.optim.SGD(base.parameters(), lr=0.1))
    assert all(type(mod) is nn.Linear for mod in m.modules() if isinstance(mod, nn.Linear))


def test_weight_widened_in_blocks_gives_the_same_results(monkeypatch):
    _, lin = pair(in_f=48, out_f=40)
    x = torch.randn(6, 48)
    outs = []
    for block in (1 << 21, 100):  # one block; then 2 rows per block, the last one short
        monkeypatch.setattr(ipex_lite.nn.linear, "_BLOCK_ELEMS", block)
        lin.zero_grad()
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(xg)
        y.float().pow(2).sum().backward()
        outs.append((y, xg.grad, lin.weight.grad.clone(), lin.bias.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _record_row_updates(monkeypatch):
    """Small row blocks, and a list of what each row_update call returned."""
    monkeypatch.setattr(ipex_lite.nn.linear, "_BLOCK_ELEMS", 100)  # 64 x 16 weight: 6 rows per block
    hook_cls = ipex_lite.optim._UpdateInBackward
    real, returned = hook_cls.row_update, []

    def spy(self, p):
        returned.append(real(self, p))
        return returned[-1]
    monkeypatch.setattr(hook_cls, "row_update", spy)
    return returned


def _fused_equals_separate(make, steps):
    """Trains ``make(fuse)`` -> (model, optimizer, weights(model, optimizer) -> dict) with the update
    separate and inside backward; asserts equal losses and bit-equal weights; returns the fused pair."""
    runs = []
    for fuse in (False, True):
        model, opt, weights = make(fuse)
        runs.append((train(model, opt, steps), weights(model, opt), model, opt))
    (loss_a, w_a, _, _), (loss_b, w_b, model, opt) = runs
    assert loss_a == loss_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    return model, opt


def _state_dict(model, opt):
    return model.state_dict()


@pytest.mark.skipif(HAS_AMX, reason="with AMX optimize keeps bf16 GEMMs (nn.Linear)")
@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
                                         (torch.optim.Adam, dict(lr=1e-2)),
                                         (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
                                         (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01))])
def test_update_in_backward_by_row_blocks_equals_separate_step(monkeypatch, opt_cls, kw):
    returned = _record_row_updates(monkeypatch)

    def make(fuse):
        base = _mlp()
        return (*ipex_lite.optimize(base, dtype=torch.bfloat16, optimizer=opt_cls(base.parameters(), **kw),
                                    fuse_update_step=fuse), _state_dict)
    fused, _ = _fused_equals_separate(make, 4)
    assert all(p.grad is None for p in fused.parameters())
    assert len(returned) == 3 * 4 and all(r is not None for r in returned)  # every weight, every step


class _SharedWeights(nn.Module):
    """One 32 x 32 weight used three times per forward: twice through `a`, once through `b`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.a, self.b, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.head(torch.relu(self.b(torch.relu(self.a(torch.relu(self.a(h)))))))


@pytest.mark.skipif(HAS_AMX, reason="with AMX optimize keeps bf16 GEMMs (nn.Linear)")
def test_a_weight_used_more_than_once_takes_its_whole_gradient(monkeypatch):
    returned = _record_row_updates(monkeypatch)

    def make(fuse):
        base = _SharedWeights()
        return (*ipex_lite.optimize(base, dtype=torch.bfloat16, fuse_update_step=fuse,
                                    optimizer=torch.optim.Adam(base.parameters(), lr=1e-2)), _state_dict)
    _fused_equals_separate(make, 3)
    # per step, backward order head, b, a, a, inp: only the shared weight's three uses decline
    assert [r is None for r in returned] == [False, True, True, True, False] * 3


@pytest.mark.skipif(HAS_AMX, reason="with AMX optimize keeps bf16 GEMMs (nn.Linear)")
def test_lamb_takes_whole_gradients_in_backward(monkeypatch):
    returned = _record_row_updates(monkeypatch)

    def make(fuse):
        m = _mlp()
        o = ipex_lite.optim.Lamb(m.parameters(), lr=1e-2)
        ipex_lite.optim.split_master_weights_(o)
        ipex_lite.frontend._fp32_compute_linears(m, None)
        if fuse:
            ipex_lite.optim.update_in_backward_(o)
        return m, o, lambda m, o: {n: ipex_lite.optim.master_weight(o, p) for n, p in m.named_parameters()}
    _fused_equals_separate(make, 3)
    assert returned and all(r is None for r in returned)  # Lamb's trust ratio needs the whole gradient
