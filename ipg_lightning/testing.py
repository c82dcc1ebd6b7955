"""Tiny models and tokenizers built from configs, for tests, docs and the offline demo.

Nothing here downloads anything: weights are random (seeded) and the tokenizer is a real
``tokenizers`` character-level tokenizer built in memory.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

#: Architectures with a tiny config here; each is a family of :data:`ipg_lightning.sites.ARCHITECTURES`.
TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox")

_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
_CHARACTERS = list(string.ascii_letters + string.digits + string.punctuation + " \n")

# A minimal chat template so the chat-template code path runs on the tiny tokenizer too.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (100 tokens, ids 0-3 are special)."""
    vocab = {token: index for index, token in enumerate(_SPECIAL_TOKENS + _CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )
    if chat_template:
        tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str = "llama", **overrides):
    """A 2-block config of ``family`` with width 32, 4 heads and a 128-token vocabulary."""
    common = dict(vocab_size=128, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if family == "gpt2":
        fields = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=512)
    elif family == "gpt_neox":
        fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=512, rotary_pct=0.5)
    elif family in ("llama", "qwen2", "qwen3", "mistral"):
        fields = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        if family == "qwen3":
            fields["head_dim"] = 8
    else:
        raise ValueError(f"No tiny config for {family!r}; choose from {list(TINY_FAMILIES)}")
    return AutoConfig.for_model(family, **{**common, **fields, **overrides})


def tiny_causal_lm(family: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised (seeded) tiny causal LM of ``family``, in eval mode, float32."""
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger-than-default init so that random tiny models have non-trivial, token-dependent outputs.
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(4.0)
        # nn.Embedding zeroes the padding row; a sampled pad token would then put an all-zero vector
        # into the residual stream, where the next norm is singular. Real checkpoints have no such row.
        embeddings = model.get_input_embeddings()
        if embeddings.padding_idx is not None:
            embeddings.weight[embeddings.padding_idx] = embeddings.weight[-1].roll(1)
    return model.eval()
