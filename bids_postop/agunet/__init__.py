"""AGU-Net (the study's full-volume network): Keras architecture, training and export to the Raidionics
ONNX format that the participant level runs with onnxruntime.

TensorFlow lives in its own process (``python -m bids_postop.agunet.worker``): importing this package, or any
of its modules, does not import TensorFlow; the functions that need Keras import it when called.
"""
