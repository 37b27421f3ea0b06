"""How fast this CPU multiplies bf16 matrices whole and in 512-row blocks, at the shapes of LoRA's frozen products.

    .venv/bin/python bench/row_blocks.py [--rows 1024,2048] [--dims 576,896,1536,2048,4864]

For each product [rows, k] @ [k, n] (the weight a transposed view, as a linear layer multiplies it): TFLOP/s of the
whole product, the speed-up of 512-row blocks (models/row_blocks.py's BLOCK_ROWS) over it, and whether the blocks
come out bit for bit equal (the condition under which training uses them). Each figure is the fastest of several
timed repetitions, the two ways alternating. One JSON line per shape, named by CPU and thread count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from tuneforge.machine import cpu_description
from tuneforge.models.row_blocks import BLOCK_ROWS, _in_blocks, _whole


def _fastest(function, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1024,2048", help="row counts (comma list)")
    parser.add_argument("--dims", default="576,896,1536,2048,4864", help="inner and output sizes (comma list)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    header = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "block_rows": BLOCK_ROWS}
    dims = [int(d) for d in args.dims.split(",")]
    for inner, cols, rows in itertools.product(dims, dims, [int(r) for r in args.rows.split(",")]):
        x = torch.randn(rows, inner, dtype=torch.bfloat16)
        weight = torch.randn(cols, inner, dtype=torch.bfloat16).t()
        whole = lambda: _whole(x, weight, None)  # noqa: E731
        blocked = lambda: _in_blocks(x, weight, None, BLOCK_ROWS)  # noqa: E731
        reps = max(3, int(2e8 / (rows * inner * cols)))  # about 0.1 s a way at 2 TFLOP/s
        best_whole = best_blocked = float("inf")
        whole(), blocked()  # oneDNN builds its kernels
        for _ in range(args.rounds):
            best_whole = min(best_whole, _fastest(whole, reps))
            best_blocked = min(best_blocked, _fastest(blocked, reps))
        line = {**header, "rows": rows, "inner": inner, "cols": cols,
                "whole_tflops": round(2 * rows * inner * cols / best_whole / 1e12, 2),
                "blocks_speedup": round(best_whole / best_blocked, 2), "equal": torch.equal(whole(), blocked())}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
