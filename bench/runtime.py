"""Multi-stream inference: one stream on all cores vs N pinned streams (MultiStreamModule).

    python bench/runtime.py [--model resnet50,bert] [--batches 1,2,4] [--streams 1,2] [--graph eager,jit]
                            [--quick] [--json]

For each model and batch: latency of one forward call (p50 / p99 over the
samples) and throughput (images or sequences per second) with the batch
split over N streams of len(cores)/N cores each.  Models are
``ipex_lite.optimize``d (fp32), then run as they are ("eager") or traced and
frozen ("jit", IPEX's recipe for multi-stream inference: the graph runs
without Python, so streams do not wait for each other's GIL).  All of a
model's stream counts and graph kinds run interleaved in one process;
"ratio" is against one stream of the same kind, "vs eager" against one
eager stream.
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
    parser.add_argument("--graph", default="eager,jit", help="eager, jit (trace + freeze) or both")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    pool = CPUPool()
    ncores = len(pool)
    streams = [int(s) for s in args.streams.split(",")] if args.streams else \
        [s for s in (1, 2, 4, 8, 16, 32) if s <= ncores]
    repeat = 6 if args.quick else args.repeat
    kinds = args.graph.split(",")
    rows = []
    for name in args.model.split(","):
        torch.manual_seed(0)
        model = _trained_looking_bn(ResNet50()).eval() if name == "resnet50" else BertEncoder(4).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224) if name == "resnet50" else torch.randn(batch, 128, 768)
            opt = ipex_lite.optimize(model, sample_input=x[:1])
            graphs = {}
            if "eager" in kinds:
                graphs["eager"] = opt
            if "jit" in kinds:
                with torch.no_grad():
                    graphs["jit"] = torch.jit.freeze(torch.jit.trace(opt, x[:1]))
            systems = {(g, n): MultiStreamModule(m, num_streams=n, cpu_pool=pool)
                       for g, m in graphs.items() for n in streams if n <= max(1, ncores)}
            samples = {k: [] for k in systems}
            with torch.no_grad():
                want = opt(x)
                for ms in systems.values():
                    torch.testing.assert_close(ms(x), want, rtol=1e-4, atol=1e-4)
                for _ in range(repeat):
                    for k, ms in systems.items():
                        t = time.perf_counter()
                        ms(x)
                        samples[k].append(time.perf_counter() - t)
            eager_base = statistics.median(samples[("eager", streams[0])]) if "eager" in graphs else None
            for (g, n), s in samples.items():
                p50 = statistics.median(s)
                rows.append({"model": name, "graph": g, "batch": batch, "streams": n, "cores/stream": ncores // n,
                             "p50 ms": p50 * 1e3, "p99 ms": percentile(s, 99) * 1e3, "items/s": batch / p50,
                             "ratio": statistics.median(samples[(g, streams[0])]) / p50,
                             "vs eager": eager_base / p50 if eager_base else None})
    if args.json:
        import json
        print(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        return
    print(f"\n## multi-stream inference ({ncores} cores)\nmachine: " + ", ".join(f"{k}={v}" for k, v in
                                                                         machine().items()))
    print("ratio = one-stream p50 / this p50 (same graph kind); vs eager = one eager stream p50 / this p50 "
          "(same process, interleaved)\n")
    print("| model | graph | batch | streams x cores | p50 ms | p99 ms | items/s | ratio | vs eager |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs eager']:.2f}x" if r["vs eager"] else ""
        print(f"| {r['model']} | {r['graph']} | {r['batch']} | {r['streams']} x {r['cores/stream']} | "
              f"{r['p50 ms']:.1f} | {r['p99 ms']:.1f} | {r['items/s']:.1f} | {r['ratio']:.2f}x | {vs} |")


if __name__ == "__main__":
    main()
