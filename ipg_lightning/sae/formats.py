"""Reading and writing the SAE file formats in use, natively (no SAE library needed at run time).

- **SAELens**: a directory with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` (d_in, d_sae),
  ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec``, and ``threshold`` for JumpReLU). Read: the
  architectures ``standard``, ``topk`` and ``jumprelu``, in the flat (SAELens < 6) and the nested
  (``metadata``) config layouts. Written by :func:`save_sae`, so other tools load our SAEs.
- **EleutherAI sparsify**: one directory per hook point (``layers.6``, ``layers.6.mlp``) with
  ``cfg.json`` and ``sae.safetensors`` (``encoder.weight`` (d_sae, d_in), ``encoder.bias``,
  ``W_dec`` (d_sae, d_in), ``b_dec``); top-k. ``layers.N`` is the output of decoder block N, i.e.
  ``blocks.N.hook_resid_post``; ``layers.N.mlp`` is that block's MLP output.
- **dictionary_learning**: ``ae.pt`` (a ``torch.save`` state dict) with ``config.json``; read
  without unpickling (:mod:`ipg_lightning.sae.torch_zip`). ``BatchTopKSAE`` and
  ``MatryoshkaBatchTopKSAE`` (a JumpReLU with their one threshold, as at inference),
  ``AutoEncoderTopK``, the standard ``AutoEncoder`` and ``JumpReluAutoEncoder``.

:func:`load_sae` tells the formats apart by their files; a config it cannot honour is refused with a
message that names the setting.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ipg_lightning.model.autoencoder import SparseAutoencoder
from ipg_lightning.model.families import sae_point
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text
from ipg_lightning.sae.torch_zip import read_torch_tensors

SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
SPARSIFY_WEIGHTS, SPARSIFY_CONFIG = "sae.safetensors", "cfg.json"
DICTIONARY_WEIGHTS, DICTIONARY_CONFIG = "ae.pt", "config.json"
SAELENS_SCALER = "activation_scaler.json"
CARD_FILE = "sae_card.json"
#: The SAELens version whose ``cfg.json`` layout :func:`save_sae` writes.
SAELENS_LAYOUT_VERSION = "6.0.0"


logger = logging.getLogger(__name__)


class SAEFormatError(ValueError):
    """An SAE file that cannot be read, or whose config asks for something not supported."""


def sae_directory(path: str | Path) -> Path:
    """The directory of an SAE given by its directory or by its weights file (``ae.pt``, ``sae_weights.safetensors``, ...)."""
    path = Path(path)
    return path.parent if path.is_file() and path.name in (DICTIONARY_WEIGHTS, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS) else path


def load_sae(path: str | Path) -> SparseAutoencoder:
    """The SAE saved at ``path`` (a directory in the SAELens, sparsify or dictionary_learning layout, or its weights file), frozen."""
    path = sae_directory(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No SAE directory at {path}")
    files = {child.name for child in path.iterdir()}
    readers = {SAELENS_WEIGHTS: ("SAELens", _read_saelens), SPARSIFY_WEIGHTS: ("sparsify", _read_sparsify)}
    readers[DICTIONARY_WEIGHTS] = ("dictionary_learning", _read_dictionary_learning)
    found = next((readers[name] for name in readers if name in files), None)
    if found is None:
        nested = sorted(child.name for child in path.iterdir() if child.is_dir() and (child / SPARSIFY_WEIGHTS).is_file())
        hint = f"; it holds SAEs for several hook points, give one of them, e.g. {path / nested[0]}" if nested else ""
        raise SAEFormatError(
            f"{path} is not an SAE directory: expected {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} (sparsify) "
            f"or {DICTIONARY_WEIGHTS} (dictionary_learning){hint}"
        )
    layout, read = found
    try:
        sae = read(path)
    except KeyError as error:
        raise SAEFormatError(f"{path} is not a readable {layout} SAE: it has no {error.args[0]!r} entry") from None
    except (IndexError, TypeError, RuntimeError, AttributeError) as error:  # tensors or entries of other kinds than the layout's
        raise SAEFormatError(f"{path} is not a readable {layout} SAE ({type(error).__name__}: {error})") from None
    sae.source = str(path.resolve())
    return sae.requires_grad_(False)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SAEFormatError(f"{path} is missing: an SAE needs its config next to its weights")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise SAEFormatError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise SAEFormatError(f"{path} must hold a JSON object")
    return config


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise SAEFormatError(f"{path} cannot be read ({error})") from None


def _size(value: Any, key: str, where: Path) -> int:
    """A size (``d_in``, ``d_sae``, ``k``) as a positive int, or an error naming the SAE's directory and the entry."""
    whole = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value == int(value)
    if not whole or value < 1:
        raise SAEFormatError(f"{where.parent}: the SAE's {key} must be a positive whole number, got {value!r}")
    return int(value)


def _matrix(weights: dict[str, torch.Tensor], name: str, where: Path) -> torch.Tensor:
    """The 2-D tensor ``name`` of an SAE's weights, or an error naming the file."""
    if name not in weights:
        raise SAEFormatError(f"{where} has no {name} tensor (it has {sorted(weights)})")
    if weights[name].dim() != 2:
        raise SAEFormatError(f"{where}: {name} must be a matrix, it has shape {tuple(weights[name].shape)}")
    return weights[name]


def _build(config: dict[str, Any], weights: dict[str, torch.Tensor], where: Path) -> SparseAutoencoder:
    """An SAE from constructor arguments and ``W_enc``/``b_enc``/``W_dec``/``b_dec``[/``threshold``].

    Sizes and shapes are checked against the weights before anything is allocated (a config cannot
    make the loader allocate more than the file holds), and every value must be finite.
    """
    hook_name = config["hook_name"]
    if not isinstance(hook_name, str):
        raise SAEFormatError(f"{where.parent}: the SAE's hook name must be text such as blocks.3.hook_resid_post, got {hook_name!r}")
    try:
        sae_point(hook_name)
    except ValueError as error:
        raise SAEFormatError(f"{where.parent}: {error}") from None
    if not isinstance(config.get("apply_b_dec_to_input", True), bool):
        raise SAEFormatError(f"{where.parent}: apply_b_dec_to_input must be true or false, got {config['apply_b_dec_to_input']!r}")
    d_in, d_sae = _size(config["d_in"], "d_in", where), _size(config["d_sae"], "d_sae", where)
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if config["activation"] == "jumprelu":
        expected["threshold"] = (d_sae,)
    found = {}
    for name, shape in expected.items():
        if name not in weights:
            raise SAEFormatError(f"{where} has no {name} tensor (it has {sorted(weights)})")
        tensor = weights[name]
        if name == "threshold" and tensor.numel() == 1:  # one threshold shared by all features (BatchTopK)
            tensor = tensor.reshape(1).expand(shape)
        if tuple(tensor.shape) != shape:
            raise SAEFormatError(f"{where}: {name} has shape {tuple(tensor.shape)}, but its config (d_in {d_in}, d_sae {d_sae}) needs {shape}")
        if not (tensor.is_floating_point() and torch.isfinite(tensor).all()):
            raise SAEFormatError(f"{where}: {name} holds non-finite values (NaN or inf) or is not a float tensor: the SAE is damaged; use another")
        found[name] = tensor
    if config["activation"] == "topk":
        k = _size(config["k"], "k", where)
        if k > d_sae:
            raise SAEFormatError(f"{where.parent}: k = {k} exceeds the SAE's {d_sae} features (d_sae)")
    try:
        sae = SparseAutoencoder(**config)
    except ValueError as error:
        raise SAEFormatError(f"{where}: {error}") from None
    with torch.no_grad():
        for name, tensor in found.items():
            getattr(sae, name).copy_(tensor.float())
    return sae


# ------------------------------------------------------------------------------------- SAELens
_SAELENS_ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def _read_saelens(path: Path) -> SparseAutoencoder:
    config = _read_json(path / SAELENS_CONFIG)
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}

    def setting(*keys: str, default: Any = None) -> Any:  # SAELens >= 6 nests some keys under metadata; older names too
        for key in keys:
            for source in (config, metadata):
                if source.get(key) is not None:
                    return source[key]
        return default

    for key, kinds in (("architecture", str), ("activation_fn_kwargs", dict), ("normalize_activations", str | bool), ("hook_name", str)):
        if setting(key) is not None and not isinstance(setting(key), kinds):
            raise SAEFormatError(f"{path}/{SAELENS_CONFIG}: {key} has the wrong type ({setting(key)!r})")
    architecture = setting("architecture", default="standard")
    if architecture == "standard" and setting("activation_fn_str", "activation_fn") == "topk":  # SAELens < 6 wrote top-k SAEs so
        architecture = "topk"
    if architecture not in _SAELENS_ARCHITECTURES:
        raise SAEFormatError(
            f"{path}/{SAELENS_CONFIG}: SAE architecture {architecture!r} is not supported; supported: {sorted(_SAELENS_ARCHITECTURES)}"
        )
    if setting("hook_head_index", "hook_point_head_index") is not None:
        raise SAEFormatError(
            f"{path}/{SAELENS_CONFIG}: an SAE on one attention head (hook_head_index) cannot be spliced; use one on a whole hook point"
        )
    if setting("reshape_activations", default="none") != "none":
        raise SAEFormatError(f"{path}/{SAELENS_CONFIG}: reshape_activations {setting('reshape_activations')!r} is not supported (only 'none')")
    normalization = setting("normalize_activations", default="none")
    input_scale = 1.0
    if normalization in (False, True, "expected_average_only_in"):  # True in old files: a dataset-wide constant
        normalization, input_scale = _saelens_scale(path)
    elif normalization not in ("none", "constant_norm_rescale", "layer_norm"):
        raise SAEFormatError(
            f"{path}/{SAELENS_CONFIG}: normalize_activations {normalization!r} is not supported; "
            "supported: none, expected_average_only_in, constant_norm_rescale, layer_norm"
        )
    hook_name = setting("hook_name", "hook_point")
    if not hook_name:
        raise SAEFormatError(f"{path}/{SAELENS_CONFIG} names no hook_name: where in the model does this SAE read?")
    weights = _read_safetensors(path / SAELENS_WEIGHTS)
    scale = weights.pop("finetuning_scaling_factor", weights.pop("scaling_factor", None))
    if scale is not None:  # SAELens < 6: a per-feature factor on the features before decoding
        decoder = _matrix(weights, "W_dec", path / SAELENS_WEIGHTS)
        if scale.numel() != decoder.shape[0]:
            raise SAEFormatError(f"{path / SAELENS_WEIGHTS}: its scaling factor has {scale.numel()} values for {decoder.shape[0]} features")
        weights["W_dec"] = decoder * scale.reshape(-1, 1)
    if architecture == "topk" and setting("rescale_acts_by_decoder_norm", default=False):
        # features scaled by decoder norms: fold the norms into the weights
        norms = _matrix(weights, "W_dec", path / SAELENS_WEIGHTS).norm(dim=-1).clamp_min(1e-12)
        weights.update(W_enc=weights["W_enc"] * norms, b_enc=weights["b_enc"] * norms, W_dec=weights["W_dec"] / norms.reshape(-1, 1))
    kwargs = setting("activation_fn_kwargs", default={})
    missing = [key for key in ("d_in", "d_sae") if setting(key) is None]
    if missing:
        raise SAEFormatError(f"{path}/{SAELENS_CONFIG} has no {' or '.join(missing)}")
    fields = {
        "d_in": setting("d_in"),
        "d_sae": setting("d_sae"),
        "hook_name": hook_name,
        "activation": _SAELENS_ARCHITECTURES[architecture],
        "k": setting("k", default=kwargs.get("k", 100)) if architecture == "topk" else None,  # SAELens' own default is 100
        "apply_b_dec_to_input": setting("apply_b_dec_to_input", default=True),
        "normalization": normalization,
        "input_scale": input_scale,
    }
    return _build(fields, weights, path / SAELENS_WEIGHTS)


def _saelens_scale(path: Path) -> tuple[str, float]:
    """The constant input scale of an ``expected_average_only_in`` SAE: SAELens folds it into the weights
    when training ends, so a final SAE reads raw activations; a checkpoint keeps it in ``activation_scaler.json``."""
    scaler = path / SAELENS_SCALER
    factor = _read_json(scaler).get("scaling_factor") if scaler.is_file() else None
    if factor is not None:
        return "constant_scale", float(factor)
    logger.info(
        "%s says normalize_activations expected_average_only_in: read as already folded into the weights, as SAELens' own "
        "load_from_disk does (a release that needs SAELens' norm_scaling_factor gives wrong features)",
        path,
    )
    return "none", 1.0


def save_sae(
    sae: SparseAutoencoder, path: str | Path, card: dict[str, Any] | None = None, model_name: str | None = None, overwrite: bool = False
) -> Path:
    """Write ``sae`` in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``) atomically, with an optional card.

    Args:
        sae: the autoencoder (``topk``, ``relu`` or ``jumprelu``); a ``constant_scale`` is folded into the weights.
        path: the directory to write.
        card: training settings and metrics, written to ``sae_card.json`` and a ``README.md``.
        model_name: the model it reads (SAELens ``model_name``).
        overwrite: replace an earlier directory written by this library.
    """
    sae = sae.folded()  # a training scale becomes part of the weights, as SAELens saves it
    architecture = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}.get(sae.activation)
    if architecture is None:
        raise SAEFormatError(f"A {sae.activation} SAE has no SAELens architecture; save a topk, relu or jumprelu SAE")
    config = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalization,
        "reshape_activations": "none",
        **({"k": sae.k} if architecture == "topk" else {}),
        # The layout of SAELens 6 (its loader reads a config without this version as the older flat layout).
        "metadata": {"sae_lens_version": SAELENS_LAYOUT_VERSION, "hook_name": sae.hook_name, "hook_head_index": None, "model_name": model_name},
    }
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture == "jumprelu" else [])
    weights = {name: getattr(sae, name).detach().float().cpu().contiguous() for name in names}
    with atomic_directory(path, overwrite=overwrite, kind="SAE") as staging:
        save_file(weights, str(staging / SAELENS_WEIGHTS))
        atomic_write_json(staging / SAELENS_CONFIG, config)
        if card is not None:
            atomic_write_json(staging / CARD_FILE, card)
            atomic_write_text(staging / "README.md", sae_card_markdown(card, sae))
    return Path(path)


def sae_card_markdown(card: dict[str, Any], sae: SparseAutoencoder) -> str:
    """A short model card for a trained SAE: what it reads, its size and measured quality."""
    size = f"{sae.d_sae} features over {sae.d_in} channels" + (f", k = {sae.k}" if sae.k else "")
    lines = [f"# {sae.activation} SAE at `{sae.hook_name}`", "", f"{size}.", ""]
    lines += ["Written by `ipg train-sae` in the SAELens layout (`cfg.json`, `sae_weights.safetensors`).", ""]
    metrics = card.get("metrics") or {}
    if metrics:
        shown = [f"| {key} | {'n/a' if value is None else format(value, '.4g')} |" for key, value in metrics.items()]
        measured = f" (losses on {card['measured_on']})" if card.get("measured_on") else ""
        lines += [f"Measured on held-out data{measured}:", "", "| metric | value |", "| --- | --- |", *shown, ""]
    for warning in card.get("warnings") or []:
        lines += [f"**Warning:** {warning}.", ""]
    if card.get("command"):
        lines += ["Command:", "", f"    {card['command']}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ sparsify
def sparsify_hook_name(directory_name: str) -> str:
    """The site a sparsify hook point directory reads: ``layers.6`` -> ``blocks.6.hook_resid_post``.

    ``layers.N`` / ``h.N`` is block N's output, ``layers.N.mlp`` its MLP output; ``layer_N`` (sparsify
    before July 2024) is block N's input, ``blocks.N.hook_resid_pre``.
    """
    old = re.fullmatch(r"layer_(\d+)", directory_name)
    if old:
        return f"blocks.{old[1]}.hook_resid_pre"
    match = re.fullmatch(r"(?:layers|h)\.(\d+)(\.mlp|\.self_attn|\.attn)?", directory_name)
    if match is None:
        raise SAEFormatError(
            f"sparsify hook point {directory_name!r} is not one ipg_lightning can splice: "
            "sparsify names the hook point by the directory: name it layers.N (block output), layers.N.mlp or layers.N.self_attn"
        )
    point = {None: "hook_resid_post", ".mlp": "hook_mlp_out"}.get(match[2], "hook_attn_out")
    return f"blocks.{match[1]}.{point}"


def _read_sparsify(path: Path) -> SparseAutoencoder:
    config = _read_json(path / SPARSIFY_CONFIG)
    for setting in ("skip_connection", "transcode"):
        if config.get(setting):
            raise SAEFormatError(f"{path}/{SPARSIFY_CONFIG}: {setting} SAEs are not supported (their output is not a decomposition of their input)")
    if config.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}/{SPARSIFY_CONFIG}: activation {config['activation']!r} is not supported (only topk)")
    if not config.get("k"):
        raise SAEFormatError(f"{path}/{SPARSIFY_CONFIG} has no k: sparsify SAEs are top-k")
    weights = _read_safetensors(path / SPARSIFY_WEIGHTS)
    if "encoder.weight" not in weights or "W_dec" not in weights:
        raise SAEFormatError(f"{path}/{SPARSIFY_WEIGHTS} needs encoder.weight and W_dec (it has {sorted(weights)})")
    d_sae, d_in = _matrix(weights, "encoder.weight", path / SPARSIFY_WEIGHTS).shape
    if config.get("d_in") is not None and _size(config["d_in"], "d_in", path / SPARSIFY_CONFIG) != d_in:
        raise SAEFormatError(f"{path}: cfg.json says d_in {config['d_in']}, encoder.weight has {d_in} inputs")
    hook_point = path.parent.name if re.fullmatch(r"seed\d+", path.name) else path.name  # several seeds: <hook point>/seedN
    fields = {"d_in": d_in, "d_sae": d_sae, "hook_name": sparsify_hook_name(hook_point), "activation": "topk", "k": config["k"]}
    renamed = {"W_enc": weights["encoder.weight"].T, "b_enc": weights.get("encoder.bias", torch.zeros(d_sae)), "W_dec": weights["W_dec"]}
    renamed["b_dec"] = weights.get("b_dec", torch.zeros(d_in))
    return _build(fields, renamed, path / SPARSIFY_WEIGHTS)


# --------------------------------------------------------------------------- dictionary_learning
_DICTIONARY_CLASSES = {
    "BatchTopKSAE": "jumprelu",  # at inference: its one threshold for every feature
    "MatryoshkaBatchTopKSAE": "jumprelu",
    "AutoEncoderTopK": "topk",
    "AutoEncoder": "relu",
    "JumpReluAutoEncoder": "jumprelu",
}


def dictionary_learning_hook_name(submodule_name: str | None, layer: int | None) -> str:
    """The site a dictionary_learning SAE reads: ``resid_post_layer_3`` -> ``blocks.3.hook_resid_post``.

    ``submodule_name`` is a label; without one, ``layer`` means that block's output (as SAELens'
    importer reads it). A label that names something else is refused rather than guessed.
    """
    match = re.fullmatch(r"(resid_post|mlp_out|attn_out)_layer_(\d+)", submodule_name or "")
    if match:
        return f"blocks.{match[2]}.hook_{match[1]}"
    if not submodule_name and isinstance(layer, int):
        return f"blocks.{layer}.hook_resid_post"
    raise SAEFormatError(
        f"dictionary_learning submodule {submodule_name!r} (layer {layer}) is not a point ipg_lightning can splice: "
        "set trainer.submodule_name in config.json to resid_post_layer_N, mlp_out_layer_N or attn_out_layer_N"
    )


def _dictionary_weights(state: dict[str, torch.Tensor], activation: str, where: Path) -> dict[str, torch.Tensor]:
    """The state dict of a dictionary_learning class in this library's names (``W_enc`` (d_in, d_sae), ...)."""
    if "W_enc" in state:  # JumpReluAutoEncoder, MatryoshkaBatchTopKSAE: already in these names and shapes
        return {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") if name in state}
    if "encoder.weight" not in state or "decoder.weight" not in state:
        raise SAEFormatError(f"{where} has no encoder.weight/decoder.weight (it has {sorted(state)})")
    weights = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"], "W_dec": state["decoder.weight"].T}
    weights["b_dec"] = state["bias"] if activation == "relu" else state["b_dec"]
    if "threshold" in state:
        weights["threshold"] = state["threshold"]
    if activation == "relu":  # the library's loader rescales to unit decoder norms: feature values times the norms
        norms = weights["W_dec"].norm(dim=-1).clamp_min(1e-12)
        weights.update(W_enc=weights["W_enc"] * norms, b_enc=weights["b_enc"] * norms, W_dec=weights["W_dec"] / norms.reshape(-1, 1))
    return weights


def _with_path(path: Path, function: Any, *args: Any) -> Any:
    """``function(*args)``, with the SAE's directory put in front of the message of an error it raises."""
    try:
        return function(*args)
    except SAEFormatError as error:
        raise SAEFormatError(f"{path}: {error}") from None


def _read_dictionary_learning(path: Path) -> SparseAutoencoder:
    config = _read_json(path / DICTIONARY_CONFIG)
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else config
    dict_class = trainer.get("dict_class")
    if dict_class not in _DICTIONARY_CLASSES:
        raise SAEFormatError(f"{path}/{DICTIONARY_CONFIG}: dict_class {dict_class!r} is not supported; supported: {sorted(_DICTIONARY_CLASSES)}")
    io = (config.get("buffer") or {}).get("io", "out") if isinstance(config.get("buffer"), dict) else "out"
    if io != "out":
        raise SAEFormatError(
            f"{path}/{DICTIONARY_CONFIG}: buffer io {io!r} means the SAE reads a module's input; only SAEs on outputs (io 'out') splice in"
        )
    state = read_torch_tensors(path / DICTIONARY_WEIGHTS)
    if isinstance(state, dict) and "ae" in state:
        raise SAEFormatError(f"{path}/{DICTIONARY_WEIGHTS} is a mid-training backup (its biases are not yet rescaled); use the final ae.pt")
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise SAEFormatError(f"{path}/{DICTIONARY_WEIGHTS} must hold a state dict of tensors")
    activation = _DICTIONARY_CLASSES[dict_class]
    weights = _dictionary_weights(state, activation, path / DICTIONARY_WEIGHTS)
    d_in, d_sae = _matrix(weights, "W_enc", path / DICTIONARY_WEIGHTS).shape
    if "k" in state and state["k"].numel() != 1:
        raise SAEFormatError(f"{path / DICTIONARY_WEIGHTS}: k must be one number, it holds {state['k'].numel()}")
    k = state["k"].item() if "k" in state else trainer.get("k")
    if activation == "topk" and k is None:
        raise SAEFormatError(f"{path}: a {dict_class} needs k, in ae.pt or in config.json's trainer settings")
    fields = {
        "d_in": d_in,
        "d_sae": d_sae,
        "hook_name": _with_path(path, dictionary_learning_hook_name, trainer.get("submodule_name"), trainer.get("layer")),
        "activation": activation,
        "k": k if activation == "topk" else None,
        "apply_b_dec_to_input": dict_class != "JumpReluAutoEncoder",  # the only class that encodes x itself
    }
    return _build(fields, weights, path / DICTIONARY_WEIGHTS)
