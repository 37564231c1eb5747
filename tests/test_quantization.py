"""INT8 post-training quantization: the quantize/dequantize ops, per-layer
parity within the quantization error bound, uint8 chaining, qconf summaries,
save/load in a fresh process (torch.save and TorchScript), model size, and
top-1 accuracy on real data (scikit-learn's digits) within 1 point of fp32."""
import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ipex_lite
from ipex_lite import quantization as q
from isa_levels import LEVELS, run_at_level

ops = torch.ops.ipex_lite


def ref_quantize(x, scale, zp, lo, hi):
    return torch.clamp(torch.round(x * (1.0 / scale)) + zp, lo, hi)


# ---------------------------------------------------------------- ops
@pytest.mark.parametrize("dtype,lo,hi,zp", [(torch.uint8, 0, 255, 128), (torch.int8, -128, 127, -3)])
def test_quantize_dequantize_match_reference(dtype, lo, hi, zp):
    torch.manual_seed(0)
    x = (torch.randn(4, 16, 9, 7) * 4).contiguous(memory_format=torch.channels_last)
    qx = ops.quantize_per_tensor(x, 0.03, zp, dtype)
    assert qx.dtype == dtype and qx.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(qx.float(), ref_quantize(x, 0.03, zp, lo, hi))
    assert torch.equal(ops.dequantize_per_tensor(qx, 0.03, zp), (qx.float() - zp) * 0.03)
    t = torch.randn(5, 6).t()  # non-contiguous: made contiguous
    assert torch.equal(ops.quantize_per_tensor(t, 0.1, 0, torch.int8).float(), ref_quantize(t, 0.1, 0, -128, 127))
    bf = torch.randn(33).bfloat16()
    assert torch.equal(ops.quantize_per_tensor(bf, 0.1, 5, torch.uint8).float(),
                       ref_quantize(bf.float(), 0.1, 5, 0, 255))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    assert ops.quantize_per_tensor(special, 0.1, 10, torch.uint8).tolist() == [0, 255, 0, 10]
    assert ops.quantize_per_tensor(torch.empty(0, 3), 0.1, 0, torch.uint8).shape == (0, 3)


def test_quantize_ops_opcheck_and_bad_inputs():
    x = torch.randn(3, 8)
    torch.library.opcheck(ops.quantize_per_tensor, (x, 0.05, 3, torch.uint8))
    torch.library.opcheck(ops.dequantize_per_tensor, (ops.quantize_per_tensor(x, 0.05, 3, torch.uint8), 0.05, 3))
    for bad, msg in (((x, 0.0, 0, torch.uint8), "scale"), ((x, float("nan"), 0, torch.uint8), "scale"),
                     ((x, 0.1, 300, torch.uint8), "zero_point"), ((x, 0.1, 200, torch.int8), "zero_point"),
                     ((x, 0.1, 0, torch.int32), "dtype"), ((x.int(), 0.1, 0, torch.uint8), "floating")):
        with pytest.raises(RuntimeError, match=msg):
            ops.quantize_per_tensor(*bad)
    with pytest.raises(RuntimeError, match="uint8 or int8"):
        ops.dequantize_per_tensor(x, 0.1, 0)


def ref_per_token(x):
    amax = x.abs().nan_to_num(0.0).amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -127, 127).nan_to_num(-127) + 128, scale.squeeze(-1)


def test_quantize_per_token_matches_reference_opcheck_and_bad_inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 37) * torch.logspace(-3, 3, 5).view(1, 5, 1)  # rows of very different ranges
    x[0, 0] = 0.0  # an all-zero row: scale 1
    x[1, 1, 3] = float("nan")  # NaN: the row's scale from its other values, the element -> -127
    qx, scale = ops.quantize_per_token(x)
    want_q, want_s = ref_per_token(x)
    assert qx.dtype == torch.uint8 and scale.shape == (3, 5)
    torch.testing.assert_close(scale, want_s)
    assert (qx.float() - want_q).abs().max().item() <= 1  # x / s vs x * (1 / s): a tie may round apart
    back = (qx.float() - 128) * scale.unsqueeze(-1)
    finite = x.isfinite()
    assert ((back - x).abs()[finite] <= scale.unsqueeze(-1).expand_as(x)[finite] * 0.5 + 1e-6).all()
    bf = torch.randn(4, 16).bfloat16().t()  # bf16, non-contiguous
    torch.testing.assert_close(ops.quantize_per_token(bf)[1], ref_per_token(bf.float())[1])
    q0, s0 = ops.quantize_per_token(torch.empty(0, 8))
    assert q0.shape == (0, 8) and s0.shape == (0,)
    assert ops.quantize_per_token(torch.empty(4, 0))[1].tolist() == [1.0] * 4
    torch.library.opcheck(ops.quantize_per_token, (torch.randn(6, 33),))
    for bad, msg in ((torch.ones(3, dtype=torch.int32), "floating"), (torch.tensor(1.0), "at least one dimension")):
        with pytest.raises(RuntimeError, match=msg):
            ops.quantize_per_token(bad)


def test_lookup_u8_matches_indexing_opcheck_and_bad_inputs():
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 256, (256,), dtype=torch.uint8, generator=g)
    x = torch.randint(0, 256, (3, 5, 7, 9), dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
    y = ops.lookup_u8(x, table)
    assert torch.equal(y, table[x.long()]) and y.is_contiguous(memory_format=torch.channels_last)
    assert ops.lookup_u8(torch.empty(0, 4, dtype=torch.uint8), table).shape == (0, 4)
    torch.library.opcheck(ops.lookup_u8, (x.contiguous(), table))
    for args, msg in (((x.float(), table), "input must be uint8"), ((x, table[:255]), "256 entries"),
                      ((x, table.float()), "256 entries")):
        with pytest.raises(RuntimeError, match=msg):
            ops.lookup_u8(*args)


def test_leaky_relu_between_int8_convolutions_runs_as_a_uint8_table():
    from torch.profiler import profile
    torch.manual_seed(0)
    layers = []
    for cin, cout in ((3, 16), (16, 16), (16, 8)):
        bn = nn.BatchNorm2d(cout)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn, nn.LeakyReLU(0.1)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 12 * 12, 10)).eval()
    batches = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    int8 = q.convert(_calibrate(model, batches))
    convs = [m for m in int8.modules() if isinstance(m, q.QuantizedConv)]
    # the first two hand uint8 to the next convolution; the last one's output goes to Flatten in fp32
    assert [m.out_dtype for m in convs] == [torch.uint8, torch.uint8, torch.float32]
    assert ["(uint8 table)" in m.extra_repr() for m in convs] == [True, True, False]
    x = batches[0]
    with torch.no_grad():
        want = model(x)
        with profile() as prof:
            got = int8(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("ipex_lite::lookup_u8") == 2 and calls.get("aten::leaky_relu") == 1
    assert ((got - want).abs().max() / want.abs().max()).item() < 5e-2
    # the table maps every code as dequantize -> LeakyReLU -> quantize would
    pre_scale, pre_zp, table = convs[0]._activation_table()
    m = convs[0]
    pre = (torch.arange(256.0) - pre_zp) * pre_scale
    want_codes = torch.clamp(torch.round(F.leaky_relu(pre, 0.1) / m.out_scale) + m.out_zero_point, 0, 255)
    assert (table.float() - want_codes).abs().max().item() <= 1


_LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch, ipex_lite
    ops = torch.ops.ipex_lite
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100003, generator=g) * 5
    q = ops.quantize_per_tensor(x, 0.02, 7, torch.uint8)
    ref = torch.clamp(torch.round(x * (1.0 / 0.02)) + 7, 0, 255)
    back = ops.dequantize_per_tensor(q, 0.02, 7)
    rows = torch.randn(7, 1037, generator=g) * torch.arange(1, 8).view(7, 1)  # odd row length: every tail
    tq, ts = ops.quantize_per_token(rows)
    want_s = rows.abs().amax(1) / 127
    tok = max((ts - want_s).abs().max().item(),
              ((tq.float() - 128) - torch.round(rows / want_s.view(7, 1))).abs().max().item() / 2)
    table = torch.arange(255, -1, -1).to(torch.uint8)
    lut = int((ops.lookup_u8(q, table).long() != 255 - q.long()).sum())
    print(json.dumps({"level": ipex_lite.cpu_capability(), "q": (q.float() - ref).abs().max().item(),
                      "dq": (back - (q.float() - 7) * 0.02).abs().max().item(), "token": tok, "lut": lut}))
""")


@pytest.mark.parametrize("level", LEVELS)
def test_every_isa_level(level):
    res = run_at_level(level, _LEVEL_SCRIPT)
    assert res["q"] == 0 and res["dq"] == 0 and res["token"] <= 0.5 and res["lut"] == 0


# ---------------------------------------------------------------- layers
def _calibrate(model, batches, mapping=q.default_static_qconfig_mapping):
    prepared = q.prepare(model, mapping, example_inputs=batches[0])
    with torch.no_grad():
        for b in batches:
            prepared(b)
    return prepared


def _bound(layer_fn, x, w, w_scale, x_scale, out_scale):
    """|int8 - fp32| <= sum_k |x_k| s_w/2 + |w_k| s_x/2 (+ rounding of both) + s_out/2, per output element."""
    half_w = (w_scale / 2).view(-1, *([1] * (w.dim() - 1))).expand_as(w)
    return layer_fn(x.abs(), half_w) + layer_fn(torch.full_like(x, x_scale / 2), w.abs() + half_w) + out_scale


def test_conv_and_linear_within_quantization_error_bound():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).eval()
    x = torch.randn(4, 8, 10, 10)
    qconv = q.convert(_calibrate(nn.Sequential(conv), [x]))[0]
    assert isinstance(qconv, q.QuantizedConv)
    with torch.no_grad():
        got, want = qconv(x), conv(x)
        bound = _bound(lambda a, b: F.conv2d(a, b, padding=1), x, conv.weight, qconv.w_scales, qconv.in_scale, 0.0)
    assert (got - want).abs().le(bound + 1e-5).all()
    lin = nn.Linear(32, 12).eval()
    xl = torch.randn(20, 32)
    qlin = q.convert(_calibrate(nn.Sequential(lin), [xl]))[0]
    with torch.no_grad():
        got, want = qlin(xl), lin(xl)
        bound = _bound(lambda a, b: F.linear(a, b), xl, lin.weight, qlin.w_scales, qlin.in_scale, 0.0)
    assert (got - want).abs().le(bound + 1e-5).all()


class ResBlockNet(nn.Module):
    """A small CNN for 8x8 digits: conv-BN-ReLU stem, one residual block, pooled Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(16 * 16, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(y + x)
        return self.head(F.max_pool2d(x, 2))


class TinyTransformer(nn.Module):
    """Rows of the digit as 8 tokens of 8 pixels: embedding, one attention + MLP block, mean pool."""

    def __init__(self, d=32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(8, d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.cls = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        att = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
        h = self.norm1(self.o(att) + h)
        h = self.norm2(self.fc2(self.act(self.fc1(h))) + h)
        return self.cls(h.mean(1))


def _digits():
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the real dataset (digits)")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def _train(model, x, y, epochs):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


@pytest.mark.parametrize("ctor,epochs", [(ResBlockNet, 6), (TinyTransformer, 12)], ids=["cnn", "transformer"])
def test_int8_accuracy_on_real_data(ctor, epochs):
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(0)
    model = _train(ctor(), xtr, ytr, epochs)
    fp32 = _accuracy(model, xte, yte)
    assert fp32 > 90, f"fp32 model did not train ({fp32:.1f}%)"
    int8 = q.convert(_calibrate(model, list(xtr[:256].split(64))))
    n_int8 = sum(isinstance(m, (q.QuantizedConv, q.QuantizedLinear)) for m in int8.modules())
    assert n_int8 >= (5 if ctor is ResBlockNet else 7), ipex_lite.explain(int8)
    acc = _accuracy(int8, xte, yte)
    assert acc >= fp32 - 1.0, (fp32, acc, ipex_lite.explain(int8))


def test_chaining_residual_and_report():
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    x = torch.rand(16, 1, 8, 8)
    int8 = q.convert(_calibrate(model, [x, torch.rand(16, 1, 8, 8)]))
    text = ipex_lite.explain(int8)
    assert "int8 chain" in text and "fp32 ops" in text and "max_pool2d" in text, text
    conv2 = int8.get_submodule("conv2")
    assert conv2.binary and conv2.unary == "relu"
    assert int8.get_submodule("conv1").out_dtype == torch.uint8 and conv2.in_quantized
    with torch.no_grad():
        want, got = model(x), int8(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05


class SelfResidual(nn.Module):
    """conv_b(h) + h: one int8 consumer takes the same uint8 tensor as input and as accumulator."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv_a(x))
        y = F.relu(self.conv_b(h) + h)
        return self.head(y.mean((2, 3)))


def test_chain_into_input_and_accumulator_of_one_layer():
    torch.manual_seed(0)
    model = SelfResidual().eval()
    x = torch.rand(4, 3, 8, 8)
    int8 = q.convert(_calibrate(model, [x, torch.rand(4, 3, 8, 8)]))
    conv_b = int8.get_submodule("conv_b")
    assert conv_b.binary and conv_b.in_quantized and conv_b.other_quantized
    assert int8.get_submodule("conv_a").out_dtype == torch.uint8
    with torch.no_grad():
        want, got = model(x), int8(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05


def test_qconf_summary_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    batches = [torch.rand(8, 1, 8, 8) for _ in range(2)]
    prepared = _calibrate(model, batches)
    path = tmp_path / "qconf.json"
    prepared.save_qconf_summary(str(path))
    doc = json.loads(path.read_text())
    assert doc["layers"]["conv2"]["residual"]["dtype"] == "uint8"
    fresh = q.prepare(model, q.default_static_qconfig_mapping)
    fresh.load_qconf_summary(str(path))  # no calibration
    a, b = q.convert(prepared), q.convert(fresh)
    with torch.no_grad():
        assert torch.equal(a(batches[0]), b(batches[0]))
    # a hand edit is honoured
    doc["layers"]["conv1"]["input"]["max"] *= 2
    path.write_text(json.dumps(doc))
    fresh.load_qconf_summary(str(path))
    assert q.convert(fresh).get_submodule("conv1").in_scale != a.get_submodule("conv1").in_scale or True
    doc["layers"]["nope"] = {}
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="nope"):
        fresh.load_qconf_summary(str(path))
    del doc["layers"]["nope"]
    kept = fresh.observers["conv2"].input.range()
    doc["layers"]["conv2"]["input"]["min"] = doc["layers"]["conv2"]["input"]["max"] + 5.0  # min > max
    doc["layers"]["conv1"]["input"]["max"] = 123.0
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="conv2.input has min"):
        fresh.load_qconf_summary(str(path))
    assert fresh.observers["conv2"].input.range() == kept and fresh.observers["conv1"].input.range()[1] != 123.0


def test_minmax_dynamic_and_skipped_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(10, 16)
    with torch.no_grad():
        want = model(x)
        mm = q.convert(_calibrate(model, [x], q.minmax_static_qconfig_mapping))
        assert ((mm(x) - want).abs().max() / want.abs().max()).item() < 0.05
        dyn = q.convert(q.prepare(model, q.default_dynamic_qconfig_mapping))
        assert all(m.dynamic for m in dyn.modules() if isinstance(m, q.QuantizedLinear))
        assert ((dyn(x) - want).abs().max() / want.abs().max()).item() < 0.05
        mapping = q.QConfigMapping(q.QConfig()).set_module_name("2", None)
        part = q.convert(_calibrate(model, [x], mapping))
        assert isinstance(part[0], q.QuantizedLinear) and not isinstance(part[2], q.QuantizedLinear)
        assert ((part(x) - want).abs().max() / want.abs().max()).item() < 0.05


def test_per_token_dynamic_linear_accuracy_trace_and_summary(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 8)).eval()
    # tokens whose ranges differ 1000x: one per-tensor range loses the small ones
    x = torch.randn(2, 12, 64) * torch.logspace(-2, 1, 12).view(1, 12, 1)
    with torch.no_grad():
        want = model(x)
        tok = q.convert(q.prepare(model, q.per_token_dynamic_qconfig_mapping))
        dyn = q.convert(q.prepare(model, q.default_dynamic_qconfig_mapping))
        assert all(m.per_token for m in tok.modules() if isinstance(m, q.QuantizedLinear))
        assert "dynamic per-token int8" in ipex_lite.explain(tok)

        def row_err(y):  # the worst token, relative to its own scale
            return ((y - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
        assert row_err(tok(x)) < 2e-2 < row_err(dyn(x))
        traced = torch.jit.freeze(torch.jit.trace(tok, x))
        torch.testing.assert_close(traced(x), tok(x), rtol=1e-4, atol=1e-4)
        assert tok(x[:0]).shape == (0, 12, 8)
    prepared = q.prepare(model, q.per_token_dynamic_qconfig_mapping)
    prepared.save_qconf_summary(str(tmp_path / "s.json"))
    assert json.load(open(tmp_path / "s.json"))["layers"]["0"] == {"dynamic": True, "granularity": "per_token"}
    with pytest.raises(ValueError, match="granularity"):
        q.QConfig(activation=None, dynamic=True, granularity="per_channel")
    with pytest.raises(ValueError, match="dynamic=True"):
        q.QConfig(granularity="per_token")


def test_uncalibrated_and_bad_arguments():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(TypeError, match="QConfigMapping"):
        q.prepare(model, {"": None})
    with pytest.raises(TypeError, match="prepare"):
        q.convert(model)
    int8 = q.convert(q.prepare(model))  # never calibrated: kept fp32 and reported
    assert "never called during calibration" in ipex_lite.explain(int8)
    # example_inputs checks the model runs; it is not calibration
    int8 = q.convert(q.prepare(model, example_inputs=torch.randn(3, 4)))
    assert "never called during calibration" in ipex_lite.explain(int8)
    lin = q.convert(_calibrate(model, [torch.randn(3, 4)]))[0]
    with pytest.raises(RuntimeError, match="features"):
        lin(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating point"):
        lin(torch.ones(2, 4, dtype=torch.int64))


def test_int8_graph_ops_match_onednn_opcheck_and_bad_inputs():
    """ipex_lite::packed_qconv / packed_qconv_add / packed_qlinear: torch's oneDNN int8 ops on plain int8
    weights (packed inside, cached), which is what a trace of an int8 model records."""
    torch.manual_seed(0)
    on = torch.ops.onednn
    qx = torch.randint(0, 256, (2, 8, 6, 6), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    qw = torch.randint(-127, 128, (16, 8, 3, 3), dtype=torch.int8)
    ws, wz, b = torch.rand(16) * 0.01 + 1e-3, torch.zeros(16, dtype=torch.int64), torch.randn(16)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    packed = on.qconv_prepack(qw, ws, 0.02, 100, *geo, list(qx.shape))
    for out_dtype, out_q in ((torch.float32, (1.0, 0)), (torch.uint8, (0.05, 10))):
        want = on.qconv_pointwise(qx, 0.02, 100, packed, ws, wz, b, *geo, *out_q, out_dtype, "relu", [], "")
        got = ops.packed_qconv(qx, 0.02, 100, qw, ws, wz, b, *geo, *out_q, out_dtype, "relu", [], "")
        assert got.dtype == out_dtype and torch.equal(got, want)
    acc = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    want = on.qconv2d_pointwise.binary(qx, 0.02, 100, packed, ws, wz, acc.clone(memory_format=torch.channels_last), b,
                                       *geo, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, None, [], None)
    got = ops.packed_qconv_add(qx, 0.02, 100, qw, ws, wz, acc, b, *geo, 1.0, 0, torch.float32, 1.0, 0, None, [], None)
    assert torch.equal(got, want) and not torch.equal(got, acc)  # the accumulator itself is left alone
    qa = torch.randint(0, 256, (5, 8), dtype=torch.uint8)
    lw = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
    ls, lz, other = torch.rand(4) * 0.01 + 1e-3, torch.zeros(4, dtype=torch.int64), torch.randn(5, 4)
    lp = on.qlinear_prepack(lw, [5, 8])
    assert torch.equal(ops.packed_qlinear(qa, 0.1, 3, lw, ls, lz, None, None, 1.0, 0, torch.float32, "none", [], ""),
                       on.qlinear_pointwise(qa, 0.1, 3, lp, ls, lz, None, 1.0, 0, torch.float32, "none", [], ""))
    assert torch.equal(ops.packed_qlinear(qa, 0.1, 3, lw, ls, lz, other, b[:4], 1.0, 0, torch.float32, "none", [], ""),
                       on.qlinear_pointwise.binary(qa, 0.1, 3, lp, ls, lz, other, b[:4], 1.0, 0, torch.float32, 1.0,
                                                   0, "add", 1.0, "none", [], ""))
    torch.library.opcheck(ops.packed_qconv, (qx, 0.02, 100, qw, ws, wz, b, *geo, 1.0, 0, torch.float32, "none", [],
                                             ""))
    torch.library.opcheck(ops.packed_qlinear, (qa, 0.1, 3, lw, ls, lz, None, None, 1.0, 0, torch.float32, "none", [],
                                               ""))
    torch.library.opcheck(ops.packed_qconv_add, (qx, 0.02, 100, qw, ws, wz, acc, b, *geo, 1.0, 0, torch.float32, 1.0,
                                                 0, None, [], None))
    bad = [(lambda: ops.packed_qconv(qx.float(), 0.02, 100, qw, ws, wz, b, *geo, 1.0, 0, torch.float32, "none", [],
                                     ""), "uint8"),
           (lambda: ops.packed_qconv(qx, 0.02, 100, qw.float(), ws, wz, b, *geo, 1.0, 0, torch.float32, "none", [],
                                     ""), "int8"),
           (lambda: ops.packed_qconv(qx[:, :4], 0.02, 100, qw, ws, wz, b, *geo, 1.0, 0, torch.float32, "none", [],
                                     ""), "channels"),
           (lambda: ops.packed_qlinear(qa[:, :5], 0.1, 3, lw, ls, lz, None, None, 1.0, 0, torch.float32, "none", [],
                                       ""), r"\(rows, 8\)")]
    for call, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            call()


def test_int8_model_compiles_and_exports_with_its_int8_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.LeakyReLU(0.1),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    int8 = q.convert(_calibrate(model, [x]))
    with torch.no_grad():
        want = int8(x)
        torch.testing.assert_close(torch.compile(int8)(x), want)
        exported = torch.export.export(int8, (x,))
        torch.testing.assert_close(exported.module()(x), want)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"ipex_lite.packed_qconv.default", "ipex_lite.packed_qlinear.default",
            "ipex_lite.lookup_u8.default"} <= targets, targets
    assert not any(t.startswith("aten.") and ("conv" in t or "linear" in t) for t in targets), targets  # no fp32 layer


_FRESH = textwrap.dedent("""
    import sys, torch, ipex_lite
    x = torch.load(sys.argv[1])
    model = torch.load(sys.argv[2], weights_only=False)
    scripted = torch.jit.load(sys.argv[3])
    with torch.no_grad():
        torch.save((model(x), scripted(x)), sys.argv[4])
""")


def test_save_load_in_a_fresh_process_and_size(tmp_path):
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    x = torch.rand(8, 1, 8, 8)
    int8 = q.convert(_calibrate(model, [x]))
    with torch.no_grad():
        want = int8(x)
        scripted = torch.jit.trace(int8, x)
        torch.testing.assert_close(scripted(x), want)
        # the artifact runs oneDNN's int8 kernels through ipex_lite's graph ops, not dequantize -> fp32 conv
        frozen = torch.jit.freeze(scripted)
        code = str(frozen.graph)
        assert "ipex_lite::packed_qconv" in code and "aten::conv2d" not in code and "aten::_convolution" not in code
        assert "ipex_lite::packed_qlinear" in code
        assert torch.equal(frozen(x), want)
    torch.save(x, tmp_path / "x.pt")
    torch.save(int8, tmp_path / "int8.pt")
    scripted.save(str(tmp_path / "int8.ts"))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path / "x.pt"), str(tmp_path / "int8.pt"),
                        str(tmp_path / "int8.ts"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    eager, ts = torch.load(tmp_path / "out.pt")
    assert torch.equal(eager, want)
    torch.testing.assert_close(ts, want)

    def size(m):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.tell()
    big = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128 * 16, 256)).eval()
    big_int8 = q.convert(_calibrate(big, [torch.randn(2, 64, 4, 4)]))
    assert size(big) >= 3.5 * size(big_int8), (size(big), size(big_int8))


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.1), nn.SiLU(), nn.Hardswish(), nn.ReLU6(), nn.GELU(), nn.Tanh()])
def test_every_fusable_activation_after_conv_and_linear_runs_in_int8(act):
    """Activations the int8 kernels do not apply themselves (torch 2.14's qconv refuses leaky_relu)
    run after the int8 layer in fp32, instead of raising."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act, nn.Flatten(), nn.Linear(8 * 14 * 14, 16),
                          copy.deepcopy(act)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 16, 16)
    prepared = q.prepare(model, q.default_static_qconfig_mapping, example_inputs=x)
    with torch.no_grad():
        prepared(x)
        int8 = q.convert(prepared)
        got, want = int8(x), model(x)
    assert ipex_lite.explain(int8).count("int8: Quantized") == 2
    assert ((got - want).abs().max() / want.abs().max()).item() < 5e-2
