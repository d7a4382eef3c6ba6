"""Published peak rates of accelerators, matched as substrings of `device.device_kind`.

The benchmark's MFU divides by `peak_flops`; `benchmarks/device_projection.py` scales a
measured trace from one device to another with both rates. First match wins, so specific
names come first ("NVIDIA H100 80GB HBM3" is the SXM part).
"""

from __future__ import annotations

# (name, dense FLOP/s by compute dtype (float32 means TF32), HBM bytes/s or None).
DEVICE_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756.0e12, "float32": 378.0e12}, 2.0e12),
    ("H100 NVL", {"bfloat16": 835.0e12, "float32": 417.5e12}, 3.9e12),
    ("H100", {"bfloat16": 989.4e12, "float32": 494.7e12}, 3.35e12),  # SXM
    ("H200", {"bfloat16": 989.4e12, "float32": 494.7e12}, 4.8e12),
    # The A100's bandwidth depends on the model (1.6-2.0 TB/s), which its name may not say.
    ("A100", {"bfloat16": 312.0e12, "float32": 156.0e12}, None),
)


def _entry(device_kind: str):
  for entry in DEVICE_PEAKS:
    if entry[0].lower() in device_kind.lower():
      return entry
  return None


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak for `dtype`, or None where unknown (CPU included)."""
  entry = _entry(device_kind)
  return entry[1].get(dtype) if entry else None


def memory_bandwidth(device_kind: str) -> float | None:
  """The device's peak memory bandwidth in bytes/s, or None where unknown."""
  entry = _entry(device_kind)
  return entry[2] if entry else None
