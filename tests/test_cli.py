import json

import pytest

from ipg_lightning.cli import main, run


def test_demo_runs_every_stage_and_writes_a_complete_output(tmp_path, capsys):
    out = tmp_path / "demo"
    run(["demo", "--model", "tiny:llama", "--out_dir", str(out), "--support_prompts", "4", "--test_prompts", "4",
          "--steps", "2", "--learning_steps", "1", "--max_new_tokens", "8", "--k", "3", "--eval_samples", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["conditions"]) == ["base", "accuracy suppressed", "accuracy amplified", "length suppressed",
                                           "length amplified", "length learned"]
    assert summary["export"]["greedy_generations_identical"] is True
    assert summary["site"] == "blocks.1.mlp.hook_post"  # the last block of the 2-block tiny model
    assert set(summary["learned_gates"]) == set(summary["selected"]["length"])
    assert len(summary["selected"]["accuracy"]) == 3
    for name in ("attribution_accuracy", "attribution_length", "exported_learned"):
        assert (out / name).is_dir()
    assert len((out / "generations.jsonl").read_text().splitlines()) == 6 * 4 * 2  # 2 sampled completions each
    printed = capsys.readouterr().out
    assert "accuracy suppressed" in printed and "wall time" in printed


def test_demo_names_unknown_presets():
    with pytest.raises(ValueError, match="smollm2"):
        run(["demo", "--preset", "smolm2"])


def test_demo_rejects_a_zero_count_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        run(["demo", "--model", "tiny:llama", "--k", "0", "--out_dir", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()


def test_cli_rejects_a_config_typo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--test_promts", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "ipg demo: error: unrecognized arguments: --test_promts 3 (--debug shows the traceback)"
