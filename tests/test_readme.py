"""The README's Python examples are part of the contract: they must run as written."""

import re
from pathlib import Path

import torch

from ipg_lightning.cli import run

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _block(marker: str) -> str:
    matching = [block for block in BLOCKS if marker in block]
    assert len(matching) == 1, f"expected one README Python block containing {marker!r}"
    return matching[0]


def test_api_example_runs_and_puts_gradients_on_gates():
    namespace: dict = {}
    exec(compile(_block("ComponentGates.for_model"), str(README), "exec"), namespace)
    gates = namespace["gates"]
    assert gates.gate("blocks.1.attn.hook_z").grad is not None
    assert gates.gate("blocks.1.attn.hook_z")[2].item() == 0.0
    assert isinstance(namespace["surrogate"], float)
    assert torch.isfinite(gates.gate("blocks.1.mlp.hook_post").grad).all()


def test_report_example_runs_on_a_report_from_the_tiny_recipe(tmp_path, monkeypatch):
    recipe = README.parent / "recipes" / "attribute_tiny.yaml"
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
    namespace: dict = {}
    exec(compile(_block("AttributionReport.load"), str(README), "exec"), namespace)
    assert len(namespace["report"].select(k=10)) == 10


def test_the_coverage_table_is_the_one_the_code_generates():
    from ipg_lightning.zoo.tiny import coverage_table

    shown = re.search(r"<!-- coverage-table -->\n(.*?)\n<!-- /coverage-table -->", README.read_text(), flags=re.DOTALL)
    assert shown is not None, "README.md has no <!-- coverage-table --> block"
    expected = coverage_table()
    assert shown.group(1).strip() == expected, f"Regenerate the README coverage table; it should read:\n{expected}"
