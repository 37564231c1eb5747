"""Activation observers for static quantization (uint8, per-tensor affine).

Plain Python objects (not modules): they never reach the model's state_dict,
pickle cleanly and serialise to the JSON of ``save_qconf_summary``.
"""
import math
from typing import Dict, Tuple

import torch

QMIN, QMAX = 0, 255  # uint8 activations


def affine_qparams(lo: float, hi: float) -> Tuple[float, int]:
    """uint8 scale / zero point covering [lo, hi] (widened to include 0, as every affine scheme must)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"observer range [{lo}, {hi}] is not finite: calibrate on finite inputs")
    scale = (hi - lo) / (QMAX - QMIN)
    if scale <= 1e-12:  # an all-zero tensor
        return 1.0, 0
    zero_point = int(min(max(round(QMIN - lo / scale), QMIN), QMAX))
    return float(scale), zero_point


class MinMaxObserver:
    """Running min and max over every calibration batch."""

    kind = "minmax"

    def __init__(self):
        self.min, self.max = math.inf, -math.inf

    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach().float())
        self.min, self.max = min(self.min, lo.item()), max(self.max, hi.item())

    @property
    def calibrated(self) -> bool:
        return self.min <= self.max

    def range(self) -> Tuple[float, float]:
        return self.min, self.max

    def qparams(self) -> Tuple[float, int]:
        if not self.calibrated:
            raise RuntimeError("observer saw no data: run calibration batches through the prepared model first")
        return affine_qparams(*self.range())

    def to_dict(self) -> Dict:
        scale, zp = self.qparams()
        lo, hi = self.range()
        return {"observer": self.kind, "min": lo, "max": hi, "scale": scale, "zero_point": zp, "dtype": "uint8"}


class FixedRange(MinMaxObserver):
    """A range read back from a qconf summary (possibly edited by hand)."""

    kind = "fixed"

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.min, self.max = float(lo), float(hi)

    def observe(self, x: torch.Tensor) -> None:
        pass


class HistogramObserver(MinMaxObserver):
    """Histogram over the running range; the range kept is the clipping that
    minimises the expected squared quantization error (rounding error
    scale²/12 inside, distance to the bound outside), searched over tail
    fractions dropped at each end.  Outliers in calibration data then cost
    one clipped value instead of the resolution of every other value."""

    kind = "histogram"
    BINS = 2048
    TAILS = (0.0, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

    def __init__(self):
        super().__init__()
        self.hist = torch.zeros(self.BINS, dtype=torch.float64)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        lo, hi = lo.item(), hi.item()
        if not self.calibrated:
            self.min, self.max = lo, hi if hi > lo else lo + 1e-6
        elif lo < self.min or hi > self.max:
            self._widen(min(lo, self.min), max(hi, self.max))
        self.hist += torch.histc(x, self.BINS, self.min, self.max).double()

    def _widen(self, lo: float, hi: float) -> None:
        """Re-bin the histogram onto a wider range (each old bin's count moves to its centre's new bin)."""
        old_w = (self.max - self.min) / self.BINS
        centres = self.min + (torch.arange(self.BINS, dtype=torch.float64) + 0.5) * old_w
        idx = ((centres - lo) / (hi - lo) * self.BINS).long().clamp_(0, self.BINS - 1)
        new = torch.zeros(self.BINS, dtype=torch.float64)
        new.index_add_(0, idx, self.hist)
        self.hist, self.min, self.max = new, lo, hi

    def range(self) -> Tuple[float, float]:
        total = self.hist.sum().item()
        if total == 0:
            return self.min, self.max
        w = (self.max - self.min) / self.BINS
        centres = self.min + (torch.arange(self.BINS, dtype=torch.float64) + 0.5) * w
        cdf = torch.cumsum(self.hist, 0) / total
        best, best_err = (self.min, self.max), math.inf
        for lo_tail in self.TAILS:
            lo = self.min if lo_tail == 0 else centres[int(torch.searchsorted(cdf, lo_tail))].item()
            for hi_tail in self.TAILS:
                hi = self.max if hi_tail == 0 else \
                    centres[min(int(torch.searchsorted(cdf, 1 - hi_tail)), self.BINS - 1)].item()
                if hi <= lo:
                    continue
                qlo, qhi = min(lo, 0.0), max(hi, 0.0)
                scale = (qhi - qlo) / (QMAX - QMIN)
                clipped = torch.clamp(centres, qlo, qhi)
                err = (self.hist * ((centres - clipped) ** 2 + scale * scale / 12)).sum().item()
                if err < best_err:
                    best, best_err = (lo, hi), err
        return best
