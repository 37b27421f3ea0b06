"""Frozen-weight products in row blocks (models/row_blocks.py): the result is always the whole product's, bit for
bit; blocks are chosen only when timed faster and found equal, the choice is made once per shape, and nothing is
timed where blocks are never used."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tuneforge.models import row_blocks
from tuneforge.models.lora_linear import _LoraProduct


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(row_blocks, "_choices", {})


@contextlib.contextmanager
def threads(count: int):
    # the suite runs on one thread (OMP_NUM_THREADS=1), where blocks are never tried
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _clock(whole: float, blocked: float):
    """A clock under which every whole product takes `whole` seconds and every blocked one `blocked`: choose_blocks
    reads it before the whole product, between the two, and after the blocked one."""
    times, now = [], 0.0
    for _ in range(row_blocks._TIMED_RUNS):
        times += [now, now + whole, now + whole + blocked]
        now += whole + blocked
    return iter(times).__next__


def _operands(rows=1024, inner=64, cols=48, bias=True):
    torch.manual_seed(0)
    x = torch.randn(rows, inner, dtype=torch.bfloat16)
    weight = torch.randn(cols, inner, dtype=torch.bfloat16)
    return x, weight.t(), torch.randn(cols, dtype=torch.bfloat16) if bias else None


def test_blocks_are_chosen_when_faster_and_equal_and_the_choice_is_kept(monkeypatch):
    x, weight, bias = _operands()
    block, out = row_blocks.choose_blocks(x, weight, bias, clock=_clock(whole=2.0, blocked=1.0))
    assert block == row_blocks.BLOCK_ROWS and torch.equal(out, torch.addmm(bias, x, weight))
    assert row_blocks.choose_blocks(x, weight, bias, clock=_clock(whole=1.05, blocked=1.0))[0] is None  # noise
    assert row_blocks.choose_blocks(x, weight, bias, clock=_clock(whole=1.0, blocked=2.0))[0] is None

    calls = []

    def choose(rows, weight, bias):
        calls.append(rows.shape)
        return row_blocks.BLOCK_ROWS, row_blocks._in_blocks(rows, weight, bias, row_blocks.BLOCK_ROWS)
    monkeypatch.setattr(row_blocks, "choose_blocks", choose)
    with threads(2):
        for _ in range(3):
            assert torch.equal(row_blocks.frozen_product(x, weight, bias), torch.addmm(bias, x, weight))
    assert len(calls) == 1 and list(row_blocks._choices.values()) == [row_blocks.BLOCK_ROWS]


def test_blocks_that_change_a_result_are_never_chosen(monkeypatch):
    x, weight, _ = _operands(bias=False)
    real = row_blocks._in_blocks

    def one_bit_off(*args):  # oneDNN may sum in another order for fewer rows: one element's last bit differs
        out = real(*args)
        out[7, 3] = torch.nextafter(out[7, 3], out[7, 3] + 1)
        return out
    monkeypatch.setattr(row_blocks, "_in_blocks", one_bit_off)
    block, out = row_blocks.choose_blocks(x, weight, None, clock=_clock(whole=10.0, blocked=1.0))
    assert block is None and torch.equal(out, x @ weight)


@pytest.mark.parametrize("case", ["fp32", "one thread", "few rows", "compiling"])
def test_nothing_is_timed_where_blocks_are_never_used(monkeypatch, case):
    x, weight, bias = _operands(rows=row_blocks.BLOCK_ROWS if case == "few rows" else 1024)
    if case == "fp32":
        x, weight, bias = x.float(), weight.float(), bias.float()
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(row_blocks, "choose_blocks", lambda *a: pytest.fail("timed"))
    with threads(1 if case == "one thread" else 2):
        assert torch.equal(row_blocks.frozen_product(x, weight, bias), torch.addmm(bias, x, weight))
    assert row_blocks._choices == {}


def test_lora_products_in_blocks_are_bit_for_bit_the_whole_ones(monkeypatch):
    """The LoRA function's frozen products (forward, and the input's gradient) in blocks on real timing, forced to
    prefer blocks wherever they are equal: the same output and gradients as without blocks."""
    torch.manual_seed(0)
    rows = torch.randn(1100, 96, dtype=torch.bfloat16)  # 1,100 rows: a last block shorter than the others
    weight, bias = torch.randn(80, 96, dtype=torch.bfloat16), torch.randn(80, dtype=torch.bfloat16)
    lora_a, lora_b = torch.randn(8, 96, dtype=torch.bfloat16), torch.randn(80, 8, dtype=torch.bfloat16)
    grad = torch.randn(1100, 80, dtype=torch.bfloat16)

    def run():
        x, a, b = (t.clone().requires_grad_(True) for t in (rows, lora_a, lora_b))
        out = _LoraProduct.apply(x, weight, bias, a, b, 2.0)
        out.backward(grad)
        return [out, x.grad, a.grad, b.grad]

    with threads(2):
        monkeypatch.setattr(row_blocks, "MIN_GAIN", 0.0)  # any blocks that are equal
        run()  # the first product of a shape chooses, and returns the whole product
        blocked = run()
        # both products (forward, input gradient) in blocks: at 96 and 80 inner columns oneDNN sums one block of
        # the inner dimension whatever the row count, so blocks come out equal on every CPU
        assert list(row_blocks._choices.values()) == [row_blocks.BLOCK_ROWS] * 2
        monkeypatch.setattr(row_blocks, "_may_block", lambda *a: False)
        whole = run()
    for ours, theirs in zip(blocked, whole):
        assert torch.equal(ours, theirs)
