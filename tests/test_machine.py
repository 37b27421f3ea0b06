from tuneforge.machine import matrix_units


def test_matrix_units_name_the_bf16_path():
    # flags as /proc/cpuinfo lists them on our two machine kinds and on an older laptop
    assert matrix_units({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "AMX"
    assert matrix_units({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16, no AMX"
    assert matrix_units({"avx2", "avx512f"}) == "AVX512, no bf16 units"
    assert matrix_units({"avx2", "fma"}) == "AVX2"
