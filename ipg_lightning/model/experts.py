"""Mixture-of-experts MLPs whose experts are fused 3-D weights: where they are, and how a gate reaches them.

In transformers v5 the experts of Mixtral, Qwen2/3-MoE and gpt-oss live in one module holding a
``down_proj`` parameter of shape (experts, ..., ...) that its forward indexes per expert; no hook can
reach one expert's hidden activations. A gate on them therefore scales the weight instead, which is
exact: scaling input channel i of expert e's down-projection is ``W_e (h * c) = (W_e * c) h``, and
scaling the whole expert scales its down-projection and its bias. During :meth:`attach` the weight is
reparametrised as ``W * multiplier(gates)`` (``torch.nn.utils.parametrize``), so gradients reach the
gates and the router is untouched; folding multiplies the weight in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ipg_lightning.model.families import ExpertLayout


def find_experts(mlp: nn.Module, mlp_path: str, hidden: int) -> ExpertLayout | None:
    """The fused experts inside an MLP module, or None if it holds no 3-D down-projection."""
    for name, module in mlp.named_modules():
        down = getattr(module, "down_proj", None)
        if not isinstance(down, torch.nn.Parameter) or down.dim() != 3:
            continue
        count, first, second = down.shape
        gate_up = getattr(module, "gate_up_proj", None)
        linear_layout = first == hidden and (second != hidden or gate_up is None or gate_up.shape[-1] == hidden)
        bias = "down_proj_bias" if isinstance(getattr(module, "down_proj_bias", None), torch.Tensor) else None
        return ExpertLayout(
            path=f"{mlp_path}.{name}" if name else mlp_path,
            parameter="down_proj",
            input_axis=2 if linear_layout else 1,
            count=count,
            width=second if linear_layout else first,
            bias=bias,
        )
    return None


class _GateScale(nn.Module):
    """A parametrization ``W -> W * multiplier()`` whose multiplier is read from the gates at every access."""

    def __init__(self, multiplier: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "multiplier", multiplier)  # a closure over the gates, not a submodule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The gated weight."""
        return weight * self.multiplier().to(device=weight.device, dtype=weight.dtype)


class WeightGateHandle:
    """Removes a gate parametrization, restoring the original parameter (like a hook's ``RemovableHandle``)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name

    def remove(self) -> None:
        """Restore the plain parameter (idempotent)."""
        if parametrize.is_parametrized(self.module, self.name):
            parametrize.remove_parametrizations(self.module, self.name, leave_parametrized=False)


def gate_weight(module: nn.Module, name: str, multiplier: Callable[[], torch.Tensor]) -> WeightGateHandle:
    """Reparametrise ``module.<name>`` as ``weight * multiplier()`` until the returned handle is removed."""
    parametrize.register_parametrization(module, name, _GateScale(multiplier), unsafe=True)
    return WeightGateHandle(module, name)
