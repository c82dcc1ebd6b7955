"""Outputs: atomic, marked with a manifest, and never replacing what the library did not write."""

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.cli import run
from ipg_lightning.outputs import MANIFEST_FILE, UnsafeOverwriteError, atomic_directory, atomic_write_json, read_manifest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUICK_EVALUATE = ["--data.num_test", "2", "--data.num_val", "1", "--data.num_train", "0", "--sampling.max_new_tokens", "4"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory that looks like a user's project: a repository with files and an earlier run."""
    root = tmp_path / "project"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "notes.txt").write_text("my notes\n")
    with atomic_directory(root / "outputs" / "old_run", kind="evaluation") as staging:
        (staging / "metrics.json").write_text("{}\n")
    monkeypatch.chdir(root)
    return root


def test_atomic_directory_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as staging:
        atomic_write_json(staging / "attribution.json", {"half": "written"})
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target, kind="test output") as staging:
        atomic_write_json(staging / "a.json", {"x": 1})
    assert json.loads((target / "a.json").read_text()) == {"x": 1}
    assert stat.S_IMODE(target.stat().st_mode) & 0o055  # readable by others, like a normal directory
    manifest = read_manifest(target)
    assert manifest["kind"] == "test output" and manifest["files"] == ["a.json"]
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(target):
        pass


@pytest.mark.parametrize(
    "command",
    [
        ["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), "--model.overwrite", "true", "--model.output_dir"],
        ["evaluate", "--config", str(RECIPES / "evaluate_tiny.yaml"), "--overwrite", "true", *QUICK_EVALUATE, "--output_dir"],
        ["export", "--config", str(RECIPES / "export_tiny.yaml"), "--overwrite", "true", "--output_dir"],
        ["demo", "--model_path", "tiny:llama", "--out_dir"],
    ],
    ids=lambda command: command[0],
)
@pytest.mark.parametrize("target", [".", "..", "outputs"])
def test_overwrite_never_replaces_the_working_directory_its_parents_or_other_files(project, command, target):
    before = _tree(project.parent)
    with pytest.raises(UnsafeOverwriteError, match="Refusing to overwrite"):
        run([*command, target])
    assert _tree(project.parent) == before  # .git, notes.txt and outputs/old_run all intact


def test_overwrite_replaces_an_earlier_output_but_not_a_file_added_to_it(project):
    run(["evaluate", "--config", str(RECIPES / "evaluate_tiny.yaml"), *QUICK_EVALUATE, "--output_dir", "outputs/run"])
    first = read_manifest("outputs/run")
    assert first["kind"] == "evaluation" and set(first["files"]) == {"metrics.json", "generations.jsonl"}
    with pytest.raises(FileExistsError, match="already exists"):  # overwrite must be asked for
        run(["evaluate", "--config", str(RECIPES / "evaluate_tiny.yaml"), *QUICK_EVALUATE, "--output_dir", "outputs/run"])
    (project / "outputs" / "run" / "metrics.json").write_text("stale\n")
    run(["evaluate", "--config", str(RECIPES / "evaluate_tiny.yaml"), *QUICK_EVALUATE, "--output_dir", "outputs/run", "--overwrite", "true"])
    assert json.loads((project / "outputs" / "run" / "metrics.json").read_text())["metrics"]["num_completions"] == 2
    (project / "outputs" / "run" / "analysis.ipynb").write_text("{}")
    with pytest.raises(UnsafeOverwriteError, match=r"entries the earlier run did not write \(analysis.ipynb\)"):
        run(["evaluate", "--config", str(RECIPES / "evaluate_tiny.yaml"), *QUICK_EVALUATE, "--output_dir", "outputs/run", "--overwrite", "true"])
    assert (project / "outputs" / "run" / "analysis.ipynb").is_file()
    assert sorted(p.name for p in (project / "outputs").iterdir()) == ["old_run", "run"]  # no stage left behind


def test_an_existing_output_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    for module in ("steering.loading", "cli.demo", "task"):
        monkeypatch.setattr(f"ipg_lightning.{module}.load_model_and_tokenizer", no_loading)
    for command in (
        ["evaluate", "--output_dir"],
        ["export", "--selection.components", '["blocks.0.hook_mlp_out"]', "--output_dir"],
        ["demo", "--overwrite", "false", "--out_dir"],
        ["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), "--model.output_dir"],
    ):
        with pytest.raises(FileExistsError, match="already exists"):
            run([*command, str(tmp_path / "taken")])


STAGE_AND_HANG = """
import sys, time
from pathlib import Path
from ipg_lightning.outputs import atomic_directory
with atomic_directory(sys.argv[1]) as staging:
    (staging / "half.bin").write_bytes(b"x" * 1000)
    print("staged", flush=True)
    time.sleep(60)
"""


def _killed_while_staging(target: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", STAGE_AND_HANG, str(target)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "staged"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_stage_left_by_a_killed_process_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "report"
    _killed_while_staging(target)
    stages = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(stages) == 1 and not target.exists()
    live = tmp_path / ".report.otherhost-1.abc123.partial"  # a stage another live process holds: left alone
    live.mkdir()
    handle = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with atomic_directory(target) as staging:
            (staging / "done.txt").write_text("complete")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "report"])
    finally:
        os.close(handle)


def test_an_old_result_displaced_by_a_killed_swap_is_put_back(tmp_path):
    target = tmp_path / "report"
    with atomic_directory(target) as staging:
        (staging / "old.txt").write_text("the earlier result")
    displaced = tmp_path / ".report.somehost-99999.xyz.replaced"  # killed between the two renames
    displaced.mkdir()
    os.replace(target, displaced / "report")
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(target):  # restored before anything is decided
        raise AssertionError("the restored result must be refused before any work")
    assert (target / "old.txt").read_text() == "the earlier result" and not displaced.exists()


def test_a_file_added_inside_a_sub_directory_of_an_output_is_not_overwritten(tmp_path):
    target = tmp_path / "demo"
    with atomic_directory(target) as staging:
        (staging / "exported").mkdir()
        (staging / "exported" / "model.safetensors").write_bytes(b"weights")
    assert read_manifest(target)["files"] == ["exported/model.safetensors"]
    (target / "exported" / "NOTES.md").write_text("mine")
    with pytest.raises(UnsafeOverwriteError, match=r"did not write \(exported/NOTES.md\)"), atomic_directory(target, overwrite=True):
        pass
    assert (target / "exported" / "NOTES.md").read_text() == "mine"


def test_reports_and_exports_are_readable_by_others(tmp_path):
    import torch

    report = AttributionReport({"blocks.0.hook_mlp_out": torch.ones(1)}, {"blocks.0.hook_mlp_out": {"family": "mlp_out", "layer": 0, "size": 1}})
    report.save(tmp_path / "report", plot=False)
    run(["export", "--config", str(RECIPES / "export_tiny.yaml"), "--output_dir", str(tmp_path / "export")])
    for path in [
        tmp_path / "report" / "attribution.safetensors",
        tmp_path / "export" / "model.safetensors",
        tmp_path / "export" / "steering.safetensors",
        tmp_path / "export" / MANIFEST_FILE,
    ]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
