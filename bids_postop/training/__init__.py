"""Training of residual-tumour models (``bids_postop-train``).

- :mod:`.splits`: hospital-stratified folds and the held-out test site(s);
- :mod:`.datasets`: manual masks, data preparation shared with the participant level, nnU-Net raw datasets;
- :mod:`.nnunet`: plan, preprocess, train, strip and export with nnU-Net v2 (its only training-side import);
- :mod:`.agunet`: the study's AGU-Net per fold in TensorFlow worker processes, exported as a Raidionics ONNX model
  (TensorFlow code in :mod:`bids_postop.agunet`);
- :mod:`.threshold`: the probability threshold chosen on the validation folds.
"""
