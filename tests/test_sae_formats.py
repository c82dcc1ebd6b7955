"""Each SAE file format, written here by its own conventions, reads back to an SAE whose encoding and
decoding equal the format's equations computed independently in the test."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ipg_lightning.sae import load_sae, save_sae
from ipg_lightning.sae.formats import SAEFormatError
from ipg_lightning.sae.torch_zip import UnsafeTorchFileError
from ipg_lightning.zoo.tiny import random_sae

D_IN, D_SAE, K = 16, 40, 5


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(D_SAE, D_IN, generator=generator) / 4
    return {
        "W_enc": W_dec.T + 0.1 * torch.randn(D_IN, D_SAE, generator=generator),
        "b_enc": 0.1 * torch.randn(D_SAE, generator=generator),
        "W_dec": W_dec,
        "b_dec": 0.1 * torch.randn(D_IN, generator=generator),
        "threshold": 0.3 * torch.rand(D_SAE, generator=generator),
    }


@pytest.fixture
def z():
    return torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(1)) * 2


def topk_dense(pre, k):
    """Top-k of ``pre`` along the last axis, then ReLU; zeros elsewhere (written with sort, not topk)."""
    kth = pre.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return torch.where(pre >= kth, pre.clamp(min=0), torch.zeros(()))


def write_saelens(directory, weights, **config):
    directory.mkdir()
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", **config}))
    return directory


def check(sae, z, features, reconstruction):
    assert torch.allclose(sae.encode(z), features, atol=1e-5)
    assert torch.allclose(sae(z), reconstruction, atol=1e-5)


def test_saelens_standard_flat_layout(tmp_path, tensors, z):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae = load_sae(write_saelens(tmp_path / "sae", weights, architecture="standard", hook_name="blocks.2.hook_resid_post"))
    features = torch.relu((z - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    check(sae, z, features, features @ tensors["W_dec"] + tensors["b_dec"])
    assert sae.hook_name == "blocks.2.hook_resid_post" and not sae.W_enc.requires_grad


def test_saelens_topk_nested_layout_without_b_dec_on_input(tmp_path, tensors, z):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    metadata = {"sae_lens_version": "6.18.0", "hook_name": "blocks.1.hook_mlp_out", "model_name": "x"}
    sae = load_sae(write_saelens(tmp_path / "sae", weights, architecture="topk", k=K, apply_b_dec_to_input=False, metadata=metadata))
    features = topk_dense(z @ tensors["W_enc"] + tensors["b_enc"], K)
    check(sae, z, features, features @ tensors["W_dec"] + tensors["b_dec"])
    assert (sae.encode(z) != 0).sum(-1).max() <= K


def test_saelens_pre_6_topk_and_decoder_norm_rescaling(tmp_path, tensors, z):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    old = load_sae(
        write_saelens(tmp_path / "old", weights, activation_fn_str="topk", activation_fn_kwargs={"k": K}, hook_point="blocks.0.hook_resid_post")
    )
    pre = (z - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    check(old, z, topk_dense(pre, K), topk_dense(pre, K) @ tensors["W_dec"] + tensors["b_dec"])
    norms = tensors["W_dec"].norm(dim=-1)
    rescaled = load_sae(
        write_saelens(tmp_path / "new", weights, architecture="topk", k=K, rescale_acts_by_decoder_norm=True, hook_name="blocks.0.hook_resid_post")
    )
    features = topk_dense(pre * norms, K)  # SAELens: pre-activations times decoder norms; decode divides them out
    assert torch.allclose(rescaled.encode(z), features, atol=1e-5)
    assert torch.allclose(rescaled(z), (features / norms) @ tensors["W_dec"] + tensors["b_dec"], atol=1e-5)


def test_saelens_jumprelu_threshold_is_strict(tmp_path, tensors, z):
    sae = load_sae(write_saelens(tmp_path / "sae", tensors, architecture="jumprelu", hook_name="blocks.0.hook_resid_post"))
    pre = (z - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    features = torch.relu(pre) * (pre > tensors["threshold"])
    check(sae, z, features, features @ tensors["W_dec"] + tensors["b_dec"])
    assert (features == 0).any() and (features != 0).any()


@pytest.mark.parametrize("normalization", ["constant_norm_rescale", "layer_norm"])
def test_saelens_per_token_normalisations(tmp_path, tensors, z, normalization):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae = load_sae(
        write_saelens(tmp_path / "sae", weights, architecture="standard", normalize_activations=normalization, hook_name="blocks.0.hook_resid_post")
    )
    if normalization == "constant_norm_rescale":
        factor = D_IN**0.5 / z.norm(dim=-1, keepdim=True)
        x, back = z * factor, lambda y: y / factor
    else:
        mean, std = z.mean(-1, keepdim=True), (z - z.mean(-1, keepdim=True)).std(-1, keepdim=True)
        x, back = (z - mean) / (std + 1e-5), lambda y: y * std + mean
    features = torch.relu((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    check(sae, z, features, back(features @ tensors["W_dec"] + tensors["b_dec"]))


def test_sparsify_folder_per_hook_point(tmp_path, tensors, z):
    folder = tmp_path / "run" / "layers.3.mlp"
    folder.mkdir(parents=True)
    weights = {"encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    save_file({name: tensor.to(torch.bfloat16).contiguous() for name, tensor in weights.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(
        json.dumps({"activation": "topk", "expansion_factor": 0, "num_latents": D_SAE, "k": K, "d_in": D_IN, "normalize_decoder": True})
    )
    sae = load_sae(folder)
    assert sae.hook_name == "blocks.3.hook_mlp_out"
    stored = {name: tensor.to(torch.bfloat16).float() for name, tensor in weights.items()}
    pre = torch.relu((z - stored["b_dec"]) @ stored["encoder.weight"].T + stored["encoder.bias"])  # sparsify: ReLU, then top-k
    features = topk_dense(pre, K)
    check(sae, z, features, features @ stored["W_dec"] + stored["b_dec"])
    with pytest.raises(SAEFormatError, match="several hook points, give one of them, e.g. .*layers.3.mlp"):
        load_sae(tmp_path / "run")


def test_sparsify_hook_points_map_to_sites():
    from ipg_lightning.sae.formats import sparsify_hook_name

    assert sparsify_hook_name("layers.6") == "blocks.6.hook_resid_post"
    assert sparsify_hook_name("h.2") == "blocks.2.hook_resid_post"
    assert sparsify_hook_name("layer_4") == "blocks.4.hook_resid_pre"  # sparsify before July 2024: the block's input
    with pytest.raises(SAEFormatError, match="embed_tokens"):
        sparsify_hook_name("embed_tokens")


def write_dictionary_learning(directory, state, dict_class, **trainer):
    directory.mkdir()
    torch.save(state, directory / "ae.pt")
    config = {
        "trainer": {
            "dict_class": dict_class,
            "activation_dim": D_IN,
            "dict_size": D_SAE,
            "layer": 2,
            "submodule_name": "resid_post_layer_2",
            **trainer,
        }
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_dictionary_learning_batch_topk_uses_its_scalar_threshold(tmp_path, tensors, z):
    state = {
        "k": torch.tensor(K, dtype=torch.int32),
        "threshold": torch.tensor(0.2),
        "decoder.weight": tensors["W_dec"].T.contiguous(),
        "encoder.weight": tensors["W_enc"].T.contiguous(),
        "encoder.bias": tensors["b_enc"],
        "b_dec": tensors["b_dec"],
    }
    sae = load_sae(write_dictionary_learning(tmp_path / "trainer_0", state, "BatchTopKSAE", k=K))
    r = torch.relu((z - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    features = r * (r > 0.2)
    check(sae, z, features, features @ tensors["W_dec"] + tensors["b_dec"])
    assert sae.hook_name == "blocks.2.hook_resid_post"


def test_dictionary_learning_standard_autoencoder_is_rescaled_like_its_loader(tmp_path, tensors, z):
    state = {"bias": tensors["b_dec"], "encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"], "decoder.weight": tensors["W_dec"].T}
    sae = load_sae(write_dictionary_learning(tmp_path / "trainer_0", torch.nn.Module().state_dict() | state, "AutoEncoder") / "ae.pt")
    raw = torch.relu((z - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    norms = tensors["W_dec"].norm(dim=-1)
    check(sae, z, raw * norms, raw @ tensors["W_dec"] + tensors["b_dec"])  # same reconstruction, unit-norm features


def test_dictionary_learning_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    directory = write_dictionary_learning(tmp_path / "trainer_0", {"encoder.weight": torch.zeros(2, 2), "x": Payload()}, "AutoEncoderTopK", k=1)
    with pytest.raises(UnsafeTorchFileError, match="names posix.system|names nt.system"):
        load_sae(directory)
    assert not marker.exists()


def test_unsupported_configs_are_named(tmp_path, tensors):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with pytest.raises(SAEFormatError, match="architecture 'gated' is not supported"):
        load_sae(write_saelens(tmp_path / "a", weights, architecture="gated", hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(SAEFormatError, match="W_enc has shape \\(16, 40\\), but its config \\(d_in 16, d_sae 41\\)"):
        load_sae(write_saelens(tmp_path / "b", weights, architecture="standard", d_sae=D_SAE + 1, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(SAEFormatError, match="names no hook_name"):
        load_sae(write_saelens(tmp_path / "c", weights, architecture="standard"))
    with pytest.raises(SAEFormatError, match="not an SAE directory"):
        load_sae(tmp_path)


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_save_and_load_round_trip_in_the_saelens_layout(tmp_path, z, activation):
    sae = random_sae(D_IN, "blocks.1.hook_resid_post", D_SAE, activation=activation, k=K)
    save_sae(sae, tmp_path / "sae", card={"metrics": {"fvu": 0.1}}, model_name="tiny")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.config() == {**sae.config()}
    check(loaded, z, sae.encode(z), sae(z))
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert config["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and config["dtype"] == "float32"


def test_a_training_scale_is_folded_when_saved(tmp_path, z):
    sae = random_sae(D_IN, "blocks.1.hook_resid_post", D_SAE, k=K, normalization="constant_scale", input_scale=0.37)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.normalization == "none"
    check(loaded, z, sae.encode(z), sae(z))


def test_saelens_itself_loads_what_we_save(tmp_path, z):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed here (optional cross-check)")
    sae = random_sae(D_IN, "blocks.1.hook_resid_post", D_SAE, k=K)
    save_sae(sae, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    assert torch.allclose(theirs.encode(z), sae.encode(z), atol=1e-5)


def test_torch_files_that_inflate_or_are_damaged_are_refused(tmp_path):
    import zipfile

    from ipg_lightning.sae.torch_zip import read_torch_tensors

    torch.save({"w": torch.ones(1).expand(3000, 3000)}, tmp_path / "inflated.pt")  # 4 bytes stored, 36 MB asked for
    with pytest.raises(UnsafeTorchFileError, match="would repeat the 1 elements it stores"):
        read_torch_tensors(tmp_path / "inflated.pt")
    torch.save({"w": torch.zeros(4)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as source, zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    with pytest.raises(UnsafeTorchFileError, match="compressed members"):
        read_torch_tensors(tmp_path / "deflated.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as source, zipfile.ZipFile(tmp_path / "truncated.pt", "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            target.writestr(info.filename, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    with pytest.raises(UnsafeTorchFileError, match="damaged or not a torch.save state dict"):
        read_torch_tensors(tmp_path / "truncated.pt")
    assert torch.equal(read_torch_tensors(tmp_path / "plain.pt")["w"], torch.zeros(4))


def test_a_saelens_checkpoint_keeps_its_activation_scale(tmp_path, tensors, z):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    directory = write_saelens(
        tmp_path / "sae", weights, architecture="standard", normalize_activations="expected_average_only_in", hook_name="blocks.0.hook_resid_post"
    )
    assert load_sae(directory).normalization == "none"  # a final SAE: the scale is in its weights
    (directory / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    sae = load_sae(directory)  # a training checkpoint: inputs times 0.25, outputs divided by it
    features = torch.relu((z * 0.25 - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    check(sae, z, features, (features @ tensors["W_dec"] + tensors["b_dec"]) / 0.25)


def test_dictionary_learning_points_that_are_not_block_outputs_are_refused(tmp_path, tensors):
    state = {"encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"], "decoder.weight": tensors["W_dec"].T, "b_dec": tensors["b_dec"]}
    directory = write_dictionary_learning(tmp_path / "a", state, "AutoEncoderTopK", k=K, submodule_name="embed")
    with pytest.raises(SAEFormatError, match="submodule 'embed' .* is not a point"):
        load_sae(directory)
    directory = write_dictionary_learning(tmp_path / "b", state, "AutoEncoderTopK", k=K)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "buffer": {"io": "in"}}))
    with pytest.raises(SAEFormatError, match="buffer io 'in'"):
        load_sae(directory)


def _nan_in(weights, name):
    damaged = dict(weights)
    damaged[name] = damaged[name].clone()
    damaged[name].view(-1)[3] = float("nan")
    return damaged


@pytest.mark.parametrize("layout", ["saelens", "sparsify", "dictionary_learning"])
def test_non_finite_weights_are_refused_in_every_format(tmp_path, tensors, layout):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if layout == "saelens":
        folder = write_saelens(tmp_path / "sae", _nan_in(weights, "W_dec"), architecture="standard", hook_name="blocks.0.hook_resid_post")
    elif layout == "sparsify":
        folder = tmp_path / "layers.0"
        folder.mkdir()
        renamed = {"encoder.weight": weights["W_enc"].T, "encoder.bias": weights["b_enc"], "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
        save_file({name: tensor.contiguous() for name, tensor in _nan_in(renamed, "encoder.bias").items()}, str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": K, "d_in": D_IN}))
    else:
        state = {"encoder.weight": weights["W_enc"].T, "encoder.bias": weights["b_enc"], "decoder.weight": weights["W_dec"].T}
        state["b_dec"] = torch.full((D_IN,), float("inf"))
        folder = write_dictionary_learning(tmp_path / "dl", {**state, "k": torch.tensor(K)}, "AutoEncoderTopK")
    with pytest.raises(SAEFormatError, match=r"holds non-finite values \(NaN or inf\)"):
        load_sae(folder)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"d_sae": 2e10}, r"W_enc has shape \(16, 40\), but its config \(d_in 16, d_sae 20000000000\)"),
        ({"d_sae": -5}, r"d_sae must be a positive whole number, got -5"),
        ({"d_in": "abc"}, r"sae: the SAE's d_in must be a positive whole number, got 'abc'"),
        ({"architecture": "topk", "k": "many"}, r"k must be a positive whole number, got 'many'"),
        ({"architecture": "topk", "k": 41}, r"k = 41 exceeds the SAE's 40 features"),
    ],
    ids=["huge", "negative", "text", "k-text", "k-too-large"],
)
def test_config_sizes_are_checked_against_the_weights_before_anything_is_allocated(tmp_path, tensors, config, message):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    folder = write_saelens(tmp_path / "sae", weights, **{"architecture": "standard", "hook_name": "blocks.0.hook_resid_post", **config})
    with pytest.raises(SAEFormatError, match=message) as caught:
        load_sae(folder)
    assert str(folder) in str(caught.value)


def test_tensors_of_the_wrong_kind_are_named_with_the_file(tmp_path, tensors):
    folder = tmp_path / "layers.0"
    folder.mkdir()
    save_file({"encoder.weight": torch.zeros(D_SAE), "W_dec": tensors["W_dec"].contiguous()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": K}))
    with pytest.raises(SAEFormatError, match=r"layers.0/sae.safetensors: encoder.weight must be a matrix, it has shape \(40,\)"):
        load_sae(folder)
    state = {"encoder.weight": tensors["W_enc"].T, "decoder.weight": tensors["W_dec"].T, "b_dec": tensors["b_dec"], "k": torch.tensor(K)}
    folder = write_dictionary_learning(tmp_path / "dl", state, "AutoEncoderTopK")  # no encoder.bias
    with pytest.raises(SAEFormatError, match=r"dl is not a readable dictionary_learning SAE: it has no 'encoder.bias' entry"):
        load_sae(folder)


def test_an_sae_with_nan_is_never_spliced_into_a_model(tiny_llama):
    from ipg_lightning.sae import attach_sae, attached_saes

    sae = random_sae(tiny_llama.config.hidden_size, "blocks.1.hook_resid_post", d_sae=32, k=4)
    with torch.no_grad():
        sae.b_enc[0] = float("nan")
    with pytest.raises(ValueError, match=r"holds non-finite values \(NaN or inf\) in \['b_enc'\]"):
        attach_sae(tiny_llama, sae)
    assert attached_saes(tiny_llama) == {}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"hook_name": 7}, r"hook_name has the wrong type \(7\)"),
        ({"hook_name": "blocks.2.hook_foo"}, r"sae: An SAE at 'blocks.2.hook_foo' cannot be spliced in"),
        ({"apply_b_dec_to_input": "false"}, r"apply_b_dec_to_input must be true or false, got 'false'"),
        ({"architecture": ["topk"]}, r"architecture has the wrong type"),
        ({"activation_fn": "topk", "activation_fn_kwargs": [5]}, r"activation_fn_kwargs has the wrong type"),
    ],
    ids=["hook-int", "hook-unknown", "flag-text", "architecture-list", "kwargs-list"],
)
def test_config_entries_of_the_wrong_kind_are_refused_not_guessed(tmp_path, tensors, config, message):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with pytest.raises(SAEFormatError, match=message):
        load_sae(write_saelens(tmp_path / "sae", weights, **{"architecture": "standard", "hook_name": "blocks.0.hook_resid_post", **config}))


def test_inconsistent_extra_tensors_are_named(tmp_path, tensors):
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    scaled = write_saelens(tmp_path / "scaled", {**weights, "scaling_factor": torch.ones(3)}, hook_name="blocks.0.hook_resid_post")
    with pytest.raises(SAEFormatError, match=r"its scaling factor has 3 values for 40 features"):
        load_sae(scaled)
    state = {"encoder.weight": tensors["W_enc"].T, "encoder.bias": tensors["b_enc"], "decoder.weight": tensors["W_dec"].T}
    folder = write_dictionary_learning(tmp_path / "dl", {**state, "b_dec": tensors["b_dec"], "k": torch.tensor([K, K])}, "AutoEncoderTopK")
    with pytest.raises(SAEFormatError, match=r"ae.pt: k must be one number, it holds 2"):
        load_sae(folder)
    folder = write_dictionary_learning(
        tmp_path / "dl2", {**state, "b_dec": tensors["b_dec"], "k": torch.tensor(K)}, "AutoEncoderTopK", submodule_name="foo"
    )
    with pytest.raises(SAEFormatError, match=r"dl2: dictionary_learning submodule 'foo'"):
        load_sae(folder)


def test_an_sae_for_a_layer_the_model_lacks_is_named(tiny_llama):
    from ipg_lightning.sae import attach_sae

    sae = random_sae(tiny_llama.config.hidden_size, "blocks.9.hook_resid_post", d_sae=32, k=4)
    sae.source = "/saes/deep"
    with pytest.raises(ValueError, match=r"The SAE /saes/deep reads blocks.9.hook_resid_post, which this model cannot host: .*9"):
        attach_sae(tiny_llama, sae)
