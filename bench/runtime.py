"""Multi-stream inference: one stream on all cores vs N pinned streams (MultiStreamModule).

    python bench/runtime.py [--model resnet50,bert] [--batches 1,2,4] [--streams 1,2] [--quick] [--json]

For each model and batch: latency of one forward call (p50 / p99 over the
samples) and throughput (images or sequences per second) with the batch
split over N streams of len(cores)/N cores each.  Stream counts run
interleaved in one process; ratios are against one stream.  Models are
``ipex_lite.optimize``d (fp32).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine  # noqa: E402
from bench.models import BertEncoder, ResNet50, _trained_looking_bn  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite.cpu.runtime import CPUPool, MultiStreamModule  # noqa: E402


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50,bert")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--streams", default=None, help="default: 1, 2, 4, ... up to the core count")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    pool = CPUPool()
    ncores = len(pool)
    streams = [int(s) for s in args.streams.split(",")] if args.streams else \
        [s for s in (1, 2, 4, 8, 16, 32) if s <= ncores]
    repeat = 6 if args.quick else args.repeat
    rows = []
    for name in args.model.split(","):
        torch.manual_seed(0)
        model = _trained_looking_bn(ResNet50()).eval() if name == "resnet50" else BertEncoder(4).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224) if name == "resnet50" else torch.randn(batch, 128, 768)
            opt = ipex_lite.optimize(model, sample_input=x[:1])
            systems = {n: MultiStreamModule(opt, num_streams=n, cpu_pool=pool) for n in streams if n <= max(1, ncores)}
            samples = {n: [] for n in systems}
            with torch.no_grad():
                want = opt(x)
                for n, ms in systems.items():
                    torch.testing.assert_close(ms(x), want, rtol=1e-4, atol=1e-4)
                for _ in range(repeat):
                    for n, ms in systems.items():
                        t = time.perf_counter()
                        ms(x)
                        samples[n].append(time.perf_counter() - t)
            base = statistics.median(samples[streams[0]])
            for n, s in samples.items():
                p50 = statistics.median(s)
                rows.append({"model": name, "batch": batch, "streams": n, "cores/stream": ncores // n,
                             "p50 ms": p50 * 1e3, "p99 ms": percentile(s, 99) * 1e3,
                             "items/s": batch / p50, "ratio": base / p50})
    if args.json:
        import json
        print(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        return
    print(f"\n## multi-stream inference ({ncores} cores)\nmachine: " + ", ".join(f"{k}={v}" for k, v in
                                                                         machine().items()))
    print("ratio = one-stream p50 / this p50 (same process, interleaved)\n")
    print("| model | batch | streams x cores | p50 ms | p99 ms | items/s | ratio |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['streams']} x {r['cores/stream']} | {r['p50 ms']:.1f} | "
              f"{r['p99 ms']:.1f} | {r['items/s']:.1f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
