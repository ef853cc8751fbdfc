"""gpt2fast.hardware: which peaks a device name gets (the figures themselves are pinned in test_bench.py)."""
from __future__ import annotations

import pytest

from gpt2fast import hardware


def test_no_device_name_is_shadowed_by_an_earlier_one():
    """Names are matched in order as substrings: a name that contains an earlier one could never be found (an
    "H100 PCIe" listed after "H100" would get the SXM peak)."""
    keys = [key.lower() for key, _ in hardware.DEVICE_NAMES]
    for later, key in enumerate(keys):
        for earlier in keys[:later]:
            assert earlier not in key, (earlier, key)


@pytest.mark.parametrize("device_name, expected, bf16", [
    ("NVIDIA H100 PCIe", "H100 PCIe", 756),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989),
    ("NVIDIA H100 NVL", "H100 NVL", 835),
    ("NVIDIA H200", "H200", 989),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("nvidia h100 pcie", "H100 PCIe", 756),  # case does not matter
])
def test_hopper_variants_get_their_own_peaks(device_name, expected, bf16):
    gpu = hardware.detect_gpu(device_name)
    assert gpu is not None and (gpu.name, gpu.tflops("bf16")) == (expected, bf16)


def test_every_variant_is_no_faster_than_its_sxm_part():
    """The PCIe and NVL parts trade clocks for power: a figure above the SXM one is a typo in the table."""
    sxm = {"H100": hardware.H100_SXM, "H200": hardware.H200_SXM, "A100": hardware.A100_SXM_80GB,
           "V100": hardware.V100_SXM2}
    for _, gpu in hardware.DEVICE_NAMES:
        family = sxm[gpu.name[:4]]
        assert gpu.bf16 <= family.bf16 and gpu.fp32 <= family.fp32, gpu.name
