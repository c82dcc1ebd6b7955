"""Shared test setup (tests and doctests): no hub access ever, and small deterministic fixtures."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ipg_lightning.zoo.tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402

# lm-evaluation-harness is an optional extra: without it, its module's doctests are not collected
collect_ignore = [] if importlib.util.find_spec("lm_eval") else ["ipg_lightning/evaluation/lm_eval_model.py"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tokenizer():
    """The character-level tiny tokenizer (deterministic, no chat template)."""
    return tiny_tokenizer()


@pytest.fixture
def tiny_model():
    """A factory ``make(family="llama", seed=0, **config_overrides)`` of fresh tiny causal LMs.

    Each call builds a new model (tests fold gates into weights and otherwise mutate them). Building
    forks the RNG, so a call does not disturb the test's own random stream wherever it happens.
    """

    def make(family: str = "llama", seed: int = 0, **overrides):
        return tiny_causal_lm(family, seed=seed, **overrides)

    return make


@pytest.fixture
def tiny_llama(tiny_model):
    """A fresh ``tiny_causal_lm("llama")`` (seed 0) for each test."""
    return tiny_model("llama")


@pytest.fixture
def run_gated():
    """A function ``run(model, gates, inputs, outputs, input_ids) -> {name: tensor}``: one forward pass
    with ``gates`` attached, recording the first positional input of each module in ``inputs`` and the
    output (first element of a tuple) of each module in ``outputs``, as the gates left them."""

    def run(model, gates, inputs: dict, outputs: dict, input_ids) -> dict:
        seen = {}

        def record_input(name):  # copies: some blocks add into these tensors in place later (Falcon's mlp_output += attention)
            return lambda module, args, kwargs: seen.update({name: kwargs.get("hidden_states", args[0] if args else None).clone()})

        def record_output(name):
            return lambda module, args, out: seen.update({name: (out[0] if isinstance(out, tuple) else out).clone()})

        with gates.attach(model):  # hooks registered after the gates' see what the gates wrote
            handles = [module.register_forward_pre_hook(record_input(name), with_kwargs=True) for name, module in inputs.items()]
            handles += [module.register_forward_hook(record_output(name)) for name, module in outputs.items()]
            try:
                model(input_ids)
            finally:
                for handle in handles:
                    handle.remove()
        return seen

    return run


@pytest.fixture
def quiet_trainer(tmp_path):
    """A factory ``make(**overrides)`` of CPU Trainers that log, print and validate nothing, rooted in ``tmp_path``."""
    import lightning as L

    def make(**overrides):
        settings = dict(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path
        )
        return L.Trainer(**{**settings, **overrides})

    return make
