"""Run settings: every option of a run, frozen, passed explicitly, saved beside the logs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bids_postop.core.postprocess import GTR_CUTOFF_ML, MIN_COMPONENT_VOXELS

Device = Literal["auto", "cpu", "cuda"]
DEFAULT_BRAIN_MODEL = "MRI_Brain"  # the published Raidionics brain model, for --brain-method raidionics


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu`` (imports torch: call from workers only)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class RunSettings:
    bids_dir: Path
    output_dir: Path
    analysis_level: Literal["participant", "group"]
    work_dir: Path
    participant_labels: tuple[str, ...] = ()
    postop_session: str = "postop"
    preop_session: str = "preop"
    bids_filter_file: Path | None = None
    derivatives: dict[str, Path] = field(default_factory=dict)
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    device: Device = "auto"
    model: str | None = None  # required for the participant level (no silent demo model on real data)
    config: str = "auto"
    brain_method: str = "deepbet"  # deepbet | hdbet | raidionics
    brain_model: str | None = None  # raidionics: installed model name or folder (None: MRI_Brain)
    trust_checkpoint: bool = False  # allow full (pickle) loading of nnU-Net checkpoints
    skip_bids_validation: bool = False
    stop_on_first_crash: bool = False
    min_component_voxels: int = MIN_COMPONENT_VOXELS
    gtr_cutoff_ml: float = GTR_CUTOFF_ML
    gtr_inclusive: bool = False
    use_mirroring: bool = True
    fast: bool = False  # speed preset: first fold only, no mirroring (use_mirroring is then False), bf16
    precision: str = "fp32"  # nnU-Net networks on the CPU: fp32 | bf16 (used where the CPU computes in bf16)
    nnunet_engine: str = "auto"  # auto | torch | onnxruntime (CPU fp32) | compiled (CPU, torch.compile)
    reports_only: bool = False
    clean_workdir: bool = False
    boilerplate: bool = False
    rater_groups: Path | None = None
    folds: Path | None = None
    compare: dict[str, Path] = field(default_factory=dict)
    reclassify: bool = False  # group level: one cut-off for all instead of each participant's own
    interrater_all_patients: bool = False  # group level: inter-rater Jaccard over all patients
    n_bootstrap: int = 2000
    seed: int = 0
    verbosity: int = 0
    notrack: bool = False  # accepted for fMRIPrep compatibility: runs never use the network anyway
    command_line: str = ""

    def to_json(self) -> str:
        def default(value: Any) -> Any:
            return str(value) if isinstance(value, Path) else value

        return json.dumps(asdict(self), indent=2, default=default)
