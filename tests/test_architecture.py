"""The package's shape: layered imports, one registry per concept, no side effects on import."""

import ast
import importlib
import importlib.metadata
import typing
from pathlib import Path

import torch

import ipg_lightning
from ipg_lightning.attribution import METHODS, AttributionMethod, IPGAttribution, run_attribution
from ipg_lightning.attribution.methods import AttributionMethodName
from ipg_lightning.data import PromptTemplate, ReasoningDataModule

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


