"""What bf16 costs on CPUs without bf16 matrix units, measured on one that has them.

    .venv/bin/python bench/bf16_units.py

oneDNN can be capped below the machine's instruction set (ONEDNN_MAX_CPU_ISA), and torch then behaves as on a CPU
of that class: capped at AVX512_CORE (Intel Skylake to Ice Lake servers) it still sends bf16 products to oneDNN,
which converts them; capped at AVX2 (most laptops) torch finds no bf16 support in oneDNN and multiplies bf16 with
its own fallback. The AVX2 class also caps MKL (fp32 products) and ATen's kernels at AVX2. Each class runs in its
own process and prints one JSON line: milliseconds per product, fp32 and bf16, for a SmolLM2-135M layer's shapes
at 1,024 tokens. Training rows under the same caps: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CLASSES = {
    "native": {},
    "AVX512 without bf16 units": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def _ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return round((time.perf_counter() - start) / reps * 1000, 2)


def child() -> dict:
    import torch

    from tuneforge.machine import cpu_description

    result = {"cpu": cpu_description(), "threads": torch.get_num_threads(),
              "onednn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported()}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(1024, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)  # tokens, MLP up weight
        grad = torch.randn(1024, 1536, dtype=dtype)
        q, k = torch.randn(36, 256, 64, dtype=dtype), torch.randn(36, 256, 64, dtype=dtype)  # 4 rows x 9 heads
        result[str(dtype).removeprefix("torch.")] = {
            "forward x @ W.T": _ms(lambda: x @ w.T),
            "input gradient g @ W": _ms(lambda: grad @ w),
            "weight gradient g.T @ x": _ms(lambda: grad.T @ x),
            "attention scores q @ k.T": _ms(lambda: torch.bmm(q, k.transpose(1, 2))),
        }
    return result


def main() -> int:
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(child()))
        return 0
    for name, env in CLASSES.items():
        out = subprocess.run([sys.executable, __file__, "--child"], env={**os.environ, **env}, check=True,
                             capture_output=True, text=True).stdout
        print(json.dumps({"class": name, "env": env, **json.loads(out.splitlines()[-1])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
