"""Tiny models and tokenizers built from configs, for tests, docs and the offline demo.

Nothing here downloads anything: weights are random (seeded) and the tokenizer is a real
``tokenizers`` character-level tokenizer built in memory.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ipg_lightning.model.autoencoder import SAEActivation, SparseAutoencoder
from ipg_lightning.model.loading import ModelLoadError

#: ``model: tiny:<type>`` loads the tiny model of that decoder type.
TINY_PREFIX = "tiny:"

#: Decoder types with a tiny config here (every dense decoder type the tests cover); ``tiny:<type>``
#: loads one. The first six are the original tiny families; the order is the test matrix's.
TINY_FAMILIES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox",
    "phi3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "phi", "stablelm",
    "starcoder2", "cohere", "gptj", "opt", "bloom", "falcon", "smollm3",
)  # fmt: skip

#: Mixture-of-experts decoder types with a tiny config here (their experts are fused 3-D weights: no
#: ``mlp_neuron`` sites yet; ``mlp_out`` gates the whole MoE block's output).
TINY_MOE_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")

#: Per-type settings beyond the shared tiny sizes: the names some configs use for the same sizes,
#: and explicit head dimensions where a type's default would not divide the tiny width.
_TINY_EXTRAS: dict[str, dict] = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=512, tie_word_embeddings=True),
    "gpt_neox": dict(rotary_pct=0.5),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4, n_positions=512),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "bloom": dict(n_layer=2, n_head=4),
    "falcon": dict(num_kv_heads=4),
    "qwen3": dict(head_dim=8),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
}

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
    """A 2-block config of decoder type ``family`` with width 32, 4 heads and a 128-token vocabulary."""
    if family not in TINY_FAMILIES + TINY_MOE_FAMILIES:
        raise ValueError(f"No tiny config for {family!r}; choose from {list(TINY_FAMILIES + TINY_MOE_FAMILIES)}")
    fields = dict(
        vocab_size=128,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return AutoConfig.for_model(family, **{**fields, **_TINY_EXTRAS.get(family, {}), **overrides})


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


def load_tiny(name: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``model: tiny:<type>``: the tiny random model of that decoder type (float32, whatever ``dtype`` says) and its tokenizer."""
    family = name.removeprefix(TINY_PREFIX)
    if family not in TINY_FAMILIES + TINY_MOE_FAMILIES:
        raise ModelLoadError(f"No tiny model {name!r}; choose from {[TINY_PREFIX + f for f in TINY_FAMILIES + TINY_MOE_FAMILIES]}")
    return tiny_causal_lm(family), tiny_tokenizer()


def random_sae(
    d_in: int = 32,
    hook_name: str = "blocks.1.hook_resid_post",
    d_sae: int = 64,
    activation: SAEActivation = "topk",
    k: int | None = 8,
    seed: int = 0,
    **fields,
) -> SparseAutoencoder:
    """A sparse autoencoder with random (seeded) weights, scaled so that its features fire on tiny-model activations."""
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, hook_name, activation=activation, k=k if activation == "topk" else None, **fields)
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=generator), dim=-1))
        sae.W_enc.copy_(sae.W_dec.T + 0.1 * torch.randn(d_in, d_sae, generator=generator))
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=generator))
        sae.b_dec.copy_(0.05 * torch.randn(d_in, generator=generator))
        sae.threshold.copy_(0.1 * torch.rand(d_sae, generator=generator))
    return sae


def coverage_table() -> str:
    """The README's coverage table: for every tiny decoder type, how each site family's gates are applied.

    ``folds`` means the gate folds exactly into a projection's weights; ``loader`` that it is applied
    by hooks and travels in an export's steering file (``load_steered``); ``-`` that the model has no
    such site. ``sae_feature`` is measured with an SAE attached at block 0's residual output. Every
    cell is also checked by the test matrix (gates at 1 change nothing, folding and the loader
    reproduce the gated model).
    """
    from ipg_lightning.model.families import FAMILIES
    from ipg_lightning.model.sae_splice import splice_sae
    from ipg_lightning.model.sites import discover_sites

    lines = ["| decoder type | " + " | ".join(f"`{family}`" for family in FAMILIES) + " |", "| --- |" + " --- |" * len(FAMILIES)]
    for family in TINY_FAMILIES + TINY_MOE_FAMILIES:
        model, cells = tiny_causal_lm(family), []
        splice_sae(model, random_sae(model.config.hidden_size, "blocks.0.hook_resid_post"))
        for site_family in FAMILIES:
            try:
                site = discover_sites(model, [site_family], layers=[0])[0]
            except ValueError:  # the model has no site of this family
                cells.append("-")
                continue
            cells.append("folds" if site.foldable else "loader")
        lines.append(f"| `{family}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
