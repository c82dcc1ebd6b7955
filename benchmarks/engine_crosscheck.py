"""Does the sampling engine change the science? One localisation run against another, cell by cell.

Reads two ``results.json`` files written by ``benchmarks/localisation.py`` with the same measurement
settings apart from ``--engine`` (typically the 5-seed HF run and a 1-seed vLLM run) and prints, for
every measured point of every row, the reference run's mean +- 95 % interval over its seeds, the
range of its single seeds, and the other run's value of each of its seeds. A point of the other run
"lands" when it lies within the reference run's per-seed spread: mean +- 1.96 standard deviations of
single seeds (a single seed is compared with single seeds, not with the interval of their mean).
Each row also says how many of its selected components the other run shares with the reference run's
cell of the same seed: where they are the same, what is left between the two values is the
evaluation's own sampling (the localisation benchmark evaluates every seed with the same draws, so the
reference's per-seed spread does not contain it).

Run: ``python benchmarks/engine_crosscheck.py benchmarks/localisation_sft benchmarks/localisation_sft_vllm``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from localisation import BEHAVIOURS, collect, interval, load_summary

#: Settings that may differ between the two runs (besides those a resumed run may change).
MAY_DIFFER = {
    *("engine", "out", "seeds", "methods", "ipg_variants", "variant_methods"),
    *("sae_methods", "behaviours", "restart", "from_results", "device"),
}


def seed_band(values: list[float]) -> tuple[float, float]:
    """Where 95 % of single seeds fall if they are normal: mean -+ 1.96 standard deviations."""
    mean = statistics.fmean(values)
    spread = 1.96 * statistics.stdev(values) if len(values) > 1 else 0.0
    return mean - spread, mean + spread


def shared_components(reference: dict, other: dict, behaviour: str, row: str) -> str:
    """Per seed measured in both runs: how many of the other run's components the reference's cell also selected."""
    counts = []
    for seed in range(other["settings"]["seeds"]):
        key = f"{behaviour}|{row}|{seed}"
        cell, theirs = other["cells"].get(key, {}), reference["cells"].get(key, {})
        if "components" in cell and "components" in theirs:
            counts.append(f"{len(set(cell['components']) & set(theirs['components']))} of {len(cell['components'])}")
    return ", ".join(counts)


def compare(reference: dict, other: dict) -> tuple[list[str], int, int]:
    """Markdown lines of the comparison, the number of points of ``other`` that land, and of points compared."""
    lines, landed, compared = [], 0, 0
    for behaviour in BEHAVIOURS:
        if behaviour not in reference["settings"]["behaviours"] or behaviour not in other["settings"]["behaviours"]:
            continue
        ours, theirs = collect(reference, behaviour), collect(other, behaviour)
        lines += [
            f"\n{behaviour}: {reference['settings']['engine']} ({reference['settings']['seeds']} seeds) against {other['settings']['engine']}",
            "| row | point | reference mean +- interval | reference seeds (min .. max) | other | lands |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in theirs.items():
            if "points" not in row or "points" not in ours.get(name, {}):
                lines.append(f"| {name} | not compared: measured in one run only, or not applicable | | | | |")
                continue
            shared = shared_components(reference, other, behaviour, name)
            if shared:
                lines.append(f"| {name} | components shared with the reference's seed | | | {shared} | |")
            for point, values in row["points"].items():
                if point.startswith("accuracy gamma"):  # the length cells' accuracy is context, not the measurement
                    continue
                reference_values = ours[name]["points"][point]
                mean, half = interval(reference_values)
                low, high = seed_band(reference_values)
                lands = [low <= value <= high for value in values]
                landed, compared = landed + sum(lands), compared + len(lands)
                shown = ", ".join(f"{value:.3f}" for value in values)
                lines.append(
                    f"| {name} | {point} | {mean:.3f} +- {half:.3f} | {min(reference_values):.3f} .. {max(reference_values):.3f} "
                    f"| {shown} | {'yes' if all(lands) else 'NO'} |"
                )
    return lines, landed, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="output directory of the reference run (several seeds)")
    parser.add_argument("other", type=Path, help="output directory of the run to check against it")
    args = parser.parse_args()
    reference, other = load_summary(args.reference / "results.json"), load_summary(args.other / "results.json")
    for summary in (reference, other):  # runs from before the engine choice sampled with hf
        summary["settings"] = {"engine": "hf", **summary["settings"]}
    if reference["settings"]["seeds"] < 2:
        sys.exit(f"{args.reference} holds {reference['settings']['seeds']} seed: the reference needs several to have a spread")
    recorded = reference["settings"]
    may_differ = MAY_DIFFER if recorded["sae_methods"] or other["settings"]["sae_methods"] else MAY_DIFFER | {"sae", "sae_steps"}
    differ = sorted(key for key in other["settings"].keys() - may_differ if recorded.get(key) != other["settings"][key])
    if differ:
        sys.exit(f"the two runs measured with other settings ({', '.join(differ)}): they cannot be compared cell by cell")
    lines, landed, compared = compare(reference, other)
    print("\n".join(lines))
    base, base_other = reference["base"]["greedy"]["accuracy"], other["base"]["greedy"]["accuracy"]
    print(f"\nbase greedy accuracy: {base:.3f} (reference) against {base_other:.3f}")
    print(f"points within the reference's per-seed spread: {landed} of {compared} ({landed / max(compared, 1):.0%})")


if __name__ == "__main__":
    main()
