"""The README's Python example is part of the contract: it must run as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_puts_gradients_on_gates(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    gates = namespace["gates"]
    assert gates.gate("blocks.1.attn.hook_z").grad is not None
    assert gates.gate("blocks.1.attn.hook_z")[2].item() == 0.0
    assert isinstance(namespace["surrogate"], float)
    assert torch.isfinite(gates.gate("blocks.1.mlp.hook_post").grad).all()
