import json
from functools import partial

import pytest
import torch

from ipg_lightning.attribution.metadata import ReportCounts
from ipg_lightning.attribution.plots import plot_report
from ipg_lightning.attribution.report import AttributionReport


def _report():
    scores = {
        "blocks.0.attn.hook_z": torch.tensor([0.5, -2.0, 0.1, 0.0]),
        "blocks.1.attn.hook_z": torch.tensor([1.0, 0.2, -0.3, 3.0]),
        "blocks.1.mlp.hook_post": torch.tensor([0.7, -0.9]),
        "blocks.1.hook_mlp_out": torch.tensor([-5.0]),
    }
    sites = {
        "blocks.0.attn.hook_z": {"family": "attn_head", "layer": 0, "size": 4},
        "blocks.1.attn.hook_z": {"family": "attn_head", "layer": 1, "size": 4},
        "blocks.1.mlp.hook_post": {"family": "mlp_neuron", "layer": 1, "size": 2},
        "blocks.1.hook_mlp_out": {"family": "mlp_out", "layer": 1, "size": 1},
    }
    return AttributionReport(scores, sites, {"method": "ipg", "counts": {"prompts": 3}})


def test_selection_signed_absolute_fraction_per_layer_and_family():
    report = _report()
    assert report.select(k=3) == ["blocks.1.attn.hook_z[3]", "blocks.1.attn.hook_z[0]", "blocks.1.mlp.hook_post[0]"]
    assert report.select(k=2, signed=False) == ["blocks.1.hook_mlp_out", "blocks.1.attn.hook_z[3]"]
    assert report.select(k=1, per_layer=True) == ["blocks.1.attn.hook_z[3]", "blocks.0.attn.hook_z[0]"]
    assert report.select(fraction=0.25, family="attn_head") == ["blocks.1.attn.hook_z[3]", "blocks.1.attn.hook_z[0]"]
    assert report.select(k=0) == []
    with pytest.raises(ValueError, match="exactly one"):
        report.select(k=2, fraction=0.5)
    with pytest.raises(ValueError, match="fraction"):
        report.select(fraction=1.5)


def test_save_and_load_round_trip_with_plot(tmp_path):
    report = _report()
    report.save(tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["attribution.json", "attribution.safetensors", "ipg_manifest.json"]
    report.save(tmp_path / "report", top_n=3, extra_files=partial(plot_report, report))
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == ["attribution.json", "attribution.png", "attribution.safetensors", "ipg_manifest.json"]
    payload = json.loads((tmp_path / "report" / "attribution.json").read_text())
    assert payload["top"][0] == {"name": "blocks.1.attn.hook_z[3]", "score": 3.0} and len(payload["top"]) == 3
    loaded = AttributionReport.load(tmp_path / "report")
    assert loaded.select(k=4) == report.select(k=4)
    assert loaded.metadata == report.metadata
    for name, scores in report.scores.items():
        assert torch.equal(loaded.scores[name], scores)
    with pytest.raises(FileExistsError):
        report.save(tmp_path / "report")
    with pytest.raises(FileNotFoundError, match="not an attribution report: attribution.safetensors is missing"):
        AttributionReport.load(tmp_path)


def test_entries_another_version_wrote_are_left_out_with_a_warning(tmp_path, caplog):
    report = _report()
    report.metadata.counts = ReportCounts(prompts=2, trajectories=8)
    report.save(tmp_path / "report")
    path = tmp_path / "report" / "attribution.json"
    payload = json.loads(path.read_text())
    payload["counts"]["correct_trajectories"] = 5  # an entry an earlier version wrote
    payload["future_entry"] = {"x": 1}
    path.write_text(json.dumps(payload))
    loaded = AttributionReport.load(tmp_path / "report")
    assert loaded.metadata.counts == ReportCounts(prompts=2, trajectories=8) and loaded.metadata == report.metadata
    assert "future_entry" in caplog.text and "correct_trajectories" in caplog.text
    del payload["counts"]["prompts"], payload["future_entry"]
    payload["completeness"] = {"sum_of_scores": 1.0}  # a block without the entries it needs
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="attribution.json cannot be read .*lacks an entry.*run the attribution again"):
        AttributionReport.load(tmp_path / "report")


def test_mismatched_scores_are_rejected():
    with pytest.raises(ValueError, match="blocks.0.attn.hook_z"):
        AttributionReport({"blocks.0.attn.hook_z": torch.zeros(3)}, {"blocks.0.attn.hook_z": {"family": "attn_head", "layer": 0, "size": 4}})
