"""``ipg demo``, the main job: attribute, steer, learn, evaluate and export, on the shipped tiny reasoner.

1. IPG attribution of two rewards, accuracy and reasoning length, over the MLP neurons of one block
   (the last, by default), on support problems the model never saw in training;
2. fixed steering of the top-k components of each: suppressed (gate 0) and amplified (gate > 1);
3. learned gates on the top length components, a few policy-gradient steps on "be right, think
   shorter" (accuracy minus a per-token cost);
4. the same over the features of the preset's SAE (the paper's best variant): IPG of both rewards,
   the top features suppressed, learned gates on the top length features;
5. export of the learned gates as Hugging Face checkpoints (neuron gates folded; SAE feature gates
   carried with their SAE in the steering file), each checked to generate the same when loaded fresh.

Every condition is evaluated on held-out test problems, sampled with the same per-problem seeds in
every condition so that differences come from the gates, not from the draw.

This module is the typed command: it checks its arguments with nothing heavy imported, then runs
the stages (:mod:`ipg_lightning.cli.demo_stages`), which load torch, Lightning and transformers.
"""

from __future__ import annotations

import time
import typing
from pathlib import Path
from typing import Any, Literal

from ipg_lightning.checks import check_at_least, check_gamma
from ipg_lightning.model.families import SiteFamilyName
from ipg_lightning.outputs import check_output_dir
from ipg_lightning.rollout.engine_names import Engine

#: The demo's presets (``ipg_lightning.cli.demo_stages.PRESETS`` says what each studies).
DemoPresetName = Literal["tiny-reasoner", "smollm2"]


def demo(
    preset: str = "tiny-reasoner",
    model_path: str | None = None,
    out_dir: Path = Path("outputs/demo"),
    family: SiteFamilyName = "mlp_neuron",
    layer: int | None = None,
    k: int = 4,
    gamma_suppress: float = 0.0,
    gamma_amplify: float = 2.0,
    support_prompts: int = 32,
    test_prompts: int = 64,
    num_samples: int = 4,
    eval_samples: int = 4,
    temperature: float = 0.7,
    steps: int = 16,
    rule: str = "gauss_legendre",
    learning_steps: int = 8,
    max_new_tokens: int | None = None,
    sae_features: bool = True,
    sae_steps: int = 32,
    seed: int = 0,
    engine: Engine = "hf",
    overwrite: bool = True,
) -> dict[str, Any]:
    """Attribute accuracy and reasoning length with IPG, steer (fixed and learned), evaluate, export.

    Args:
        preset: ``tiny-reasoner`` (the shipped model, a minute or two on 2 CPU cores) or ``smollm2``
            (SmolLM2-135M-Instruct on reasoning-gym arithmetic; run ``ipg prepare-smollm2`` once).
        model_path: another model on the preset's problems: a local HF directory or ``tiny:<family>``.
        out_dir: where reports, metrics, generations, the exported model and the table go (atomically).
        family: site family to attribute and steer.
        layer: block to attribute (default: the last one).
        k: number of top components steered.
        gamma_suppress: gate value of the suppressed conditions.
        gamma_amplify: gate value of the amplified conditions.
        support_prompts: problems used for attribution and gate learning (never the test problems).
        test_prompts: held-out problems every condition is evaluated on.
        num_samples: trajectories per support problem (N).
        eval_samples: completions per test problem (1 when ``temperature`` is 0).
        temperature: sampling temperature of attribution, learning and evaluation (0: greedy
            evaluation). Reflection ("Wait, let me check") is a minority choice, so greedy decoding
            hides most of the reasoning-length behaviour that steering moves.
        steps: IPG quadrature points (q).
        rule: IPG quadrature rule (``right`` is the paper's; Gauss-Legendre closes the
            completeness gap with fewer points on these smooth paths).
        learning_steps: policy-gradient steps of the learned gates.
        max_new_tokens: generation cap (default: the preset's).
        sae_features: also attribute and steer the features of the preset's SAE (the tiny reasoner
            ships one; SmolLM2 has none; another ``model_path`` skips them).
        sae_steps: IPG quadrature points over SAE features: gating all of them off removes the whole
            reconstructed residual stream, a rougher path than one block's neurons, so it needs more.
        seed: sampling seed.
        engine: what samples every completion: ``hf`` (Hugging Face ``generate``) or ``vllm``
            (``docs/engines.md``; the tiny reasoner is too small to gain from it).
        overwrite: replace an earlier output of this library at ``out_dir`` (never other files).
    """
    started = time.perf_counter()
    if preset not in typing.get_args(DemoPresetName):
        raise ValueError(f"Unknown demo preset {preset!r}; choose from {list(typing.get_args(DemoPresetName))}")
    check_at_least(
        1,
        k=k,
        support_prompts=support_prompts,
        test_prompts=test_prompts,
        num_samples=num_samples,
        eval_samples=eval_samples,
        steps=steps,
        learning_steps=learning_steps,
        sae_steps=sae_steps,
    )
    check_gamma(gamma_suppress, "gamma_suppress")
    check_gamma(gamma_amplify, "gamma_amplify")
    check_output_dir(out_dir, overwrite)
    settings = dict(locals())
    from ipg_lightning.cli.demo_stages import run_demo  # torch, Lightning and transformers load only now

    return run_demo(settings)
