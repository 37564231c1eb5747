"""INT8 post-training quantization (IPEX 2.x names)::

    from ipex_lite.quantization import prepare, convert, default_static_qconfig_mapping
    prepared = prepare(model.eval(), default_static_qconfig_mapping, example_inputs=x)
    for batch in calibration_batches:
        prepared(batch)
    prepared.save_qconf_summary("qconf.json")   # editable JSON of the calibrated ranges
    model_int8 = convert(prepared)
    torch.save(model_int8, "model_int8.pt")      # int8 weights; oneDNN layouts rebuilt on load

Activations are uint8 per-tensor affine (histogram or min-max calibration),
weights int8 per-output-channel symmetric; Conv1d/2d and Linear run as oneDNN
int8 kernels with ReLU-family / GELU post-ops and residual adds fused, on
plain uint8/int8 tensors.  ``default_dynamic_qconfig_mapping`` quantizes
Linear activations per call instead (no calibration), and
``per_token_dynamic_qconfig_mapping`` with one symmetric int8 scale per token (row), the
recipe for LLM-style decoders.  ``ipex_lite.explain``
on the converted model lists the int8 layers, the uint8 chains between them
and the operations that stayed fp32.

Weight-only quantization (int8 / int4 weights, activations in bf16/fp32, for LLM decoding and any model
with Linear layers): ``get_weight_only_quant_qconfig_mapping(weight_dtype=WoqWeightDtype.INT4,
group_size=128)`` passed to ``prepare``/``convert`` or to ``ipex_lite.llm.optimize(quantization_config=)``.
"""
from ._modules import QuantizedConv, QuantizedLinear, quantize_weight
from ._observers import HistogramObserver, MinMaxObserver
from ._woq import (WoqActQuantMode, WoqConfig, WoqLinear, WoqLowpMode, WoqWeightDtype,
                   get_weight_only_quant_qconfig_mapping)
from ._quantize import (PreparedModel, QConfig, QConfigMapping, convert, default_dynamic_qconfig_mapping,
                        default_static_qconfig_mapping, minmax_static_qconfig_mapping, per_token_dynamic_qconfig_mapping,
                        prepare)

__all__ = ["prepare", "convert", "QConfig", "QConfigMapping", "PreparedModel", "default_static_qconfig_mapping",
           "minmax_static_qconfig_mapping", "default_dynamic_qconfig_mapping",
           "per_token_dynamic_qconfig_mapping", "HistogramObserver",
           "MinMaxObserver", "QuantizedConv", "QuantizedLinear", "quantize_weight",
           "get_weight_only_quant_qconfig_mapping", "WoqWeightDtype", "WoqLowpMode", "WoqActQuantMode", "WoqConfig",
           "WoqLinear"]
