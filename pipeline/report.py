"""The evaluation report folder: markdown beside the prototype's published rows, PNG plots that open offline
(``dvc plots show`` needs a CDN), overlays (image, truth, prediction) and the prior analysis. The folder is built
aside and swapped in whole, so a failed run never leaves half a report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from segevo_pipeline.common import pyplot
from segevo_pipeline.seed_results import SEED_OVERALL, seed_row

MODALITY_COLOURS = {"CT": "tab:blue", "MRI": "tab:orange"}


def save_png(fig, path: Path) -> None:
    """A figure as PNG (its folder made), then closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)


def write_report(folder: Path, rows: list[dict], summary: dict, overlays: list[dict], model, cfg) -> Path:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    figures = {"per_class": _per_class_plot(summary, tmp / "per_class.png"),
               "prompts": _prompt_plot(summary, tmp / "prompts.png"),
               "jitter": _jitter_plot(summary, tmp / "box_jitter.png")}
    overlay_files = [_overlay(o, tmp / "overlays") for o in overlays]
    priors = prior_analysis(model, tmp) if getattr(model, "priors", None) is not None else {}
    (tmp / "report.md").write_text(_markdown(summary, figures, overlay_files, priors, cfg))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


# ---- plots ------------------------------------------------------------------------------------------------------


def _per_class_plot(summary: dict, path: Path) -> str:
    plt = pyplot()
    head = summary["headline"]["prompt"]
    rows = [r for r in summary["per_class"] if r["prompt"] == head]
    rows.sort(key=lambda r: r["dice"])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    y = np.arange(len(rows))
    dice = np.array([r["dice"] for r in rows])
    err = np.array([[r["dice"] - r["dice_lo"] for r in rows], [r["dice_hi"] - r["dice"] for r in rows]])
    ax.barh(y, dice, xerr=err, color=[MODALITY_COLOURS.get(r["modality"], "tab:gray") for r in rows],
            error_kw={"elinewidth": 0.8})
    ax.set_yticks(y, [f"{r['modality']} {r['class']} ({r['source']})" for r in rows], fontsize=8)
    ax.set(xlim=(0, 1), xlabel=f"Dice ({head}; 95% bootstrap CI over cases)", title="Dice per class")
    save_png(fig, path)
    return path.name


def _prompt_plot(summary: dict, path: Path) -> str:
    plt = pyplot()
    modalities = sorted({k.split("/")[0] for k in summary["modality"]})
    prompts = list(summary["prompt"])
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / max(len(modalities), 1)
    for i, m in enumerate(modalities):
        vals = [summary["modality"].get(f"{m}/{p}", {}).get("dice", np.nan) for p in prompts]
        ax.bar(np.arange(len(prompts)) + i * width, vals, width, label=m, color=MODALITY_COLOURS.get(m))
    ax.set_xticks(np.arange(len(prompts)) + width * (len(modalities) - 1) / 2, prompts, fontsize=8)
    ax.set(ylim=(0, 1), ylabel="Dice", title="Dice per prompt type")
    ax.legend()
    save_png(fig, path)
    return path.name


def _jitter_plot(summary: dict, path: Path) -> str | None:
    if not summary["box_jitter"]:
        return None
    plt = pyplot()
    items = sorted(summary["box_jitter"].items(), key=lambda kv: int(kv[0]))
    x = [int(k) for k, _ in items]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar(x, [v["dice"] for _, v in items], marker="o",
                yerr=[[v["dice"] - v["dice_lo"] for _, v in items], [v["dice_hi"] - v["dice"] for _, v in items]])
    ax.set(xscale="symlog", ylim=(0, 1), xlabel="box jitter (± voxels)", ylabel="Dice (text+box)",
           title="Box perturbation")
    save_png(fig, path)
    return path.name


def _overlay(entry: dict, folder: Path) -> str:
    plt = pyplot()
    panels = entry["panels"]
    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3 * len(panels)), squeeze=False)
    for row, p in zip(axes, panels, strict=True):
        for ax, (title, layer, colour) in zip(row, (("image", None, None), ("truth", p["truth"], "lime"),
                                                    ("prediction", p["pred"], "red")), strict=True):
            ax.imshow(p["image"], cmap="gray", interpolation="nearest")
            if layer is not None:
                ax.imshow(np.ma.masked_where(~layer, layer), cmap=_solid(colour), alpha=0.5, interpolation="nearest")
            ax.set_title(f"{p['class']}: {title} (slice {p['slice']})" if title != "image" else
                         f"{entry['case']} ({entry['modality']})", fontsize=8)
            ax.axis("off")
    name = entry["case"].replace("/", "_") + ".png"
    save_png(fig, folder / name)
    return f"overlays/{name}"


def _solid(colour: str):
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour])


# ---- priors -----------------------------------------------------------------------------------------------------


def prior_labels(model) -> list[str]:
    """Names of the learned priors: tasks (the null task left out), then modality pools in brackets."""
    return [f"{c} ({d})" for d, c in model.tasks.pairs[1:]] + [f"[{m}]" for m in model.modalities]


def prior_vectors(model) -> tuple[list[str], np.ndarray]:
    """One vector per learned task and modality prior (the mean of its pool), labelled; the null task is left out."""
    priors = model.priors
    tasks = priors.task_pool.detach().float().mean(1).cpu().numpy()[1:]
    modalities = priors.modality_pool.detach().float().mean(1).cpu().numpy()
    return prior_labels(model), np.concatenate([tasks, modalities])


def _heatmap(plt, matrix: np.ndarray, labels: list[str], title: str, path: Path, **imshow) -> None:
    fig, ax = plt.subplots(figsize=(0.12 * len(labels) + 4, 0.12 * len(labels) + 3.5))
    im = ax.imshow(matrix, **imshow)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax.set_yticks(range(len(labels)), labels, fontsize=5)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.6)
    save_png(fig, path)


def prior_attention(model, folder: Path) -> dict:
    """The poster's figure: the first fusion block's self-attention among the learned priors (row: the prior that
    attends, softmax over all priors in one sequence). Empty when the block has no self-attention."""
    if not model.priors_cfg.self_attention:
        return {}
    affinity = model.priors.self_attention_affinity().float().cpu().numpy()
    labels = prior_labels(model)
    _heatmap(pyplot(), affinity, labels, "Self-attention among prior tokens (fusion block 1)",
             folder / "priors_attention.png", cmap="viridis", vmin=0)
    return {"attention": "priors_attention.png", "attention_self_share": float(np.diag(affinity).mean())}


def prior_analysis(model, folder: Path) -> dict:
    """PCA embedding and cosine-similarity heatmap of the prior tokens (do similar tasks' priors correlate?), and
    their self-attention in the fusion block."""
    plt = pyplot()
    labels, vectors = prior_vectors(model)
    if len(labels) < 2:
        return {}
    centred = vectors - vectors.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    explained = (s[:2] ** 2 / max(float((s**2).sum()), 1e-12)).tolist()
    fig, ax = plt.subplots(figsize=(7, 6))
    is_mod = np.array([lab.startswith("[") for lab in labels])
    ax.scatter(coords[~is_mod, 0], coords[~is_mod, 1], s=14, label="task priors")
    ax.scatter(coords[is_mod, 0], coords[is_mod, 1], s=50, marker="*", color="tab:red", label="modality priors")
    for (x, y), lab in zip(coords, labels, strict=True):
        ax.annotate(lab, (x, y), fontsize=6, alpha=0.8)
    ax.set(title="Prior tokens, PCA", xlabel=f"PC1 ({explained[0]:.0%})",
           ylabel=f"PC2 ({explained[1]:.0%})" if len(explained) > 1 else "PC2")
    ax.legend(fontsize=8)
    save_png(fig, folder / "priors_pca.png")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    _heatmap(plt, sim, labels, "Cosine similarity of prior tokens", folder / "priors_similarity.png",
             cmap="RdBu_r", vmin=-1, vmax=1)
    off = sim[~np.eye(len(labels), dtype=bool)]
    return {"pca": "priors_pca.png", "similarity": "priors_similarity.png", "tokens": len(labels),
            "mean_offdiag_cosine": float(off.mean()), "explained": explained, **prior_attention(model, folder)}


# ---- markdown ---------------------------------------------------------------------------------------------------


def ci_text(r: dict, metric: str = "dice") -> str:
    """``mean [lo, hi]`` of a summary row's metric, three decimals."""
    return f"{r[metric]:.3f} [{r[f'{metric}_lo']:.3f}, {r[f'{metric}_hi']:.3f}]"


def _markdown(summary: dict, figures: dict, overlays: list[str], priors: dict, cfg) -> str:
    head = summary["headline"]
    lines = [
        "# Evaluation report", "",
        f"- split: **{summary['split']}**, {summary['cases']} cases, {summary['classes']} (data set, class) tasks, "
        f"{summary['samples']} (case, class, prompt) samples; adapter: `{summary['adapter']}`",
        f"- zoom-out-zoom-in (overlap {cfg.inference.overlap}, {cfg.inference.precision}) on {summary['device']}, "
        f"{summary['seconds']} s ({summary['seconds_per_sample']} s per sample)",
        f"- Dice rule: {summary['dice_rule']}. NSD tolerance {summary['nsd_tolerance_mm']} mm.",
        f"- Intervals: 95% percentile bootstrap over cases ({summary['bootstrap']['n_resamples']} resamples, "
        f"seed {summary['bootstrap']['seed']}); a group with one case has no spread.",
        "",
    ]
    if summary["split"] != "test":
        lines += [f"> **Not a held-out estimate**: these are {summary['split']} cases.", ""]
    lines += ["## Headline", "", f"**{head['prompt']}**: Dice {ci_text(head)}, NSD {ci_text(head, 'nsd')} "
              f"({head['cases']} cases).", "",
              "## By prompt type and modality", "", "| modality | prompt | cases | Dice [95% CI] | NSD [95% CI] |",
              "|---|---|---|---|---|"]
    for r in summary["modality"].values():
        lines.append(f"| {r['modality']} | {r['prompt']} | {r['cases']} | {ci_text(r)} | {ci_text(r, 'nsd')} |")
    lines += ["", f"![prompts]({figures['prompts']})", ""]
    if summary["box_jitter"]:
        lines += ["## Box perturbation (text+box)", "", "Each box coordinate moved by a uniform integer in "
                  "[-j, j] voxels.", "", "| ± voxels | cases | Dice [95% CI] |", "|---|---|---|"]
        for j, r in sorted(summary["box_jitter"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {j} | {r['cases']} | {ci_text(r)} |")
        lines += ["", f"![jitter]({figures['jitter']})", ""]
    lines += _seed_section(summary)
    lines += ["## Per class", "", f"![per class]({figures['per_class']})", "",
              "| prompt | modality | data set | class | cases | Dice [95% CI] | NSD [95% CI] |",
              "|---|---|---|---|---|---|---|"]
    for r in summary["per_class"]:
        lines.append(f"| {r['prompt']} | {r['modality']} | {r['source']} | {r['class']} | {r['cases']} | "
                     f"{ci_text(r)} | {ci_text(r, 'nsd')} |")
    if overlays:
        lines += ["", "## Overlays", "", "Green: ground truth; red: prediction.", ""]
        lines += [f"![{o}]({o})" for o in overlays]
    if priors:
        lines += ["", "## Prior analysis", "",
                  f"{priors['tokens']} prior vectors (the mean of each task's and modality's pool); mean off-diagonal "
                  f"cosine similarity {priors['mean_offdiag_cosine']:.3f}; PCA explains "
                  f"{sum(priors['explained']):.0%} in two components.", "",
                  f"![PCA]({priors['pca']})", "", f"![similarity]({priors['similarity']})"]
        if "attention" in priors:
            n = priors["tokens"]
            lines += ["", f"Self-attention of the first fusion block among the same {n} priors (each row a prior "
                      "attending to all of them in one sequence, its pool averaged): on average a prior keeps "
                      f"{priors['attention_self_share']:.0%} of its attention on itself (uniform: {1 / n:.0%}).",
                      "", f"![self-attention]({priors['attention']})"]
    return "\n".join(lines) + "\n"


def _seed_section(summary: dict) -> list[str]:
    """Our text+point numbers beside the prototype's where the data match (same source, modality and class)."""
    lines = ["## Beside the prototype (text+point)", "",
             "The prototype's rows (seed-results.md: 400-subset test split, n = 3-4 volumes, one run, Dice with a "
             "+1 in the denominator) appear where our data set, modality and class match.", ""]
    ours = [r for r in summary["per_class"] if r["prompt"] == "text+point"]
    matched = [(r, seed_row(r["modality"], r["source"], r["class"])) for r in ours]
    matched = [(r, s) for r, s in matched if s is not None]
    if not matched:
        lines += ["No data set in this evaluation matches one the prototype reported on, so there is no row to "
                  "compare. Its overall text+point Dice, on different data, for orientation: "
                  + ", ".join(f"{k} {v[0]:.3f} (CT {v[1]:.3f}, MRI {v[2]:.3f})" for k, v in SEED_OVERALL.items())
                  + ".", ""]
        return lines
    lines += ["| modality | class | our data set | ours: Dice [95% CI] (cases) | prototype data set (n) | "
              "baseline | LoRA | SegVol-Prior |", "|---|---|---|---|---|---|---|---|"]
    for r, s in matched:
        lines.append(f"| {r['modality']} | {r['class']} | {r['source']} | {ci_text(r)} ({r['cases']}) | "
                     f"{s.dataset} ({s.n}) | {s.baseline:.3f} | {s.lora:.3f} | {s.prior:.3f} |")
    return lines + [""]
