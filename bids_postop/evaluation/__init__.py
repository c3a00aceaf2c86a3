"""Evaluation against manual annotations: metrics, patient-wise classification, inter-rater study, tests.

Pure numpy/scipy; the group level (:mod:`bids_postop.group`) reads the images and writes the tables.
"""
