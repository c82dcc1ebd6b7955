"""Log-probabilities of the taken tokens without a vocabulary-sized log-softmax per position.

``log_softmax(logits.float()).gather(targets)`` keeps a float32 copy of every position's full
log-softmax for backward, and backward adds two more vocabulary-sized tensors: with a 150k
vocabulary that is 0.6 MB per token each, more than the whole transformer stack above a
mid-depth site. :func:`target_log_probs` computes ``logit[target] - logsumexp(logits)`` in slices
of positions, keeps only the logits (which exist anyway) and one float per position for backward,
and writes the gradient ``onehot(target) - softmax(logits)`` slice by slice into one tensor of the
logits' dtype.
"""

from __future__ import annotations

import itertools

import torch

#: Positions per slice: bounds the float32 temporaries at ``slice x vocabulary`` elements.
POSITIONS_PER_SLICE = 128


def _slices(shape: torch.Size) -> list[tuple[int, ...] | tuple[int, slice]]:
    """Index tuples covering the leading dimensions in runs of at most ``POSITIONS_PER_SLICE`` positions.

    Indexing views the logits in place: a reshape of the sliced logits a model returns would copy them.
    """
    *outer, positions = shape
    runs = [slice(start, start + POSITIONS_PER_SLICE) for start in range(0, positions, POSITIONS_PER_SLICE)]
    return [(*index, run) for index in itertools.product(*map(range, outer)) for run in runs]


class _TargetLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_norm = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(log_norm)
        for index in _slices(targets.shape):
            block = logits[index].float()
            log_norm[index] = torch.logsumexp(block, dim=-1)
            picked[index] = block.gather(-1, targets[index].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, targets, log_norm)
        return picked - log_norm

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, log_norm = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_output = grad_output.float()
        for index in _slices(targets.shape):
            scale = grad_output[index].unsqueeze(-1)
            block = torch.exp(logits[index].float() - log_norm[index].unsqueeze(-1)).mul_(-scale)
            block.scatter_add_(-1, targets[index].unsqueeze(-1), scale)
            grad[index] = block
        return grad, None


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits, -1)`` at ``targets``, in float32, computed in slices of positions.

    Args:
        logits: (..., vocabulary) scores, any floating dtype.
        targets: (...) token ids.

    Returns a float32 tensor shaped like ``targets``; differentiable with respect to ``logits``.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0, 2.0]])
        >>> torch.allclose(target_log_probs(logits, torch.tensor([2])), torch.log_softmax(logits, -1)[:, 2])
        True
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match the logits' leading shape {tuple(logits.shape[:-1])}")
    return _TargetLogProbs.apply(logits, targets)
