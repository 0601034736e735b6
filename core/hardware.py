"""What the machine can do fast, for choosing precisions (read once per process)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[-1].split())


def fast_bfloat16(device: str = "cpu") -> bool:
    """True on a GPU or a CPU with bfloat16 instructions (AMX tiles or avx512_bf16), where bfloat16 inference
    beats float32; elsewhere bfloat16 is emulated and slower."""
    return str(device).startswith("cuda") or bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
