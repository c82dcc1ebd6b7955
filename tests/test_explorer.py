"""The attribution explorer: kept trajectories, per-token traces checked against independent computations, the page."""

import copy
import json
import logging
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from test_attribution import _data, _run, word_count

from ipg_lightning.attribution.estimator import group_advantages
from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.cli.main import run
from ipg_lightning.explorer import Effects, MeasuredEffect, embedded_payload, page_for_report, read_evaluations
from ipg_lightning.explorer.page import score_path
from ipg_lightning.gates.component_gates import parse_component_name
from ipg_lightning.rewards.functions import Completion, accuracy
from ipg_lightning.sae import save_sae
from ipg_lightning.zoo.tiny import random_sae

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(model, tokenizer, families=("mlp_neuron",), **kwargs):
    settings = {"reward": word_count, "layers": [1], "steps": 4, "rule": "gauss_legendre", "keep_trajectories": True}
    settings["sampling"] = {"max_new_tokens": 12}
    return _run(model, tokenizer, _data(num_val=4), families=list(families), **{**settings, **kwargs})


def _score(report, name):
    site, index = parse_component_name(name)
    return float(report.scores[site][index or 0])


def test_kept_trajectories_hold_the_runs_samples_rewards_and_advantages_and_survive_a_round_trip(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer)
    kept = report.trajectories
    assert len(kept.prompts) == 4 and len(kept) == 4 * 4 and kept.num_samples == 4
    rewards = torch.tensor([row["reward"] for row in kept.rows], dtype=torch.float64).view(4, 4)
    for row in kept.rows:  # the reward is the run's reward of the kept text
        assert row["reward"] == word_count(Completion("", row["completion"], len(row["completion_ids"])))
        decoded = tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        assert row["completion"] == decoded or row["completion_ids"][-1] == tokenizer.eos_token_id
        gold = kept.prompts[row["prompt"]]["answer"]
        assert row["correct"] == bool(accuracy(Completion("", row["completion"], 1, gold=gold)))
    advantages, _ = group_advantages(rewards, "rloo")  # recomputed independently of the run
    torch.testing.assert_close(torch.tensor([row["advantage"] for row in kept.rows], dtype=torch.float64), advantages.flatten())
    report.save(tmp_path / "report")
    again = AttributionReport.load(tmp_path / "report", trajectories=True)
    assert again.trajectories == kept and (tmp_path / "report" / "trajectories.json").is_file()
    assert AttributionReport.load(tmp_path / "report").trajectories is None  # selecting and steering never read them


def test_a_damaged_trajectories_file_is_refused_naming_it(tmp_path, tiny_llama, tokenizer):
    _report(tiny_llama, tokenizer).save(tmp_path / "report")
    path = tmp_path / "report" / "trajectories.json"
    payload = json.loads(path.read_text())
    payload["rows"][0]["completion_ids"] = ["<script>"]
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"trajectories.json was changed after its report was written"):  # the recorded digest
        AttributionReport.load(tmp_path / "report", trajectories=True)
    metadata = json.loads((tmp_path / "report" / "attribution.json").read_text())
    del metadata["trajectories_sha256"]  # as an older version wrote it: the contents are still checked
    (tmp_path / "report" / "attribution.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"trajectories.json is damaged .*completion_ids are not token ids"):
        AttributionReport.load(tmp_path / "report", trajectories=True)
    path.write_text('{"format": 1, "num_sam')
    with pytest.raises(ValueError, match=r"trajectories.json is damaged"):
        AttributionReport.load(tmp_path / "report", trajectories=True)
    assert AttributionReport.load(tmp_path / "report").select(k=2)  # the scores stay usable


@pytest.mark.parametrize("method", ["random", "ig_reference"])
def test_keeping_trajectories_is_refused_for_methods_that_sample_none(method):
    from ipg_lightning.attribution import IPGAttribution

    with pytest.raises(ValueError, match=f"method '{method}' samples no trajectories to keep"):
        IPGAttribution(method=method, keep_trajectories=True)


@pytest.mark.parametrize(
    ("families", "settings"),
    [
        (("mlp_neuron",), {}),
        (("attn_head",), {"rule": "right"}),
        (("resid_post", "mlp_neuron"), {"path": "family", "layers": [0, 1]}),
        (("mlp_neuron",), {"method": "grad_x_act", "baseline": 0.25}),
        (("mlp_neuron",), {"surrogate": "token_mean", "sampling": {"max_new_tokens": 12, "stop_strings": ["a", "e", "o", "1"]}}),
    ],
    ids=["neurons", "heads-right-rule", "family-path-two-layers", "grad-x-act-baseline", "token-mean-surrogate"],
)
def test_per_token_contributions_add_up_to_the_reports_scores(tmp_path, tiny_llama, tokenizer, families, settings):
    report = _report(tiny_llama, tokenizer, families, **settings)
    if not settings:
        del report.metadata.config["surrogate"]  # as in a report written before the option, whose surrogate was the sum
    assert score_path(report)[0].surrogate == settings.get("surrogate", "sum")
    page = page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", components=6, trajectories_per_component=3)
    payload = embedded_payload(page.read_text())
    assert len(payload["traces"]) == min(6, len(report.ranked()))  # the tiny model has 4 heads per block
    for name, trace in payload["traces"].items():
        expected = _score(report, name)
        # per prompt, summed over every kept trajectory and position; their mean is the report's score
        assert sum(trace["prompt_scores"]) / 4 == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert trace["score"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        parts = [*trace["contribution_buckets"], trace["prompt_contribution"]]  # each rounded to 5 digits on the page
        assert sum(parts) == pytest.approx(expected, abs=1e-4 * sum(map(abs, parts)) + 1e-9)
        assert sum(trace["activation_buckets"]) == pytest.approx(1.0, rel=1e-3)
        if settings.get("surrogate"):  # each trajectory weighed by its own length
            assert len({len(record["tokens"]) for record in payload["trajectories"].values()}) > 2
        for row, tokens, contributions in zip(trace["rows"], trace["activations"], trace["contributions"], strict=True):
            assert len(tokens) == len(contributions) == len(payload["trajectories"][str(row)]["tokens"])


def test_shared_expert_neurons_which_see_the_tokens_flattened_are_traced_too(tmp_path, tiny_model, tokenizer):
    model = tiny_model("qwen2_moe")
    report = _report(model, tokenizer, ("shared_expert_neuron",))
    page = page_for_report(report, model, tokenizer, tmp_path / "page.html", components=3, trajectories_per_component=16)
    payload = embedded_payload(page.read_text())
    for name, trace in payload["traces"].items():
        assert trace["score"] == pytest.approx(_score(report, name), rel=1e-3, abs=1e-6)
        assert len(trace["activations"][0]) == len(payload["trajectories"][str(trace["rows"][0])]["tokens"])


def test_a_replay_whose_contributions_miss_the_reports_scores_says_so_on_the_page_and_in_the_log(tmp_path, tiny_llama, tokenizer, caplog):
    report = _report(tiny_llama, tokenizer)
    same = embedded_payload(page_for_report(report, tiny_llama, tokenizer, tmp_path / "same.html", components=4).read_text())
    assert not any("do not add up" in note for note in same["limits"]["notes"])
    other = copy.deepcopy(tiny_llama)  # the same architecture and sizes, other weights: what allow_other_model lets through
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    with caplog.at_level(logging.WARNING):
        payload = embedded_payload(page_for_report(report, other, tokenizer, tmp_path / "other.html", components=4).read_text())
    recorded = {name: _score(report, name) for name in payload["traces"]}
    scale = max(map(abs, recorded.values()))
    missed = [name for name, trace in payload["traces"].items() if abs(trace["score"] - recorded[name]) > 0.01 * abs(recorded[name]) + 1e-3 * scale]
    assert missed  # the changed weights moved the recomputed scores
    [note] = [note for note in payload["limits"]["notes"] if "do not add up" in note]
    assert note.startswith(f"The per-token contributions of {len(missed)} of the 4 traced components do not add up to their report scores")
    assert note in caplog.text


def test_per_token_contributions_add_up_for_sae_features(tmp_path, tiny_llama, tokenizer):
    save_sae(random_sae(hook_name="blocks.1.hook_resid_post", k=8), tmp_path / "sae")
    report = _report(tiny_llama, tokenizer, ("sae_feature",), saes=[str(tmp_path / "sae")], steps=8)
    payload = embedded_payload(page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", components=4).read_text())
    for name, trace in payload["traces"].items():
        assert name.startswith("blocks.1.hook_resid_post.sae[")
        assert trace["score"] == pytest.approx(_score(report, name), rel=1e-3, abs=1e-6)


def test_a_page_without_contributions_shades_activations_and_says_so(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer)
    full = embedded_payload(page_for_report(report, tiny_llama, tokenizer, tmp_path / "full.html", components=2).read_text())
    light = embedded_payload(page_for_report(report, tiny_llama, tokenizer, tmp_path / "light.html", components=2, contributions=False).read_text())
    assert any("contributions were left out" in note for note in light["limits"]["notes"])
    for name, trace in light["traces"].items():
        assert trace["contributions"] is None and trace["activations"] == full["traces"][name]["activations"]
        assert full["traces"][name]["contributions"] is not None


def test_token_activations_equal_a_direct_forward_pass_and_rows_are_where_it_peaks(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer)
    page = page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", components=3, trajectories_per_component=16)
    payload = embedded_payload(page.read_text())
    kept = report.trajectories
    seen = {}
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.update(value=args[0][0].detach()))
    try:
        peaks = {}
        for row, record in enumerate(kept.rows):  # one unpadded trajectory at a time: no batching, no padding
            prompt_ids = kept.prompts[record["prompt"]]["prompt_ids"]
            tiny_llama(torch.tensor([prompt_ids + record["completion_ids"]]))
            peaks[row] = seen["value"][len(prompt_ids) :]
    finally:
        handle.remove()
    for name, trace in payload["traces"].items():
        index = parse_component_name(name)[1]
        assert len(trace["rows"]) == 16  # every kept trajectory, highest peak first
        by_peak = sorted(peaks, key=lambda row: float(peaks[row][:, index].abs().max()), reverse=True)
        assert trace["rows"][:3] == by_peak[:3]
        for row, values in zip(trace["rows"], trace["activations"], strict=True):
            torch.testing.assert_close(torch.tensor(values), peaks[row][:, index], rtol=1e-4, atol=1e-5)
        # every kept trajectory is shown: its tokens' contributions and its prompt's positions make up the score
        parts = [value for row in trace["contributions"] for value in row] + trace["prompt_part"]
        assert sum(parts) == pytest.approx(_score(report, name), abs=1e-4 * sum(map(abs, parts)) + 1e-9)


class _Balance(HTMLParser):
    """Tag balance, and every attribute that could load something."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "source", "wbr", "area", "base", "col", "embed", "track"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.loads = [], [], []

    def handle_starttag(self, tag, attrs):
        self.loads += [value for key, value in attrs if key in ("src", "href", "action", "poster", "data", "srcset") and value]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_the_page_is_valid_self_contained_html_with_the_reports_ranking(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer, ("mlp_neuron", "attn_head"))
    html = page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", components=5, trajectories_per_component=2).read_text()
    assert html.startswith("<!DOCTYPE html>")
    parser = _Balance()
    parser.feed(html)
    assert parser.errors == [] and parser.stack == [] and parser.loads == []
    assert not re.search(r"url\(|@import|fetch\(|XMLHttpRequest|<link|import\(", html)
    payload = embedded_payload(html)
    ranked = report.ranked(signed=True)
    assert [row[0] for row in payload["components"]] == [name for name, _, _ in ranked]
    assert [row[2] for row in payload["components"]] == list(range(1, len(ranked) + 1))
    for (_, _, _, score), (_, expected, _) in zip(payload["components"], ranked, strict=True):
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-9)
    by_magnitude = [name for name, _, _ in report.ranked(signed=False)[:5]]
    assert sorted(payload["traces"]) == sorted(by_magnitude)
    assert payload["limits"]["components_traced"] == 5 and payload["limits"]["rows_per_component"] == 2
    for key in ("sum_of_scores", "surrogate_delta", "relative_residual"):
        assert payload["meta"]["completeness"][key] == pytest.approx(getattr(report.metadata.completeness, key), rel=1e-4)


def test_the_page_stays_bounded_and_says_what_it_left_out(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer)
    payload = embedded_payload(page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", components=2, max_listed=10).read_text())
    assert len(payload["components"]) == 10 and len(payload["traces"]) == 2
    assert len(payload["trajectories"]) <= 2 * 8 and set(payload["prompts"]) <= {str(p) for p in range(4)}
    notes = " ".join(payload["limits"]["notes"])
    assert "The ranking lists 10 of the 64 components" in notes and "Traces are shown for 2 of the 10" in notes


def test_activation_baselines_shade_activations_only_and_say_why(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer, method="mean_diff")
    payload = embedded_payload(page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", components=2).read_text())
    trace = next(iter(payload["traces"].values()))
    assert trace["contributions"] is None and trace["prompt_scores"] is None and len(trace["activations"]) == len(trace["rows"])
    assert any("this report is mean_diff" in note for note in payload["limits"]["notes"])
    assert all(row["advantage"] is None for row in report.trajectories.rows)


def _cli_report(tmp_path, *extra):
    out = tmp_path / "report"
    run(["attribute", "--config", "recipes/attribute_tiny.yaml", "--model.output_dir", str(out), "--trainer.enable_progress_bar", "false", *extra])
    return out


def test_ipg_explore_writes_the_page_and_refuses_what_it_must_not_touch(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    bare = _cli_report(tmp_path)
    with pytest.raises(ValueError, match="kept no trajectories: run the attribution again with keep_trajectories true"):
        run(["explore", str(bare), "--output", str(tmp_path / "bare.html")])
    assert not (tmp_path / "bare.html").exists()
    shutil.rmtree(bare)
    report = _cli_report(tmp_path, "--model.keep_trajectories", "true")
    run(["explore", str(report), "--components", "3", "--progress", "false"])
    page = tmp_path / "report.html"  # beside the report, named after it
    payload = embedded_payload(page.read_text())
    assert len(payload["traces"]) == 3 and payload["meta"]["model"] == "tiny:llama"
    with pytest.raises(FileExistsError, match="already exists"):
        run(["explore", str(report)])
    run(["explore", str(report), "--overwrite", "true", "--components", "2", "--progress", "false"])
    assert len(embedded_payload(page.read_text())["traces"]) == 2
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>my notes</html>")
    with pytest.raises(FileExistsError, match="not an explorer page written by ipg_lightning"):
        run(["explore", str(report), "--output", str(foreign), "--overwrite", "true"])
    assert foreign.read_text() == "<html>my notes</html>"
    with pytest.raises(ValueError, match="ending in .html"):
        run(["explore", str(report), "--output", str(tmp_path / "page.json")])
    with pytest.raises(ValueError, match="components must be >= 1"):
        run(["explore", str(report), "--output", str(tmp_path / "x.html"), "--components", "0"])
    from ipg_lightning.model.loading import load_model_and_tokenizer
    from ipg_lightning.vectors import save_vectors

    model, _ = load_model_and_tokenizer("tiny:llama")
    file = save_vectors(_vectors(model, ["blocks.1.hook_mlp_out"]), tmp_path / "contrast.safetensors", model, "tiny:llama")
    run(["explore", str(report), "--output", str(tmp_path / "v.html"), "--vectors", f"[{file}]", "--components", "1", "--progress", "false"])
    trace = embedded_payload((tmp_path / "v.html").read_text())["vectors"]["contrast @ blocks.1.hook_mlp_out"]
    assert trace["provenance"] == {"source": "test"} and len(trace["rows"]) == 8
    twin = tmp_path / "other"
    twin.mkdir()
    shutil.copy(file, twin / file.name)
    with pytest.raises(ValueError, match="is given twice; give it once"):
        run(["explore", str(report), "--output", str(tmp_path / "w.html"), "--vectors", f"[{file}, {file}]"])
    with pytest.raises(ValueError, match="Two vector files are named contrast.safetensors"):
        run(["explore", str(report), "--output", str(tmp_path / "w.html"), "--vectors", f"[{file}, {twin / file.name}]"])
    assert not (tmp_path / "w.html").exists()


def test_measured_effects_come_from_ipg_evaluate_outputs(tmp_path, tiny_llama, tokenizer):
    from ipg_lightning.cli.commands import evaluate
    from ipg_lightning.data import PromptTemplate, ReasoningDataModule
    from ipg_lightning.rollout.trajectories import SamplingConfig
    from ipg_lightning.steering import ComponentSelection

    report = _report(tiny_llama, tokenizer)
    top = report.select(k=2)
    data = ReasoningDataModule(num_train=0, num_val=0, num_test=2, template=PromptTemplate(use_chat_template=False))
    sampling = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=6)
    evaluate("tiny:llama", data=data, sampling=sampling, output_dir=str(tmp_path / "base"))
    selection = ComponentSelection(components=tuple(top))
    evaluate("tiny:llama", data=data, sampling=sampling, selection=selection, gamma=0.0, output_dir=str(tmp_path / "off"))
    effects = read_evaluations([tmp_path / "base", tmp_path / "off"])
    assert effects.base is not None and [c.components for c in effects.conditions] == [top] and effects.conditions[0].gamma == 0.0
    payload = embedded_payload(page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", effects, components=2).read_text())
    condition = payload["effects"]["conditions"][0]
    assert condition["components"] == top and condition["metrics"]["accuracy"] == effects.conditions[0].metrics["accuracy"]
    with pytest.raises(ValueError, match="is not an `ipg evaluate` output"):
        read_evaluations([tmp_path])


def test_the_page_works_in_a_real_browser(tmp_path, tiny_llama, tokenizer):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: install Debian's chromium package to run the browser test")
    report = _report(tiny_llama, tokenizer, ("mlp_neuron", "attn_head"))
    hostile = '</script><script>alert("prompt")</script><img src=x onerror=alert(1)>'
    for prompt in report.trajectories.prompts:  # text from a dataset or a model must stay text
        prompt["text"] = hostile
    report.metadata.config["reward"] = hostile
    effects = Effects(base={"accuracy": 0.5, "reasoning_length_mean": 10.0, "reflection_rate": 0.1})
    top = report.ranked(signed=False)[0][0]
    effects.conditions.append(MeasuredEffect("top suppressed", 0.0, [top], {"accuracy": 0.25, "reasoning_length_mean": 8.0, "reflection_rate": 0.0}))
    vectors = {"mine": _vectors(tiny_llama, ["blocks.1.hook_resid_post"])}
    page = page_for_report(
        report, tiny_llama, tokenizer, tmp_path / "page.html", effects, components=4, trajectories_per_component=3, vectors=vectors
    )
    payload = embedded_payload(page.read_text())
    with playwright.sync_playwright() as driver:
        try:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Exception as error:  # a chromium that cannot start here (no sandbox support, missing libraries)
            pytest.skip(f"chromium at {CHROMIUM} cannot start: {str(error).splitlines()[0]}")
        problems, requests = [], []
        view = browser.new_page()
        view.on("dialog", lambda dialog: problems.append(f"a dialog opened: {dialog.message}"))
        view.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
        view.on("pageerror", lambda error: problems.append(str(error)))
        view.on("request", lambda request: requests.append(request.url))
        view.goto(page.as_uri())
        rows = view.locator("tr.component-row")
        assert rows.count() == len(payload["components"])
        assert view.locator("#title").inner_text() == payload["title"] == f"ipg attribution of {hostile}"
        view.locator(f'tr.component-row[data-name="{top}"]').click()
        cards = view.locator("#detail .trajectory")
        assert cards.count() == 3
        first_row = str(payload["traces"][top]["rows"][0])
        assert cards.nth(0).get_attribute("data-row") == first_row
        tokens = payload["trajectories"][first_row]["tokens"]
        shown = cards.nth(0).locator(".token").evaluate_all("spans => spans.map(s => s.textContent)")
        assert [text.replace("↵", "").replace("→", "") for text in shown] == tokens  # one span per token, line breaks marked
        assert "top suppressed" in view.locator("#detail .effects").inner_text()
        assert cards.nth(0).locator("details.prompt pre").text_content() == hostile
        shading = cards.nth(0).locator(".token").evaluate_all("spans => spans.map(s => s.style.background)")
        view.locator("#view-contribution").check()
        assert cards.nth(0).locator(".token").evaluate_all("spans => spans.map(s => s.style.background)") != shading
        vector = payload["vectors"]["mine @ blocks.1.hook_resid_post"]
        view.locator("tr.vector-row").click()
        assert view.locator("#detail h2").inner_text() == vector["name"] and view.url.endswith("#vector=mine%20%40%20blocks.1.hook_resid_post")
        assert cards.count() == 3 and cards.nth(0).get_attribute("data-row") == str(vector["rows"][0])
        first = str(vector["rows"][0])
        assert cards.nth(0).locator(".token").count() == len(payload["trajectories"][first]["tokens"])
        titles = cards.nth(0).locator(".token").evaluate_all("spans => spans.map(s => s.title)")
        assert titles[0].startswith(f"token 0: projection {vector['projections'][0][0]:.4g}"[:24])
        assert view.locator("#detail svg circle").count() == len(payload["kept"]["correct"])  # one dot per kept trajectory
        view.locator(f'tr.component-row[data-name="{top}"]').click()
        view.locator("#family-filter").select_option("attn_head")
        assert rows.count() == sum(1 for row in payload["components"] if payload["sites"][row[1]]["family"] == "attn_head")
        browser.close()
    assert problems == []
    assert requests == [page.as_uri()]  # nothing but the page itself was loaded


def _vectors(model, sites, seed=0):
    from ipg_lightning.model.sites import find_site
    from ipg_lightning.vectors import SteeringVectors

    vectors = SteeringVectors([find_site(model, name) for name in sites], model.config.hidden_size, alpha=-2.0, provenance={"source": "test"})
    generator = torch.Generator().manual_seed(seed)
    for name in sites:
        vectors.set_vector(name, torch.randn(vectors.width, generator=generator) * 3)
    return vectors


def test_vector_projections_equal_hand_hooks_and_their_summaries_an_independent_computation(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer)
    vectors = _vectors(tiny_llama, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"])
    page = page_for_report(
        report, tiny_llama, tokenizer, tmp_path / "page.html", components=1, trajectories_per_component=5, vectors={"mine": vectors}
    )
    payload = embedded_payload(page.read_text())
    kept = report.trajectories
    modules = {"blocks.1.hook_resid_post": tiny_llama.model.layers[1], "blocks.0.hook_mlp_out": tiny_llama.model.layers[0].mlp}
    seen = {}
    handles = [module.register_forward_hook(partial_record(seen, name)) for name, module in modules.items()]
    try:
        projections = {name: [] for name in modules}
        for record in kept.rows:  # one unpadded trajectory at a time, the hand-made direction
            prompt_ids = kept.prompts[record["prompt"]]["prompt_ids"]
            tiny_llama(torch.tensor([prompt_ids + record["completion_ids"]]))
            for name in modules:
                unit = vectors.vector(name).detach() / vectors.vector(name).detach().norm()
                projections[name].append((seen[name][0, len(prompt_ids) :] @ unit).double())
    finally:
        for handle in handles:
            handle.remove()
    assert set(payload["vectors"]) == {"mine @ blocks.1.hook_resid_post", "mine @ blocks.0.hook_mlp_out"}
    assert payload["kept"]["reasoning_tokens"] == [row["reasoning_tokens"] for row in kept.rows]
    for name, per_row in projections.items():
        trace = payload["vectors"][f"mine @ {name}"]
        assert trace["alpha"] == -2.0 and trace["norm"] == pytest.approx(float(vectors.vector(name).detach().norm()), rel=1e-4)
        means = torch.stack([values.mean() for values in per_row])
        torch.testing.assert_close(torch.tensor(trace["trajectory_means"], dtype=torch.float64), means, rtol=1e-3, atol=1e-4)
        every = torch.cat(per_row)
        assert trace["center"] == pytest.approx(float(every.mean()), rel=1e-3, abs=1e-4)
        # the shown rows: the 3 highest mean projections, then the 2 lowest
        order = sorted(range(len(means)), key=lambda row: float(means[row]), reverse=True)
        assert trace["rows"] == order[:3] + order[::-1][:2] and trace["highest"] == 3
        for row, values in zip(trace["rows"], trace["projections"], strict=True):
            torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), per_row[row], rtol=1e-3, atol=1e-4)
        # by decile of the reasoning: floor(10 t / R) for t < R, the answer after
        sums, counts = [0.0] * 11, [0] * 11
        for record, values in zip(kept.rows, per_row, strict=True):
            for t, value in enumerate(values.tolist()):
                bucket = (10 * t) // record["reasoning_tokens"] if t < record["reasoning_tokens"] else 10
                sums[bucket] += value - float(every.mean())
                counts[bucket] += 1
        expected = [total / count if count else 0.0 for total, count in zip(sums, counts, strict=True)]
        assert trace["bucket_means"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        rewards = torch.tensor([row["reward"] for row in kept.rows], dtype=torch.float64)
        lengths = torch.tensor([row["reasoning_tokens"] for row in kept.rows], dtype=torch.float64)
        for key, other in (("reward", rewards), ("reasoning_tokens", lengths)):
            expected = float(torch.corrcoef(torch.stack([means, other]))[0, 1])
            assert trace["correlations"][key] == (None if math.isnan(expected) else pytest.approx(expected, rel=1e-3, abs=1e-4))
        assert trace["correlations"]["reward"] is not None  # word counts differ between the trajectories
        right = [row for row, record in enumerate(kept.rows) if record["correct"]]
        assert trace["right_mean"] == (pytest.approx(float(means[right].mean()), rel=1e-3, abs=1e-4) if right else None)
    for row in {row for trace in payload["vectors"].values() for row in trace["rows"]}:
        assert str(row) in payload["trajectories"]


def partial_record(seen, name):
    def record(module, args, output):
        seen[name] = (output[0] if isinstance(output, tuple) else output).detach()

    return record


def test_a_vector_without_direction_is_refused(tmp_path, tiny_llama, tokenizer):
    report = _report(tiny_llama, tokenizer)
    vectors = _vectors(tiny_llama, ["blocks.1.hook_resid_post"])
    vectors.set_vector("blocks.1.hook_resid_post", torch.zeros(vectors.width))
    with pytest.raises(ValueError, match="zero or not finite, so it has no direction to show: leave its file out"):
        page_for_report(report, tiny_llama, tokenizer, tmp_path / "page.html", components=1, vectors={"flat": vectors})
    assert not (tmp_path / "page.html").exists()
