"""Group report: one HTML page with the key tables and SVG figures (matplotlib, object API, no pyplot,
imported only when the report is written)."""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bids_postop import __version__
from bids_postop.bids.derivatives import atomic_write_text
from bids_postop.group import dictionaries as dd
from bids_postop.group.tables import cell


@dataclass
class GroupResults:
    """Everything the group level computed, as table rows (what the TSVs hold)."""

    cutoff_rule: str
    cutoff_ml: float
    datasets: dict[str, str]
    summary: list[dict] = field(default_factory=list)
    cohort: list[dict] = field(default_factory=list)
    patients: list[dict] = field(default_factory=list)
    sites: list[dict] = field(default_factory=list)
    folds: list[dict] = field(default_factory=list)
    pooled: list[dict] = field(default_factory=list)
    overall: list[dict] = field(default_factory=list)
    raters: list[dict] = field(default_factory=list)
    raters_summary: list[dict] = field(default_factory=list)
    tests: list[dict] = field(default_factory=list)
    review: list[dict] = field(default_factory=list)  # does the review flag pick out wrong calls (issue #20)
    paper_segmentation: list[dict] = field(default_factory=list)
    paper_classification: list[dict] = field(default_factory=list)
    units: list = field(default_factory=list)  # bids_postop.group.paper.ModelUnit
    methods: dict[str, str] = field(default_factory=dict)  # model → methods paragraph (Markdown)
    reference: str | None = None
    rater_groups: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    return buffer.getvalue()


def _figure(*, ncols: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _boxes(ax, groups: Mapping[str, Sequence[float]], ylabel: str) -> None:
    labels = [k for k, v in groups.items() if v]
    if not labels:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ax.boxplot([groups[k] for k in labels], tick_labels=labels)
    for i, k in enumerate(labels, 1):
        ax.plot([i] * len(groups[k]), groups[k], "o", alpha=0.4, markersize=3, color="k")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=30)


def _ok(results: GroupResults) -> list[dict]:
    return [r for r in results.patients if r.get("status") == "ok"]


def figures(results: GroupResults) -> dict[str, str]:
    """Figure name → SVG text."""
    out = {}
    fig, (ax,) = _figure()
    sites = sorted({r.get("site") or "unknown" for r in results.summary})
    _boxes(ax, {s: [float(r["residual_volume_ml"]) for r in results.summary if (r.get("site") or "unknown") == s
                    and r.get("residual_volume_ml") not in (None, "")] for s in sites}, "residual volume (ml)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title("Residual volume per site")
    out["cohort_volumes"] = _svg(fig)
    ok = _ok(results)
    if not ok:
        return out
    sources = list(dict.fromkeys(r["source"] for r in ok))
    label = (lambda s, site: f"{site} ({s})") if len(sources) > 1 else (lambda s, site: site)
    fig, (ax,) = _figure(width=max(6.0, 0.8 * len(sites) * len(sources)))
    _boxes(ax, {label(s, site): [r["dice"] for r in ok if r["source"] == s and r["in_P"]
                                 and (r.get("site") or "unknown") == site] for s in sources for site in sites},
           "Dice (patients with positive reference, P)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Dice per site")
    out["dice_per_site"] = _svg(fig)

    fig, (ax1, ax2) = _figure(ncols=2)
    for s in sources:
        true = [r["true_volume_ml"] for r in ok if r["source"] == s]
        pred = [r["predicted_volume_ml"] for r in ok if r["source"] == s]
        ax1.plot(true, pred, "o", alpha=0.5, markersize=4, label=s)
        ax2.plot([(a + b) / 2 for a, b in zip(true, pred, strict=True)],
                 [b - a for a, b in zip(true, pred, strict=True)], "o", alpha=0.5, markersize=4, label=s)
    top = max(max(r["true_volume_ml"], r["predicted_volume_ml"]) for r in ok) or 1.0
    ax1.plot([0, top], [0, top], "k--", linewidth=1)
    cutoff = results.cutoff_ml
    ax1.axvline(cutoff, color="grey", linestyle=":", linewidth=1)
    ax1.axhline(cutoff, color="grey", linestyle=":", linewidth=1)
    ax1.set_xscale("symlog", linthresh=0.1)
    ax1.set_yscale("symlog", linthresh=0.1)
    ax1.set(xlabel="true volume (ml)", ylabel="predicted volume (ml)",
            title=f"Predicted vs true residual volume (dotted: {cutoff} ml)")
    diffs = [r["volume_error_ml"] for r in ok if r["source"] == sources[0]]
    mean = sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else 0.0
    for y, style in ((mean, "-"), (mean + 1.96 * sd, "--"), (mean - 1.96 * sd, "--")):
        ax2.axhline(y, color="k", linestyle=style, linewidth=1)
    ax2.set(xlabel="mean of true and predicted (ml)", ylabel="predicted − true (ml)",
            title=f"Bland-Altman ({sources[0]}): bias {mean:.3f} ml, limits ±1.96 sd")
    if len(sources) > 1:
        ax1.legend()
    out["volumes_bland_altman"] = _svg(fig)

    fig, axes = _figure(ncols=len(sources), width=3.6, height=3.4)
    for ax, s in zip(axes, sources, strict=True):
        outcomes = [r["outcome"] for r in ok if r["source"] == s]
        matrix = [[outcomes.count("TP"), outcomes.count("FN")], [outcomes.count("FP"), outcomes.count("TN")]]
        ax.imshow(matrix, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{('TP', 'FN', 'FP', 'TN')[2 * i + j]}\n{matrix[i][j]}", ha="center", va="center")
        ax.set_xticks([0, 1], ["predicted RT", "predicted GTR"])
        ax.set_yticks([0, 1], ["true RT", "true GTR"])
        ax.set_title(s)
    out["confusion_matrix"] = _svg(fig)

    if results.units:
        out["architectures"] = architectures_figure(results.units)
    scored = [r for r in results.raters if r.get("status") == "ok" and r.get("jaccard") is not None]
    if scored:
        fig, axes = _figure(ncols=2, width=max(5.0, 0.7 * len({r["annotator"] for r in scored})))
        for ax, target in zip(axes, ("reference", "consensus"), strict=True):
            names = sorted({r["annotator"] for r in scored if r["target"] == target},
                           key=lambda n: (n in results.datasets, n))
            _boxes(ax, {n: [r["jaccard"] for r in scored if r["target"] == target and r["annotator"] == n]
                        for n in names}, "Jaccard")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"Jaccard against the {target}")
        out["rater_jaccard"] = _svg(fig)
    return out


def architectures_figure(units: Sequence) -> str:
    """Side by side per configuration: Dice-P of each architecture, validation (own-fold) and test sets."""
    fig, axes = _figure(ncols=2, width=max(5.0, 1.2 * len(units)), height=4.0)
    archs = sorted({u.architecture for u in units})
    configs = sorted({u.configuration for u in units})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, set_ in zip(axes, ("validation", "test"), strict=True):
        width = 0.8 / max(len(archs), 1)
        handles = []
        for i, arch in enumerate(archs):
            data, positions = [], []
            for j, config in enumerate(configs):
                values = [r["dice"] for u in units if u.architecture == arch and u.configuration == config
                          for r in u.rows[set_] if r["in_P"] and r["dice"] is not None]
                if values:
                    data.append(values)
                    positions.append(j + (i - (len(archs) - 1) / 2) * width)
            if data:
                parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                                   manage_ticks=False)
                for box in parts["boxes"]:
                    box.set_facecolor(colours[i % len(colours)])
                    box.set_alpha(0.6)
                handles.append((parts["boxes"][0], arch))
        ax.set_xticks(range(len(configs)), configs)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.set(xlabel="input configuration", ylabel="Dice-P (reference-positive patients)",
               title=f"{set_} set" + (" (own-fold predictions)" if set_ == "validation" else " (fold ensemble)"))
        if handles:
            ax.legend([h for h, _ in handles], [n for _, n in handles])
    return _svg(fig)


def _pm(mean: object, sd: object) -> str:
    if not isinstance(mean, float | int):
        return "n/a"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if isinstance(sd, float | int) else "")


def _ci(low: object, high: object) -> str:
    return f"[{low:.3f}, {high:.3f}]" if isinstance(low, float | int) and isinstance(high, float | int) else "n/a"


def paper_tables_html(results: GroupResults) -> str:
    """The paper's two tables: validation (pooled over folds) and test columns per architecture × configuration."""
    from bids_postop.group.paper import CLASSIFICATION_METRICS, SEGMENTATION_METRICS

    names = {"dice": "Dice", "dice_P": "Dice-P", "dice_TP": "Dice-TP", "hd95_mm": "HD95 (mm)", "recall": "Recall",
             "precision": "Precision", "specificity": "Specificity", "balanced_accuracy": "bAcc"}
    head = "<tr><th rowspan=2>architecture</th><th rowspan=2>config</th><th rowspan=2>model</th>"
    seg = [head + f"<th colspan={len(SEGMENTATION_METRICS) + 2}>validation (mean ± sd over folds)</th>"
           f"<th colspan={len(SEGMENTATION_METRICS) + 2}>test (mean ± sd)</th></tr><tr>"
           + ("<th>n</th>" + "".join(f"<th>{names[m]}</th>" for m in SEGMENTATION_METRICS) + "<th>AVE median (ml)</th>")
           * 2 + "</tr>"]
    for r in results.paper_segmentation:
        cells = [r["architecture"], r["configuration"], r["model"]]
        for set_ in ("validation", "test"):
            cells.append(f"{r[f'{set_}_n']}" + (f" ({r['validation_n_folds']} folds)" if set_ == "validation" else ""))
            cells += [_pm(r[f"{m}_{set_}_mean"], r[f"{m}_{set_}_sd"]) for m in SEGMENTATION_METRICS]
            cells.append(_pm(r[f"ave_ml_{set_}_median"], None))
        seg.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    cls = [head + f"<th colspan={len(CLASSIFICATION_METRICS) + 1}>validation (mean ± sd over folds, normal 95 % "
           f"interval)</th><th colspan={len(CLASSIFICATION_METRICS) + 1}>test (BCa 95 % interval)</th></tr><tr>"
           + ("<th>n</th>" + "".join(f"<th>{names[m]}</th>" for m in CLASSIFICATION_METRICS)) * 2 + "</tr>"]
    for r in results.paper_classification:
        cells = [r["architecture"], r["configuration"], r["model"], str(r["validation_n"])]
        cells += [f"{_pm(r[f'{m}_validation_mean'], r[f'{m}_validation_sd'])} "
                  f"{_ci(r[f'{m}_validation_ci_low'], r[f'{m}_validation_ci_high'])}" for m in CLASSIFICATION_METRICS]
        cells.append(f"{r['test_n']} (TP {r['test_TP']}, TN {r['test_TN']}, FP {r['test_FP']}, FN {r['test_FN']})")
        cells += [f"{_pm(r[f'{m}_test'], None)} {_ci(r[f'{m}_test_ci_low'], r[f'{m}_test_ci_high'])}"
                  for m in CLASSIFICATION_METRICS]
        cls.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<h3>Segmentation (the paper's Table 3 shape)</h3><table>" + "".join(seg) + "</table>"
            "<p>Dice over every patient counts two empty masks as 1 (the authors' validation code); Dice-P over "
            "reference-positive patients; Dice-TP over true positives; HD95 where both masks are non-empty. "
            "Validation: own-fold predictions, fold-size-weighted mean and combined-sample sd. Test: fold ensemble "
            "on the held-out site.</p>"
            "<h3>Patient-wise classification (the paper's Table 4 shape)</h3><table>" + "".join(cls) + "</table>"
            "<p>Validation rates: mean weighted by fold size ± sd of the fold values, normal 95 % interval over "
            "the fold values; test: BCa bootstrap 95 % intervals.</p>")


def _table(rows: Sequence[Mapping], columns: Sequence[str], *, limit: int = 200) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows[:limit])
    more = f"<p>… {len(rows) - limit} more rows in the TSV</p>" if len(rows) > limit else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else cell(value)


KEY_COLUMNS = ["n_evaluated", "n_P", "TP", "TN", "FP", "FN", "dice_P_mean", "dice_P_sd", "dice_TP_mean",
               "dice_TP_sd", "hd95_P_mm_mean", "hd95_P_n_undefined", "median_abs_volume_error_ml", "recall",
               "precision", "specificity", "balanced_accuracy"]
CI_COLUMNS = [f"{m}_ci_{e}" for m in ("recall", "specificity", "balanced_accuracy") for e in ("low", "high")]


def render(results: GroupResults, figure_files: Mapping[str, str]) -> str:
    img = "".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(n)}"><figcaption>{html.escape(n)}'
                  f"</figcaption></figure>" for n, p in figure_files.items())
    datasets = "; ".join(f"{name} = {folder}" for name, folder in results.datasets.items())
    parts = [f"<h1>bids_postop group report</h1><p>bids_postop {__version__}; datasets: "
             f"{html.escape(datasets)}.</p><p>GTR/RT classification: "
             f"{html.escape(results.cutoff_rule)}</p>",
             "<h2>Cohort</h2>", _table(results.cohort, ["site", "n_sessions", "n_GTR", "n_RT", "configs",
                                                        "residual_volume_ml_median", "residual_volume_ml_mean",
                                                        "preop_volume_ml_median", "eor_percent_median",
                                                        "rano_classes", "n_review_flagged"]), img]
    if results.patients:
        parts += ["<h2>Validation against manual annotations</h2>",
                  f"<p>Reference annotation: <b>{html.escape(str(results.reference))}</b>. "
                  f"{html.escape(dd.DICE_POLICY)} {html.escape(dd.HD95_POLICY)} {html.escape(dd.EMPTY_CELL)}</p>",
                  "<h3>Overall</h3>", _table(results.overall, ["source", *KEY_COLUMNS]),
                  "<h3>BCa bootstrap 95 % intervals</h3>",
                  _table(results.overall, ["source", *CI_COLUMNS, "recall_ci_reason", "specificity_ci_reason"]),
                  "<h3>Per site</h3>", _table(results.sites, ["source", "site", *KEY_COLUMNS])]
        if results.paper_segmentation:
            parts += ["<h2>The paper's tables: validation and test per architecture and configuration</h2>",
                      paper_tables_html(results)]
        if results.folds:
            parts += ["<h3>Per fold</h3>", _table(results.folds, ["source", "fold", *KEY_COLUMNS]),
                      "<h3>Pooled over folds</h3>",
                      _table(results.pooled, ["source", "metric", "n_folds", "pooled_mean", "pooled_sd", "fold_mean",
                                              "fold_sd", "normal_ci_low", "normal_ci_high"])]
        if results.raters_summary:
            groups = ", ".join(f"{rater}: {group}" for rater, group in results.rater_groups.items())
            parts += ["<h2>Inter-rater study</h2>", f"<p>Rater groups: {html.escape(groups)}</p>",
                      _table(results.raters_summary, list(dd.raters_summary()))]
        if results.review:
            parts += ["<h2>Review flag against the truth</h2><p>Does the participant level's review flag (the model's "
                      "members disagree, or the mirror score exceeds the card's threshold) pick out the patients "
                      "whose call is wrong? Error rates among flagged and unflagged patients, and the AUROC of the "
                      "uncertainty and mirror scores for a wrong call or Dice &lt; 0.5.</p>",
                      _table(results.review, list(dd.review()))]
        parts += ["<h2>Statistical tests</h2><p>Scoped as the paper (origin 'paper'); paired tests for repeated "
                  "measures on the same patients are additions (origin 'addition').</p>",
                  _table(results.tests, list(dd.tests())),
                  "<h2>Sessions not evaluated</h2>",
                  _table([r for r in results.patients if r.get("status") != "ok"],
                         ["source", "participant_id", "session_id", "status", "reason"]),
                  "<h3>Rater masks not used</h3>",
                  _table([r for r in results.raters if r.get("status") == "error"],
                         ["participant_id", "session_id", "annotator", "reason"])]
    if results.methods:
        parts += ["<h2>Methods (generated from what ran)</h2>"] + [
            f"<h3>{html.escape(name)}</h3><pre style='white-space:pre-wrap'>{html.escape(text)}</pre>"
            for name, text in results.methods.items()]
    if results.notes:
        parts += ["<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in results.notes) + "</ul>"]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;"
             "font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "figure{display:inline-block;margin:1em}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>bids_postop group report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(output_dir: Path, results: GroupResults) -> list[Path]:
    """Write ``group/figures/*.svg`` and ``group_report.html``; returns their paths."""
    written, files = [], {}
    try:
        import matplotlib  # noqa: F401  (optional: the tables do not need it)
        made = figures(results)
    except ImportError as exc:
        made = {}
        results.notes.append(f"figures skipped: {exc} (pip install 'matplotlib>=3.9')")
    for name, svg in made.items():
        path = atomic_write_text(output_dir / "group" / "figures" / f"{name}.svg", svg)
        written.append(path)
        files[name] = path.relative_to(output_dir).as_posix()
    written.append(atomic_write_text(output_dir / "group_report.html", render(results, files)))
    return written
