"""The command-line parser (no side effects: it only describes and parses)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bids_postop import __version__
from bids_postop.errors import EXIT_USAGE

EPILOG = """\
exit codes:
  0   every participant finished
  1   at least one participant failed (the others finished; see the final table and logs/)
  64  usage error (bad option or value, --model missing or unknown, work directory inside or around the data)
  66  no usable input (dataset missing or not BIDS, unknown participant, no post-op contrast T1w)
  73  the output or work directory cannot be written, or the output is (inside) the input dataset

example:
  bids_postop /data/bids /data/bids/derivatives/bids_postop participant --participant-label 01 02 \\
      -d preop=/data/bids/derivatives/preop_masks --model MRI_GBM_Postop_FV_5p -w /scratch/work
  (models: bids_postop-models list; the demo model, for simulated data only: bids_postop-demo)
"""


class BidsAppParser(argparse.ArgumentParser):
    """argparse exits with 2 on usage errors; BIDS apps here document 64 (EX_USAGE)."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage()
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _derivative(value: str) -> tuple[str, Path]:
    if "=" in value:
        name, _, path = value.partition("=")
    else:
        path, name = value, Path(value).name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


_UNITS_GB = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}


def _memory(value: str, *, bare_unit: str) -> float:
    """A memory size in GB from ``8000``, ``8000M``, ``8G``, ``8GB``, ``1T``; a bare number is in ``bare_unit``."""
    text = value.strip().upper().removesuffix("B")
    unit = text[-1] if text and text[-1] in _UNITS_GB else bare_unit
    number = text[:-1] if text and text[-1] in _UNITS_GB else text
    try:
        size = float(number) * _UNITS_GB[unit]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a memory size like 16000 (MB), 16000M or 16G, got {value!r}") \
            from exc
    if size <= 0:
        raise argparse.ArgumentTypeError(f"memory must be > 0, got {value!r}")
    return size


def memory_mb(value: str) -> float:
    """``--mem`` / ``--mem-mb``: a bare number is MB, as in fMRIPrep (``--mem 16000`` = 16000 MB); GB returned."""
    return _memory(value, bare_unit="M")


def memory_gb(value: str) -> float:
    """``--mem-gb``: a bare number is GB; GB returned."""
    return _memory(value, bare_unit="G")


def build_parser() -> argparse.ArgumentParser:
    parser = BidsAppParser(
        prog="bids_postop",
        description="Residual glioblastoma in early post-operative MRI: registration, brain extraction, "
                    "residual-tumour segmentation, GTR/RT and extent of resection, as BIDS derivatives.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset (never modified)")
    parser.add_argument("output_dir", type=Path,
                        help="where the derivatives go (e.g. <bids_dir>/derivatives/bids_postop)")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="participant: process participants; group: aggregate their results")
    parser.add_argument("--version", action="version", version=f"bids_postop {__version__}")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                        help="more messages (-v: info from every step, -vv: debug)")

    g = parser.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                   help="participants to process, with or without 'sub-' (default: all)")
    g.add_argument("--postop-session", default="postop", metavar="LABEL",
                   help="session label of the early post-operative scans (default: postop)")
    g.add_argument("--preop-session", default="preop", metavar="LABEL",
                   help="session label of the pre-operative scans (default: preop)")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help="JSON of pybids queries per input (keys: t1ce, t1w, flair, preop_t1ce, preop_mask)")
    g.add_argument("-d", "--derivatives", nargs="+", type=_derivative, default=[], metavar="NAME=PATH",
                   help="derivatives datasets, e.g. preop=PATH with pre-operative tumour masks "
                        "(*_label-tumor_mask.nii.gz in ses-<preop>)")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not validate the input dataset")

    g = parser.add_argument_group("model and method")
    g.add_argument("--model", default=None, metavar="NAME|FOLDER",
                   help="required for the participant level: the name of an installed model (bids_postop-models "
                        "list; e.g. MRI_GBM_Postop_FV_2p after bids_postop-models fetch MRI_GBM_Postop_FV_2p), a "
                        "model folder (with bids_postop_model.json), a folder of models (one per configuration), "
                        "a bare nnU-Net v2 trained-model folder, a Raidionics model folder, or 'demo' — the "
                        "embedded demo model for simulated data, NOT for clinical use (bids_postop-demo uses it)")
    g.add_argument("--config", default="auto", choices=["auto", "A", "B", "C", "D", "E"],
                   help="input configuration (A: T1w-CE; B: +T1w; C: +FLAIR; D: B+pre-op T1w-CE and mask; "
                        "E: all); auto takes the richest that the data and models allow (default: auto)")
    g.add_argument("--brain-method", default=None, choices=["deepbet", "hdbet", "raidionics"],
                   help="brain extraction network (default: deepbet, or raidionics when --brain-model is given; "
                        "see README for the measured choice)")
    g.add_argument("--brain-model", default=None, metavar="NAME|FOLDER",
                   help="Raidionics brain model for --brain-method raidionics (implied when given): the name of "
                        "an installed model (default: MRI_Brain, installed with `bids_postop-models fetch "
                        "MRI_Brain`) or a folder holding pre_processing.ini and model.onnx")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow nnU-Net checkpoints that hold pickled Python objects (optimizer or logging state) "
                        "to be loaded in full, which can run code from the file: only for checkpoints you trust "
                        "(default: weights-only loading; strip such checkpoints with "
                        "bids_postop.training.nnunet.strip_checkpoint)")
    g.add_argument("--no-tta", dest="use_mirroring", action="store_false",
                   help="disable mirroring test-time augmentation (faster, slightly less accurate)")
    g.add_argument("--fast", action="store_true",
                   help="speed preset: only the model's first fold and no mirroring test-time augmentation "
                        "(nnU-Net: 1/(8 x folds) of the default network work; the measured accuracy cost is in "
                        "benchmarks/RESULTS.md), and bf16 networks where the CPU computes in bf16 "
                        "(--precision). Default preset: every fold averaged, with mirroring, fp32")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="CPU arithmetic of nnU-Net networks: bf16 (torch autocast; about half the time on CPUs "
                        "with AVX512-BF16 or AMX, probabilities change slightly: benchmarks/RESULTS.md) or fp32. "
                        "auto: bf16 with --fast, else fp32. On a GPU nnU-Net's own fp16 autocast is used")
    g.add_argument("--nnunet-engine", choices=("auto", "torch", "onnxruntime", "compiled"), default="auto",
                   help="what runs nnU-Net networks on the CPU: onnxruntime (fp32; about 0.75x torch's time, "
                        "segmentations agree with torch's at Dice >= 0.999), torch, or compiled (torch.compile "
                        "with frozen weights: about 0.65x eager torch's time in bf16, after a one-off compile of "
                        "~10-40 s per fold; needs a C++ compiler; pays on large images). auto: onnxruntime on "
                        "the CPU in fp32, torch on a GPU or in bf16. An engine that fails falls back to torch")
    g.add_argument("--min-component-voxels", type=int, default=20, metavar="N",
                   help="remove residual components smaller than N voxels (default: 20)")
    g.add_argument("--gtr-cutoff-ml", type=float, default=0.175, metavar="ML",
                   help="residual volume below which the resection is gross total (default: 0.175); at the group "
                        "level it applies with --reclassify, or to participants that recorded no cut-off")
    g.add_argument("--gtr-inclusive", action="store_true",
                   help="classify a residual of exactly the cut-off as GTR (the study's validation code) "
                        "instead of RT (the paper's text, default)")

    g = parser.add_argument_group("group level (validation against manual masks)")
    g.add_argument("--rater-groups", type=Path, metavar="TSV",
                   help="raters and their groups (columns rater, group: novice, expert or reference); manual "
                        "masks are the -d datasets whose NAME starts with 'manual'")
    g.add_argument("--folds", type=Path, metavar="TSV",
                   help="cross-validation folds (columns fold and participant_id or site); default: a fold "
                        "column of participants.tsv")
    g.add_argument("--compare", nargs="+", type=_derivative, default=[], metavar="NAME=PATH",
                   help="other models' bids_postop derivatives to compare with (Tukey HSD, Mann-Whitney U)")
    g.add_argument("--n-bootstrap", type=positive_int, default=2000, metavar="N",
                   help="bootstrap resamples for BCa confidence intervals (default: 2000)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap (default: 0)")
    g.add_argument("--reclassify", action="store_true",
                   help="classify every participant with --gtr-cutoff-ml/--gtr-inclusive (default: each participant "
                        "keeps the cut-off it was classified with; a cohort with mixed settings is flagged)")
    g.add_argument("--interrater-all-patients", action="store_true",
                   help="inter-rater Jaccard over all patients (default: over reference-positive patients, as "
                        "the paper reports it)")

    g = parser.add_argument_group("resources")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="intermediate files; reusing it resumes a run (default: ./work)")
    g.add_argument("--nprocs", "--n-cpus", type=positive_int, default=min(os.cpu_count() or 1, 8),
                   metavar="N", help="processes run at once (default: CPU count, at most 8)")
    g.add_argument("--omp-nthreads", "--omp_nthreads", type=positive_int, default=None, metavar="N",
                   help="threads of each multi-threaded step (registration, brain extraction, segmentation, "
                        "figures); the scheduler never runs more threads at once than --nprocs "
                        "(default: nprocs - 1, at most 8, at least 1, as fMRIPrep)")
    mem = g.add_mutually_exclusive_group()
    mem.add_argument("--mem", "--mem-mb", "--mem_mb", dest="mem_gb", type=memory_mb, default=None, metavar="MB",
                     help="memory limit for scheduling steps, in MB as in fMRIPrep (16000 = 16 GB); a unit may be "
                          "given (16G)")
    mem.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=memory_gb, default=None, metavar="GB",
                     help="the same in GB (16 = 16 GB)")
    g.add_argument("--notrack", action="store_true",
                   help="accepted for fMRIPrep compatibility: bids_postop never contacts the network during a run "
                        "(nipype's online version check is off); only bids_postop-models fetch downloads")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where networks run (default: auto = cuda when available)")
    g.add_argument("--clean-workdir", action="store_true",
                   help="empty the work directory before running (default: reuse it, i.e. resume)")
    g.add_argument("--boilerplate", action="store_true",
                   help="only write the methods paragraph with citations to output_dir/logs/CITATION.md and "
                        "print it (every participant run writes it too)")
    g.add_argument("--reports-only", action="store_true",
                   help="only rebuild the HTML reports from outputs already in output_dir")
    g.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop at the first failure instead of finishing the other participants")
    return parser
