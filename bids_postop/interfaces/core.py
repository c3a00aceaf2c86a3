"""Thin nipype interfaces: each unpacks its inputs and calls one plain function of the core."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_postop.settings import resolve_device

ROLE_TRAITS = ("postop_t1ce", "postop_t1", "postop_flair", "preop_t1ce", "preop_mask")
# Intermediate images that stay in the work directory are written uncompressed: on a 430×461×180 float32
# grid gzip costs ~1 s per write and per read on 2 cores (several per image along the pipeline), for files
# that are deleted with the work directory. Files copied into the derivatives stay .nii.gz.
WORK_NIFTI = "{}.nii"


class _RegisterInputSpec(BaseInterfaceInputSpec):
    fixed = File(exists=True, mandatory=True)
    moving = File(exists=True, mandatory=True)
    kind = traits.Enum("rigid", "affine", "syn", mandatory=True)
    fixed_mask = File(exists=True)
    threads = traits.Int(1, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    transforms = InputMultiObject(File(exists=True))


class Register(SimpleInterface):
    """ANTs registration of ``moving`` onto ``fixed`` (:func:`bids_postop.core.registration.register`)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from bids_postop.core.registration import register

        result = register(self.inputs.fixed, self.inputs.moving, kind=self.inputs.kind,
                          out_prefix=Path(runtime.cwd) / "reg_",
                          fixed_mask=self.inputs.fixed_mask if isdefined(self.inputs.fixed_mask) else None,
                          threads=self.inputs.threads)
        self._results["transforms"] = [str(t) for t in result.transforms]
        return runtime


class _ApplyTransformsInputSpec(BaseInterfaceInputSpec):
    moving = File(exists=True, mandatory=True)
    reference = File(exists=True, mandatory=True)
    transforms = InputMultiObject(File(exists=True), mandatory=True)
    interpolation = traits.Enum("linear", "nearest", usedefault=True)


class _OutFileSpec(TraitedSpec):
    out_file = File(exists=True)


class ApplyTransforms(SimpleInterface):
    """Resample onto the reference grid (exact reference shape and affine)."""

    input_spec = _ApplyTransformsInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        from bids_postop.core.registration import apply_transforms

        out = apply_transforms(self.inputs.moving, self.inputs.reference, self.inputs.transforms,
                               interpolation=self.inputs.interpolation,
                               out_file=Path(runtime.cwd) / WORK_NIFTI.format("registered"))
        self._results["out_file"] = str(out)
        return runtime


class _BrainInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    method = traits.Enum("deepbet", "hdbet", "raidionics", usedefault=True)
    model_folder = traits.Str(desc="Raidionics brain model folder (method raidionics)")
    device = traits.Str("cpu", usedefault=True)
    threads = traits.Int(1, usedefault=True)


class BrainExtraction(SimpleInterface):
    """Brain mask of the post-op T1w-CE with a pretrained network."""

    input_spec = _BrainInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        from bids_postop.core.brain import extract_brain

        out = extract_brain(self.inputs.in_file, method=self.inputs.method,
                            out_mask=Path(runtime.cwd) / "brain_mask.nii.gz",
                            device=resolve_device(self.inputs.device), threads=self.inputs.threads,
                            model_folder=self.inputs.model_folder if isdefined(self.inputs.model_folder) else None,
                            report=(report := {}))
        # what it did (threads, the grid the network got, seconds per stage): a slow step told from a slow machine
        (Path(runtime.cwd) / "brain_extraction.json").write_text(json.dumps(report, indent=2, default=str))
        self._results["out_file"] = str(out)
        return runtime


class _MaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)


class ApplyBrainMask(SimpleInterface):
    """Skull stripping: zero outside the brain mask."""

    input_spec = _MaskInputSpec
    output_spec = _OutFileSpec

    def _run_interface(self, runtime):
        from bids_postop.core.brain import apply_brain_mask

        out = apply_brain_mask(self.inputs.in_file, self.inputs.mask,
                               out_file=Path(runtime.cwd) / WORK_NIFTI.format("skullstripped"))
        self._results["out_file"] = str(out)
        return runtime


class _SegmentInputSpec(BaseInterfaceInputSpec):
    model_folder = traits.Str(mandatory=True, desc="folder holding the model card")
    model_digest = traits.Str(desc="content digest of the model's card and weights: part of the node's hash, so a "
                                   "cached probability map is reused only for the same model bytes")
    device = traits.Str("cpu", usedefault=True)
    threads = traits.Int(1, usedefault=True)
    use_mirroring = traits.Bool(True, usedefault=True)
    trust_checkpoint = traits.Bool(False, usedefault=True, desc="allow full (pickle) loading of nnU-Net checkpoints")
    first_fold_only = traits.Bool(False, usedefault=True, desc="run only the model's first fold (--fast)")
    precision = traits.Enum("fp32", "bf16", usedefault=True, desc="nnU-Net networks on the CPU (--precision)")
    nnunet_engine = traits.Enum("auto", "torch", "onnxruntime", "compiled", usedefault=True, desc="--nnunet-engine")
    postop_t1ce = File(exists=True, mandatory=True)
    postop_t1 = File(exists=True)
    postop_flair = File(exists=True)
    preop_t1ce = File(exists=True)
    preop_mask = File(exists=True)
    brain_mask = File(exists=True, desc="brain mask on the post-op T1w-CE grid (Raidionics cropping)")
    assess_uncertainty = traits.Bool(True, usedefault=True, desc="keep the ensemble's members and assess them "
                                     "(outputs uncertainty, uncertainty_json); False: both undefined")
    # the ensemble's post-processing, applied to every member (bids_postop.core.uncertainty)
    threshold = traits.Float(0.5, usedefault=True, desc="probability threshold (the model card's)")
    min_component_voxels = traits.Int(20, usedefault=True)
    gtr_cutoff_ml = traits.Float(0.175, usedefault=True)
    gtr_inclusive = traits.Bool(False, usedefault=True)


class _SegmentOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    run_info = File(exists=True, desc="JSON: what the backend ran (folds, networks, mirroring, tile step)")
    uncertainty = File(exists=True, desc="float32 map on the post-op T1w-CE grid: the members' standard deviation "
                                         "of the foreground probability; undefined when there are no members")
    uncertainty_json = File(exists=True, desc="JSON: members kind and count, member volumes and GTR/RT calls, "
                                              "min/max, rt_fraction_members, score, review_flag and reasons")


class Segment(SimpleInterface):
    """Residual-tumour probability on the post-op T1w-CE grid, channels in the model's order, and the ensemble
    members' uncertainty and review flag (:func:`bids_postop.core.uncertainty.assess_members`)."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        from bids_postop.core.images import write_like
        from bids_postop.core.uncertainty import assess_members
        from bids_postop.segmentation.backend import predict
        from bids_postop.segmentation.models import resolve_models, review_settings

        _set_threads(self.inputs.threads)
        [card] = resolve_models(self.inputs.model_folder)
        review = review_settings(card)  # a bad card fails before the network runs
        channels = []
        for role in card.channels:
            value = getattr(self.inputs, role)
            if not isdefined(value):
                raise ValueError(f"model {card.name} needs the {role} channel, which was not connected")
            channels.append(value)
        prediction = predict(
            card, channels, brain_mask=self.inputs.brain_mask if isdefined(self.inputs.brain_mask) else None,
            device=resolve_device(self.inputs.device), threads=self.inputs.threads,
            use_mirroring=self.inputs.use_mirroring, trust_checkpoint=self.inputs.trust_checkpoint,
            first_fold_only=self.inputs.first_fold_only, precision=self.inputs.precision,
            nnunet_engine=self.inputs.nnunet_engine, keep_members=self.inputs.assess_uncertainty, report=(report := {}))
        report.setdefault("device", resolve_device(self.inputs.device))  # what ran, for the report and methods
        reference = nib.load(self.inputs.postop_t1ce)
        out = write_like(prediction.probability, reference, Path(runtime.cwd) / "probseg.nii.gz")
        self._results["out_file"] = str(out)
        info = Path(runtime.cwd) / "segment.json"
        info.write_text(json.dumps(report, indent=2))
        self._results["run_info"] = str(info)
        if not self.inputs.assess_uncertainty:
            return runtime
        # members cover the backend's crop (members.box), outside which the ensemble is 0: only that part of the
        # ensemble is kept while they are assessed (memory on very large grids)
        members, probability, mirror_scores = prediction.members, prediction.probability, prediction.mirror_scores
        del prediction
        # per-fold thresholds and votes apply to fold members; mirrored passes of one fold keep the card's threshold
        member_thresholds, votes = review.for_members(members.names) if members.kind == "folds" else (None, None)
        if members.box is not None:
            probability = np.array(members.crop(probability))
        voxel_map, summary = assess_members(
            members, probability, reference.affine, kind=members.kind, names=members.names,
            threshold=self.inputs.threshold, min_component_voxels=self.inputs.min_component_voxels,
            cutoff_ml=self.inputs.gtr_cutoff_ml, gtr_inclusive=self.inputs.gtr_inclusive,
            score_threshold=review.score_threshold, member_thresholds=member_thresholds, voting=votes,
            mirror_scores=mirror_scores)
        del probability
        if voxel_map is not None:
            voxel_map = members.paste(voxel_map, reference.shape[:3])
            self._results["uncertainty"] = str(write_like(voxel_map, reference,
                                                          Path(runtime.cwd) / "uncertainty.nii.gz"))
        summary_file = Path(runtime.cwd) / "uncertainty.json"
        summary_file.write_text(json.dumps(summary.to_dict(), indent=2))
        self._results["uncertainty_json"] = str(summary_file)
        return runtime


class _PostInputSpec(BaseInterfaceInputSpec):
    probseg = File(exists=True, mandatory=True)
    threshold = traits.Float(mandatory=True)
    min_component_voxels = traits.Int(20, usedefault=True)
    gtr_cutoff_ml = traits.Float(0.175, usedefault=True)
    gtr_inclusive = traits.Bool(False, usedefault=True)
    preop_mask = File(exists=True, desc="pre-op tumour mask in its own (pre-op) grid")
    nonenhancing_mask = File(exists=True, desc="post-op non-enhancing residual tumour mask, any grid (RANO 1 vs 2A)")


class _PostOutputSpec(TraitedSpec):
    residual_mask = File(exists=True)
    measures = File(exists=True)


class PostProcess(SimpleInterface):
    """Threshold, remove small components, measure volumes, GTR/RT and EOR; RANO resect class and the
    residual's bidimensional product (:mod:`bids_postop.core.rano`, :mod:`bids_postop.core.bidimensional`)."""

    input_spec = _PostInputSpec
    output_spec = _PostOutputSpec

    def _run_interface(self, runtime):
        import numpy as np

        from bids_postop.core.images import load_3d, write_like
        from bids_postop.core.postprocess import postprocess_probability, volume_ml

        prob_img = load_3d(self.inputs.probseg, what="probability map")
        preop_ml = None
        if isdefined(self.inputs.preop_mask):
            from bids_postop.core.masks import load_binary_mask

            preop = load_binary_mask(self.inputs.preop_mask, what="pre-operative tumour mask")
            preop_ml = volume_ml(np.asarray(preop.dataobj) > 0, preop.affine)  # |det(affine)| per voxel
        mask, measures = postprocess_probability(
            np.asarray(prob_img.dataobj, dtype=np.float32), prob_img.affine,
            threshold=self.inputs.threshold, min_component_voxels=self.inputs.min_component_voxels,
            cutoff_ml=self.inputs.gtr_cutoff_ml, gtr_inclusive=self.inputs.gtr_inclusive,
            preop_volume_ml=preop_ml)
        self._results["residual_mask"] = str(write_like(mask, prob_img, Path(runtime.cwd) / "residual_mask.nii.gz",
                                                        dtype="uint8"))
        values = measures.as_dict()
        values.update(residual_shape_measures(
            mask, prob_img.affine, values, nonenhancing_mask=self.inputs.nonenhancing_mask
            if isdefined(self.inputs.nonenhancing_mask) else None, gtr_cutoff_ml=self.inputs.gtr_cutoff_ml,
            gtr_inclusive=self.inputs.gtr_inclusive))
        out = Path(runtime.cwd) / "measures.json"
        out.write_text(json.dumps(values, indent=2))
        self._results["measures"] = str(out)
        return runtime


def residual_shape_measures(mask, affine, measures: dict, *, nonenhancing_mask: str | None, gtr_cutoff_ml: float,
                            gtr_inclusive: bool) -> dict:
    """The RANO resect class (the study's GTR cut-off counts as "0 cm3 residual enhancing tumour") and the
    residual's bidimensional product, as measures keys."""
    import numpy as np

    from bids_postop.core.bidimensional import measure_bidimensional
    from bids_postop.core.masks import nonenhancing_volume_ml
    from bids_postop.core.rano import rano_resect_class

    nonenhancing_ml = nonenhancing_volume_ml(nonenhancing_mask) if nonenhancing_mask else None
    rano = rano_resect_class(measures["residual_volume_ml"], measures.get("preop_volume_ml"),
                             residual_nonce_ml=nonenhancing_ml, zero_ce_cutoff_ml=gtr_cutoff_ml,
                             zero_ce_inclusive=gtr_inclusive)
    shape = measure_bidimensional(np.asarray(mask) > 0, affine)
    return {"residual_nonenhancing_ml": nonenhancing_ml, "rano_resect_class": rano.label, "rano": rano.to_dict(),
            "measurable_lesions": shape.n_measurable, "sum_bidimensional_mm2": shape.sum_products_mm2,
            "bidimensional": shape.to_dict()}


def _set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(max(1, threads))
