"""A LoRA linear layer whose forward and backward are one autograd function: PEFT's LoRA Linear with fewer products.

PEFT's layer computes `base(x) + B(A(x)) * scaling` as three linear layers and an add; autograd then takes each
apart in backward. Written as one function: the up-projection is added into the base output by one addmm, the
input gradient's low-rank term by another, and B's gradient is taken as (xa.T @ g).T, which oneDNN runs faster at
LoRA's shapes than g.T @ xa. On an Intel AMX Xeon it saves 34% of what LoRA adds to a layer's products eager and
22% compiled (bench/lora_function.py); in a whole training step, 1.04x eager and nothing compiled, where inductor
fuses the same work (bench/adapter_cost.py, docs/benchmarks.md), so compiled training keeps PEFT's layers. The
mathematics is PEFT's; only the order in which bf16 sums round differs.

It is PEFT's own `lora.Linear` (same parameters, names, merge, save and load; an adapter trained with it loads in
plain PEFT), registered through LoraConfig's custom-module mapping (`_register_custom_module`, which PEFT documents
as experimental in its guide to custom models), and it falls back to PEFT's forward whenever
anything beyond plain LoRA is asked of it: dropout, DoRA and other variants, a LoRA bias, several or disabled
adapters, merged weights, per-row adapter names, or a trainable base weight.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear

from .row_blocks import frozen_product


class _LoraProduct(torch.autograd.Function):
    """x @ W.T + bias + scaling * (x @ A.T) @ B.T over rows, every operand already in one dtype; the frozen
    weight's products in row blocks where this CPU runs them faster so (models/row_blocks.py)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, lora_a, lora_b, scaling):
        xa = rows @ lora_a.t()
        # in place on the product just made: out-of-place addmm would first copy it
        out = frozen_product(rows, weight.t(), bias).addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, weight, lora_a, lora_b, xa = ctx.saved_tensors
        grad_xa = (grad @ lora_b).mul_(ctx.scaling)
        grad_rows = frozen_product(grad, weight).addmm_(grad_xa, lora_a) if ctx.needs_input_grad[0] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        grad_a = grad_xa.t() @ rows
        grad_b = (xa.t() @ grad).t().mul_(ctx.scaling)
        return grad_rows, None, grad_bias, grad_a, grad_b, None


class FusedLoraLinear(Linear):
    """PEFT's LoRA Linear; plain LoRA runs as one autograd function (see the module docstring)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = self._fused_dtype(x, args, kwargs)
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        base = self.get_base_layer()
        # autocast off: every operand is cast here, as autocast would cast it, so backward (which runs outside
        # autocast) multiplies in the same dtype
        with torch.autocast(x.device.type, enabled=False):
            out = _LoraProduct.apply(x.reshape(-1, x.shape[-1]).to(dtype), base.weight.to(dtype),
                                     None if base.bias is None else base.bias.to(dtype),
                                     self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype),
                                     self.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fused_dtype(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.dtype | None:
        """The dtype to multiply in when plain LoRA may run fused, else None (PEFT's own forward)."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.get_base_layer()
        if (name not in self.lora_A or name in self.lora_variant or self.lora_bias[name]
                or not isinstance(self.lora_dropout[name], torch.nn.Identity) or type(base) is not torch.nn.Linear
                or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        # without autocast PEFT multiplies the adapters in their own dtype: fused only when all share one
        same = x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype
        return x.dtype if same else None


def fuse_lora_products(config) -> None:
    """Have PEFT build FusedLoraLinear for the nn.Linear layers `config` (a LoraConfig) adapts."""
    config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
