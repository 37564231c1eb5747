"""LLM inference with ipex_lite.llm: (1) ``ipex_lite.llm.optimize`` on a Hugging Face Llama, (2) the same
decoder assembled by hand from ``ipex_lite.llm.modules`` with a ``StaticKVCache``.

    python tutorials/llm.py

IPEX users: ``import ipex_lite as ipex`` and ``ipex.llm.optimize(model, dtype=torch.bfloat16)`` as before.
The model is built from a config with random weights (no download); a checkpoint works the same way.
"""
import copy
import time

import torch
from torch import nn

import ipex_lite
from ipex_lite.llm import modules as LM


class HandBuiltLlama(nn.Module):
    """A Llama decoder from ipex_lite.llm.modules, loading a Hugging Face Llama's state_dict by name."""

    def __init__(self, hf_model):
        super().__init__()
        cfg = hf_model.config
        dtype = hf_model.dtype
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
        self.config = cfg
        self.rotary = LM.RotaryEmbedding(cfg.max_position_embeddings, head_dim, base=theta)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            LM.DecoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                            i, self.rotary, eps=cfg.rms_norm_eps, dtype=dtype)
            for i in range(cfg.num_hidden_layers))
        self.norm = LM.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, torch.ones(cfg.hidden_size, dtype=dtype))
        self.lm_head = LM.LinearFast(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        renamed = {k.replace("model.", "", 1).replace("embed_tokens", "embed"): v
                   for k, v in hf_model.state_dict().items()}
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        assert not unexpected and all(k.startswith("rotary") for k in missing), (missing, unexpected)
        self.eval()

    def new_cache(self, batch: int, max_length: int) -> ipex_lite.llm.StaticKVCache:
        cfg = self.config
        return ipex_lite.llm.StaticKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads,
                                           cfg.hidden_size // cfg.num_attention_heads, max_length,
                                           dtype=self.lm_head.weight.dtype)

    def forward(self, ids: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        start = cache.seq_length() if cache is not None else 0
        pos = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, pos, cache)
        if last_only:  # generation needs the last position's logits only
            h = h[:, -1:]
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def generate_greedy(self, ids: torch.Tensor, new_tokens: int, on_token=None) -> torch.Tensor:
        cache = self.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
        logits = self(ids, cache, last_only=True)[:, -1]
        out = [ids]
        for i in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if on_token is not None:
                on_token()
            if i + 1 < new_tokens:
                logits = self(nxt, cache, last_only=True)[:, -1]
        return torch.cat(out, 1)


def main():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, 1000, (1, 16))

    # (1) optimize a Hugging Face model: generate() and forward keep working
    fast = ipex_lite.llm.optimize(model, dtype=torch.bfloat16)
    print(ipex_lite.explain(fast))
    stock = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        want, got = stock(prompt).logits[:, -1].float(), fast(prompt).logits[:, -1].float()
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 3e-2, f"ipex_lite's logits differ from stock bf16 by {err:.2e}"
        times = {}
        for name, m in (("stock bf16", stock), ("ipex_lite bf16", fast)):
            m.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            tokens = m.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            times[name] = (time.perf_counter() - t0) / 16 * 1e3
    print(f"{'system':<16} {'ms/token':>9}   (16 greedy tokens, prompt 16; last-position logits agree: {err:.1e})")
    for name, ms in times.items():
        print(f"{name:<16} {ms:9.2f}")
    print("ipex_lite.llm.optimize (bf16) generated:", tokens[0, -8:].tolist())

    # (2) the same weights in a hand-built decoder; in fp32 its greedy tokens equal transformers'
    hand = HandBuiltLlama(model)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    got = hand.generate_greedy(prompt, 8)
    print("hand-built decoder (fp32, equal to transformers fp32) generated:", got[0, -8:].tolist())
    assert torch.equal(got, want), "hand-built decoder disagrees with transformers"


if __name__ == "__main__":
    main()
