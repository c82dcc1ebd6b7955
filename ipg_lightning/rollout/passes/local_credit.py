"""The ``local`` credit path: a component's effect at position t counts only through log pi(a_t).

With the ``full`` path, backward carries a gate's effect on the hidden state h_t to every later
token t' > t through attention, so dL/dh_t = sum_{t' >= t} d log pi(a_t') / dh_t. The ``local``
path keeps only the t' = t term, the paper's per-position formula read literally.

Every path from h_t to log pi(a_t) stays at position t (causal attention reads only earlier
positions, and h_t only reaches later ones), so the only cross-position paths are the attention
reads of position t's key and value by later queries. Module hooks cannot remove them: the same
key and value tensors serve position t's own query, whose read must keep its gradient. So the
attention function itself is wrapped, in the blocks from the lowest gate up: it runs on detached
keys and values (gradient still flows through the queries), and a zero-valued term puts back the
gradient of each position's read of its own key and value,

    a_tt (v_t - sg[v_t])  +  a_tt (sg[v_t] - sg[o_t]) * ds_tt,    ds_tt = d score_tt along k_t,

where a_tt is the attention weight of position t on itself, o_t the attention output and sg the
stop-gradient. a_tt comes from the scores recomputed in float32 (scaling, soft-capping, the mask,
attention sinks); the recomputed output must match the model's own attention function, or the
pass stops with an error naming the attention class (for example ALiBi attention, which adds a
bias this recomputation does not know).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

LOCAL_CREDIT = "ipg_local_credit"


class LocalCreditError(RuntimeError):
    """The local credit path cannot be applied to this model's attention."""


def _original_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    if implementation == "eager":  # the modelling file's own eager function (soft-capping, sinks)
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise LocalCreditError(f"credit: local cannot find the eager attention function of {type(module).__name__}")
        return function
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _repeat_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """Key or value heads repeated to ``heads`` query heads (grouped-query attention)."""
    return states.repeat_interleave(heads // states.shape[1], dim=1) if states.shape[1] != heads else states


def _attention_probabilities(module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """The attention weights (batch, heads, queries, keys) in float32, recomputed without gradients."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril(scores.shape[-1] - scores.shape[-2])
        scores = scores.masked_fill(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., : scores.shape[-1]], float("-inf"))
    else:
        scores = scores + mask[..., : scores.shape[-1]].float()
    sinks = getattr(module, "sinks", None)
    if sinks is not None:  # a per-head logit that joins the normaliser and reads nothing
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probabilities = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probabilities = torch.softmax(scores, dim=-1)
    return probabilities.nan_to_num(0.0)  # a padding query that may read nothing reads nothing


def local_credit_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's attention with each position's gradient reaching only its own key and value.

    Registered in transformers' ``AttentionInterface`` as ``ipg_local_credit`` and selected by
    :func:`local_credit` around the attention modules of the live blocks.
    """
    original = _original_attention(module, module.ipg_original_attention)
    output, weights = original(module, query, key.detach(), value.detach(), attention_mask, **kwargs)
    module.ipg_local_credit_ran = True
    if query.shape[-2] != key.shape[-2]:
        raise LocalCreditError("credit: local needs full teacher-forced passes (queries and keys over the same positions), not a KV cache")
    heads = query.shape[1]
    keys, values = _repeat_heads(key, heads), _repeat_heads(value, heads)
    with torch.no_grad():
        probabilities = _attention_probabilities(module, query, keys, attention_mask, kwargs)
        recomputed = (probabilities @ values.float()).transpose(1, 2)
        reads = probabilities.sum(-1).transpose(1, 2) > 0  # padding queries that read nothing are not compared
        tolerance = (1e-4 if output.dtype == torch.float32 else 3e-2) * (1 + values.abs().max().item())
        if not torch.allclose(recomputed[reads], output.float()[reads], rtol=0, atol=tolerance):
            raise LocalCreditError(
                f"credit: local cannot reproduce {type(module).__name__}'s attention (a position bias such as ALiBi?); use credit: full"
            )
        on_itself = probabilities.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (batch, heads, positions, 1)
        attended = output.transpose(1, 2).float()
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        slope = torch.ones_like(on_itself)
        if kwargs.get("softcap"):
            own_score = (query.float() * keys.float()).sum(-1, keepdim=True) * scaling
            slope = 1 - torch.tanh(own_score / kwargs["softcap"]) ** 2
    own_score_change = (query.detach().float() * (keys.float() - keys.detach().float())).sum(-1, keepdim=True) * scaling * slope
    correction = on_itself * (values.float() - values.detach().float()) + on_itself * (values.detach().float() - attended) * own_score_change
    return output + correction.transpose(1, 2).to(output.dtype), weights


AttentionInterface.register(LOCAL_CREDIT, local_credit_attention)


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(getattr(module, "config", None), "_attn_implementation")


@contextmanager
def local_credit(blocks: list[nn.Module]) -> Iterator[None]:
    """Within the block, the attention of ``blocks`` passes gradient only along each position's own reads."""
    modules = [module for block in blocks for module in block.modules() if _is_attention(module)]
    if blocks and not modules:
        raise LocalCreditError(f"credit: local found no attention module in {type(blocks[0]).__name__}; use credit: full")

    def select(module: nn.Module, args: Any, kwargs: Any) -> None:
        module.ipg_original_attention = module.config._attn_implementation
        module.ipg_local_credit_ran = False
        module.config._attn_implementation = LOCAL_CREDIT

    def restore(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        module.config._attn_implementation = module.ipg_original_attention
        if not module.ipg_local_credit_ran:
            raise LocalCreditError(f"credit: local needs attention through transformers' AttentionInterface; {type(module).__name__} does not use it")

    handles = [module.register_forward_pre_hook(select, with_kwargs=True) for module in modules]
    handles += [module.register_forward_hook(restore, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:  # a pass that failed inside attention has not restored the setting
            if "ipg_original_attention" in vars(module):
                module.config._attn_implementation = vars(module).pop("ipg_original_attention")
            vars(module).pop("ipg_local_credit_ran", None)
