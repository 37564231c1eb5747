"""``ipex_lite.llm.optimize``: Hugging Face decoder models found by structure, not by class name.

A module is replaced when its structure matches a building block *and* a probe on random inputs gives the
original module's output (within the dtype's tolerance); anything else runs unchanged, and
``ipex_lite.explain(model)`` lists every decision:

* attention with q/k/v/o (or fused qkv) projections, rotary ``position_embeddings`` and optional per-head
  q/k norms (Llama, Mistral, Qwen2/3, Phi-3, ...) -> q/k/v in one GEMM, rotary in place, the KV cache read in
  place by the decode-attention kernel (grouped-query heads never copied), prefill through ipex_lite's
  attention kernel;
* gated MLPs (gate/up/down or gate_up/down with SiLU) -> gate and up in one GEMM, one SiLU-gate pass;
* RMSNorms -> the fused kernel;
* every other ``nn.Linear`` (``lm_head``, OPT/NeoX/Falcon projections) -> bf16 calls with few rows stream
  the weight through the small-M kernel;
* attention modules that were not replaced use ipex_lite's attention through transformers'
  ``AttentionInterface``; ``generate()`` gets a KV cache allocated once per call (``KVCache``).

Replaced modules are subclasses of the originals with the same Parameters and state_dict keys; fused
projections keep their Parameters as views of one buffer (no weight is held twice).
"""
import copy
import inspect
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _hf_attention
from .._inference import Report
from ..nn.attention import adopt
from ..nn.functional import cached_attention
from ..quantization._woq import WoqConfig, WoqLinear, fuse_woq, quantize_weight_only, woq_layers_from_checkpoint
from ..quantization._woq import _plan as _woq_plan
from . import functional as LF
from .cache import KVCache
from .modules import LinearFast, _fuse_rows

__all__ = ["optimize"]

def _attend(q, k, v, attention_mask, scaling):
    """(B, H, Lq, D) queries over (B, Hkv, Lk, D) keys/values -> (B, Lq, H, D) output."""
    lk = k.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] > lk:  # transformers 4.x masks may run longer
        attention_mask = attention_mask[..., :lk]
    causal = attention_mask is None and q.shape[2] > 1
    return cached_attention(q, k, v, attention_mask, causal, scaling).transpose(1, 2)


def _cache_update(module: nn.Module, cache, k, v, cos, sin, cache_position):
    if cache is None:
        return k, v
    return cache.update(k, v, module.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})


class _FastAttentionMixin:
    """forward of a rotary self-attention with one q/k/v GEMM (``self._ipex_qkv``)."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache_position=None, **kwargs):
        if kwargs.get("output_attentions", False) or (self.training and torch.is_grad_enabled()):
            return self._ipex_original_forward(hidden_states, position_embeddings=position_embeddings,
                                               attention_mask=attention_mask, past_key_values=past_key_values,
                                               cache_position=cache_position, **kwargs)
        cache = past_key_values if past_key_values is not None else kwargs.get("past_key_value")
        b, s, _ = hidden_states.shape
        hq, hk, d = self._ipex_heads
        qkv = self._ipex_qkv(hidden_states).view(b, s, hq + 2 * hk, d)
        q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hk], qkv[:, :, hq + hk:]
        if getattr(self, "q_norm", None) is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = LF.rotary_embedding(q, k, sin, cos)
        k, v = _cache_update(self, cache, k.transpose(1, 2), v.transpose(1, 2), cos, sin, cache_position)
        out = _attend(q.transpose(1, 2), k, v, attention_mask, self.scaling)
        return self.o_proj(out.reshape(b, s, hq * d)), None

    def _ipex_original_forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


class _FastGatedMLPMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return super().forward(x)
        gu = self._ipex_gate_up(x)
        n = gu.shape[-1] // 2
        return self.down_proj(LF.silu_mul(gu[..., :n], gu[..., n:]))


class _FastRMSNormMixin:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return super().forward(hidden_states)
        return LF.rms_norm(hidden_states, self.weight, self._ipex_eps)


class _FastLinear(LinearFast):
    pass


_SUBCLASSES: Dict[tuple, type] = {}


def _subclass(mixin: type, cls: type) -> type:
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__,
                                                             "__qualname__": cls.__qualname__})
    return _SUBCLASSES[key]


def _tolerance(dtype: torch.dtype) -> float:
    return 3e-2 if dtype == torch.bfloat16 else 1e-4


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _probe(original: Callable, fast: Callable, inputs: tuple, dtype: torch.dtype) -> Optional[str]:
    """None when fast(*inputs) matches original(*inputs); else why not."""
    try:
        with torch.no_grad():
            want = original(*inputs)
            got = fast(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure leaves the module as it was
        return f"probe failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    want = want[0] if isinstance(want, tuple) else want
    got = got[0] if isinstance(got, tuple) else got
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "probe output differs in shape"
    err = _rel_err(got, want)
    if not err <= _tolerance(dtype):
        return f"probe output differs from the original (max rel err {err:.2e})"
    return None


def _linear(m) -> bool:
    return type(m) in (nn.Linear, _FastLinear) or (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)


def _proj(m) -> bool:
    """A projection the fused blocks can take: a plain Linear or a weight-only quantized one."""
    return _linear(m) or isinstance(m, WoqLinear)


def _fuse(parts):
    """One layer over the stacked rows of ``parts`` (their tensors become views of it)."""
    if all(isinstance(p, WoqLinear) for p in parts):
        return fuse_woq(*parts)
    if all(_linear(p) for p in parts):
        return _fuse_rows(*parts)
    raise ValueError("a mix of quantized and float projections")


def _fast(layer: nn.Module) -> nn.Module:
    """The layer a fused block calls for a single projection."""
    return adopt(_FastLinear, layer) if _linear(layer) else layer


def _snapshot(layers):
    return [(dict(lay._parameters), dict(lay._buffers)) for lay in layers]


def _fused_block(mixin: type, m: nn.Module, parts, out_name: str, fused_name: str):
    """The fast subclass of block m: its input projections ``parts`` as one layer under ``fused_name`` (a
    plain attribute, not a child: the Parameters stay where the checkpoint has them) and its output
    projection ``out_name`` on the small-M path; with what _restore needs to undo the fusion.  Raises
    ValueError (nothing changed) when the projections cannot be fused."""
    saved = _snapshot(parts)
    fused = _fuse(parts) if len(parts) > 1 else _fast(parts[0])
    new = adopt(_subclass(mixin, type(m)), m)
    setattr(new, out_name, _fast(getattr(m, out_name)))
    object.__setattr__(new, fused_name, fused)
    return new, saved


def _is_rms_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and isinstance(eps, float) and len(list(m.children())) == 0
            and getattr(m, "bias", None) is None and "norm" in type(m).__name__.lower()
            and not isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)))


def _rms_reference_probe(m: nn.Module, dtype):
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    x = torch.randn(2, 3, m.weight.shape[0], dtype=dtype)
    return _probe(m.forward, lambda t: LF._rms_norm_reference(t, m.weight, eps), (x,), dtype)


def _attention_parts(m: nn.Module):
    """(linears for q/k/v in order, (hq, hk, d)) when m looks like rotary self-attention, else (None, why)."""
    if "position_embeddings" not in inspect.signature(type(m).forward).parameters:
        return None, "no rotary position_embeddings argument"
    if not _proj(getattr(m, "o_proj", None)) or not hasattr(m, "layer_idx"):
        return None, "no o_proj / layer_idx"
    cfg = getattr(m, "config", None)
    d = getattr(m, "head_dim", None)
    hq = getattr(cfg, "num_attention_heads", None)
    hk = getattr(cfg, "num_key_value_heads", None) or hq
    if not (isinstance(d, int) and isinstance(hq, int) and isinstance(hk, int)) or hq % hk:
        return None, "head counts not found in the module's config"
    if getattr(m, "scaling", None) is None:
        return None, "no scaling attribute"
    if all(_proj(getattr(m, n, None)) for n in ("q_proj", "k_proj", "v_proj")):
        parts = (m.q_proj, m.k_proj, m.v_proj)
        if (parts[0].out_features, parts[1].out_features, parts[2].out_features) != (hq * d, hk * d, hk * d):
            return None, "q/k/v sizes do not match the head counts"
        return parts, (hq, hk, d)
    if _proj(getattr(m, "qkv_proj", None)):
        if m.qkv_proj.out_features != (hq + 2 * hk) * d:
            return None, "qkv_proj size does not match the head counts"
        return (m.qkv_proj,), (hq, hk, d)
    return None, "no q/k/v projections"


def _mlp_parts(m: nn.Module):
    act = getattr(m, "act_fn", getattr(m, "activation_fn", None))
    if act is None or not _proj(getattr(m, "down_proj", None)):
        return None
    probe = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            if not torch.allclose(act(probe), F.silu(probe), atol=1e-6):
                return None
    except Exception:  # noqa: BLE001
        return None
    if _proj(getattr(m, "gate_proj", None)) and _proj(getattr(m, "up_proj", None)):
        return (m.gate_proj, m.up_proj)
    if _proj(getattr(m, "gate_up_proj", None)):
        return (m.gate_up_proj,)
    return None


def _find_rotary(model: nn.Module):
    for name, m in model.named_modules():
        if "rotary" in type(m).__name__.lower() and "position_ids" in inspect.signature(type(m).forward).parameters:
            return m
    return None


def _optimize_attention(path, m, parts, heads, rotary, dtype, report) -> Optional[nn.Module]:
    """The fast subclass of attention module m, or None (kept; the report says why)."""
    hq, hk, d = heads
    if rotary is None:
        report.add(path, "kept", "no rotary-embedding module found to probe it with")
        return None
    b, s = 2, 5
    x = torch.randn(b, s, parts[0].in_features, dtype=dtype)
    pos = torch.arange(s).expand(b, s)
    with torch.no_grad():
        cos, sin = rotary(x, pos)
    original_forward = m.forward

    try:
        new, saved = _fused_block(_FastAttentionMixin, m, parts, "o_proj", "_ipex_qkv")
    except ValueError as e:
        report.add(path, "kept", f"q/k/v not fused: {e}")
        return None
    object.__setattr__(new, "_ipex_heads", heads)
    why = _probe(lambda t: original_forward(t, position_embeddings=(cos, sin), attention_mask=None),
                 lambda t: new(t, position_embeddings=(cos, sin), attention_mask=None), (x,), dtype)
    if why is not None:
        _restore(parts, saved)
        report.add(path, "kept", why)
        return None
    report.add(path, "replaced", f"rotary attention ({hq} query / {hk} kv heads, head_dim {d}): "
                                 f"{'q/k/v' if len(parts) == 3 else 'qkv'} in one GEMM, rotary in place, decode "
                                 "attention over the KV cache in place, prefill via ipex_lite's attention kernel")
    return new


def _restore(layers, saved) -> None:
    """Undo _fuse: the layers get their own tensors back."""
    for lay, (params, buffers) in zip(layers, saved):
        lay._parameters.update(params)
        lay._buffers.update(buffers)


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _CachedGenerationMixin:
    """generate() with a KV cache allocated once per call (see ipex_lite.llm.cache), and prompts checked
    before any cache is written."""

    def generate(self, inputs=None, *args, **kwargs):
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            if ids.shape[-1] == 0:
                raise ValueError("ipex_lite.llm: generate() got an empty prompt (input_ids of length 0)")
            cfg = self.config.get_text_config(decoder=True)
            limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
            gen = kwargs.get("generation_config") or self.generation_config
            new = kwargs.get("max_new_tokens", gen.max_new_tokens)
            total = ids.shape[-1] + new if new is not None else kwargs.get("max_length", gen.max_length)
            total = max(total or 0, ids.shape[-1] + 1)
            if isinstance(limit, int) and total > limit:
                raise ValueError(f"ipex_lite.llm: the prompt ({ids.shape[-1]} tokens) and the tokens to generate "
                                 f"need {total} positions, more than the model's max_position_embeddings ({limit})")
        return super().generate(inputs, *args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        from transformers.cache_utils import DynamicCache
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and not cache.get_seq_length():
            try:
                bound = inspect.signature(super()._prepare_cache_for_generation).bind(
                    generation_config, model_kwargs, *args, **kwargs)
                max_length = int(bound.arguments.get("max_cache_length") or 0)
            except (TypeError, ValueError):
                max_length = 0
            model_kwargs["past_key_values"] = KVCache(config=self.config.get_text_config(decoder=True),
                                                      max_length=max_length)
        return out


def optimize(model: nn.Module, optimizer=None, dtype: torch.dtype = torch.float32, inplace: bool = False,
             device: str = "cpu", quantization_config=None, qconfig_summary_file=None,
             low_precision_checkpoint=None, sample_inputs=None, deployment_mode: bool = True,
             cache_weight_for_large_batch: bool = False) -> nn.Module:
    """Optimizes a Hugging Face decoder (causal LM) for CPU inference; IPEX's ``ipex.llm.optimize`` signature.

    Args:
        model: a transformers model (or any module: blocks are found by structure).
        dtype: ``torch.bfloat16`` or ``torch.float32``; the model is cast to it.
        inplace: change ``model`` itself instead of a deep copy.
        deployment_mode: accepted for IPEX compatibility; ipex_lite's deployment form is the eager model
            (it also runs under ``torch.compile``), so there is no TorchScript trace to make.
        quantization_config: ``ipex_lite.quantization.get_weight_only_quant_qconfig_mapping(...)``: int8 / int4
            weight-only quantization of every Linear but the excluded ones (``lm_head`` by default).
        low_precision_checkpoint: a state_dict of quantized layers -- ipex_lite's ``WoqLinear`` keys
            (``qweight``, ``scales``, ``qzeros``) or the GPTQ layout (``qweight``/``qzeros`` int32, ``scales``,
            ``g_idx``) -- loaded in place of the model's float weights (a fresh model from a config will do).
        device: ``"cpu"`` only (anything else raises ``ValueError``).
        optimizer: must be ``None`` (``ValueError`` otherwise): this is inference; train with
            ``ipex_lite.optimize(model, optimizer)``.
        qconfig_summary_file: accepted for IPEX compatibility; no effect (weight-only quantization needs no
            calibration).
        sample_inputs: accepted for IPEX compatibility; no effect.
        cache_weight_for_large_batch: accepted for IPEX compatibility; no effect.

    Returns the optimized model (in eval mode).  ``ipex_lite.explain(model)`` reports every decision.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ipex_lite.llm.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if str(device) != "cpu":
        raise ValueError(f"ipex_lite.llm.optimize: only device='cpu' is supported, got {device!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"ipex_lite.llm.optimize: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if optimizer is not None:
        raise ValueError("ipex_lite.llm.optimize is for inference; train with ipex_lite.optimize(model, optimizer)")
    if quantization_config is not None and not isinstance(quantization_config, WoqConfig):
        raise TypeError("ipex_lite.llm.optimize: quantization_config must come from "
                        "ipex_lite.quantization.get_weight_only_quant_qconfig_mapping(...), got "
                        f"{type(quantization_config).__name__}")
    if low_precision_checkpoint is not None and not isinstance(low_precision_checkpoint, dict):
        raise TypeError("ipex_lite.llm.optimize: low_precision_checkpoint must be a state_dict (dict of tensors)")
    woq = quantization_config if quantization_config is not None else (
        WoqConfig() if low_precision_checkpoint is not None else None)
    if woq is not None and low_precision_checkpoint is None:
        _woq_plan(model, woq)  # a group size that does not fit a layer raises here, before any change
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    model.to(dtype)
    report = Report()
    if low_precision_checkpoint is not None:
        woq_layers_from_checkpoint(model, low_precision_checkpoint, woq, report)
    elif woq is not None:
        quantize_weight_only(model, woq, report)
    rotary = _find_rotary(model)
    handled = set()  # Linear layers consumed by a fused block

    for path, m in list(model.named_modules()):
        if not path or any(path.startswith(h + ".") for h in handled if h):
            continue
        parts, info = _attention_parts(m) if hasattr(m, "o_proj") else (None, None)
        if parts is not None:
            new = _optimize_attention(path, m, parts, info, rotary, dtype, report)
            if new is not None:
                _set(model, path, new)
                handled.update(f"{path}.{n}" for n in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"))
            continue
        if info is not None and hasattr(m, "q_proj"):
            report.add(path, "kept", f"attention not optimized: {info}")
        mlp = _mlp_parts(m) if hasattr(m, "down_proj") else None
        if mlp is not None:
            try:
                new, saved = _fused_block(_FastGatedMLPMixin, m, mlp, "down_proj", "_ipex_gate_up")
            except ValueError as e:
                report.add(path, "kept", f"gated MLP not fused: {e}")
                continue
            x = torch.randn(2, 3, mlp[0].in_features, dtype=dtype)
            why = _probe(m.forward, new.forward, (x,), dtype)
            if why is None:
                _set(model, path, new)
                handled.update(f"{path}.{n}" for n in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"))
                report.add(path, "replaced", "gated SiLU MLP: gate and up in one GEMM, one SiLU-gate pass")
            else:
                _restore(mlp, saved)
                report.add(path, "kept", f"gated MLP not optimized: {why}")
            continue
        if _is_rms_norm(m):
            why = _rms_reference_probe(m, dtype)
            if why is None:
                new = adopt(_subclass(_FastRMSNormMixin, type(m)), m)
                new._ipex_eps = float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))
                _set(model, path, new)
                report.add(path, "replaced", "RMSNorm -> fused kernel")
            else:
                report.add(path, "kept", f"a norm that is not Llama's RMSNorm ({why})")
            continue
        if _linear(m) and path not in handled:
            _set(model, path, adopt(_FastLinear, m))
            report.add(path, "replaced", "Linear: bf16 calls with few rows (decode) stream the weight through "
                                         "the small-M kernel" if dtype == torch.bfloat16 else
                                         "Linear: fp32 keeps torch's GEMM (the small-M kernel reads bf16 weights)")
        elif type(m).__name__ == "Conv1D":
            report.add(path, "kept", "HF Conv1D (GPT-2 style, weight stored (in, out)) runs torch's addmm")
        elif isinstance(m, nn.LayerNorm):
            report.add(path, "kept", "LayerNorm runs torch's kernel")

    if _hf_attention.is_transformers_model(model):
        report.add("<attention>", "attention interface", _hf_attention.use_ipex_lite_attention(model))
        if KVCache is not None and hasattr(model, "_prepare_cache_for_generation"):
            model.__class__ = _subclass(_CachedGenerationMixin, type(model))
            report.add("<generate>", "KV cache", "allocated once per generate() call (ipex_lite.llm.KVCache)")
        else:
            report.add("<generate>", "KV cache", "transformers' own (this transformers has no cache-layer API)")
    model.__dict__["_ipex_lite_report"] = report
    return model
