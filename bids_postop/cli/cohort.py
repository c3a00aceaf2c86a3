"""Running the participant level's cohort graph and reporting on it: nipype's configuration, one graph for every
participant (``--nprocs`` overlaps them), per-participant progress and failure isolation, the final reports and
the run's summary table. :mod:`bids_postop.cli.run` decides what runs; this module runs it."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bids_postop import __version__
from bids_postop.settings import RunSettings

LOG = logging.getLogger("bids_postop")


@dataclass
class ParticipantStatus:
    participant_id: str
    status: str  # done | failed | skipped
    config: str | None = None
    seconds: float = 0.0
    message: str = ""
    measures_tsv: Path | None = None  # the measures this run wrote (the final table reads them)


def preset_provenance(settings: RunSettings) -> dict:
    """The speed preset, for the outputs' provenance: ``--fast`` runs the first fold without mirroring, in bf16
    where the CPU computes in bf16 (what ran is in the work directory's ``segment.json``: engine, precision)."""
    return {"name": "fast" if settings.fast else "default",
            "folds": "first fold only" if settings.fast else "all folds averaged",
            "test_time_mirroring": settings.use_mirroring, "precision": settings.precision,
            "nnunet_engine": settings.nnunet_engine}


def configure_nipype(settings: RunSettings) -> None:
    """nipype's settings for this run, in this process and in its worker processes.

    Workers are fresh interpreters (forkserver) that read nipype's configuration file at import, not this
    process's settings: a ``nipype.cfg`` in the work directory, named by ``NIPYPE_CONFIG_DIR`` before any worker
    starts, gives them the same logging levels (without ``-v`` a demo printed ~160 ``nipype.workflow INFO`` lines
    from its workers).
    """
    levels = {"workflow_level": "INFO" if settings.verbosity > 0 else "WARNING",
              "interface_level": "INFO" if settings.verbosity > 1 else "WARNING", "utils_level": "WARNING"}
    config_dir = settings.work_dir / ".nipype"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "nipype.cfg").write_text("[logging]\n" + "".join(f"{k} = {v}\n" for k, v in levels.items())
                                           + "\n[monitoring]\nenabled = false\n")
    os.environ["NIPYPE_CONFIG_DIR"] = str(config_dir)
    from nipype import config
    from nipype import logging as nlogging

    # crash files are results a user must keep: under the output's logs/, not in the work folder they delete
    crash_dir = settings.output_dir / "logs" / "crashes"
    crash_dir.mkdir(parents=True, exist_ok=True)
    config.update_config({
        "logging": {"log_directory": str(settings.work_dir), "log_to_file": False, **levels},
        "execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                      "stop_on_first_crash": settings.stop_on_first_crash, "hash_method": "timestamp",
                      "remove_unnecessary_outputs": False, "create_report": False,
                      "parameterize_dirs": False, "poll_sleep_duration": 0.2},
        "monitoring": {"enabled": False},
    })
    nlogging.update_logging(config)


@dataclass
class _Progress:
    """One participant's share of the cohort graph, followed through nipype's status callback."""

    inputs: object
    model: object
    started: float | None = None
    ended: float | None = None
    errors: list[str] = field(default_factory=list)
    finished_nodes: set[str] = field(default_factory=set)


def run_cohort(settings: RunSettings, runnable: Sequence[tuple[object, object]], provenance: dict, *,
               brain_model: str | None = None) -> list[ParticipantStatus]:
    """Run every participant in one nipype graph, so that ``--nprocs N`` overlaps participants (one graph per
    participant would leave cores idle while one participant's chain of steps runs).

    Each participant is a sub-workflow ``sub_<label>_wf`` of ``bids_postop_<version>_wf`` (the work-directory
    layout of earlier versions, so their finished steps are reused). A crashed step fails its participant only:
    nipype skips what depends on it and runs everything else; progress is logged per participant and step.
    """
    from nipype.pipeline import engine as pe

    from bids_postop.workflows.base import init_participant_wf

    cohort = pe.Workflow(name=f"bids_postop_{__version__.replace('.', '_')}_wf", base_dir=str(settings.work_dir))
    progress: dict[str, _Progress] = {}
    for inputs, model in runnable:
        card = model.card
        workflow = init_participant_wf(
            inputs=inputs, model=model, output_dir=settings.output_dir, bids_dir=settings.bids_dir,
            brain_method=settings.brain_method, brain_model=brain_model, device=settings.device,
            omp_nthreads=settings.omp_nthreads, use_mirroring=settings.use_mirroring,
            trust_checkpoint=settings.trust_checkpoint, fast=settings.fast, precision=settings.precision,
            nnunet_engine=settings.nnunet_engine, min_component_voxels=settings.min_component_voxels,
            gtr_cutoff_ml=settings.gtr_cutoff_ml, gtr_inclusive=settings.gtr_inclusive,
            provenance={**provenance, "configuration": card.configuration, "preset": preset_provenance(settings)},
            derivatives=settings.derivatives, name=f"sub_{inputs.subject}_wf")
        cohort.add_nodes([workflow])
        progress[workflow.name] = _Progress(inputs, model)
        LOG.info("%s: queued (configuration %s, model %s)", inputs.participant_id, card.configuration, card.name)
    node_start: dict[str, float] = {}

    def status_callback(node, status: str) -> None:
        owner = next((part for part in node.fullname.split(".") if part in progress), None)
        if owner is None:
            return
        state, now, key = progress[owner], time.monotonic(), node.fullname
        pid = state.inputs.participant_id
        if status == "start":
            node_start[key] = now
            if state.started is None:
                state.started = now
                LOG.info("%s: start", pid)
        elif status in ("end", "exception"):
            took = now - node_start.get(key, now)
            state.ended = now
            LOG.info("%s: %-24s %s %6.1f s", pid, node.name, "done  " if status == "end" else "FAILED", took)
            if status == "end":
                state.finished_nodes.add(node.name)
            else:
                state.errors.append(f"{node.name}: {crash_message(node)}")

    # forkserver: workers must not be forked from a process that already runs torch/OpenMP threads (the
    # training command and tests call this in-process after using torch): such forks deadlock.
    plugin, plugin_args = ("Linear", {}) if settings.nprocs == 1 else (
        "MultiProc", {"n_procs": settings.nprocs, "raise_insufficient": False, "mp_context": "forkserver",
                      **({"memory_gb": settings.mem_gb} if settings.mem_gb else {})})
    plugin_args["status_callback"] = status_callback
    # nipype's MultiProc runs gc.collect() at every poll (5 per second) while a processor is free; without this,
    # each pass rescans every object alive in this process (measured: ~0.3-1 s per pass with torch imported,
    # 12 % of a core during a run); frozen objects are skipped, newer ones are still collected
    gc.freeze()
    crash: str | None = None
    try:
        cohort.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:  # nipype raises RuntimeError after the crashed nodes; details per participant
        crash = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    finally:
        gc.unfreeze()
    statuses = []
    for state in progress.values():
        inputs, model = state.inputs, state.model
        pid, config = inputs.participant_id, model.card.configuration
        took = (state.ended or time.monotonic()) - (state.started or time.monotonic())
        done = not state.errors and {"ds_outputs", "ds_report"} <= state.finished_nodes
        if done:
            final_report(settings, inputs, model, took, [], failed=False)
            LOG.info("%s: finished in %.0f s; report: %s", pid, took, settings.output_dir / f"{pid}.html")
            statuses.append(ParticipantStatus(pid, "done", config, took,
                                              measures_tsv=session_outputs(settings, inputs, model).measures_tsv))
            continue
        errors = state.errors or [f"not finished ({crash or 'stopped'}; --stop-on-first-crash stops every "
                                  f"participant at the first failure)"]
        message = "; ".join(errors)
        LOG.error("%s: failed after %.0f s: %s (crash files: %s)", pid, took, message,
                  settings.output_dir / "logs" / "crashes")
        final_report(settings, inputs, model, took, errors, failed=True)
        statuses.append(ParticipantStatus(pid, "failed", config, took, message))
    return statuses


def session_outputs(settings: RunSettings, inputs, model):
    """Where this participant's derivatives for this model go."""
    from bids_postop.bids.derivatives import SessionOutputs

    return SessionOutputs.for_source(settings.output_dir, inputs.files["postop_t1ce"], inputs.subject,
                                     inputs.postop_session, model_label=model.label)


def final_report(settings: RunSettings, inputs, model, took: float, errors: list[str], *, failed: bool) -> None:
    """Rewrite the participant's HTML with what only the end of the run knows: run time, device, errors."""
    from bids_postop.bids.derivatives import bids_uri
    from bids_postop.reports.html import existing_figures, measures_model_label, render_participant_report

    outputs = session_outputs(settings, inputs, model)
    warnings = list(inputs.notes)
    if not failed and outputs.measures_json.exists():
        import json

        notes = json.loads(outputs.measures_json.read_text()).get("measures", {}).get("notes", [])
        for note in notes:
            LOG.warning("%s: %s", inputs.participant_id, note)
        warnings += notes
    try:
        render_participant_report(
            settings.output_dir, inputs.subject, inputs.postop_session,
            measures_json=None if failed or not outputs.measures_json.exists() else outputs.measures_json,
            figures=existing_figures(settings.output_dir, inputs.subject, inputs.postop_session,
                                     model_label=measures_model_label(outputs.measures_json)),
            inputs={role: bids_uri(p, settings.bids_dir, derivatives=settings.derivatives)
                    for role, p in inputs.files.items()},
            warnings=warnings, errors=errors, runtime_s=round(took, 1),
            device=settings.device if settings.device != "auto" else "auto (cuda when available)")
    except Exception as exc:  # a report problem must never hide the participant's own result
        LOG.warning("%s: the report could not be written: %s", inputs.participant_id, exc)


def crash_message(node) -> str:
    """The last line of a crashed node's traceback: usually the message that names the bad file."""
    result = getattr(node, "result", None)
    runtime = getattr(result, "runtime", None)
    trace = getattr(runtime, "traceback", None) if runtime is not None else None
    if trace:
        lines = [line for line in str(trace).strip().splitlines() if line.strip()]
        return lines[-1] if lines else "unknown error"
    return "see the crash file"


def _cell(row: dict, key: str) -> str:
    value = str(row.get(key, "") or "")
    return "-" if value in ("", "n/a") else value


def _read_row(tsv: Path | None) -> dict[str, str]:
    if tsv is None or not tsv.is_file():
        return {}
    import csv

    with tsv.open(newline="") as handle:
        return next(csv.DictReader(handle, delimiter="\t"), {})


def print_final_table(statuses: Sequence[ParticipantStatus]) -> None:
    """The run's summary: one row per participant (status, configuration, time, residual, call, EOR) from the
    measures each run wrote; a model flagged not for clinical use is named under the table."""
    width = max([14, *(len(s.participant_id) + 2 for s in statuses)])
    lines = [f"{'participant':<{width}}{'status':<9}{'config':<8}{'time':>8}  {'residual ml':>11}  {'call':<5}"
             f"{'EOR %':>8}  message"]
    flagged: set[str] = set()
    for s in statuses:
        row = _read_row(s.measures_tsv) if s.status == "done" else {}
        if row.get("not_for_clinical_use", "").lower() == "true":
            flagged.add(row.get("model", ""))
        lines.append(f"{s.participant_id:<{width}}{s.status:<9}{s.config or '-':<8}{s.seconds:>7.0f}s  "
                     f"{_cell(row, 'residual_volume_ml'):>11}  {_cell(row, 'resection_status'):<5}"
                     f"{_cell(row, 'eor_percent'):>8}  {s.message}")
    for name in sorted(flagged):
        lines.append(f"NOT FOR CLINICAL USE: model {name} is flagged not for clinical use in its card; do not use "
                     f"these results for patient care")
    LOG.info("Summary\n%s", "\n".join(lines))
