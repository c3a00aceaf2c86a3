"""Run an nnU-Net model's networks with onnxruntime instead of torch (CPU, fp32): same sliding window,
Gaussian weighting, mirroring and fold averaging — nnU-Net's own code — with each network call answered by
an onnxruntime session.

Why: on 2 CPU cores onnxruntime's convolutions run the study-size nnU-Net (PlainConvUNet 32–320 features,
patch 80×192×128) in 6.9–7.1 s per forward pass against torch's 9.3–9.8 s, logits within 3e-4 of torch's on
one patch; over a whole study-grid case the segmentation agrees with stock nnU-Net's at Dice 0.9995
(benchmarks/RESULTS.md). Only the network changes; nnU-Net's predictor still tiles, mirrors and averages.

Each fold's network is exported once per process with ``torch.onnx.export`` (fixed input shape: batch 1, the
plans' patch size; nnU-Net always calls the network on whole patches), kept in memory (no file), and its
session is freed before the next fold's is built, so at most one session's arena is held. Export is only
attempted for the known nnU-Net network classes; anything it cannot export falls back to torch (logged).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from typing import Any

import numpy as np

LOG = logging.getLogger("bids_postop")

ENGINES = ("auto", "torch", "onnxruntime")


def resolve_engine(engine: str, device: str, bf16: bool = False) -> str:
    """The engine that runs: ``auto`` is onnxruntime on the CPU in fp32 (faster there), torch on a GPU
    (nnU-Net's own fp16 autocast) or with bf16 (torch's CPU autocast)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if engine == "auto":
        return "onnxruntime" if device == "cpu" and not bf16 and onnxruntime_available() else "torch"
    return engine


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) that oneDNN uses; elsewhere bf16 autocast
    is emulated and slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class OnnxNetwork:
    """Callable with the torch network's signature for nnU-Net's predictor: (1, C, *patch) tensor in,
    logits tensor out. ``to``/``eval`` are accepted (the predictor calls them) and do nothing."""

    def __init__(self, session: Any):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: Any) -> Any:
        import torch

        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)  # flips give negative strides
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def to(self, *_: Any, **__: Any) -> OnnxNetwork:
        return self

    def eval(self) -> OnnxNetwork:
        return self


def export_network(network: Any, parameters: dict, n_channels: int, patch_size: list[int]) -> bytes:
    """ONNX bytes of ``network`` with ``parameters`` loaded, for one (1, C, *patch) input."""
    import torch

    network.load_state_dict(parameters)
    network.eval()
    example = torch.zeros((1, n_channels, *patch_size), dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # instance-norm "training mode" and tracer notices: eval mode is exported
        torch.onnx.export(network, (example,), buffer, input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
    return buffer.getvalue()


def make_session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def predict_logits(predictor: Any, data: Any, threads: int) -> Any:
    """nnU-Net's ``predict_logits_from_preprocessed_data`` (fold loop, sum, mean) with onnxruntime networks.

    ``data`` is the preprocessed (C, z, y, x) tensor. The predictor's torch network is put back afterwards.
    """
    import torch

    network = predictor.network
    patch_size = list(predictor.configuration_manager.patch_size)
    n_channels = int(data.shape[0])
    prediction = None
    try:
        for index, parameters in enumerate(predictor.list_of_parameters):
            start = time.perf_counter()
            session = make_session(export_network(network, parameters, n_channels, patch_size), threads)
            LOG.debug("network %d exported to onnxruntime in %.1f s", index, time.perf_counter() - start)
            predictor.network = OnnxNetwork(session)
            logits = predictor.predict_sliding_window_return_logits(data).to("cpu")
            prediction = logits if prediction is None else prediction + logits
            predictor.network = network
            del session
    finally:
        predictor.network = network
    if len(predictor.list_of_parameters) > 1:
        prediction /= len(predictor.list_of_parameters)
    return prediction if isinstance(prediction, torch.Tensor) else torch.as_tensor(prediction)
