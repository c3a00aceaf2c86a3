"""Run an nnU-Net model's networks with onnxruntime instead of torch (CPU, fp32): same sliding window,
Gaussian weighting, mirroring and fold averaging — nnU-Net's own code — with each network call answered by
an onnxruntime session.

Why: on 2 CPU cores onnxruntime's convolutions run the study-size nnU-Net (PlainConvUNet 32–320 features,
patch 80×192×128) in 6.9–7.1 s per forward pass against torch's 9.3–9.8 s, logits within 3e-4 of torch's on
one patch; over a whole study-grid case the segmentation agrees with stock nnU-Net's at Dice 0.9995
(benchmarks/RESULTS.md). Only the network changes; nnU-Net's predictor still tiles, mirrors and averages.

Each fold's network is exported once per predictor with ``torch.onnx.export`` (fixed input shape: batch 1,
the plans' patch size; nnU-Net always calls the network on whole patches; about 10 s for the study network)
and the ONNX bytes are kept in memory beside the predictor (no file; ~63 MiB per study-size fold), so a
process that segments several participants exports once. Each fold's session is freed before the next one's
is built, so at most one session's arena is held. The network classes are those ``plans.json`` may name
(installed packages only, see ``nnunet.check_network_classes``); a network that cannot be exported or run
falls back to torch (logged by the caller).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
import weakref
from typing import Any

import numpy as np

LOG = logging.getLogger("bids_postop")

ENGINES = ("auto", "torch", "onnxruntime")

# predictor -> {(fold index, channels, patch): ONNX bytes}; entries go with the predictor (build_predictor's cache)
_EXPORTED: weakref.WeakKeyDictionary[Any, dict[tuple, bytes]] = weakref.WeakKeyDictionary()


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


def exported_network(predictor: Any, index: int, n_channels: int) -> bytes:
    """The ONNX bytes of the predictor's fold ``index``, exported on first use."""
    patch_size = [int(v) for v in predictor.configuration_manager.patch_size]
    models = _EXPORTED.setdefault(predictor, {})
    key = (index, n_channels, tuple(patch_size))
    if key not in models:
        start = time.perf_counter()
        models[key] = export_network(predictor.network, predictor.list_of_parameters[index], n_channels, patch_size)
        LOG.debug("network %d exported for onnxruntime in %.1f s", index, time.perf_counter() - start)
    return models[key]


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
    network = predictor.network
    n_channels = int(data.shape[0])
    prediction = None
    try:
        for index in range(len(predictor.list_of_parameters)):
            model = exported_network(predictor, index, n_channels)
            predictor.network = OnnxNetwork(make_session(model, threads))  # replaces (frees) the last fold's
            logits = predictor.predict_sliding_window_return_logits(data).to("cpu")
            prediction = logits if prediction is None else prediction + logits
    finally:
        predictor.network = network
    if len(predictor.list_of_parameters) > 1:
        prediction /= len(predictor.list_of_parameters)
    return prediction
