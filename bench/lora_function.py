"""What LoRA's products cost per layer, and what a hand-written LoRA linear would save on them.

    .venv/bin/python bench/lora_function.py            # eager
    .venv/bin/python bench/lora_function.py --compile  # each variant through torch.compile

One forward and backward of a single linear layer at SmolLM2-135M's shapes, 1,024 tokens, the quickstart's
precision (bf16 base weights, fp32 adapters, bf16 autocast), timed three ways:
- `base`: the frozen linear alone (what the layer would cost if LoRA were free);
- `peft`: PEFT's LoRA Linear (r 8, alpha 16, no dropout), as `tuneforge train` runs it (its input cast to the
  adapters' fp32 switched off under autocast);
- `function`: the same LoRA linear as one autograd function: the up-projection added into the base output by one
  addmm, the input gradient's low-rank term added by one addmm, B's gradient as (xa.T @ g).T (faster than g.T @ xa
  at these shapes: 3x on a Zen 4 EPYC, 1.3-1.5x on a Zen 5), nothing saved but the input and the rank-r activations.
Rounds alternate the variants; each figure is the fastest of its repetitions (milliseconds), so background noise
does not land on one variant. Results: docs/benchmarks.md ("What the levers left could give").
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting

TOKENS, RANK, ALPHA = 1024, 8, 16
SHAPES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (576, 192), "gate_proj, up_proj": (576, 1536),
          "down_proj": (1536, 576)}
PER_LAYER = {"q_proj, o_proj": 2, "k_proj, v_proj": 2, "gate_proj, up_proj": 2, "down_proj": 1}


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):
        rows = x.reshape(-1, x.shape[-1])
        xa = rows @ lora_a.t()
        out = torch.addmm(rows @ weight.t(), xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.in_shape = scaling, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight, lora_a, lora_b, xa = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_xa = (grad @ lora_b).mul_(ctx.scaling)
        grad_x = torch.addmm(grad @ weight, grad_xa, lora_a)
        grad_a = grad_xa.t() @ rows
        grad_b = (xa.t() @ grad).t().mul_(ctx.scaling)
        return grad_x.view(ctx.in_shape), None, grad_a, grad_b, None


class _Base(torch.nn.Module):
    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(fan_in, fan_out, bias=False, dtype=torch.bfloat16).requires_grad_(False)

    def forward(self, x):
        return self.proj(x)


class _Function(torch.nn.Module):
    def __init__(self, weight, lora_a, lora_b):
        super().__init__()
        self.weight, self.lora_a, self.lora_b = weight, lora_a, lora_b

    def forward(self, x):
        dtype = torch.get_autocast_dtype("cpu")
        return _LoraLinear.apply(x, self.weight, self.lora_a.to(dtype), self.lora_b.to(dtype), ALPHA / RANK)


def _variants(fan_in: int, fan_out: int) -> dict:
    """The three variants on the same weights: one frozen bf16 base, one pair of fp32 adapters."""
    base = _Base(fan_in, fan_out)
    peft = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    lora = peft.base_model.model.proj
    lora_a, lora_b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    with torch.no_grad():  # a non-zero B, as after the first step
        lora_b.copy_(torch.randn_like(lora_b) * 0.01)
    return {"base": lora.base_layer, "peft": peft, "function": _Function(lora.base_layer.weight, lora_a, lora_b)}


def _check_same(variants: dict, x, grad) -> None:
    """The hand-written function computes what PEFT computes (bf16 rounding apart)."""
    results = []
    for name in ("peft", "function"):
        x.grad = None
        for param in variants[name].parameters():
            param.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(variants[name]):
            out = variants[name](x)
        out.backward(grad)
        results.append([out.float(), x.grad.float()] + [p.grad.float() for p in variants["function"].parameters()
                                                        if p.requires_grad])
    for ours, theirs in zip(*results):
        # bf16 keeps 8 significant bits; the two sum the same products in a different order
        assert torch.allclose(ours, theirs, rtol=0.05, atol=0.05 * theirs.abs().max().item()), "results differ"


def _fastest_ms(module, x, grad, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(module):
            out = module(x)
        out.backward(grad)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true", help="run each variant through torch.compile")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    from tuneforge.machine import cpu_description

    torch.manual_seed(0)
    result = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "compile": args.compile, "ms": {}}
    for label, (fan_in, fan_out) in SHAPES.items():
        variants = _variants(fan_in, fan_out)
        x = torch.randn(1, TOKENS, fan_in, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(1, TOKENS, fan_out, dtype=torch.bfloat16)
        _check_same(variants, x, grad)
        if args.compile:
            variants = {name: torch.compile(module) for name, module in variants.items()}
        for module in variants.values():  # warm-up: oneDNN's kernels, compiling
            _fastest_ms(module, x, grad, 3)
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for name, module in variants.items():
                best[name] = min(best[name], _fastest_ms(module, x, grad, args.reps))
        result["ms"][label] = {name: round(ms, 3) for name, ms in best.items()}
    per_layer = {name: round(sum(PER_LAYER[label] * times[name] for label, times in result["ms"].items()), 2)
                 for name in ("base", "peft", "function")}
    result["per_decoder_layer_ms"] = per_layer
    result["lora_share_saved"] = round((per_layer["peft"] - per_layer["function"]) /
                                       (per_layer["peft"] - per_layer["base"]), 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
