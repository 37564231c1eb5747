"""Quickstart: ``ipex_lite.optimize`` on a real model, stock vs ipex_lite side by side.

    python tutorials/quickstart.py                 # small inputs, seconds
    python tutorials/quickstart.py --full          # ResNet-50 8x224x224, BERT-base 4 layers 8x128
    ipex-lite-run --throughput-mode tutorials/quickstart.py   # what `make demo` runs

The one line a user adds is

    model = ipex_lite.optimize(model.eval())                        # fp32
    model = ipex_lite.optimize(model.eval(), dtype=torch.bfloat16)  # bf16

which folds BatchNorm into the convolutions, fuses ReLU/GELU and residual
adds into them, and prepacks the weights for oneDNN.  IPEX's graph recipe
works on top of it:

    model = torch.jit.freeze(torch.jit.trace(model, x))           # under torch.no_grad()

and the frozen graph runs the same packed kernels without Python (the
"jit" row).  The int8 row is
``ipex_lite.quantization.prepare`` -> a few calibration batches -> ``convert``
(see tutorials/int8.py; calibrated here on noisy copies of the input, so its
error is only indicative).  The script times stock
eager and the optimized model interleaved in one process, checks that the
outputs agree (fp32: 1e-4 of the output scale, bf16: 5e-2, int8: 1e-1), and exits
non-zero when they do not.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, measure  # noqa: E402
from bench.models import BertEncoder, ResNet50, _trained_looking_bn  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite import quantization  # noqa: E402


def int8_model(model, x):
    prepared = quantization.prepare(model, quantization.default_static_qconfig_mapping, example_inputs=x)
    with torch.no_grad():
        for _ in range(2):
            prepared(x + 0.05 * torch.randn_like(x))
    return quantization.convert(prepared)


def launcher_settings() -> str:
    keys = ("OMP_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF", "KMP_AFFINITY", "IPEX_LITE_INSTANCE_IDX")
    got = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return ", ".join(got) if got else "none (not started by ipex-lite-run)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the benchmark's sizes (slower)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.full:
        cases = {"ResNet-50": (_trained_looking_bn(ResNet50()), torch.rand(8, 3, 224, 224)),
                 "BERT-base x4": (BertEncoder(4), torch.randn(8, 128, 768))}
    else:
        cases = {"ResNet-50": (_trained_looking_bn(ResNet50()), torch.rand(2, 3, 112, 112)),
                 "BERT-base x2": (BertEncoder(2), torch.randn(2, 64, 768))}
    print(f"torch {torch.__version__}, ipex_lite {ipex_lite.__version__}, ISA {ipex_lite.cpu_capability()}, "
          f"{torch.get_num_threads()} threads; launcher: {launcher_settings()}")
    report = Report("stock eager vs ipex_lite.optimize (inference, no_grad)", reference="stock fp32")
    ok = True
    for name, (model, x) in cases.items():
        model.eval()
        fp32 = ipex_lite.optimize(model, sample_input=x)
        bf16 = ipex_lite.optimize(model, dtype=torch.bfloat16, sample_input=x)
        int8 = int8_model(model, x)
        with torch.no_grad():
            fp32_jit = torch.jit.freeze(torch.jit.trace(fp32, x))
        systems = {"stock fp32": lambda: model(x), "ipex_lite fp32": lambda: fp32(x),
                   "ipex_lite fp32 jit": lambda: fp32_jit(x), "ipex_lite bf16": lambda: bf16(x),
                   "ipex_lite int8": lambda: int8(x)}
        extra = {}
        with torch.no_grad():
            want = model(x)
            for label, fn in systems.items():
                err = ((fn().float() - want).abs().max() / want.abs().max()).item()
                limit = 5e-2 if "bf16" in label else 1e-4 if "fp32" in label else 1e-1
                ok &= err <= limit
                extra[label] = {"max err": f"{err:.1e}", "agrees": "yes" if err <= limit else "NO"}
            res = measure(systems, repeat=args.repeat, warmup=1, inner=1)
        report.add(name, res, extra)
    notes = ["max err: largest |optimized - stock fp32| over the largest |stock fp32| output"]
    if ipex_lite.isa_info().get("amx_bf16"):
        notes.append("this CPU has AMX: oneDNN runs the bf16 and int8 GEMMs and convolutions on its tiles")
    else:
        notes.append("no AMX on this CPU: bf16 GEMMs run on AVX-512 (BF16 dot products where the CPU has them), not "
                     "tiles, and may lose to fp32; auto_kernel_selection=True times both on the model")
    report.emit(False, notes)
    if not ok:
        print("FAILED: an optimized model's output does not agree with stock", file=sys.stderr)
        return 1
    print("outputs agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
