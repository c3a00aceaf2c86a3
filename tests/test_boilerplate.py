"""The methods paragraph says what ran: architecture and configuration from the model card, folds, test-time
augmentation, engine, brain extraction; its BibTeX holds exactly the references it cites."""

from __future__ import annotations

import re

from bids_postop.reports.boilerplate import RunDescription, bibtex, methods_markdown, methods_text, write_methods

NNUNET_RUN = {
    "model": {"name": "whatever-name", "architecture": "nnunet", "configuration": "B", "threshold": 0.4},
    "measures": {"min_component_voxels": 20, "gtr_cutoff_ml": 0.175, "gtr_rule": "GTR if residual <= 0.175 ml"},
    "provenance": {"versions": {"nnunetv2": "2.8.1", "deepbet": "1.0.2"},
                   "brain_extraction": {"method": "deepbet"},
                   "segmentation": {"backend": "nnunet", "folds": [0, 1, 2, 3, 4], "use_mirroring": False,
                                    "mirror_axes": [], "engine": "onnxruntime", "precision": "fp32"},
                   "preset": {"name": "default", "test_time_mirroring": True}},
}
AGUNET_RUN = {
    "model": {"name": "nnunet-looking-name", "architecture": "raidionics", "configuration": "E", "threshold": 0.6},
    "measures": {"min_component_voxels": 20, "gtr_cutoff_ml": 0.175, "gtr_rule": "GTR if residual < 0.175 ml"},
    "provenance": {"versions": {"onnxruntime": "1.32.0"},
                   "brain_extraction": {"method": "raidionics", "model": "MRI_Brain"},
                   "segmentation": {"backend": "raidionics", "n_networks": 5, "use_mirroring": False}},
}


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_an_nnunet_run_is_described_from_what_ran():
    text = _one_line(methods_markdown(RunDescription.from_measures(NNUNET_RUN)))
    assert "nnU-Net v2 2.8.1" in text and "input configuration B; whatever-name" in text
    assert "logits of 5 folds averaged, without test-time augmentation, onnxruntime engine" in text
    assert "mirroring" not in text  # the preset asked for it, the backend did not run it: what ran wins
    assert "at or below 0.175 ml" in text and "threshold (0.4)" in text and "deepbet" in text
    assert "AGU-Net" not in text


def test_an_agunet_run_is_never_called_nnunet_whatever_its_name():
    desc = RunDescription.from_measures(AGUNET_RUN)
    text = _one_line(methods_markdown(desc))
    assert "AGU-Net full-volume model" in text and "input configuration E" in text
    assert "softmax outputs of 5 fold networks averaged, without test-time augmentation" in text
    assert "nnU-Net v2" not in text and "with mirroring" not in text
    assert "Raidionics brain model MRI_Brain" in text
    refs = text.split("References", 1)[1]
    assert "Meningioma segmentation" in refs and "Raidionics: an open software" in refs
    assert "Isensee F, Jaeger" not in refs
    bib = bibtex(desc)
    assert bib.count("@article{") == len(re.findall(r"\[\d+\] ", refs)) == 6
    assert "bids_postop:agunet" in bib and "bids_postop:nnunet" not in bib


def test_the_settings_only_call_still_works_and_files_are_written(tmp_path):
    text = methods_text(versions={}, fast=True, precision="bf16",
                        models=[{"architecture": "nnunet", "configuration": "A", "name": "m"}])
    assert "only the model's first fold, without test-time augmentation, bfloat16" in text
    md, bib = write_methods(RunDescription.from_measures(AGUNET_RUN), tmp_path)
    assert md.read_text().startswith("Residual tumour was measured") and bib.read_text().startswith("@article")
    # outputs of older versions lack most of it: the defaults are said, nothing is guessed from names
    bare = _one_line(methods_markdown(RunDescription.from_measures({"measures": {"gtr_cutoff_ml": None}})))
    assert "below 0.175 ml" in bare and "nnU-Net v2" in bare
