import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_steering.py")


def _train(devices, output):
    subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(output)],
        check=True,
        timeout=300,
        capture_output=True,
        env={**os.environ, "PL_DISABLE_FORK": "1"},
    )
    return torch.load(output)


def test_two_ddp_processes_train_the_same_gates_as_one(tmp_path):
    single = _train(1, tmp_path / "single.pt")
    double = _train(2, tmp_path / "double.pt")
    assert set(single) == set(double)
    for key, value in single.items():
        torch.testing.assert_close(double[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.all(single["gates.values.blocks__1__hook_attn_out"] == 1)  # training did move the gates
