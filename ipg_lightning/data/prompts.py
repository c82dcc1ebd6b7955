"""Prompt templates: a plain text template, or the tokenizer's chat template when it has one."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

DEFAULT_INSTRUCTION = "Solve the problem step by step. Write the final answer on its own line as '#### <answer>'."


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes the text the model is prompted with.

    Args:
        instruction: text placed before the question.
        plain_format: template used without a chat template; fields ``{instruction}`` and ``{question}``.
        use_chat_template: use the tokenizer's chat template when it defines one.
        system_prompt: an optional system message (chat templates only).
    """

    instruction: str = DEFAULT_INSTRUCTION
    plain_format: str = "{instruction}\n\nQuestion: {question}\nAnswer:"
    use_chat_template: bool = True
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if "{question}" not in self.plain_format:
            raise ValueError(f"plain_format must contain '{{question}}', got {self.plain_format!r}")

    def render(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        """The full prompt text for ``question``, including any BOS token the model expects.

        >>> PromptTemplate(instruction="Solve.").render("1+1?")
        'Solve.\\n\\nQuestion: 1+1?\\nAnswer:'
        """
        if tokenizer is not None and self.use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": f"{self.instruction}\n\n{question}".strip()})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = self.plain_format.format(instruction=self.instruction, question=question)
        return _bos_prefix(tokenizer) + text


def _bos_prefix(tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The BOS token text if the tokenizer adds one by default (prompts are encoded without specials)."""
    if tokenizer is None or tokenizer.bos_token is None:
        return ""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == tokenizer.bos_token_id else ""
