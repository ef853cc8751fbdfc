"""GPU peak figures, the one table the package uses, and the share-of-peak arithmetic.

    gpu = detect_gpu(torch.cuda.get_device_name())        # GpuPeak or None for an unknown GPU
    peak_shares(tflop_s=412.0, detected=gpu, measured=700.0)
    # {'detected': 0.417, 'measured': 0.589, 'V100': 3.3, 'A100': 1.32, 'H100': 0.417}

Figures are NVIDIA's datasheet peaks, dense (no 2:4 sparsity). "bf16" is the 16-bit tensor-core peak: bf16 on
A100 and later, fp16 on V100 (which has no bf16). Rates are TFLOP/s (10^12) and GB/s (10^9 bytes).

The three reference GPUs (V100, A100, H100) are the ones every GPU benchmark is also compared against,
whatever GPU it ran on, so that figures from different machines and from the papers line up. Nothing here
imports torch: the arithmetic is plain and tested on machines without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

PRECISIONS = ("bf16", "tf32", "fp32")


@dataclass(frozen=True)
class GpuPeak:
    name: str
    gb_per_s: float  # DRAM bandwidth
    bf16: float  # dense 16-bit tensor-core TFLOP/s (fp16 on V100)
    tf32: Optional[float]  # dense TF32 tensor-core TFLOP/s (None: the GPU has no TF32)
    fp32: float  # non-tensor fp32 TFLOP/s
    memory_gb: float

    def tflops(self, precision: str = "bf16") -> Optional[float]:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        return getattr(self, precision)


V100_SXM2 = GpuPeak("V100 SXM2", gb_per_s=900, bf16=125, tf32=None, fp32=15.7, memory_gb=32)
A100_SXM_80GB = GpuPeak("A100 SXM 80GB", gb_per_s=2039, bf16=312, tf32=156, fp32=19.5, memory_gb=80)
H100_SXM = GpuPeak("H100 SXM", gb_per_s=3350, bf16=989, tf32=494.5, fp32=67, memory_gb=80)
H200_SXM = GpuPeak("H200", gb_per_s=4800, bf16=989, tf32=494.5, fp32=67, memory_gb=141)

# Every GPU figure is also given as a share of these, keyed by the short name used in reports.
REFERENCE_GPUS: Dict[str, GpuPeak] = {"V100": V100_SXM2, "A100": A100_SXM_80GB, "H100": H100_SXM}

# The GPUs `python -m gpt2fast.compute --gpu` plans for. The trainer and the benchmarks look the GPU they run on
# up in DEVICE_NAMES instead, so that a PCIe or NVL part is not measured against the SXM peak.
PLANNING_GPUS: Dict[str, GpuPeak] = {"H100": H100_SXM, "H200": H200_SXM, "A100": A100_SXM_80GB, "V100": V100_SXM2}

# Matched in order, case-insensitively, as substrings of torch.cuda.get_device_name(): the specific variants
# before the generic name ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA A100-SXM4-80GB" the 80 GB one).
# The NVL and PCIe parts run at lower clocks and power than the SXM ones, hence their lower tensor-core peaks.
DEVICE_NAMES = (
    ("H200 NVL", GpuPeak("H200 NVL", gb_per_s=4800, bf16=835.5, tf32=417.5, fp32=60, memory_gb=141)),
    ("H200", H200_SXM),
    ("H100 PCIe", GpuPeak("H100 PCIe", gb_per_s=2000, bf16=756, tf32=378, fp32=51, memory_gb=80)),
    ("H100 NVL", GpuPeak("H100 NVL", gb_per_s=3900, bf16=835, tf32=417.5, fp32=60, memory_gb=94)),
    ("H100", H100_SXM),
    ("A100-SXM4-40GB", GpuPeak("A100 SXM 40GB", gb_per_s=1555, bf16=312, tf32=156, fp32=19.5, memory_gb=40)),
    ("A100-PCIE-40GB", GpuPeak("A100 PCIe 40GB", gb_per_s=1555, bf16=312, tf32=156, fp32=19.5, memory_gb=40)),
    ("A100 80GB PCIe", GpuPeak("A100 PCIe 80GB", gb_per_s=1935, bf16=312, tf32=156, fp32=19.5, memory_gb=80)),
    ("A100", A100_SXM_80GB),
    ("V100-PCIE", GpuPeak("V100 PCIe", gb_per_s=900, bf16=112, tf32=None, fp32=14, memory_gb=32)),
    ("V100", V100_SXM2),
)


def detect_gpu(device_name: str) -> Optional[GpuPeak]:
    """The peaks of the GPU ``torch.cuda.get_device_name()`` calls ``device_name``; None when not in the table."""
    lowered = device_name.lower()
    return next((peak for key, peak in DEVICE_NAMES if key.lower() in lowered), None)


def share(rate: Optional[float], ceiling: Optional[float]) -> Optional[float]:
    """``rate / ceiling``, or None when either is unknown (or the ceiling is not positive)."""
    if rate is None or ceiling is None or ceiling <= 0:
        return None
    return rate / ceiling


def peak_shares(*, tflop_s: Optional[float] = None, gb_s: Optional[float] = None, precision: str = "bf16",
                detected: Optional[GpuPeak] = None, measured: Optional[float] = None,
                digits: int = 4) -> Dict[str, float]:
    """A rate as a share of each known ceiling: "detected" (the GPU it ran on), "measured" (a ceiling measured
    on the spot, in the rate's own unit: a large matmul's TFLOP/s or a large copy's GB/s) and each reference
    GPU ("V100", "A100", "H100"). Give ``tflop_s`` (compared with the ``precision`` peak) or ``gb_s``
    (compared with DRAM bandwidth), not both. Ceilings that are unknown (no TF32 on a V100, no GPU detected)
    are left out; a share above 1 is kept (an H100 kernel beats the V100's peak)."""
    if (tflop_s is None) == (gb_s is None):
        raise ValueError("give exactly one of tflop_s and gb_s")

    def ceiling(gpu: GpuPeak) -> Optional[float]:
        return gpu.tflops(precision) if tflop_s is not None else gpu.gb_per_s

    rate = tflop_s if tflop_s is not None else gb_s
    candidates = {"detected": ceiling(detected) if detected is not None else None, "measured": measured}
    candidates.update({key: ceiling(gpu) for key, gpu in REFERENCE_GPUS.items()})
    shares = {key: share(rate, limit) for key, limit in candidates.items()}
    return {key: round(value, digits) for key, value in shares.items() if value is not None}
