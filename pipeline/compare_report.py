"""The comparison report folder (``compare.report``): per-variant Dice and NSD with intervals, the paired
differences against each reference with the fraction of cases improved, one plot of the differences with their
intervals, the prototype's rows where data set, modality and class match, and the prior analysis of each variant
that learns priors. Built aside and swapped in whole, like the evaluation report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from segevo_pipeline.common import pyplot
from segevo_pipeline.report import ci_text, prior_analysis, save_png
from segevo_pipeline.seed_results import seed_row

PROTOTYPE = "the prototype's (seed-results.md: 400-subset test split, n = 3-4 volumes, one run, Dice with +1 in the " \
            "denominator)"


def write_compare_report(folder: Path, summary: dict, models: dict[str, Any], cfg: Any) -> Path:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plot = _differences_plot(summary, tmp / "differences.png")
    priors = {name: prior_analysis(model, tmp / f"priors-{name}")
              for name, model in models.items() if getattr(model, "priors", None) is not None}
    (tmp / "report.md").write_text(_markdown(summary, plot, {k: v for k, v in priors.items() if v}))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _headline(rows: list[dict], summary: dict, metric: str = "dice") -> list[dict]:
    return [r for r in rows if r["prompt"] == summary["headline_prompt"] and r.get("metric", metric) == metric]


def _differences_plot(summary: dict, path: Path) -> str:
    """Differences with intervals, one panel per reference: a reader sees at a glance which side of zero each
    variant falls on, per modality."""
    plt = pyplot()
    refs = summary["references"]
    diffs = _headline(summary["differences"], summary)
    fig, axes = plt.subplots(1, max(len(refs), 1), figsize=(5 * max(len(refs), 1), 0.45 * len(diffs) + 1.6),
                             squeeze=False)
    for ax, ref in zip(axes[0], refs or [None], strict=True):
        rows = [d for d in diffs if d["reference"] == ref]
        y = np.arange(len(rows))[::-1]
        x = np.array([d["diff"] for d in rows])
        err = np.array([[d["diff"] - d["diff_lo"] for d in rows], [d["diff_hi"] - d["diff"] for d in rows]])
        colours = ["tab:blue" if d["modality"] == "CT" else "tab:orange" for d in rows]
        ax.axvline(0, color="0.4", lw=0.8)
        if rows:
            ax.errorbar(x, y, xerr=err, fmt="none", ecolor="0.3", elinewidth=1, capsize=3)
            ax.scatter(x, y, c=colours, zorder=3)
        ax.set_yticks(y, [f"{d['variant']} ({d['modality']})" for d in rows], fontsize=8)
        ax.set(xlabel=f"Dice difference vs {ref} ({summary['headline_prompt']}; paired 95% CI)",
               title=f"vs {ref}")
    save_png(fig, path)
    return path.name


def _diff(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}]"


def _markdown(summary: dict, plot: str, priors: dict[str, dict]) -> str:
    head = summary["headline_prompt"]
    lines = ["# The comparison", ""]
    if summary["evaluate_split_is_train"] or summary["random_base"]:
        lines += ["**Demo scale: " + " and ".join(
            [w for w, on in (("scored on training cases", summary["evaluate_split_is_train"]),
                             ("a random base SegVol (no released weights offline)", summary["random_base"])) if on])
                  + ".** The numbers show that the comparison runs end to end, not what the method achieves.", ""]
    lines += [f"{len(summary['variants'])} models on the same {summary['cases']} cases of the "
              f"{summary['split']!r} split with the same seeded prompts. Intervals are 95% percentile bootstraps "
              f"over cases ({summary['bootstrap']['n_resamples']} resamples, seed {summary['bootstrap']['seed']}); "
              "a difference is paired: each case's difference is resampled, so case difficulty cancels. "
              f"{summary['computed']} queries were run and {summary['reused']} shared (rows that provably compute "
              f"the base SegVol); {summary['seconds']} s on {summary['device']}. Dice rule: {summary['dice_rule']}",
              "", "| variant | what it is |", "|---|---|"]
    lines += [f"| {name} | {v['about']} |" for name, v in summary["variants"].items()]
    lines += ["", f"## Dice and NSD ({head})", "", "| variant | modality | cases | Dice [95% CI] | NSD [95% CI] |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['modality']} | {r['cases']} | {ci_text(r)} | {ci_text(r, 'nsd')} |"
              for r in _headline(summary["per_variant"], summary)]
    lines += ["", f"## Paired differences ({head})", "", f"![differences]({plot})", "",
              "| variant | vs | modality | cases | ΔDice [95% CI] | improved / worse | ΔNSD [95% CI] |",
              "|---|---|---|---|---|---|---|"]
    nsd = {(d["variant"], d["reference"], d["modality"]): d for d in _headline(summary["differences"], summary, "nsd")}
    for d in _headline(summary["differences"], summary):
        n = nsd.get((d["variant"], d["reference"], d["modality"]))
        lines.append(f"| {d['variant']} | {d['reference']} | {d['modality']} | {d['cases']} | {_diff(d)} | "
                     f"{d['improved']:.0%} / {d['worsened']:.0%} | {_diff(n) if n else '-'} |")
    lines += ["", "Every prompt type, modality, data set and class: `metrics/compare_diffs.csv` (differences) and "
              "`metrics/compare_cases.csv` (every case row).", ""]
    lines += _per_class(summary)
    for name, p in priors.items():
        lines += [f"## Priors of {name}", "", f"{p['tokens']} prior vectors; mean off-diagonal cosine "
                  f"{p['mean_offdiag_cosine']:.3f}.", "",
                  *[f"![{key}](priors-{name}/{file})" for key, file in p.items()
                    if isinstance(file, str) and file.endswith(".png")], ""]
    return "\n".join(lines)


def _per_class(summary: dict) -> list[str]:
    """Dice per class and variant at the headline prompt, with the prototype's published row where it matches."""
    head = summary["headline_prompt"]
    names = list(summary["variants"])
    cells: dict[tuple, dict[str, dict]] = {}
    for r in summary["per_class"]:
        if r["prompt"] == head:
            cells.setdefault((r["modality"], r["source"], r["class"]), {})[r["variant"]] = r
    lines = [f"## Per class ({head})", "", f"Dice [95% CI] per variant; {PROTOTYPE} baseline / LoRA / SegVol-Prior "
             "where data set, modality and class match (prompt text+point).", "",
             "| modality | data set | class | " + " | ".join(names) + " | prototype |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for (modality, source, structure), by in sorted(cells.items()):
        seed = seed_row(modality, source, structure)
        proto = f"{seed.baseline:.3f} / {seed.lora:.3f} / {seed.prior:.3f} ({seed.dataset})" if seed else "-"
        lines.append(f"| {modality} | {source} | {structure} | "
                     + " | ".join(ci_text(by[n]) if n in by else "-" for n in names) + f" | {proto} |")
    return lines + [""]
