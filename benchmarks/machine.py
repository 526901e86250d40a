"""What the benchmarks report about the host: the CPU model, its core count and SIMD extensions."""

from __future__ import annotations

import os
import platform

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni",
              "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """The CPU model and which of :data:`SIMD_FLAGS` it has (``/proc/cpuinfo`` on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags]}


def cpu_line(info: dict) -> str:
    """``CPU: <model> (<n> cores); SIMD: <flags>``."""
    return f"CPU: {info['model']} ({info['cores']} cores); SIMD: {' '.join(info['simd']) or 'none found'}"
