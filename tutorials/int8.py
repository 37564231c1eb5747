"""Tutorial: INT8 post-training quantization, the way a user runs it.

    python tutorials/int8.py [--out DIR]

1. train a small CNN on scikit-learn's 8x8 digits (a real dataset shipped inside the package;
   without scikit-learn the script falls back to synthetic digits and says so),
2. ``prepare`` it with the default static qconfig (histogram-calibrated uint8 activations,
   per-channel int8 weights) and run a few calibration batches from the training set,
3. save the calibrated ranges as editable JSON (``save_qconf_summary``),
4. ``convert`` to the int8 model, ``torch.save`` it, load it back and run it,
5. compare top-1 accuracy, speed and file size with the fp32 model.

It exits non-zero if int8 accuracy drops more than 1 point below fp32.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import ipex_lite
from ipex_lite import quantization


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_data():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("scikit-learn not installed: using synthetic digits (accuracy figures are not meaningful)")
        g = torch.Generator().manual_seed(0)
        protos = torch.rand(10, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (1797,), generator=g)
        x = (protos[y] + 0.3 * torch.randn(1797, 1, 8, 8, generator=g)).clamp(0, 1)
    else:
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where to write qconf.json and the models (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="ipex_lite_int8_")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_data()

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()

    # calibrate -> convert
    prepared = quantization.prepare(model, quantization.default_static_qconfig_mapping, example_inputs=xtr[:64])
    with torch.no_grad():
        for batch in xtr[:512].split(128):
            prepared(batch)
    prepared.save_qconf_summary(os.path.join(out, "qconf.json"))
    int8 = quantization.convert(prepared)
    print(ipex_lite.explain(int8))

    # save -> load -> run
    fp32_path, int8_path = os.path.join(out, "fp32.pt"), os.path.join(out, "int8.pt")
    torch.save(model, fp32_path)
    torch.save(int8, int8_path)
    loaded = torch.load(int8_path, weights_only=False)

    acc_fp32, acc_int8 = accuracy(model, xte, yte), accuracy(loaded, xte, yte)
    with torch.no_grad():
        times = {}
        for name, m in (("fp32", model), ("int8", loaded)):
            m(xte)
            t = time.perf_counter()
            for _ in range(5):
                m(xte)
            times[name] = (time.perf_counter() - t) / 5 * 1e3
    size = {name: os.path.getsize(p) / 1e6 for name, p in (("fp32", fp32_path), ("int8", int8_path))}
    print(f"\n| model | top-1 (%) | ms per {len(yte)} images | file MB |\n| --- | --- | --- | --- |")
    for name, acc in (("fp32", acc_fp32), ("int8", acc_int8)):
        print(f"| {name} | {acc:.2f} | {times[name]:.2f} | {size[name]:.2f} |")
    print(f"files in {out}: qconf.json (edit it and use prepared.load_qconf_summary), fp32.pt, int8.pt")
    if acc_int8 < acc_fp32 - 1.0:
        print("FAILED: int8 accuracy dropped more than 1 point", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
