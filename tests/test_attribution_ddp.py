import os
import subprocess
import sys
from pathlib import Path

import torch

from ipg_lightning.attribution.report import AttributionReport

SCRIPT = Path(__file__).with_name("ddp_attribution.py")


def _run(devices, output_dir):
    environment = {**os.environ, "PL_DISABLE_FORK": "1"}
    subprocess.run([sys.executable, str(SCRIPT), str(devices), str(output_dir)], check=True, env=environment, timeout=300, capture_output=True)
    return AttributionReport.load(output_dir, trajectories=True)


def test_two_ddp_processes_give_the_same_scores_as_one(tmp_path):
    single = _run(1, tmp_path / "single")
    double = _run(2, tmp_path / "double")
    assert double.metadata.world_size == 2 and single.metadata.world_size == 1
    # 6 prompts split 3 + 3 without repeats: every prompt counted exactly once
    assert double.metadata.counts == single.metadata.counts
    assert double.metadata.counts.prompts == 6
    for name, scores in single.scores.items():
        torch.testing.assert_close(double.scores[name], scores, rtol=1e-5, atol=1e-7)
    assert any(scores.abs().sum() > 0 for scores in single.scores.values())
    # rank 0 writes every process's kept trajectories, each prompt once, with the same samples as one process
    kept = {name: report.trajectories for name, report in (("single", single), ("double", double))}
    assert len(kept["double"]) == 6 * 4 and len(kept["double"].prompts) == 6

    def records(trajectories):
        return sorted((trajectories.prompts[row["prompt"]]["text"], row["sample"], row["completion"], row["reward"]) for row in trajectories.rows)

    assert records(kept["double"]) == records(kept["single"])
