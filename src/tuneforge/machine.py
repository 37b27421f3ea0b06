"""What machine this is, in the terms that decide speed and numerics: the CPU model and its matrix units."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path
from typing import Mapping


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; on other systems the platform's processor name."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or platform.machine(), set()


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text. The name carries the family and model
    numbers: virtual machines often show only "AMD EPYC", and two CPUs of that name (Zen 4, family 25; Zen 5,
    family 26) multiply bf16 at rates 2.5 times apart."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "Features" in fields and "flags" not in fields:  # Arm: no model name; the implementer and part name the core
        implementer, part = fields.get("CPU implementer", "?"), fields.get("CPU part", "?")
        core = _ARM_CORES.get((implementer, part), f"implementer {implementer} part {part}")
        return f"{platform.machine() or 'Arm'}, {core}", {f"arm:{flag}" for flag in fields["Features"].split()}
    name = fields.get("model name") or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        name += f", family {fields['cpu family']} model {fields['model']}"
    return name, set(fields.get("flags", "").split())


# (CPU implementer, CPU part) of /proc/cpuinfo for common server cores (Arm Ltd's Neoverse line)
_ARM_CORES = {("0x41", "0xd0c"): "Neoverse N1", ("0x41", "0xd40"): "Neoverse V1", ("0x41", "0xd49"): "Neoverse N2",
              ("0x41", "0xd4f"): "Neoverse V2"}


def matrix_units(flags: set[str]) -> str:
    """What multiplies bf16 matrices: AMX tiles (Intel Sapphire Rapids and later), AVX512-BF16 dot products (AMD
    Zen 4 and later, Intel Cooper Lake), or neither (bf16 is then converted and multiplied in fp32)."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16, no AMX"
    if "avx512f" in flags:
        return "AVX512, no bf16 units"
    if "arm:asimd" in flags:  # Arm's flags are kept apart (arm: prefix): the bf16 decisions below are x86's, measured
        return ("SME, " if "arm:sme" in flags else "") + ("BF16 (BFMMLA)" if "arm:bf16" in flags else "NEON, no bf16")
    return "AVX2" if "avx2" in flags else "no AVX2"


def cpu_description() -> str:
    """e.g. 'AMD EPYC, family 26 model 2 (AVX512-BF16, no AMX)': the name every benchmark and speed figure
    carries."""
    name, flags = _cpuinfo()
    return f"{name} ({matrix_units(flags)})" if flags else name


def multiplies_bf16_natively(flags: set[str] | None = None) -> bool:
    """Whether this CPU has bf16 matrix units (AMX or AVX512-BF16): bf16 products then run two to four times as
    fast as fp32 (two threads: 394 against 187 GFLOP/s on a Zen 4 EPYC, 917-1,066 against 234-241 on a Zen 5)."""
    return bool({"amx_bf16", "avx512_bf16"} & (_cpuinfo()[1] if flags is None else flags))


def multiplies_fp16_natively(flags: set[str] | None = None) -> bool:
    """Whether this CPU has fp16 matrix units (AMX-FP16, Intel Granite Rapids; AVX512-FP16, Sapphire Rapids and
    later). Without them torch converts every fp16 product, and fp16 matmul runs at a few GFLOP/s (2 on the AMD EPYC
    against 369 in bf16, two threads)."""
    return bool({"amx_fp16", "avx512_fp16"} & (_cpuinfo()[1] if flags is None else flags))


def fp16_notice() -> str:
    """What `fp16: true` does on this CPU (train/loop.py's autocast_dtype decides by the same flags)."""
    if multiplies_fp16_natively():
        return f"note: `fp16` on this CPU ({cpu_description()}) runs in fp16: it has fp16 matrix units"
    return (f"note: `fp16` on this CPU ({cpu_description()}) trains in bf16 autocast, the same 16-bit mixed precision: "
            "it has no fp16 matrix units, and fp16 matmul would run ~100x slower")


def bf16_notice(keys: list[str]) -> str | None:
    """On a CPU without bf16 matrix units, what setting the 16-bit `keys` (bf16, fp16, pure_bf16) costs; None where
    bf16 is native or the CPU's flags are unknown. Measured with oneDNN capped at each class of CPU
    (docs/benchmarks.md; a SmolLM2 LoRA step 2.0x and 36x slower): torch converts every bf16 product, and without
    AVX512 it does so outside oneDNN."""
    flags = _cpuinfo()[1]
    if not keys or not flags or "arm:asimd" in flags or multiplies_bf16_natively(flags):
        return None  # nothing measured on Arm: say nothing rather than x86's figures
    cost = "about 2x" if "avx512f" in flags else "about 35x"
    memory = " (the weights `pure_bf16` held in bf16 then take twice the memory)" if "pure_bf16" in keys else ""
    return (f"note: this CPU ({cpu_description()}) has no bf16 units, so {', '.join(f'`{k}`' for k in keys)} make "
            f"a training step {cost} slower than in fp32; set {', '.join(f'`{k}: false`' for k in keys)} for "
            f"speed{memory}")


def environment() -> str:
    """`tuneforge env`: what a bug report needs to say about the machine and the libraries."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    lines = []
    for package in ("tuneforge", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            lines.append(f"{package:<13} {version(package)}")
        except PackageNotFoundError:
            lines.append(f"{package:<13} not installed")
    _, flags = _cpuinfo()
    units = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("amx_fp16", "AMX-FP16"),
                                     ("avx512_bf16", "AVX512-BF16"), ("avx512_fp16", "AVX512-FP16"),
                                     ("avx512f", "AVX512F"), ("avx2", "AVX2"), ("arm:sme", "SME"),
                                     ("arm:bf16", "BF16"), ("arm:i8mm", "I8MM"), ("arm:sve2", "SVE2"),
                                     ("arm:sve", "SVE"), ("arm:asimd", "NEON")) if flag in flags]
    fp16 = "fp16 (native fp16 units)" if multiplies_fp16_natively(flags) else "runs as bf16 (no fp16 units)"
    lines += [f"python        {platform.python_version()}", f"cpu           {cpu_description()}",
              f"cpu units     {', '.join(units) or 'unknown'}", f"fp16 on cpu   {fp16}",
              f"threads       {torch.get_num_threads()} (torch), {os.cpu_count()} CPUs"]
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    lines.append(f"cuda          {', '.join(f'{i}: {n}' for i, n in enumerate(cuda)) or 'none'}")
    return "\n".join(lines)


def map_large_allocations() -> None:
    """Give allocations of 4 MB and more (attention scores, output-head logits, large activations) their own memory
    mapping, returned to the system when freed. By default glibc raises this threshold to the size of the largest
    block freed so far (up to 32 MB), so after the first training step such tensors come from the heap, where the
    holes they leave between longer-lived activations stay resident: peak RSS 0.1 GB higher with checkpointing on
    SmolLM2-135M (docs/benchmarks.md). A lower threshold (64 KB, 1 MB) saves more but costs up to 70% more CPU time
    in page faults. Kept as the user set it when MALLOC_MMAP_THRESHOLD_ is in the environment; no-op off glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or _preloaded_allocator(os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator has its own policy
        return
    m_mmap_threshold = -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 4 << 20)


def release_free_memory() -> None:
    """Hand the memory allocator's free blocks back to the system: tcmalloc's page heap, or glibc's free pages.

    Called where a run switches between phases that allocate differently. GRPO samples (a KV cache grown token by
    token), then trains on the samples (a forward's activations): without this call tcmalloc kept what sampling had
    used and freed, training could not reuse all of it, and a SmolLM2 GRPO run peaked 0.8 GB higher from its second
    step on (docs/benchmarks.md). The cost is the next phase touching its memory anew, once per phase."""
    process = ctypes.CDLL(None)  # the symbols of this process, the preloaded tcmalloc's first
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release()
    elif hasattr(process, "malloc_trim"):  # glibc; other C libraries have no such call
        process.malloc_trim(0)


ALLOCATOR_KEY = "TUNEFORGE_ALLOCATOR"  # tcmalloc (the default: used when installed) or system


def tcmalloc_library() -> str | None:
    """tcmalloc's shared library when this Linux system has it (Debian/Ubuntu: libtcmalloc-minimal4), else None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def allocator_in_use() -> str:
    """tcmalloc when this process runs on it, else system (from the libraries mapped into it, so a preload that
    failed to load does not count)."""
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return "system"
    return "tcmalloc" if "tcmalloc" in maps else "system"


def _preloaded_allocator(environ: Mapping[str, str]) -> bool:
    return "malloc" in environ.get("LD_PRELOAD", "")  # tcmalloc, jemalloc, mimalloc: the user's or ours


def _allocator_choice(environ: Mapping[str, str]) -> str:
    choice = environ.get(ALLOCATOR_KEY, "tcmalloc")
    if choice not in ("tcmalloc", "system"):
        raise ValueError(f"{ALLOCATOR_KEY}={choice!r} is not an allocator tuneforge knows: use tcmalloc (the "
                         "default when it is installed) or system")
    return choice


def training_allocator(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to run `tuneforge train` again in, under tcmalloc; None to go on as we are (the user chose
    the system's allocator or preloaded one, it already runs on tcmalloc, or tcmalloc is not installed).

    glibc keeps the holes that freed activations leave between longer-lived ones (attention scores, the head's
    logits, compiled code's buffers); tcmalloc reuses them by size class. Measured on SmolLM2-135M LoRA
    (docs/benchmarks.md): peak RSS 1.5 GB lower in fp32, 0.4 GB in bf16, 0.1 GB with checkpointing, the same speed,
    the same losses. An allocator can only be chosen before the process starts, hence the same command again
    (same pid, same arguments) with it preloaded."""
    if _allocator_choice(environ) == "system" or _preloaded_allocator(environ):
        return None
    library = tcmalloc_library()
    if library is None:
        return None
    # tcmalloc reports every allocation over 1 GB on stderr (a 1B model's embedding is one); nothing to act on
    return {**environ, "LD_PRELOAD": ":".join(filter(None, (library, environ.get("LD_PRELOAD")))),
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
                                                                 str(1 << 40))}


def allocator_notice(environ: Mapping[str, str]) -> str | None:
    """The line a training run prints about its memory allocator: tcmalloc in use, or how to get it."""
    if allocator_in_use() == "tcmalloc":
        return f"memory allocator: tcmalloc (lower peak memory; {ALLOCATOR_KEY}=system for the system's)"
    if environ.get(ALLOCATOR_KEY) == "system" or _preloaded_allocator(environ) or not sys.platform.startswith("linux") \
            or tcmalloc_library() is not None:  # installed: main() was called in a process of the caller's
        return None
    return ("tip: with tcmalloc installed (Debian/Ubuntu: apt install libtcmalloc-minimal4) training peaks 0.4-1.5 GB "
            "lower on SmolLM2-135M at the same speed (docs/benchmarks.md)")
