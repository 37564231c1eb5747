"""Child workload of bench/launcher.py: an allocation-heavy inference loop, one JSON line out.

Every iteration feeds a fresh input of a varying batch size through a residual MLP whose ops all
return new tensors (~64-512 KiB activations, around glibc's mmap threshold), so the allocator's
behaviour under repeated alloc/free of mid-sized blocks shows up in items/s.  The model is built and
warmed up first; timing starts at the shared wall-clock instant --start-at so that the instances of
one run measure the same window.
"""
import argparse
import json
import os
import time

import torch


def build(width: int, depth: int) -> torch.nn.Module:
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(width, width)
            self.norm = torch.nn.LayerNorm(width)

        def forward(self, x):
            return self.norm(torch.nn.functional.gelu(self.fc(x)) + x)

    return torch.nn.Sequential(*[Block() for _ in range(depth)], torch.nn.Linear(width, 16)).eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--start-at", type=float, default=0.0, help="time.time() at which to start measuring")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args.width, args.depth)
    batches = [int(b) for b in torch.randint(32, 257, (64,))]
    with torch.inference_mode():
        for b in batches[:8]:
            model(torch.randn(b, args.width))
        late = time.time() > args.start_at
        while time.time() < args.start_at:
            time.sleep(min(0.05, max(0.0, args.start_at - time.time())))
        items = iters = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            b = batches[iters % len(batches)]
            model(torch.randn(b, args.width)).sum().item()
            items += b
            iters += 1
        elapsed = time.perf_counter() - start
    with open("/proc/self/maps") as f:
        maps = f.read()
    allocator = "jemalloc" if "jemalloc" in maps else "tcmalloc" if "tcmalloc" in maps else "default"
    print(json.dumps({"instance": int(os.environ.get("IPEX_LITE_INSTANCE_IDX", 0)), "items_per_s": items / elapsed,
                      "iters": iters, "threads": torch.get_num_threads(), "allocator": allocator,
                      "cpus": sorted(os.sched_getaffinity(0)), "late": late}), flush=True)


if __name__ == "__main__":
    main()
