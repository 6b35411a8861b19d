"""Exploratory plots of a prepared data set, written to OUT/eda/ by `cxr prepare`.

    class_balance.png   images per split and class (the real set is ~1:3 NORMAL:PNEUMONIA)
    sizes.png           original width x height by class (NORMAL images are larger in the real set;
                        at most 5,000 points a class drawn, the medians of all)
    modes.png           original image modes by class (a few hundred real images are RGB)
    samples.png         preprocessed training images, one row per class: what the model will see
    summary.md          the numbers behind the plots, the rejected files and the duplicates

Figures are drawn on `matplotlib.figure.Figure` objects, not pyplot, so nothing global (backend,
current figure) changes in the calling process. Plain matplotlib rather than seaborn: seaborn
imports scipy.stats, 1-3 s of every `cxr prepare` for three bar and scatter plots.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .config import CLASS_NAMES, SPLITS
from .figures import new_figure, save_figure
from .shards import manifest_totals

SAMPLES_PER_CLASS = 8
_PALETTE = {"NORMAL": "#4C72B0", "PNEUMONIA": "#DD8452"}


def write_eda(eda_dir: Path, table: pd.DataFrame, manifest: dict,
              samples: pd.DataFrame) -> list[str]:
    """Plots and summary.md for `table` (accepted rows: split, label_name, orig_*, height, width).
    `samples`: `sample_rows(table, seed)` with an `image` column (raw bytes) added. Returns the
    written file names."""
    eda_dir.mkdir(parents=True, exist_ok=True)
    written = [
        save_figure(_class_balance(table), eda_dir / "class_balance.png").name,
        save_figure(_sizes(table), eda_dir / "sizes.png").name,
        save_figure(_modes(table), eda_dir / "modes.png").name,
        save_figure(_samples(samples), eda_dir / "samples.png").name,
    ]
    (eda_dir / "summary.md").write_text(summary_markdown(table, manifest))
    return written + ["summary.md"]


def summary_markdown(table: pd.DataFrame, manifest: dict) -> str:
    counts, patients = manifest["counts"], manifest["patients"]
    accepted, rejected, removed = manifest_totals(manifest)
    lines = [
        "# Prepared data set",
        "",
        f"Source: `{manifest['source']}`  ",
        f"Images: {accepted} accepted, {rejected} rejected, {removed} duplicates removed; "
        f"{manifest['options']['image_size']} px, resize `{manifest['options']['resize']}`, "
        f"split `{manifest['split_used']}`",
        "",
        "| split | " + " | ".join(CLASS_NAMES) + " | patients |",
        "|---|" + "---|" * len(CLASS_NAMES) + "---|",
    ]
    for split in SPLITS:
        lines.append(f"| {split} | " + " | ".join(str(counts[split][c]) for c in CLASS_NAMES)
                     + f" | {patients[split]} |")
    lines += ["", f"Class weights (train): {manifest['class_weights']}", "",
              "## Original sizes (median width x height)", ""]
    for name, group in table[["label_name", "orig_mode", "orig_width", "orig_height"]] \
            .groupby("label_name"):
        modes = dict(Counter(group["orig_mode"]))
        lines.append(f"- {name}: {int(group['orig_width'].median())} x "
                     f"{int(group['orig_height'].median())} px, modes {modes}")
    lines += ["", "![class balance](class_balance.png)", "![sizes](sizes.png)",
              "![modes](modes.png)", "![samples](samples.png)", ""]
    lines += _labels_section(manifest.get("labels"), manifest.get("split_warnings") or [])
    lines += _rejected_section(manifest["rejected"]) + [""]
    lines += _duplicates_section(manifest["duplicates"], manifest.get("patient_overlap"))
    return "\n".join(lines) + "\n"


def _labels_section(labels: dict | None, warnings: list[str]) -> list[str]:
    """The label file's rules (rows per source label and rule) and what each exclusion removed."""
    lines = [f"- warning: {w}" for w in warnings] + ([""] if warnings else [])
    if not labels:
        return lines
    lines += [f"## Labels from `{labels['label_file']}` ({labels['format']})", "",
              f"Patients: {labels['patient_rule']}", "", "| rule | label | rows |", "|---|---|---|"]
    lines += [f"| {r['rule']} | {r.get('label', '')} | {r['rows']} |" for r in labels["rules"].values()]
    lines += ["", "| excluded | rows | e.g. |", "|---|---|---|"]
    problems = {**labels["excluded"], "label row without its image": labels["missing_images"],
                "image without a label row": labels["unlabelled_images"]}
    lines += [f"| {why} | {e['count']} | {', '.join(map(str, e['examples'][:2]))} |"
              for why, e in problems.items()]
    return lines + [""]


def _rejected_section(rejected: list[dict]) -> list[str]:
    if not rejected:
        return ["No file was rejected."]
    lines = [f"## Rejected files ({len(rejected)})", ""]
    lines += [f"- `{r['path']}`: {r['reason']}" for r in rejected[:50]]
    if len(rejected) > 50:
        lines.append(f"- ... and {len(rejected) - 50} more (see manifest.json)")
    return lines


def _duplicates_section(duplicates: list[dict], overlap: dict | None) -> list[str]:
    lines = [f"## Exact duplicates ({len(duplicates)})", ""]
    lines += [f"- `{d['path']}` = `{d['duplicate_of']}`: {d['action']}" for d in duplicates[:50]]
    if overlap and overlap["images_removed_from_train"]:
        lines += ["", f"{overlap['images_removed_from_train']} train/val images of "
                      f"{overlap['patients']} patients who are also in test were removed."]
    return lines




def _grouped_bars(ax, table: pd.DataFrame, column: str, categories: list[str]) -> None:
    """One bar per (category, class), side by side, each labelled with its count."""
    width = 0.8 / len(CLASS_NAMES)
    positions = np.arange(len(categories))
    for i, name in enumerate(CLASS_NAMES):
        counts = table.loc[table["label_name"] == name, column].value_counts()
        heights = [int(counts.get(c, 0)) for c in categories]
        bars = ax.bar(positions + (i - (len(CLASS_NAMES) - 1) / 2) * width, heights, width,
                      label=name, color=_PALETTE[name])
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(positions, categories)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _class_balance(table: pd.DataFrame):
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    _grouped_bars(ax, table, "split", list(SPLITS))
    ax.set_ylabel("images")
    ax.set_title("Images per split and class")
    return fig


# Points per class in the size scatter: beyond a few thousand overlapping points a scatter shows
# nothing more, while drawing all of an archive's (200,000 here) took seconds and ~20 MB.
SIZE_POINTS_PER_CLASS = 5000


def _sizes(table: pd.DataFrame):
    fig = new_figure(6, 5)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASS_NAMES):
        where = np.flatnonzero((table["label"] == label).to_numpy())
        widths = table["orig_width"].to_numpy()[where]
        heights = table["orig_height"].to_numpy()[where]
        shown = rng.permutation(len(where))[:SIZE_POINTS_PER_CLASS]
        sample = f", {len(shown)} of {len(where)} shown" if len(shown) < len(where) else ""
        # train holds both classes (splits.check_splits), so neither class is empty here
        median = f"median {int(np.median(widths))} x {int(np.median(heights))}"
        ax.scatter(widths[shown], heights[shown], s=12, alpha=0.5, linewidths=0,
                   color=_PALETTE[name], label=f"{name} ({median}{sample})")
    ax.set_xlabel("original width (px)")
    ax.set_ylabel("original height (px)")
    ax.set_title("Original image size by class")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _modes(table: pd.DataFrame):
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    modes = table["orig_mode"].value_counts().index.tolist()
    _grouped_bars(ax, table, "orig_mode", modes)
    ax.tick_params(axis="x", labelsize=8, labelrotation=15 if len(modes) > 3 else 0)
    ax.set_ylabel("images")
    ax.set_title("Original image modes by class")
    return fig


def sample_rows(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The training rows the sample grid shows: up to SAMPLES_PER_CLASS per class, seeded. Picked
    by position, so only the picked rows are copied."""
    train = (table["split"] == "train").to_numpy()
    rng = np.random.default_rng(seed)
    picks = []
    for label in range(len(CLASS_NAMES)):
        where = np.flatnonzero(train & (table["label"] == label).to_numpy())
        picks.append(where[rng.permutation(len(where))[:SAMPLES_PER_CLASS]])
    return table.iloc[np.concatenate(picks)]


def _samples(samples: pd.DataFrame):
    """Preprocessed train images, one row per class."""
    fig = new_figure(SAMPLES_PER_CLASS * 1.3, len(CLASS_NAMES) * 1.5)
    axes = fig.subplots(len(CLASS_NAMES), SAMPLES_PER_CLASS, squeeze=False)
    for row, name in enumerate(CLASS_NAMES):
        picks = samples[samples["label_name"] == name]
        for col, ax in enumerate(axes[row]):
            ax.set_axis_off()
            if col < len(picks):
                item = picks.iloc[col]
                pixels = np.frombuffer(item["image"], np.uint8).reshape(item["height"], item["width"])
                ax.imshow(pixels, cmap="gray", vmin=0, vmax=255)
                ax.set_title(item["patient_id"][:16], fontsize=6)
        axes[row][0].text(-0.1, 0.5, name, rotation=90, va="center", ha="right",
                          transform=axes[row][0].transAxes, fontsize=9)
    fig.suptitle("Preprocessed training samples (what the model sees)", fontsize=10)
    return fig
