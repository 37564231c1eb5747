"""INT8 post-training quantization: stock fp32 vs ipex_lite fp32 vs ipex_lite int8, in one run.

    python bench/int8.py [--model resnet50,bert,dlrm] [--quick] [--json]

ResNet-50 (batch 8, 224²), the 4-layer BERT-base encoder (batch 8 x 128) and
the DLRM of bench/dlrm.py (int8 MLPs; tables and interaction stay fp32).
Calibration: two random batches (timing only; accuracy is tested on real
data in tests/test_quantization.py).  Model size: bytes of
``torch.save(model.state_dict())``.
"""
import argparse
import io
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tutorials"))
from bench.harness import Report, add_common_args, measure, setup_from_args  # noqa: E402
from bench.models import MODELS  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite import quantization as q  # noqa: E402


def saved_mb(model) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1e6


def _cases(names):
    for name in names:
        torch.manual_seed(0)
        if name == "dlrm":
            from dlrm import DLRM, make_batch, to_ipex_lite
            stock = DLRM(tables=26, rows=100_000, dim=128).eval()
            lite = to_ipex_lite(stock).eval()
            dense, indices, offsets, _ = make_batch(26, 100_000, 2048, 1)
            yield name, stock, lite, (dense, indices, offsets), lambda: make_batch(26, 100_000, 2048, 1)[:3]
        else:
            ctor, make_input = MODELS[name]
            model = ctor().eval()
            x = make_input().relu() if name == "resnet50" else make_input()
            yield name, model, model, (x,), lambda: (make_input().relu() if name == "resnet50" else make_input(),)


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--model", default="resnet50,bert,dlrm")
    args = parser.parse_args(argv)
    setup_from_args(args)
    report = Report("INT8 inference (no_grad)", reference="stock fp32")
    for name, stock, base, inputs, calib in _cases(args.model.split(",")):
        fp32 = ipex_lite.optimize(base, sample_input=inputs)
        prepared = q.prepare(base, q.default_static_qconfig_mapping, example_inputs=inputs)
        with torch.no_grad():
            for _ in range(2):
                prepared(*calib())
        int8 = q.convert(prepared)
        with torch.no_grad():
            want = stock(*inputs).float()
            err = ((int8(*inputs).float() - want).abs().max() / want.abs().max()).item()
            res = measure({"stock fp32": lambda: stock(*inputs), "ipex_lite fp32": lambda: fp32(*inputs),
                           "ipex_lite int8": lambda: int8(*inputs)}, repeat=args.repeat, warmup=args.warmup,
                          inner=1)
        size = {"stock fp32": saved_mb(stock), "ipex_lite fp32": saved_mb(fp32), "ipex_lite int8": saved_mb(int8)}
        extra = {s: {"saved MB": f"{size[s]:.1f}"} for s in res}
        extra["ipex_lite int8"]["max err"] = f"{err:.1e}"
        report.add(name, res, extra)
    report.emit(args.json, ["max err: largest |int8 - stock fp32| over the largest |stock fp32| output "
                            "(random calibration data)",
                            "dlrm: int8 bottom/top MLPs, fp32 embedding tables (the tables dominate saved MB)"])


if __name__ == "__main__":
    main()
