"""The package's shape: layered imports, one registry per concept, clean deprecation of moved modules."""

import ast
import importlib
import importlib.metadata
import typing
import warnings
from pathlib import Path

import pytest
import torch

import ipg_lightning
from ipg_lightning._moved import MOVED_MODULES
from ipg_lightning.attribution import METHODS, AttributionMethod, IPGAttribution, run_attribution
from ipg_lightning.attribution.methods import AttributionMethodName
from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.steering import ComponentSelection, GateSteering
from ipg_lightning.steering.checkpoint import migrate_hparams
from ipg_lightning.steering.learned import load_steering_checkpoint
from ipg_lightning.trajectories import SamplingConfig

PACKAGE = Path(ipg_lightning.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules of the package imported at run time (imports under ``if TYPE_CHECKING:`` are left out)."""
    imported, tree = set(), ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ipg_lightning"):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.startswith("ipg_lightning"))
    return imported


def test_the_package_has_no_import_circle():
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # Importing a.b.c also runs the packages a and a.b, unless they are the importer's own (being initialised).
        targets = {package for target in _runtime_imports(path) for package in _with_packages(target)}
        graph[name] = {target for target in targets if target in modules and target != name and not name.startswith(target + ".")}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(target) :], target]))
            if target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def _with_packages(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def test_every_method_name_the_command_line_accepts_has_exactly_one_class():
    assert set(typing.get_args(AttributionMethodName)) == set(METHODS)
    for name, method in METHODS.items():
        assert method.name == name and issubclass(method, AttributionMethod) and method.__doc__


def test_moved_modules_still_import_with_a_warning_naming_the_new_place():
    for old, new in MOVED_MODULES.items():
        with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from ipg_lightning.report import AttributionReport  # noqa: F401 (already imported: no second warning needed)


def test_the_version_has_one_source():
    assert importlib.metadata.version("ipg-lightning") == ipg_lightning.__version__


class FirstComponentScores(AttributionMethod):
    """A made-up method: component 0 of every site scores 1, the rest 0 (counts prompts like ``random``)."""

    name = "first_component"

    def step(self, batch):
        self.task.accumulator.update(prompts=len(batch["prompt"]))

    def scores(self, state):
        return {name: torch.nn.functional.one_hot(torch.tensor(0), site.size).float() for name, site in self.task.gates.sites.items()}


def test_a_new_method_is_one_class_and_the_module_needs_no_change(monkeypatch, tiny_llama, tokenizer):
    monkeypatch.setitem(METHODS, FirstComponentScores.name, FirstComponentScores)
    module = IPGAttribution.for_model(tiny_llama, tokenizer, method="first_component", families=["attn_head"], layers=[1])
    data = ReasoningDataModule(num_train=0, num_val=2, num_test=0, batch_size=2, template=PromptTemplate(use_chat_template=False))
    report = run_attribution(module, data, enable_progress_bar=False)
    assert report.select(k=1) == ["blocks.1.attn.hook_z[0]"]
    assert report.metadata["method"] == "first_component" and report.metadata["counts"]["prompts"] == 2
    assert "completeness" not in report.metadata


def test_a_checkpoint_with_the_old_flat_hyperparameters_loads_with_the_same_settings(tmp_path, tiny_llama, tokenizer, quiet_trainer):
    sampling = SamplingConfig(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=4, batch_size=8, seed=3)
    module = GateSteering.for_model(tiny_llama, tokenizer, ComponentSelection(components=("blocks.0.hook_mlp_out",)), sampling=sampling)
    data = ReasoningDataModule(num_train=2, num_val=1, num_test=1, batch_size=2, template=PromptTemplate(use_chat_template=False))
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    flat = {key: value for key, value in hparams.items() if key not in ("model_path", "sampling", "allow_other_model")}
    flat.update(model="tiny:llama", num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=4, generation_batch_size=8, seed=3)
    flat["selection"] = {**flat["selection"], "allow_other_model": False}  # a field of ComponentSelection in 0.1
    checkpoint["hyper_parameters"] = flat  # as version 0.1 wrote it
    torch.save(checkpoint, tmp_path / "old.ckpt")
    migrated = migrate_hparams(flat)
    assert migrated["model_path"] == "tiny:llama" and "model" not in migrated and "num_samples" not in migrated
    assert SamplingConfig(**migrated["sampling"]) == sampling and migrated["allow_other_model"] is False
    restored = load_steering_checkpoint(tmp_path / "old.ckpt")
    assert restored.model_path == "tiny:llama" and restored.sampling == sampling
    assert restored.gates.component_value("blocks.0.hook_mlp_out") == module.gates.component_value("blocks.0.hook_mlp_out")
    by_lightning = GateSteering.load_from_checkpoint(tmp_path / "old.ckpt")  # Lightning's own loader, same names
    assert by_lightning.model_path == "tiny:llama" and by_lightning.sampling == sampling and by_lightning.selection == module.selection
