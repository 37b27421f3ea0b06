"""What machine this is, in the terms that decide speed and numerics: the CPU model and its matrix units."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; on other systems the platform's processor name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def matrix_units(flags: set[str]) -> str:
    """What multiplies bf16 matrices: AMX tiles (Intel Sapphire Rapids and later), AVX512-BF16 dot products (AMD
    Zen 4 and later, Intel Cooper Lake), or neither (bf16 is then converted and multiplied in fp32)."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16, no AMX"
    if "avx512f" in flags:
        return "AVX512, no bf16 units"
    return "AVX2" if "avx2" in flags else "no AVX2"


def cpu_description() -> str:
    """e.g. 'AMD EPYC (AVX512-BF16, no AMX)': the name every benchmark and speed figure carries."""
    name, flags = _cpuinfo()
    return f"{name} ({matrix_units(flags)})" if flags else name
