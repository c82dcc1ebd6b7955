import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_steering.py")


def _train(devices, output, fine_tune):
    subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(output), fine_tune],
        check=True,
        timeout=300,
        capture_output=True,
        env={**os.environ, "PL_DISABLE_FORK": "1"},
    )
    return torch.load(output)


@pytest.mark.parametrize("fine_tune", ["gates", "weight_slices"])
def test_two_ddp_processes_train_the_same_gates_as_one(tmp_path, fine_tune):
    single = _train(1, tmp_path / "single.pt", fine_tune)
    double = _train(2, tmp_path / "double.pt", fine_tune)
    assert set(single) == set(double)
    for key, value in single.items():
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if fine_tune == "gates" else {"rtol": 1e-4, "atol": 1e-5}  # deltas: larger sums
        torch.testing.assert_close(double[key], value, **tolerance)
    assert not torch.all(single["gates.values.blocks__1__hook_attn_out"] == 1)  # training did move the gates
    deltas = [value for key, value in single.items() if key.endswith(".delta")]
    assert (fine_tune == "weight_slices") == bool(deltas) and all(delta.abs().sum() > 0 for delta in deltas)
