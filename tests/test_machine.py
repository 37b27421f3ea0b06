from tuneforge.machine import matrix_units


def test_matrix_units_name_the_bf16_path():
    # flags as /proc/cpuinfo lists them on our two machine kinds and on an older laptop
    assert matrix_units({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "AMX"
    assert matrix_units({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16, no AMX"
    assert matrix_units({"avx2", "avx512f"}) == "AVX512, no bf16 units"
    assert matrix_units({"avx2", "fma"}) == "AVX2"


def test_training_allocator_preloads_tcmalloc_unless_the_user_chose(monkeypatch):
    import pytest

    from tuneforge import machine

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
    from tuneforge import machine

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
