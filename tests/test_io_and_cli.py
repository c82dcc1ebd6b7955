import json
import stat

import pytest

from ipg_lightning.cli import main
from ipg_lightning.io import atomic_directory, atomic_write_json


def test_atomic_directory_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as staging:
            atomic_write_json(staging / "attribution.json", {"half": "written"})
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        atomic_write_json(staging / "a.json", {"x": 1})
    assert json.loads((target / "a.json").read_text()) == {"x": 1}
    assert stat.S_IMODE(target.stat().st_mode) & 0o055  # readable by others, like a normal directory
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target):
            pass


def test_demo_steers_folds_and_writes_a_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--out_dir", str(out), "--num_prompts", "4", "--max_new_tokens", "24"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["conditions"]) == {"base", "suppressed", "amplified"}
    assert summary["fold"]["generations_identical"] is True
    assert summary["fold"]["max_logit_difference"] < 1e-5
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 4
    base = [json.loads(line)["completion"] for line in lines if '"condition": "base"' in line]
    suppressed = [json.loads(line)["completion"] for line in lines if '"condition": "suppressed"' in line]
    assert base != suppressed  # zeroing a layer's heads changes what the model writes
    assert "condition" in capsys.readouterr().out


def test_cli_rejects_a_config_typo(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--num_promts", "3"])
    assert "num_promts" in capsys.readouterr().err
