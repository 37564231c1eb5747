"""Linear layers for bf16 training on CPUs without AMX.

Without AMX a bf16 GEMM runs at about half the speed of an fp32 one (measured
~165 against ~300 GFLOP/s on two AVX-512-BF16 cores), so
``optimize(model, optimizer, dtype=torch.bfloat16)`` gives its Linear layers
this class there.  It keeps everything a bf16 layer stores: bf16 weights
(the split-BF16 top halves), bf16 activations saved for backward, bf16
outputs and bf16 weight gradients.  Only the three GEMMs widen their bf16
operands to fp32 first.  A product of two bf16 numbers is exact in fp32 and
oneDNN accumulates bf16 GEMMs in fp32 too, so results equal a bf16 GEMM up
to the order of the fp32 sums.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..optim import update_in_backward_hook

__all__ = ["Fp32ComputeLinear"]


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor):
    """The dtype a stock Linear would compute in here, when it is bf16; else None."""
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        return dt if dt == torch.bfloat16 else None
    return torch.bfloat16 if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 else None


# fp32 copies of the weight are made this many elements (2 MB) at a time, so a
# step holds no full-size fp32 weight or weight gradient next to the bf16 ones.
_BLOCK_ELEMS = 1 << 19


def _row_blocks(weight: torch.Tensor):
    """Row ranges of at most _BLOCK_ELEMS elements, and one fp32 buffer they
    all reuse.  The block size sets a step's peak RSS under glibc malloc
    (25M-parameter MLP: 536 MB with fresh 8 MB blocks, 512 MB reusing one,
    456 MB with 2 MB) and barely its speed (212 vs 222 ms)."""
    step = min(weight.shape[0], max(1, _BLOCK_ELEMS // max(1, weight.shape[1])))
    blocks = [(r, min(r + step, weight.shape[0])) for r in range(0, weight.shape[0], step)]
    return blocks, torch.empty(step, weight.shape[1])


class _Fp32ComputeLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, in_backward_update):
        # Round inputs as autocast would, then widen: the GEMM sees the same
        # bf16 values a bf16 kernel would see.
        x_lp = x.to(dtype)
        w_lp = weight.to(dtype)
        b_lp = None if bias is None else bias.to(dtype)
        x2 = x_lp.reshape(-1, x.shape[-1]).float()
        y = torch.empty(x2.shape[0], weight.shape[0], dtype=dtype)
        blocks, w_buf = _row_blocks(w_lp)
        with torch.autocast("cpu", enabled=False):
            for r0, r1 in blocks:
                w_f = w_buf[:r1 - r0].copy_(w_lp[r0:r1])
                blk = torch.mm(x2, w_f.t()) if b_lp is None else torch.addmm(b_lp[r0:r1].float(), x2, w_f.t())
                y[:, r0:r1] = blk
        ctx.save_for_backward(x_lp, w_lp)
        ctx.update = in_backward_update
        ctx.weight = weight if in_backward_update is not None else None
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_lp, w_lp = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x_lp.dtype).float()
        x2 = x_lp.reshape(-1, x_lp.shape[-1]).float()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.zeros_like(x2) if need_x else None
        # Under update_in_backward_, each block of the weight gradient updates
        # its rows at once (after gx has read their old values), so the whole
        # gradient (32 MB for a bf16 4096 x 4096 layer) is never held.
        update = ctx.update.row_update(ctx.weight) if need_w and ctx.update is not None else None
        gw = torch.empty(w_lp.shape, dtype=ctx.w_dtype) if need_w and update is None else None
        blocks, buf = _row_blocks(w_lp)
        with torch.autocast("cpu", enabled=False):
            for r0, r1 in blocks:
                blk = buf[:r1 - r0]
                if need_x:
                    gx.addmm_(g[:, r0:r1], blk.copy_(w_lp[r0:r1]))
                if need_w:
                    gw_rows = torch.mm(g[:, r0:r1].t(), x2, out=blk)
                    if update is None:
                        gw[r0:r1] = gw_rows
                    else:
                        update(gw_rows.to(ctx.w_dtype), (r0, r1))
        gb = g.sum(0).to(ctx.b_dtype) if ctx.b_dtype is not None and ctx.needs_input_grad[2] else None
        if need_x:
            gx = gx.to(ctx.x_dtype).reshape(x_lp.shape)
        return gx, gw, gb, None, None


class Fp32ComputeLinear(nn.Linear):
    """``nn.Linear`` whose bf16 GEMMs (under bf16 autocast, or with bf16 input
    and weight) run as fp32 GEMMs on the widened bf16 operands; other calls
    are ``nn.Linear``'s.  Same parameters and state_dict as ``nn.Linear``.
    ``torch.compile`` and ``torch.jit.trace`` handle it; ``torch.jit.script``
    cannot (an autograd.Function): optimize with ``auto_kernel_selection=False``
    to script the model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, self.weight)
        if dtype is None or x.dim() == 0 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        return _Fp32ComputeLinearFn.apply(x, self.weight, self.bias, dtype, self._in_backward_update())

    def _in_backward_update(self):
        """The weight's update_in_backward_ hook, with this use counted, when
        this forward builds a graph; else None."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad) or torch.compiler.is_compiling():
            return None
        hook = update_in_backward_hook(self.weight)
        if hook is not None:
            hook.note_use(self.weight)
        return hook
