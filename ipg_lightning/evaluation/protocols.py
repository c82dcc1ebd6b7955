"""Evaluation protocols by name, and the record of the full protocol kept with every number.

The same model scores very differently under different protocols (greedy at 2,048 tokens against 64
samples at 32k tokens), so a result is only comparable with its protocol. A :class:`Protocol` fixes
the decoding (temperature, top-p, samples per problem, optionally the token budget);
:func:`protocol_record` writes down everything else that changes the number: the engine, the prompt
(chat template or plain, system prompt, instruction), how ``<think>`` is handled, and the grader.

>>> sorted(PROTOCOLS)
['greedy', 'paper', 'r1', 'sampled']
>>> PROTOCOLS["r1"].num_samples, PROTOCOLS["r1"].max_new_tokens
(64, 32768)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from ipg_lightning.data.prompts import PromptTemplate
from ipg_lightning.rewards.answers import THINK_END
from ipg_lightning.rewards.equivalence import grader_record
from ipg_lightning.rollout.trajectories import SamplingConfig

THINK_START = "<think>"


@dataclass(frozen=True)
class Protocol:
    """How a benchmark is decoded.

    Args:
        description: one line for reports and ``--help``.
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus mass when sampling (None for greedy protocols: it has no effect there).
        num_samples: completions per problem (k); accuracy is then avg@k, and pass@k is reported.
        max_new_tokens: the token budget; None keeps ``--sampling.max_new_tokens``.
    """

    description: str
    temperature: float
    top_p: float | None
    num_samples: int
    max_new_tokens: int | None = None


#: Named protocols. ``paper``: the IPG paper's GSM8K/MATH-500 evaluation; ``r1``: how DeepSeek-R1 and
#: its distilled models report MATH-500 and AIME (its model card).
PROTOCOLS: dict[str, Protocol] = {
    "greedy": Protocol("greedy decoding, one completion per problem, at --sampling.max_new_tokens", 0.0, None, 1),
    "paper": Protocol("greedy decoding at 2,048 tokens, one completion per problem (the IPG paper)", 0.0, None, 1, 2048),
    "sampled": Protocol("temperature 0.6, top-p 0.95, 8 samples per problem (avg@8, pass@k)", 0.6, 0.95, 8),
    "r1": Protocol("temperature 0.6, top-p 0.95, 64 samples per problem at 32,768 tokens (DeepSeek-R1's card)", 0.6, 0.95, 64, 32768),
}


def apply_protocol(sampling: SamplingConfig, name: str | None, default: SamplingConfig) -> SamplingConfig:
    """``sampling`` decoding as the protocol ``name`` says (unchanged for None).

    A protocol and a ``--sampling`` field it sets are not both given: a field of ``sampling`` that
    differs from ``default`` and that the protocol would overwrite is refused, naming both. (A value
    given on the command line that equals its default cannot be told from no value: it is replaced.)
    """
    if name is None:
        return sampling
    if name not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}, or leave it out and set --sampling.*")
    protocol = PROTOCOLS[name]
    fields = {
        "temperature": protocol.temperature,
        "top_p": protocol.top_p,
        "num_samples": protocol.num_samples,
        "max_new_tokens": protocol.max_new_tokens,
    }
    fields = {field: value for field, value in fields.items() if value is not None}
    for field, value in fields.items():
        given = getattr(sampling, field)
        if given != getattr(default, field) and given != value:
            raise ValueError(f"--protocol {name} sets {field} to {value}, but --sampling.{field} is {given}: give one or the other")
    return replace(sampling, **fields)


def _think_handling(template: PromptTemplate, tokenizer: PreTrainedTokenizerBase | None) -> str:
    opened = template.render("", tokenizer).rstrip().endswith(THINK_START)
    start = "the chat template opens <think> itself; " if opened else ""
    return (
        f"{start}reasoning length counts the tokens before {THINK_END} (else before the final-answer marker, else all); "
        f"the final answer is looked for after the last {THINK_END} first, then in the whole completion"
    )


def protocol_record(
    name: str | None, sampling: SamplingConfig, template: PromptTemplate, tokenizer: PreTrainedTokenizerBase | None
) -> dict[str, Any]:
    """Everything that decides a benchmark number besides the model: decoding, engine, prompt,
    ``<think>`` handling and grader. Written into ``metrics.json``, sweeps and reports."""
    chat = bool(template.use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))
    return {
        "name": name or "custom",
        "description": PROTOCOLS[name].description if name else "decoding set by --sampling",
        "engine": sampling.engine,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p if sampling.temperature > 0 else None,
        "max_new_tokens": sampling.max_new_tokens,
        "samples_per_problem": sampling.num_samples,
        "stop_strings": list(sampling.stop_strings),
        "prompt": {"chat_template": chat, **{key: value for key, value in asdict(template).items() if key != "use_chat_template"}},
        "think": _think_handling(template, tokenizer),
        "grader": grader_record(),
        "metrics": (
            "accuracy is the mean over all completions (avg@k with k samples per problem); "
            "pass@k is the unbiased estimate 1 - C(n-c, k) / C(n, k) per problem"
        ),
    }
