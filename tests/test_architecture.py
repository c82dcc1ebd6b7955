"""The package's shape: layered imports, one registry per concept, no side effects on import."""

import ast
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest
import torch

import ipg_lightning
from ipg_lightning.attribution import METHODS, AttributionMethod, IPGAttribution, run_attribution
from ipg_lightning.attribution.methods import AttributionMethodName
from ipg_lightning.cli.main import COMMANDS
from ipg_lightning.data import PromptTemplate, ReasoningDataModule

PACKAGE = Path(ipg_lightning.__file__).parent
ROOT = PACKAGE.parent


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


#: The package's layers, lowest first: a folder (or top-level module) imports only from layers below its own.
LAYERS = (
    ("outputs", "checks"),
    ("model",),
    ("vectors",),
    ("gates",),
    ("rollout", "task"),
    ("rewards",),
    ("data", "metrics"),
    ("evaluation", "sae"),
    ("attribution", "zoo"),
    ("steering",),
    ("explorer",),
    ("cli",),
)


def test_every_import_runs_down_the_layers():
    layer_of = {unit: index for index, units in enumerate(LAYERS) for unit in units}
    upward = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        unit = name.split(".")[1] if "." in name else None
        if unit is None:  # the package's face: it imports lazily (see test_importing_the_package_has_no_side_effects)
            assert not _runtime_imports(path)
            continue
        for target in _runtime_imports(path):
            target_unit = target.split(".")[1]
            if target_unit != unit and layer_of[target_unit] >= layer_of[unit]:
                upward.append(f"{name} -> {target}")
    assert set(layer_of) == {_module_name(p).split(".")[1] for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}
    assert not upward, upward


def test_the_package_top_holds_at_most_eight_modules():
    assert len(list(PACKAGE.glob("*.py"))) <= 8


def test_importing_the_package_has_no_side_effects():
    code = (
        "import sys; finders = list(sys.meta_path); import ipg_lightning; "
        "heavy = [m for m in ('torch', 'transformers', 'lightning', 'matplotlib') if m in sys.modules]; "
        "assert not heavy, heavy; assert sys.meta_path == finders"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in PACKAGE.rglob("*.py"):  # figures are drawn on their own Figure: no global backend or pyplot state
        assert "matplotlib.use(" not in path.read_text() and "import matplotlib.pyplot" not in path.read_text(), path


def test_every_public_name_of_the_package_imports():
    for name in ipg_lightning.__all__:
        assert getattr(ipg_lightning, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ipg_lightning.nothing  # noqa: B018 (the attribute access is the test)


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
    assert report.metadata.method == "first_component" and report.metadata.counts.prompts == 2
    assert report.metadata.completeness is None


def test_ipg_help_lists_every_command_without_importing_any():
    code = (
        "import sys; from ipg_lightning.cli.main import run; run(['--help']); "
        "assert not [m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules]"
    )
    shown = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    for name, command in COMMANDS.items():
        assert any(line.split()[:2] == [name, *command.summary.split()[:1]] for line in shown.splitlines()), name
        assert callable(command.load()) and command.load().__doc__, name


@pytest.mark.parametrize(
    "arguments, message",
    [(["--k", "0"], "k must be >= 1"), (["--preset", "nope"], "nope"), (["--gamma_amplify", "-1"], "gamma_amplify"), (["--family", "x"], "family")],
)
def test_ipg_demo_refuses_a_bad_argument_before_importing_torch(arguments, message, tmp_path):
    code = (
        "import sys; from ipg_lightning.cli.main import main\n"
        f"try: main(['demo', '--out_dir', {str(tmp_path / 'out')!r}, *{arguments!r}])\n"
        "except SystemExit as exit: assert exit.code != 0, exit.code\n"
        "assert not [m for m in ('torch', 'lightning', 'transformers') if m in sys.modules]"
    )
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert refused.returncode == 0, refused.stderr
    assert message in refused.stderr and not (tmp_path / "out").exists()
    from ipg_lightning.cli.demo import DemoPresetName
    from ipg_lightning.cli.demo_stages import PRESETS

    assert set(typing.get_args(DemoPresetName)) == set(PRESETS)


def test_the_wheel_carries_the_shipped_models_so_the_demo_runs_from_an_install(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(PACKAGE, source / "ipg_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")]
    subprocess.run(build, check=True)
    names = set(zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist())
    shipped = {path.relative_to(ROOT).as_posix() for path in (PACKAGE / "zoo" / "checkpoints").rglob("*") if path.is_file()}
    assert len(shipped) >= 20 and shipped <= names
    assert "ipg_lightning/explorer/page.html" in names


def test_the_shipped_reasoners_load_by_name_and_are_recorded_as_their_directory():
    from ipg_lightning.model.identity import same_model_name
    from ipg_lightning.model.loading import MODEL_DIRECTORIES, load_model_and_tokenizer, model_directory
    from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_RL_PATH

    assert {name: model_directory(name) for name in MODEL_DIRECTORIES} == {
        "tiny-reasoner": TINY_REASONER_PATH,
        "tiny-reasoner-rl": TINY_REASONER_RL_PATH,
    }
    for name, path in (("tiny-reasoner", TINY_REASONER_PATH), ("tiny-reasoner-rl", TINY_REASONER_RL_PATH)):
        model, tokenizer = load_model_and_tokenizer(name)
        assert Path(model.config._name_or_path) == Path(path) and tokenizer.chat_template.startswith("Q: ")
        assert same_model_name(name, path) and same_model_name(path, name)
    assert not same_model_name("tiny-reasoner", TINY_REASONER_RL_PATH)
    assert IPGAttribution(model_path="tiny-reasoner").model_path == TINY_REASONER_PATH  # what reports record
