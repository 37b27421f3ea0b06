"""Products with a frozen weight, computed in blocks of rows where that is faster on this CPU and changes no bit.

oneDNN picks how to split a bf16 product over threads from its shape. On an Intel Xeon with AMX at 2 threads it
runs products of 768-1,280 rows into at most ~900 columns at one thread's speed (1.1-1.5 TFLOP/s, where 512 or 2,048
rows reach 2.2-3.0); the same product as 512-row blocks runs 1.4-1.9x faster (`bench/row_blocks.py`). SmolLM2's
q, o and down projections and the input gradients of all but k and v are such products at the fast settings'
1,024 rows. Which shapes suffer depends on the CPU, the thread count and oneDNN's heuristics, so nothing here is a
rule: each shape is timed once per process both ways on its first real operands, and blocks are kept only when
they are faster by a tenth and bit for bit equal to the whole product. oneDNN's order of summation can change with
the number of rows; where it does the whole product stays, so the choice never changes a result.

Only for products on CPUs in 16-bit floats (fp32 goes to MKL: at these shapes on the AMX machine its products
run at the same speed at every row count, 0.95-0.97x as fast in blocks), never while torch.compile traces
(inductor chooses its own kernels).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

BLOCK_ROWS = 512  # the block size measured best on the AMX machine (256-row blocks are slower, or change sums)
MIN_GAIN = 1.1  # blocks must beat the whole product by this factor: a closer call is timing noise
_TIMED_RUNS = 3

# the choice per shape, layout, dtype and thread count: block rows, or None for the whole product
_choices: dict[tuple, int | None] = {}


def frozen_product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows @ weight (+ bias): rows [m, k], weight [k, n] (a transposed view is fine), bias [n] or None."""
    if not _may_block(rows):
        return _whole(rows, weight, bias)
    key = (rows.shape, rows.stride(), weight.shape, weight.stride(), rows.dtype, bias is not None,
           torch.get_num_threads())
    if key not in _choices:
        _choices[key], out = choose_blocks(rows, weight, bias)
        return out
    block = _choices[key]
    return _whole(rows, weight, bias) if block is None else _in_blocks(rows, weight, bias, block)


def choose_blocks(rows, weight, bias, clock: Callable[[], float] = time.perf_counter):
    """(block rows or None, the product): both ways timed on these operands, blocks only if faster and equal."""
    whole = _whole(rows, weight, bias)  # also the first call, which builds oneDNN's kernel for the shape
    blocked = _in_blocks(rows, weight, bias, BLOCK_ROWS)
    if not torch.equal(whole, blocked):
        return None, whole
    best_whole = best_blocked = float("inf")
    for _ in range(_TIMED_RUNS):  # alternating, so a burst of background load does not land on one way only
        started = clock()
        _whole(rows, weight, bias)
        middle = clock()
        _in_blocks(rows, weight, bias, BLOCK_ROWS)
        best_whole, best_blocked = min(best_whole, middle - started), min(best_blocked, clock() - middle)
    return (BLOCK_ROWS if best_blocked * MIN_GAIN < best_whole else None), whole


def _may_block(rows: torch.Tensor) -> bool:
    # compiling first: dynamo cannot trace get_num_threads and would break the graph there
    return (not torch.compiler.is_compiling() and rows.device.type == "cpu"
            and rows.dtype in (torch.bfloat16, torch.float16) and rows.dim() == 2 and rows.shape[0] > BLOCK_ROWS
            and torch.get_num_threads() > 1)


def _whole(rows, weight, bias):
    return rows @ weight if bias is None else torch.addmm(bias, rows, weight)


def _in_blocks(rows, weight, bias, block: int):
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    for start in range(0, rows.shape[0], block):
        end = start + block
        if bias is None:
            torch.mm(rows[start:end], weight, out=out[start:end])
        else:
            torch.addmm(bias, rows[start:end], weight, out=out[start:end])
    return out
