"""The README and the guides in docs/ are part of the contract: their Python examples run as written,
their generated tables are the ones the code generates, and their relative links resolve."""

import re
from pathlib import Path

import pytest
import torch

from ipg_lightning.cli import run

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The README and every guide.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```.*?^```[^\n]*$", flags=re.DOTALL | re.MULTILINE)
#: Every ```python block, with the page it is on.
BLOCKS = [(page, block) for page in PAGES for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.DOTALL | re.MULTILINE)]

#: What marks each Python block a test below runs: every block holds exactly one marker, here or in ILLUSTRATIVE.
RUN_BY_TESTS = (
    "backward_weighted_log_likelihood(model",  # README: gates, sampling and the surrogate
    "AttributionReport.load(",  # docs/attribution.md: loading a report
    "attach_sae(model",  # docs/sae.md: gating one feature of the shipped SAE
    "run_attribution(module",  # docs/python.md: attribution from Python
    "load_reward({",  # docs/python.md: a compound reward
    "export_steered_model(model",  # docs/python.md: export and load
    "vectors = contrast_vectors(",  # docs/steering.md: a steering vector from a contrast
)
#: Blocks that are shown but not run, by a marker they hold, with the reason (e.g. a model that needs a GPU).
ILLUSTRATIVE: dict[str, str] = {}


def _block(marker: str) -> tuple[Path, str]:
    matching = [(page, block) for page, block in BLOCKS if marker in block]
    assert len(matching) == 1, f"expected one Python block containing {marker!r} in README.md and docs/*.md, found {len(matching)}"
    return matching[0]


def _run_block(marker: str) -> dict:
    page, block = _block(marker)
    namespace: dict = {}
    exec(compile(block, str(page), "exec"), namespace)
    return namespace


def test_every_python_block_is_run_by_a_test_or_marked_illustrative():
    for page, block in BLOCKS:
        markers = [marker for marker in (*RUN_BY_TESTS, *ILLUSTRATIVE) if marker in block]
        assert len(markers) == 1, (
            f"A Python block in {page.relative_to(ROOT)} holds the markers {markers}: give it one test (RUN_BY_TESTS) "
            f"or one reason it cannot run (ILLUSTRATIVE):\n{block}"
        )


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 300, "the README holds the essentials; move the rest to a guide in docs/"


def test_the_readme_shows_one_python_example_and_it_is_run():
    readme_blocks = [block for page, block in BLOCKS if page == README]
    assert len(readme_blocks) == 1 and "ComponentGates.for_model" in readme_blocks[0]


def test_api_example_runs_and_puts_gradients_on_gates():
    namespace = _run_block("backward_weighted_log_likelihood(model")
    gates = namespace["gates"]
    assert gates.gate("blocks.1.attn.hook_z").grad is not None
    assert gates.gate("blocks.1.attn.hook_z")[2].item() == 0.0
    assert isinstance(namespace["surrogate"], float)
    assert torch.isfinite(gates.gate("blocks.1.mlp.hook_post").grad).all()


def test_report_example_runs_on_a_report_from_the_tiny_recipe(tmp_path, monkeypatch):
    recipe = ROOT / "recipes" / "attribute_tiny.yaml"
    run(
        [
            "attribute",
            "--config",
            str(recipe),
            "--model.steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--model.output_dir",
            str(tmp_path / "outputs" / "attribution_tiny"),
        ]
    )
    monkeypatch.chdir(tmp_path)
    namespace = _run_block("AttributionReport.load(")
    assert len(namespace["report"].select(k=10)) == 10


def test_sae_example_gates_one_feature_of_the_shipped_sae(monkeypatch):
    from ipg_lightning.sae import attached_saes

    monkeypatch.chdir(ROOT)
    namespace = _run_block("attach_sae(model")
    assert list(attached_saes(namespace["model"])) == ["blocks.2.hook_resid_post.sae"]
    gate = namespace["gates"].gate("blocks.2.hook_resid_post.sae")
    assert gate.shape == (1024,) and gate[17].item() == 0.0 and gate.sum().item() == 1023.0


def test_python_attribution_example_ranks_the_attributed_neurons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run_block("run_attribution(module")
    top = namespace["top"]
    assert len(top) == 5 and all(name.startswith("blocks.1.mlp.hook_post[") for name in top)
    assert namespace["report"].metadata.completeness is not None


def test_reward_example_scores_as_its_comment_says():
    assert _run_block("load_reward({")["score"] == pytest.approx(1.0 - 0.01 * 5)


def test_export_example_folds_one_gate_and_carries_the_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    card = _run_block("export_steered_model(model")["card"]  # the block itself compares the reloaded logits
    assert card["folded_sites"] == ["blocks.1.mlp.hook_post"]
    assert card["loader_sites"] == ["blocks.1.hook_resid_post"]


def test_steering_vector_example_builds_saves_and_loads_a_contrast_vector(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run_block("vectors = contrast_vectors(")
    vectors, loaded = namespace["vectors"], namespace["loaded"]
    assert vectors.provenance["reward"] == "reasoning_length" and vectors.provenance["above_trajectories"] > 0
    assert loaded.alpha == -2.0 and torch.equal(loaded.vector("blocks.2.hook_resid_post"), vectors.vector("blocks.2.hook_resid_post").detach())
    assert len(namespace["steered"]) == 8


def _generated(page: Path, name: str) -> str:
    shown = re.search(rf"<!-- {name} -->\n(.*?)\n<!-- /{name} -->", page.read_text(), flags=re.DOTALL)
    assert shown is not None, f"{page.relative_to(ROOT)} has no <!-- {name} --> block"
    return shown.group(1).strip()


def test_the_coverage_table_is_the_one_the_code_generates():
    from ipg_lightning.zoo.tiny import coverage_table

    expected = coverage_table()
    assert _generated(ROOT / "docs" / "architectures.md", "coverage-table") == expected, (
        f"Regenerate the coverage table in docs/architectures.md; it should read:\n{expected}"
    )


def test_the_commands_table_is_the_one_the_cli_lists():
    from ipg_lightning.cli.main import COMMANDS

    rows = [f"| `ipg {name}` | {command.summary.replace('|', '&#124;')} |" for name, command in COMMANDS.items()]
    expected = "\n".join(["| command | what it does |", "| --- | --- |", *rows])
    assert _generated(README, "commands-table") == expected, f"Regenerate the README's commands table; it should read:\n{expected}"


def _prose(page: Path) -> str:
    """The page without fenced blocks and inline code, where link-like text is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", page.read_text()))


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to hyphens, repeats numbered)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCED.sub("", page.read_text()), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        numbered, count = slug, 1
        while numbered in anchors:
            numbered, count = f"{slug}-{count}", count + 1
        anchors.add(numbered)
    return anchors


def test_every_relative_link_points_at_a_file_that_exists():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(page)):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)
