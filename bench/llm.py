"""LLM generation: prefill and decode of a TinyLlama-1.1B-shaped Llama (random weights, built from a config).

    python bench/llm.py [--layers 22] [--cases 1x128,1x1024,4x128] [--new-tokens 32] [--repeat 3] [--compile]

Systems, measured interleaved in one process: stock transformers fp32 (cases up to --fp32-max-tokens
prompt tokens), stock bf16, ``torch.compile`` of stock bf16 (with --compile), ``ipex_lite.llm.optimize``
bf16, and IPEX's ``ipex.llm.optimize`` when it imports.  Each sample is one greedy ``generate()``: a
streamer stamps every token, so prefill = time to the first token and decode = the mean time per later
token.  The decode limit is (weight bytes + KV-cache bytes read per token) / the read bandwidth measured
in the same run; each decode row reports its share of it.  Logits of the first position are compared
with stock bf16.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, add_common_args, import_ipex, setup_from_args  # noqa: E402


def build_model(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]  # what a checkpoint's config.json says; IPEX needs it
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # realistic norms: not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
    return model


class Bandwidth:
    """Streaming read bandwidth: one sum over 1 GB of random fp32 per sample (random: a hypervisor may
    merge identical pages, and a buffer of ones then reads from cache).  Sampled between the systems'
    samples, since a shared host's bandwidth moves with its neighbours."""

    def __init__(self):
        self.buf = torch.rand(256 * 1024 * 1024)
        self.samples = []
        self.sample()

    def sample(self) -> None:
        t0 = time.perf_counter()
        self.buf.sum()
        self.samples.append(self.buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)

    def gbs(self) -> float:
        return statistics.median(self.samples)


def weight_bytes(model) -> int:
    """Bytes of every Linear weight (what one decode step reads; the embedding reads one row)."""
    from ipex_lite.quantization import WoqLinear
    seen = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            tensors = [m.weight]
        elif isinstance(m, WoqLinear):  # packed weights, scales and zero points
            tensors = [t for t in (m.qweight, m.scales, m.qzeros) if t is not None]
        else:
            continue
        for t in tensors:  # fused projections are views: count each byte once
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _Stamps:
    """A generate() streamer that records when each batch of tokens arrives."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _hand_built_class():
    """tutorials/llm.py's HandBuiltLlama: the decoder assembled from ipex_lite.llm.modules."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "tutorial_llm", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials", "llm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HandBuiltLlama


def timed_generate(model, ids, new_tokens: int):
    stamps = _Stamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        if hasattr(model, "generate_greedy"):  # the hand-built decoder's own loop
            model.generate_greedy(ids, new_tokens, on_token=lambda: stamps.put(None))
            stamps.times.insert(0, t0)
        else:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, streamer=stamps, pad_token_id=0)
    # the streamer's first put() is the prompt itself; then one per generated token
    t = stamps.times[1:]
    prefill = t[0] - t0
    decode = (t[-1] - t[0]) / max(1, len(t) - 1)
    return prefill * 1e3, decode * 1e3


def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cases", default="1x128,1x1024,4x128", help="batch x prompt length, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fp32-max-tokens", type=int, default=128,
                        help="stock fp32 runs only cases with batch * prompt up to this (its prefill is slow)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of stock bf16 (slow to compile)")
    parser.add_argument("--no-woq", dest="woq", action="store_false",
                        help="skip the weight-only quantized rows (int8, int4 / nf4 group 128; lm_head stays bf16)")
    parser.set_defaults(repeat=3, warmup=1)
    args = parser.parse_args(argv)
    setup_from_args(args)
    if args.quick:
        args.layers, args.cases, args.new_tokens = min(args.layers, 4), "1x128", min(args.new_tokens, 16)

    import ipex_lite
    fp32 = build_model(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    systems = {"stock fp32": fp32, "stock bf16": bf16}
    if args.compile:
        compiled = copy.deepcopy(bf16)
        compiled.forward = torch.compile(compiled.forward, dynamic=True)
        systems["torch.compile bf16"] = compiled
    systems["ipex_lite bf16"] = ipex_lite.llm.optimize(copy.deepcopy(fp32), dtype=torch.bfloat16, inplace=True)
    systems["ipex_lite modules (hand-built) bf16"] = _hand_built_class()(bf16)
    if args.woq:
        from ipex_lite.quantization import WoqWeightDtype, get_weight_only_quant_qconfig_mapping
        for label, wd, group in (("int8", WoqWeightDtype.INT8, -1), ("int4 g128", WoqWeightDtype.INT4, 128),
                                 ("nf4 g128", WoqWeightDtype.NF4, 128)):
            qc = get_weight_only_quant_qconfig_mapping(weight_dtype=wd, group_size=group)
            systems[f"ipex_lite WOQ {label}"] = ipex_lite.llm.optimize(copy.deepcopy(bf16), dtype=torch.bfloat16,
                                                                       inplace=True, quantization_config=qc)
    ipex = import_ipex()
    if ipex is not None:
        systems["IPEX bf16"] = ipex.llm.optimize(copy.deepcopy(fp32).to(torch.bfloat16), dtype=torch.bfloat16,
                                                 inplace=True, deployment_mode=True)
    bandwidth = Bandwidth()
    report = Report(f"LLM generation, Llama {args.layers} layers (hidden {args.hidden}, {args.heads}/{args.kv_heads} "
                    f"heads), greedy, {args.new_tokens} new tokens", "stock bf16")
    notes = []
    d = args.hidden // args.heads
    for case in args.cases.split(","):
        batch, prompt = (int(v) for v in case.split("x"))
        torch.manual_seed(1)
        ids = torch.randint(3, args.vocab, (batch, prompt))
        active = {n: m for n, m in systems.items() if n != "stock fp32" or batch * prompt <= args.fp32_max_tokens}
        with torch.no_grad():
            ref = bf16(ids).logits[:, -1].float()
            for name, model in active.items():
                if name.startswith("ipex_lite") or name.startswith("IPEX"):
                    out = model(ids)
                    got = (out if isinstance(out, torch.Tensor) else out.logits)[:, -1].float()
                    err = float((got - ref).abs().max() / ref.abs().max())
                    notes.append(f"b{batch} p{prompt}: {name} last-position logits vs stock bf16: max rel err {err:.2e}")
        for _ in range(args.warmup):
            for model in active.values():
                timed_generate(model, ids, 2)
        samples = {n: ([], []) for n in active}
        bandwidth.samples = []
        for _ in range(args.repeat):
            for name, model in active.items():
                p, dt = timed_generate(model, ids, args.new_tokens)
                samples[name][0].append(p)
                samples[name][1].append(dt)
                bandwidth.sample()
        gbs = bandwidth.gbs()
        notes.append(f"b{batch} p{prompt}: read bandwidth {gbs:.1f} GB/s (median of samples between the systems')")
        kv_len = prompt + args.new_tokens // 2
        prefill, decode, extra = {}, {}, {}
        for name, (ps, ds) in samples.items():
            model = active[name]
            elt = 4 if name == "stock fp32" else 2  # KV cache element size
            kv_bytes = 2 * args.layers * batch * args.kv_heads * kv_len * d * elt
            limit_ms = (weight_bytes(model) + kv_bytes) / (gbs * 1e9) * 1e3
            prefill[name] = {"median_ms": statistics.median(ps), "min_ms": min(ps)}
            decode[name] = {"median_ms": statistics.median(ds), "min_ms": min(ds)}
            extra[name] = {"tok_per_s": batch * 1e3 / statistics.median(ds), "limit_ms": limit_ms,
                           "pct_of_limit": 100 * limit_ms / statistics.median(ds)}
        report.add(f"prefill b{batch} p{prompt}", prefill)
        report.add(f"decode ms/token b{batch} p{prompt}", decode, extra)
    report.emit(args.json, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
