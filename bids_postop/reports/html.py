"""The per-participant HTML report, assembled from figures already made and the measures JSON.

``render_participant_report`` copies the session's figures into ``<output_dir>/sub-X/figures/`` under
fixed names, saves what the measures JSON does not hold (inputs found, warnings, errors, run time,
device) beside them, and writes ``<output_dir>/sub-X.html``: one self-contained page (inline CSS, a few
lines of inline script that mark each figure loaded or not, no network). ``rebuild_reports`` writes
every report again from those files alone (``--reports-only``).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bids_postop import __version__
from bids_postop.bids.derivatives import atomic_copy, atomic_write_json, atomic_write_text
from bids_postop.configurations import ROLES

# figure key → (desc, suffix, default extension); registration figures: one per registered role
FIGURES: dict[str, tuple[str, str, str]] = {
    "mosaic": ("residual", "mosaic", ".png"),
    "brainmask": ("brainmask", "overlay", ".png"),
    "preopmask": ("preopmask", "overlay", ".png"),
    "diameters": ("diameters", "rano", ".png"),
    **{f"registration_{role}": (role.replace("_", ""), "registration", ".svg")
       for role in ROLES if role not in ("postop_t1ce", "preop_mask")},
}
# figures that show one model's result: named per model (``desc-<modellabel>Residual``), so that a second model
# written into the same output folder does not overwrite the first one's
MODEL_FIGURES = ("mosaic", "diameters")
CONTEXT_DESC = "reportcontext"
ROLE_LABELS = {"postop_t1ce": "post-op T1w-CE", "postop_t1": "post-op T1w", "postop_flair": "post-op FLAIR",
               "preop_t1ce": "pre-op T1w-CE", "preop_mask": "pre-op tumour mask"}
SECTIONS = (("summary", "Summary"), ("residual", "Residual tumour"), ("brain", "Brain mask"),
            ("registration", "Registration"), ("preop", "Pre-operative tumour mask"),
            ("issues", "Warnings and errors"), ("methods", "Methods"), ("provenance", "Provenance"))


def _labels(subject: str, session: str | None) -> tuple[str, str | None]:
    subject = subject.removeprefix("sub-")
    session = session.removeprefix("ses-") if session else None
    return subject, session


def session_prefix(subject: str, session: str | None) -> str:
    """``sub-01_ses-postop`` (or ``sub-01`` without a session)."""
    subject, session = _labels(subject, session)
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def figure_filename(subject: str, session: str | None, key: str, *, ext: str | None = None,
                    model_label: str | None = None) -> str:
    """File name of a report figure, e.g. ``sub-01_ses-postop_desc-residual_mosaic.png``, or with
    ``model_label`` for a figure of :data:`MODEL_FIGURES`: ``sub-01_ses-postop_desc-demoBResidual_mosaic.png``.

    ``key`` is one of :data:`FIGURES` (``mosaic``, ``brainmask``, ``preopmask``,
    ``registration_<role>``); ``ext`` (``.png`` or ``.svg``) overrides the usual extension.
    """
    if key not in FIGURES:
        raise ValueError(f"unknown report figure {key!r}; known: {', '.join(FIGURES)}")
    desc, suffix, default = FIGURES[key]
    if model_label and key in MODEL_FIGURES:
        desc = f"{model_label}{desc.capitalize()}"
    return f"{session_prefix(subject, session)}_desc-{desc}_{suffix}{ext or default}"


def measures_model_label(measures_json: str | Path | None) -> str | None:
    """The model label of a measures JSON file name (``…_desc-<label>_measures.json``), else ``None``."""
    if measures_json is None:
        return None
    match = re.search(r"_desc-([A-Za-z0-9]+)_measures\.json$", Path(measures_json).name)
    return match[1] if match else None


def figures_dir(output_dir: Path, subject: str) -> Path:
    return Path(output_dir) / f"sub-{_labels(subject, None)[0]}" / "figures"


def _context_file(output_dir: Path, subject: str, session: str | None) -> Path:
    return figures_dir(output_dir, subject) / f"{session_prefix(subject, session)}_desc-{CONTEXT_DESC}_report.json"


# --- formatting -----------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int, unit: str = "", missing: str = "not known") -> str:
    if value is None or value == "":
        return f'<span class="muted">{_e(missing)}</span>'
    try:
        return f"{float(value):.{digits}f}{unit}"
    except (TypeError, ValueError):
        return _e(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return '<span class="muted">not recorded</span>'
    seconds = float(seconds)
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return _e(f"{hours} h {minutes} min {sec} s" if hours else f"{minutes} min {sec} s" if minutes
              else f"{seconds:.1f} s")


def _rows(pairs: Sequence[tuple[str, str]], table_id: str = "") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"{f" id={chr(34)}{table_id}{chr(34)}" if table_id else ""}>{body}</table>'


def _figure(rel: str | None, caption: str, *, interactive: bool = False) -> str:
    if rel is None:
        return f'<p class="missing">Figure not available: {_e(caption)}.</p>'
    src = _e(rel)
    element = (f'<object type="image/svg+xml" data="{src}" data-figure="{src}" aria-label="{_e(caption)}">'
               f'<img src="{src}" alt="{_e(caption)}"></object>' if interactive
               else f'<img src="{src}" alt="{_e(caption)}" data-figure="{src}">')
    link = f'<a href="{src}">({_e(Path(rel).name)})</a>'
    return f"<figure>{element}<figcaption>{_e(caption)} {link}</figcaption></figure>"


# --- the page -------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1b1b1b;
 background:#fafafa;line-height:1.4}
nav{position:sticky;top:0;background:#23395b;padding:.4em 1em;z-index:2}
nav a{color:#fff;margin-right:1.2em;text-decoration:none;font-size:.95em}
main{max-width:1280px;margin:0 auto;padding:0 1.2em 3em}
h1{font-size:1.5em;margin:.8em 0 .2em}h2{border-bottom:2px solid #23395b;padding-bottom:.2em;margin-top:1.6em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.95em}
th,td{border:1px solid #d0d0d0;padding:3px 9px;text-align:left;vertical-align:top}
table.kv th{background:#eef1f6;font-weight:600;white-space:nowrap}
.result{display:flex;gap:1em;flex-wrap:wrap;margin:.8em 0}
.card{background:#fff;border:1px solid #d0d0d0;border-radius:6px;padding:.6em 1em;min-width:11em}
.card .v{font-size:1.6em;font-weight:700}.card .k{color:#555;font-size:.85em}
.status-RT{color:#b00020}.status-GTR{color:#1b7f3b}
.banner{background:#fff3cd;border:2px solid #d39e00;border-radius:6px;padding:.6em 1em;margin:1em 0;
 font-weight:600}
.banner.clinical{background:#fde2e4;border-color:#b00020;color:#7a0016;font-size:1.1em}
.muted{color:#777}.missing{color:#b00020;font-style:italic}
figure{margin:.8em 0}figure img,figure object{max-width:100%;height:auto;display:block;background:#000}
figcaption{font-size:.85em;color:#444;margin-top:.2em}
ul.warnings li{color:#8a5a00}ul.errors li{color:#b00020;font-weight:600}
pre{background:#f0f0f0;padding:.6em;overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-all}
.figure-error{color:#b00020;font-weight:600}
"""

# Marks every figure data-loaded="yes"/"no" once the page has loaded and says so next to a broken one;
# the tests read these marks from Chromium's DOM dump.
SCRIPT = """
window.addEventListener('load', function () {
  var els = document.querySelectorAll('[data-figure]'), pending = els.length;
  function done() { if (--pending <= 0) { document.body.setAttribute('data-figures-checked', String(els.length)); } }
  function mark(el, ok) {
    el.setAttribute('data-loaded', ok ? 'yes' : 'no');
    if (!ok) { var p = document.createElement('p'); p.className = 'figure-error';
      p.textContent = 'This figure could not be loaded: ' + el.getAttribute('data-figure');
      el.parentNode.insertBefore(p, el); }
    done();
  }
  if (!els.length) { document.body.setAttribute('data-figures-checked', '0'); }
  els.forEach(function (el) {
    if (el.tagName === 'IMG') { mark(el, el.complete && el.naturalWidth > 0); return; }
    var probe = new Image();
    probe.onload = function () { mark(el, probe.naturalWidth > 0); };
    probe.onerror = function () { mark(el, false); };
    probe.src = el.getAttribute('data');
  });
});
"""


def _model_card(model: Mapping[str, Any]) -> Mapping[str, Any]:
    """The full model card when its folder is readable, else what the measures JSON recorded."""
    folder = model.get("folder")
    if folder:
        card = Path(folder) / "bids_postop_model.json"
        try:
            return json.loads(card.read_text())
        except (OSError, ValueError):
            pass
    return model


def _inputs_table(inputs: Mapping[str, str], sources: Mapping[str, str], channels: Sequence[str],
                  configuration: str) -> str:
    roles = [r for r in ROLES if r in inputs or r in sources] + [r for r in inputs if r not in ROLES]
    if not roles:
        return '<p class="muted">No inputs recorded.</p>'
    rows = []
    for role in roles:
        where = inputs.get(role) or sources.get(role, "")
        if role in channels:
            use = f"model input, channel {channels.index(role) + 1}"
        elif role == "preop_mask" and role in sources:
            use = "pre-op volume and extent of resection"
        elif role in sources:
            use = "used"
        else:
            use = f'<span class="muted">found, not used by configuration {_e(configuration)}</span>'
        rows.append(f"<tr><td>{_e(ROLE_LABELS.get(role, role))}</td><td><code>{_e(where)}</code></td>"
                    f"<td>{use if '<span' in use else _e(use)}</td></tr>")
    return ("<table id=\"inputs\"><tr><th>input</th><th>file</th><th>use</th></tr>" + "".join(rows) + "</table>")


def _summary(data: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    m = data.get("measures", {})
    model = data.get("model", {})
    status = m.get("resection_status") or "?"
    intended = str(model.get("intended_use") or "")
    parts = []
    if "measures" not in data:
        parts.append('<div class="banner clinical" id="no-results">No results for this session: processing did '
                     'not finish (see <a href="#issues">Warnings and errors</a>).</div>')
    # the card's boolean decides, never the wording of its intended use
    if data.get("not_for_clinical_use") or model.get("not_for_clinical_use"):
        parts.append(f'<div class="banner clinical" id="intended-use">NOT FOR CLINICAL USE: the model card flags '
                     f'{_e(model.get("name", "this model"))} as not for clinical use'
                     f'{" (" + _e(intended) + ")" if intended else ""}. '
                     "Do not use these results for patient care.</div>")
    elif intended:
        parts.append(f'<p id="intended-use"><b>Model intended use:</b> {_e(intended)}</p>')
    elif model:
        parts.append('<div class="banner" id="intended-use">The model card states no intended use.</div>')
    status_word = {"GTR": "gross total resection", "RT": "residual tumour"}.get(status, "")
    parts.append(
        '<div class="result">'
        f'<div class="card"><div class="k">Resection status</div><div class="v status-{_e(status)}" id="status">'
        f"{_e(status)}</div><div class=\"k\">{_e(status_word)}</div></div>"
        f'<div class="card"><div class="k">Residual tumour volume</div><div class="v" id="residual-volume">'
        f'{_num(m.get("residual_volume_ml"), 3, " ml")}</div></div>'
        f'<div class="card"><div class="k">Pre-op tumour volume</div><div class="v" id="preop-volume">'
        f'{_num(m.get("preop_volume_ml"), 2, " ml")}</div></div>'
        f'<div class="card"><div class="k">Extent of resection</div><div class="v" id="eor">'
        f'{_num(m.get("eor_percent"), 1, " %")}</div></div></div>')
    channels = list(model.get("channels") or [])
    config = data.get("configuration", "")
    pairs = [
        ("Participant", _e(data.get("participant_id", ""))),
        ("Session", _e(data.get("session_id") or "—")),
        ("Site", _e(data.get("site") or "—")),
        ("Residual tumour volume", f'{_num(m.get("residual_volume_ml"), 4, " ml")} '
                                   f'({_e(m.get("residual_voxels", "?"))} voxels)'),
        ("Resection status", f'<b class="status-{_e(status)}">{_e(status)}</b> '
                             f'<span class="muted">({_e(m.get("gtr_rule", ""))}, else RT)</span>'),
        ("Review flag", _review(data.get("uncertainty") or {})),
        ("Pre-op tumour volume", _num(m.get("preop_volume_ml"), 3, " ml",
                                      missing="not known (no pre-operative tumour mask)")),
        ("Extent of resection", _num(m.get("eor_percent"), 2, " %", missing="not known (no pre-operative volume)")),
        ("Configuration", f"{_e(config)} ({_e(', '.join(ROLE_LABELS.get(c, c) for c in channels))})"),
        ("Model", f"{_e(model.get('name', '?'))} ({_e(model.get('architecture', '?'))}), "
                  f"threshold {_e(m.get('threshold', model.get('threshold', '?')))}"),
        ("Model intended use", _e(intended or "not stated")),
        ("Post-processing", f"{_e(m.get('voxels_above_threshold', '?'))} voxels above threshold, "
                            f"{_e(m.get('components_removed', '?'))} components smaller than "
                            f"{_e(m.get('min_component_voxels', '?'))} voxels removed"),
        ("Device", _e(_ran_on(data, context)) if _ran_on(data, context)
         else '<span class="muted">not recorded</span>'),
        ("Run time", _duration(context.get("runtime_s"))),
    ]
    parts.append(_rows(pairs, "summary-table"))
    parts.append(_other_models_table(data.get("_other_models") or ()))
    parts.append("<h3>Inputs found and used</h3>")
    parts.append(_inputs_table(context.get("inputs") or {}, data.get("sources") or {}, channels, config))
    return "".join(parts)


def _issues(data: Mapping[str, Any], warnings: Sequence[str], errors: Sequence[str]) -> str:
    warnings = list(warnings)
    m = data.get("measures", {})
    eor = m.get("eor_percent")
    if isinstance(eor, int | float) and eor < 0:
        warnings.append(f"Negative extent of resection ({eor:.1f} %): the residual is larger than the pre-operative "
                        "tumour; check the registration and the segmentation.")
    out = []
    if errors:
        out.append('<ul class="errors" id="errors">' + "".join(f"<li>{_e(x)}</li>" for x in errors) + "</ul>")
    if warnings:
        out.append('<ul class="warnings" id="warnings">' + "".join(f"<li>{_e(x)}</li>" for x in warnings) + "</ul>")
    return "".join(out) or '<p id="no-issues">No warnings or errors.</p>'


def _value_html(value: Any) -> str:
    """A provenance value for people: nested tables for dicts, comma lists, never a Python repr."""
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">none</span>'
        return "<table>" + "".join(f"<tr><th>{_e(str(k).replace('_', ' '))}</th><td>{_value_html(v)}</td></tr>"
                                   for k, v in value.items()) + "</table>"
    if isinstance(value, list | tuple):
        return ", ".join(_value_html(v) for v in value) if value else '<span class="muted">none</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _e(value)


def _review(spread: Mapping[str, Any]) -> str:
    """The members' verdict: whether to double-check this call, and why."""
    if not spread or spread.get("review_flag") is None:
        kind = spread.get("members_kind") if spread else None
        return ('<span class="muted" id="review-flag">n/a: the model has no members here (one fold without '
                f'test-time augmentation){"" if kind in (None, "none") else f", {_e(kind)}"}</span>')
    flag = bool(spread["review_flag"])
    reasons = "; ".join(str(r) for r in spread.get("reasons") or ())
    low, high = spread.get("residual_volume_ml_min"), spread.get("residual_volume_ml_max")
    rt = spread.get("rt_fraction_members")
    mirror, limit = spread.get("mirror_score"), spread.get("score_threshold")
    detail = (f'{_e(spread.get("members_count"))} {_e(spread.get("members_kind"))}: RT in '
              f'{_num(None if rt is None else 100 * float(rt), 0, " %")} of them, residual '
              f'{_num(low, 3)}–{_num(high, 3, " ml")}'
              + ("" if mirror is None else f'; mirror score {_num(mirror, 3)}'
                 + ("" if limit is None else f' (threshold {_num(limit, 3)})')))
    verdict = ('<b class="status-RT" id="review-flag">REVIEW: check this call</b>' if flag
               else '<span id="review-flag">no review needed</span>')
    return f'{verdict} <span class="muted">({detail}{"; " + _e(reasons) if reasons else ""})</span>'


def _residual_shape(data: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """RANO resect class and bidimensional measures, with the two diameters drawn on the axial slices."""
    m = data.get("measures") or {}
    if "rano_resect_class" not in m:
        return ""
    rano = m.get("rano") or {}
    shape = m.get("bidimensional") or {}
    pairs = [("RANO resect class", f'<b id="rano-class">{_e(m.get("rano_resect_class"))}</b> '
                                   f'<span class="muted">{_e(rano.get("reason", ""))}</span>'),
             ("Measurable lesions (RANO)", f'<span id="measurable-lesions">{_e(m.get("measurable_lesions"))}</span>'),
             ("Sum of bidimensional products", _num(m.get("sum_bidimensional_mm2"), 0, " mm²")),
             ("Components measured", _e(len(shape.get("components") or [])))]
    drawn = _figure(figures.get("diameters"), "Axial slices (patient's right on the left) of the measured residual "
                                              "components: longest diameter red, longest perpendicular diameter "
                                              "yellow") if figures.get("diameters") else ""
    return "<h3>RANO measures</h3>" + _rows(pairs, "rano-table") + drawn


def _ran_on(data: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """Where and how the segmentation ran (device and engine after any fallback), else what was asked."""
    ran = ((data.get("provenance") or {}).get("segmentation") or {})
    if ran.get("device"):
        engine = f", {ran['engine']} engine" if ran.get("engine") else ""
        precision = f", {ran['precision']}" if ran.get("precision") else ""
        return f"{ran['device']}{engine}{precision}"
    return str(context.get("device") or "")


def _methods(data: Mapping[str, Any]) -> str:
    """The methods paragraph of this participant's run, from what ran (the measures JSON), with references."""
    if "measures" not in data:
        return '<p class="muted">No methods: processing did not finish.</p>'
    from bids_postop.reports.boilerplate import RunDescription, methods_markdown

    text = methods_markdown(RunDescription.from_measures(data))
    paragraph, _, references = text.partition("\n\nReferences\n")
    items = "".join(f"<li>{_e(line.split('] ', 1)[-1])}</li>" for line in references.splitlines() if line.strip())
    return (f'<p id="methods-text">{_e(paragraph)}</p><h3>References</h3><ol id="references">{items}</ol>'
            '<p class="muted">The same text for the whole run: <code>logs/CITATION.md</code> and '
            "<code>logs/CITATION.bib</code>.</p>")


def _provenance(data: Mapping[str, Any]) -> str:
    prov = data.get("provenance") or {}
    versions = {"bids_postop": prov.get("bids_postop_version", __version__), **(prov.get("versions") or {})}
    parts = ["<h3>Versions</h3>", _rows([(k, _e(v)) for k, v in versions.items()], "versions")]
    command = prov.get("command_line")
    if command:
        text = command if isinstance(command, str) else " ".join(str(c) for c in command)
        parts += ["<h3>Command line</h3>", f'<pre id="command-line">{html.escape(text, quote=False)}</pre>']
    other = {k: v for k, v in prov.items() if k not in ("versions", "command_line", "bids_postop_version")}
    if other:
        parts += ["<h3>Run</h3>", _rows([(k.replace("_", " "), _value_html(v)) for k, v in other.items()])]
    card = json.dumps(_model_card(data.get("model", {})), indent=2)
    parts += ["<h3>Model card</h3>", f'<pre id="model-card">{html.escape(card, quote=False)}</pre>']
    if data.get("sources"):
        parts += ["<h3>Sources</h3>", _rows([(ROLE_LABELS.get(k, k), f"<code>{_e(v)}</code>")
                                             for k, v in data["sources"].items()])]
    if data.get("definitions"):
        parts += ["<h3>Definitions</h3>", _rows([(k, _e(v)) for k, v in data["definitions"].items()])]
    return "".join(parts)


def _page(data: Mapping[str, Any], context: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    pid = data.get("participant_id", "")
    ses = data.get("session_id")
    channels = list((data.get("model") or {}).get("channels") or [])
    registered = [r for r in channels if f"registration_{r}" in FIGURES]
    regs = [k for k in FIGURES if k.startswith("registration_")
            and (k in figures or k.removeprefix("registration_") in registered)]
    reg_html = "".join(
        f"<h3>{_e(ROLE_LABELS.get(k.removeprefix('registration_'), k))} → post-op T1w-CE</h3>"
        + _figure(figures.get(k), f"{ROLE_LABELS.get(k.removeprefix('registration_'), k)} registered to the "
                                  "post-op T1w-CE: the two layers alternate (hover to hold one); cyan: edges of the "
                                  "post-op T1w-CE", interactive=True)
        for k in regs) or '<p class="muted">No image was registered to the post-op T1w-CE in this configuration.</p>'
    has_preop = "preop_mask" in (data.get("sources") or {}) or "preop_mask" in (context.get("inputs") or {})
    if "preopmask" in figures or "preop_t1ce" in registered:
        preop_html = _figure(figures.get("preopmask"), "Pre-operative tumour mask (orange) on the pre-op T1w-CE, "
                                                       "both registered to the post-op grid")
    elif has_preop:
        preop_html = ('<p class="muted">The pre-operative scan is not registered in this configuration; its tumour '
                      "mask gives the pre-operative volume only.</p>")
    else:
        preop_html = '<p class="muted">No pre-operative tumour mask for this participant.</p>'
    sections = {
        "summary": _summary(data, context),
        "residual": _figure(figures.get("mosaic"), "Post-op contrast T1w through the residual tumour (or the highest "
                                                   "probability when none): residual contour red, probability "
                                                   "yellow, brain mask blue") + _residual_shape(data, figures),
        "brain": _figure(figures.get("brainmask"), "Brain mask (blue) on the post-op contrast T1w"),
        "registration": reg_html,
        "preop": preop_html,
        "issues": _issues(data, context.get("warnings") or (), context.get("errors") or ()),
        "methods": _methods(data),
        "provenance": _provenance(data),
    }
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{sections[sid]}</section>' for sid, title in SECTIONS)
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"{pid}{' ' + ses if ses else ''}: bids_postop report"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><nav>{nav}</nav><main><h1>{_e(pid)}{" · " + _e(ses) if ses else ""}</h1>'
            f'<p class="muted">Residual tumour after surgery, bids_postop {_e(__version__)}; report written {when}.</p>'
            f"{body}</main><script>{SCRIPT}</script></body></html>\n")


# --- public API -----------------------------------------------------------------------------------

def render_participant_report(output_dir: Path, subject: str, session: str | None, *, measures_json: Path | None,
                              figures: Mapping[str, Path], inputs: Mapping[str, str], warnings: Sequence[str] = (),
                              errors: Sequence[str] = (), runtime_s: float | None = None,
                              device: str | None = None) -> Path:
    """Write ``<output_dir>/sub-<subject>.html`` for one post-op session; returns its path.

    ``figures`` maps figure keys (:data:`FIGURES`: ``mosaic``, ``brainmask``, ``preopmask``,
    ``registration_<role>``) to files; each is copied (atomically) to
    ``sub-<subject>/figures/<figure_filename(...)>`` unless it is already that file. ``inputs`` maps
    role → input file found. These, ``warnings``, ``errors``, ``runtime_s`` and ``device`` are saved in
    ``sub-<subject>/figures/<prefix>_desc-reportcontext_report.json`` so that :func:`rebuild_reports`
    can write the page again. ``measures_json`` ``None`` (or missing: the run failed before writing it)
    gives a page saying that there are no results, with the errors.
    """
    output_dir = Path(output_dir)
    subject, session = _labels(subject, session)
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown report figure key(s) {unknown}; known: {', '.join(FIGURES)}")
    dest_dir = figures_dir(output_dir, subject)
    label = measures_model_label(measures_json)
    rel: dict[str, str] = {}
    for key, src in figures.items():
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(f"report figure {key!r} not found: {src}")
        dest = dest_dir / figure_filename(subject, session, key, ext=src.suffix.lower(), model_label=label)
        if not (dest.exists() and dest.resolve() == src.resolve()):
            atomic_copy(src, dest)
        rel[key] = dest.relative_to(output_dir).as_posix()
    context = {"inputs": {k: str(v) for k, v in inputs.items()}, "warnings": [str(w) for w in warnings],
               "errors": [str(e) for e in errors], "runtime_s": runtime_s, "device": device}
    atomic_write_json(_context_file(output_dir, subject, session), context)
    if measures_json is not None and Path(measures_json).is_file():
        data = json.loads(Path(measures_json).read_text(encoding="utf-8"))
        others = _other_models(output_dir, Path(measures_json))
        if others:
            data = {**data, "_other_models": others}
    else:  # the run failed before its measures: a page with the errors and whatever figures exist
        data = {"participant_id": f"sub-{subject}", "session_id": f"ses-{session}" if session else None}
    return atomic_write_text(output_dir / f"sub-{subject}.html", _page(data, context, rel))


def _other_models(output_dir: Path, measures_json: Path) -> list[dict[str, Any]]:
    """The session's results from other models in the same output folder (their measures JSON files)."""
    prefix = measures_json.name.split("_desc-")[0]
    rows = []
    for other in sorted(measures_json.parent.glob(f"{prefix}_desc-*_measures.json")):
        if other.name == measures_json.name:
            continue
        try:
            data = json.loads(other.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        m, u = data.get("measures") or {}, data.get("uncertainty") or {}
        rows.append({"label": measures_model_label(other), "model": (data.get("model") or {}).get("name"),
                     "configuration": data.get("configuration"), "residual_volume_ml": m.get("residual_volume_ml"),
                     "resection_status": m.get("resection_status"), "review_flag": u.get("review_flag"),
                     "measures": other.relative_to(output_dir).as_posix()})
    return rows


def _other_models_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{_e(r.get('model') or '?')}</td><td>{_e(r.get('configuration') or '?')}</td>"
        f"<td>{_num(r.get('residual_volume_ml'), 3, ' ml')}</td><td>{_e(r.get('resection_status') or '?')}</td>"
        f"<td>{_e({True: 'review', False: 'no', None: 'n/a'}.get(r.get('review_flag'), '?'))}</td>"
        f'<td><a href="{_e(r["measures"])}">{_e(r["measures"])}</a></td></tr>' for r in rows)
    return ("<h3>Other models in this output folder</h3><p class=\"muted\">This page shows the latest run's model; "
            "these results of the same session are kept beside it (their own masks, measures and figures).</p>"
            '<table id="other-models"><tr><th>model</th><th>config</th><th>residual</th><th>status</th>'
            f"<th>review flag</th><th>measures</th></tr>{body}</table>")


_NAME = re.compile(r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?)_desc-(?P<desc>[A-Za-z0-9]+)_"
                   r"(?P<suffix>[A-Za-z0-9]+)(?P<ext>\.png|\.svg)$")


def existing_figures(output_dir: Path, subject: str, session: str | None, *,
                     model_label: str | None = None) -> dict[str, Path]:
    """Figure key → file for the session's figures already in ``sub-<subject>/figures/``: the model's own
    figures (:data:`MODEL_FIGURES`) of ``model_label``, or the unlabelled ones of outputs written before figures
    were named per model."""
    by_name = {(desc, suffix): key for key, (desc, suffix, _) in FIGURES.items()}
    if model_label:
        by_name.update({(f"{model_label}{FIGURES[key][0].capitalize()}", FIGURES[key][1]): key
                        for key in MODEL_FIGURES})
    prefix = session_prefix(subject, session)
    found: dict[str, Path] = {}
    folder = figures_dir(output_dir, subject)
    for path in sorted(folder.glob(f"{prefix}_desc-*")) if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if match and match["prefix"] == prefix and (key := by_name.get((match["desc"], match["suffix"]))):
            labelled = match["desc"] != FIGURES[key][0]
            if labelled or key not in found:  # the model's own figure wins over an unlabelled one
                found[key] = path
    return found


def _split_prefix(prefix: str) -> tuple[str, str | None]:
    parts = dict(part.split("-", 1) for part in prefix.split("_"))
    return parts["sub"], parts.get("ses")


def rebuild_reports(output_dir: Path) -> list[Path]:
    """Write every participant's report again from ``sub-*/figures/`` and the measures JSON files.

    For ``--reports-only``: nothing is recomputed. Each ``sub-*/[ses-*/]*_measures.json``
    gives one report, and so does a saved report context without measures (a run that failed). A
    participant with several sessions gets the last one with measures, in sorted order, and a warning
    naming the others. Returns the HTML files written, sorted by participant.
    """
    output_dir = Path(output_dir)
    found: dict[str, dict[str | None, Path | None]] = {}
    for context in sorted(output_dir.glob(f"sub-*/figures/*_desc-{CONTEXT_DESC}_report.json")):
        subject, session = _split_prefix(context.name.split(f"_desc-{CONTEXT_DESC}_")[0])
        found.setdefault(subject, {})[session] = None
    for measures in sorted(output_dir.glob("sub-*/**/*_measures.json")):
        subject, session = _split_prefix(measures.name.split("_desc-")[0])
        found.setdefault(subject, {})[session] = measures
    written = []
    for subject, sessions in sorted(found.items()):
        order = sorted(sessions, key=lambda ses: (sessions[ses] is not None, ses or ""))
        session, measures = order[-1], sessions[order[-1]]
        context_file = _context_file(output_dir, subject, session)
        context = json.loads(context_file.read_text(encoding="utf-8")) if context_file.is_file() else {}
        warnings = list(context.get("warnings") or [])
        others = [f"ses-{ses}" if ses else "(no session)" for ses in order[:-1]]
        note = f"Several post-operative sessions have outputs; this report shows ses-{session}. Others: {others}"
        if others and note not in warnings:
            warnings.append(note)
        written.append(render_participant_report(
            output_dir, subject, session, measures_json=measures,
            figures=existing_figures(output_dir, subject, session, model_label=measures_model_label(measures)),
            inputs=context.get("inputs") or {},
            warnings=warnings, errors=context.get("errors") or (), runtime_s=context.get("runtime_s"),
            device=context.get("device")))
    return written
