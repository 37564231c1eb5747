"""ipex_lite: the Intel Extension for PyTorch feature set on current PyTorch.

IPEX code keeps working with the import alias::

    import ipex_lite as ipex
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from . import _ops  # noqa: F401  (fake kernels and autograd for torch.ops.ipex_lite)
from . import cpu, distributed, llm, nn, optim, quantization
from ._aten_overrides import (aten_overrides, available_aten_overrides, disable_aten_overrides,
                              enable_aten_overrides, enabled_aten_overrides)
from ._inference import explain
from .frontend import optimize

__version__ = "0.1.0"
__all__ = ["aten_overrides", "available_aten_overrides", "disable_aten_overrides", "enable_aten_overrides",
           "enabled_aten_overrides", "cpu", "cpu_capability", "distributed", "isa_info", "explain", "llm", "nn", "optim", "optimize", "quantization", "__version__"]


def cpu_capability() -> str:
    """ISA level the kernels run at: 'default', 'avx2', 'avx512', 'avx512_bf16' or 'amx'.

    It is min(what the CPU supports, what was compiled), lowered by the
    environment variable IPEX_LITE_ISA when that is set before import.  'amx'
    is an avx512_bf16 CPU whose OS grants this process the AMX tile state
    (oneDNN then runs bf16/int8 GEMMs and convolutions on tiles); ipex_lite's
    own kernels run their avx512_bf16 code there.
    """
    return _C.cpu_capability()


def isa_info() -> dict:
    """CPU features (cpuid + OS state) and the detected, built and active ISA levels."""
    return _C.isa_info()
