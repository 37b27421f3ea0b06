import os
import subprocess
import sys

import pytest

from tuneforge import machine
from tuneforge.machine import matrix_units, parse_cpuinfo


def test_matrix_units_name_the_bf16_path():
    # flags as /proc/cpuinfo lists them on our two machine kinds and on an older laptop
    assert matrix_units({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "AMX"
    assert matrix_units({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16, no AMX"
    assert matrix_units({"avx2", "avx512f"}) == "AVX512, no bf16 units"
    assert matrix_units({"avx2", "fma"}) == "AVX2"


def test_the_cpu_name_carries_family_and_model():
    # a virtual machine's masked name: only family and model tell a Zen 5 (26) from a Zen 4 (25)
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: other\nflags\t\t: fpu\n")
    assert parse_cpuinfo(text) == ("AMD EPYC, family 26 model 2", {"fpu", "avx2", "avx512f", "avx512_bf16"})
    # an Arm server (AWS Graviton3): no model name; the implementer and part name the core, and its Features are
    # kept apart from x86 flags, so that no x86 decision (bf16 autocast, the cost notices) is taken on them
    arm = ("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd fphp asimdhp sve i8mm bf16\n"
           "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\n\n")
    name, flags = parse_cpuinfo(arm)
    assert name.endswith(", Neoverse V1") and {"arm:bf16", "arm:sve"} <= flags
    assert matrix_units(flags) == "BF16 (BFMMLA)"
    assert matrix_units({"arm:fp", "arm:asimd"}) == "NEON, no bf16"
    assert not machine.multiplies_bf16_natively(flags)  # unmeasured on Arm: fp32 stays the default there
    unknown = arm.replace("0xd40", "0xd99")
    assert "implementer 0x41 part 0xd99" in parse_cpuinfo(unknown)[0]


def test_no_x86_cost_notice_on_arm(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("aarch64, Neoverse N1", {"arm:fp", "arm:asimd"}))
    assert machine.bf16_notice(["bf16"]) is None
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("x86", {"avx2", "fma"}))
    assert "about 35x" in machine.bf16_notice(["bf16"])


def test_training_allocator_preloads_tcmalloc_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(machine, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    env = machine.training_allocator({"PATH": "/bin"})
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 1 << 30  # no report for a large model's weights
    env = machine.training_allocator({"LD_PRELOAD": "/opt/libfoo.so"})  # the user's own preload is kept
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/opt/libfoo.so"
    assert machine.training_allocator({"TUNEFORGE_ALLOCATOR": "system"}) is None
    assert machine.training_allocator({"WORLD_SIZE": "2"})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"  # ranks too
    assert machine.training_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None  # the user's allocator
    with pytest.raises(ValueError, match="TUNEFORGE_ALLOCATOR='jemalloc'.*tcmalloc.*system"):
        machine.training_allocator({"TUNEFORGE_ALLOCATOR": "jemalloc"})
    monkeypatch.setattr(machine, "tcmalloc_library", lambda: None)
    assert machine.training_allocator({}) is None


def test_allocator_notice_says_what_runs_or_how_to_get_tcmalloc(monkeypatch):
    monkeypatch.setattr(machine.sys, "platform", "linux")
    monkeypatch.setattr(machine, "allocator_in_use", lambda: "system")
    monkeypatch.setattr(machine, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    assert machine.allocator_notice({}) is None  # installed: main() called in a process of the caller's
    monkeypatch.setattr(machine, "tcmalloc_library", lambda: None)
    assert "apt install libtcmalloc-minimal4" in machine.allocator_notice({})
    assert machine.allocator_notice({"TUNEFORGE_ALLOCATOR": "system"}) is None
    assert machine.allocator_notice({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    monkeypatch.setattr(machine, "allocator_in_use", lambda: "tcmalloc")
    assert machine.allocator_notice({}).startswith("memory allocator: tcmalloc")


RELEASE_PROBE = """
import torch
from tuneforge.machine import release_free_memory
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
blocks = [torch.ones(256 * 1024) for _ in range(300)]  # 300 MB in 1 MB tensors, every page touched
del blocks
before = rss()
release_free_memory()
print(before, rss())
"""


def test_release_free_memory_hands_freed_blocks_back_under_tcmalloc():
    """tcmalloc keeps freed blocks for reuse (RL's sampling then training could not reuse them all); the call must
    return them to the system. Run in a child started on tcmalloc, as `tuneforge train` runs itself."""
    library = machine.tcmalloc_library()
    if library is None:
        pytest.skip("tcmalloc is not installed (make installs libtcmalloc-minimal4)")
    env = {**os.environ, "LD_PRELOAD": library}
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=env, capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    # tcmalloc holds the 300 MB after `del`; what comes back is most of it (the rest: pages of its own bookkeeping)
    assert before - after > 200, (before, after)
