"""Outputs: atomic, marked with a manifest, and never replacing what the library did not write."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.cli import run
from ipg_lightning.outputs import (
    MANIFEST_FILE,
    STAGE_MARKER,
    OutputWriteError,
    UnsafeOverwriteError,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    read_manifest,
    remove_stale_stages,
)

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

    for module in ("steering.loading", "cli.demo_stages", "task"):
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
    assert len(stages) == 1 and not target.exists() and (stages[0] / STAGE_MARKER).is_file()
    live = _marked(tmp_path / ".report.otherhost-1.abc123.partial", "report")  # a stage another live process holds: left alone
    handle = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with atomic_directory(target) as staging:
            (staging / "done.txt").write_text("complete")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "report"])
        assert read_manifest(target)["files"] == ["done.txt"] and not (target / STAGE_MARKER).exists()
    finally:
        os.close(handle)


def _marked(stage: Path, output: str) -> Path:
    stage.mkdir()
    (stage / STAGE_MARKER).write_text(json.dumps({"written_by": "ipg_lightning", "output": output}))
    return stage


def test_an_old_result_displaced_by_a_killed_swap_is_put_back(tmp_path):
    target = tmp_path / "report"
    with atomic_directory(target) as staging:
        (staging / "old.txt").write_text("the earlier result")
    displaced = _marked(tmp_path / ".report.somehost-99999.xyz.replaced", "report")  # killed between the two renames
    os.replace(target, displaced / "report")
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(target):  # restored before anything is decided
        raise AssertionError("the restored result must be refused before any work")
    assert (target / "old.txt").read_text() == "the earlier result" and not displaced.exists()


def test_only_this_outputs_own_marked_stages_are_removed(tmp_path, caplog):
    look_alikes = {
        ".run.backup.partial": None,  # a person's directory that merely ends like a stage
        ".run.v2.somehost-7.abcdefgh.replaced": "run.v2",  # another output's saved earlier result
        ".run.somehost-8.abcdefgh.partial": None,  # named exactly like a stage, but not marked (an older version's)
        ".run.somehost-9.abcdefgh.partial ": "run",  # not the exact name
    }
    for name, output in look_alikes.items():
        folder = _marked(tmp_path / name, output) if output else tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "precious.txt").write_text("keep me")
    (tmp_path / ".run.v2.somehost-7.abcdefgh.replaced" / "run.v2").mkdir()
    with atomic_directory(tmp_path / "run") as staging:
        (staging / "a.txt").write_text("new")
    assert all((tmp_path / name / "precious.txt").read_text() == "keep me" for name in look_alikes)
    assert (tmp_path / ".run.v2.somehost-7.abcdefgh.replaced" / "run.v2").is_dir()
    assert "left " in caplog.text and ".run.somehost-8.abcdefgh.partial" in caplog.text  # the unmarked one is named, not removed


def test_the_cli_never_deletes_a_directory_it_did_not_create(tmp_path):
    outputs = tmp_path / "outputs"
    backup = outputs / ".myrep.backup.partial"
    backup.mkdir(parents=True)
    (backup / "important.txt").write_text("precious\n")
    other = _marked(outputs / f".myrep.v2.{socket.gethostname().replace('.', '_')}-4242.abcdefgh.replaced", "myrep.v2")
    (other / "myrep.v2").mkdir()
    (other / "myrep.v2" / "only_copy.txt").write_text("the earlier myrep.v2\n")
    arguments = ["--config", str(RECIPES / "attribute_tiny.yaml"), "--data.num_val", "2", "--model.sampling.max_new_tokens", "8"]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ipg"), "attribute", *arguments, "--model.output_dir", str(outputs / "myrep")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed" not in result.stderr
    assert (backup / "important.txt").read_text() == "precious\n"
    assert (other / "myrep.v2" / "only_copy.txt").read_text() == "the earlier myrep.v2\n"
    assert (outputs / "myrep" / "attribution.safetensors").is_file()


PAGE_AND_HANG = """
import sys, time
from ipg_lightning import outputs
def hang(*args):
    print("writing", flush=True)
    time.sleep(60)
outputs.os.replace = hang
outputs.atomic_write_text(sys.argv[1], "<html>half</html>")
"""


def test_a_page_left_half_written_by_a_killed_process_is_removed_by_the_next_write_and_nothing_else(tmp_path):
    page = tmp_path / "report.html"
    process = subprocess.Popen([sys.executable, "-c", PAGE_AND_HANG, str(page)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert (left / STAGE_MARKER).is_file() and remove_stale_stages(page) == []  # its writer is alive: kept
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    look_alike = tmp_path / f".report.html.{socket.gethostname().replace('.', '_')}-4000005.abc.tmp"  # a file named like a temporary
    look_alike.write_text("mine")
    atomic_write_text(page, "<html>complete</html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([look_alike.name, "report.html"]) and not left.exists()
    assert page.read_text() == "<html>complete</html>" and look_alike.read_text() == "mine"


def test_a_path_with_an_unexpanded_tilde_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"Cannot write ~/x: a leading ~ is expanded by a shell"):
        check_output_dir("~/x")
    assert list(tmp_path.iterdir()) == []


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB file system (a tmpfs), or a skip where this process may not mount one."""
    folder = tmp_path / "disk"
    if not _mount_tmpfs(folder, "size=2m"):
        pytest.skip("needs root and mount to make a small file system")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_is_named_by_the_output_and_leaves_nothing(small_disk):
    from safetensors.torch import save_file

    target = small_disk / "report"
    full = pytest.raises(OutputWriteError, match=rf"Could not write {target}: no space left on device")
    with full as caught, atomic_directory(target) as staging:
        save_file({"scores": torch.zeros(1_000_000)}, str(staging / "scores.safetensors"))  # 4 MB
    assert ".partial" not in str(caught.value) and list(small_disk.iterdir()) == []
    with contextlib.suppress(OSError), (small_disk / "filler").open("wb") as filler:
        filler.write(b"x" * 4_000_000)
    with pytest.raises(OSError, match=r"Cannot write .*next: the disk holding .* is full"):
        check_output_dir(small_disk / "next")


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    folder = tmp_path / "read_only"
    if not _mount_tmpfs(folder, "size=64k,ro"):
        pytest.skip("needs root and mount to make a read-only file system")
    try:

        def no_loading(*args, **kwargs):
            raise AssertionError("a model was loaded before the output was checked")

        monkeypatch.setattr("ipg_lightning.task.load_model_and_tokenizer", no_loading)
        with pytest.raises(PermissionError, match=rf"Cannot write {folder}/sae: {folder} is read-only"):
            run(["train-sae", "--config", str(RECIPES / "train_tiny_sae.yaml"), "--output_dir", str(folder / "sae")])
    finally:
        subprocess.run(["umount", str(folder)], check=False)


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
    report = AttributionReport({"blocks.0.hook_mlp_out": torch.ones(1)}, {"blocks.0.hook_mlp_out": {"family": "mlp_out", "layer": 0, "size": 1}})
    report.save(tmp_path / "report")
    run(["export", "--config", str(RECIPES / "export_tiny.yaml"), "--output_dir", str(tmp_path / "export")])
    for path in [
        tmp_path / "report" / "attribution.safetensors",
        tmp_path / "export" / "model.safetensors",
        tmp_path / "export" / "steering.safetensors",
        tmp_path / "export" / MANIFEST_FILE,
    ]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
