"""Engines that run an nnU-Net model's networks: torch (nnU-Net's own), onnxruntime, and torch compiled by
inductor with weight freezing. The sliding window, Gaussian weighting, mirroring and fold averaging stay
nnU-Net's own code; only each network call is answered by the engine's fold network.

**onnxruntime** (CPU, fp32; ``auto``'s choice there). On 2 CPU cores onnxruntime's convolutions run the
study-size nnU-Net (PlainConvUNet 32–320 features, patch 80×192×128) in 6.9–7.1 s per forward pass against
torch's 9.3–9.8 s, logits within 3e-4 of torch's on one patch; over a whole study-grid case the segmentation
agrees with stock nnU-Net's at Dice 0.9995 (benchmarks/RESULTS.md). Each fold's network is exported once per
predictor with ``torch.onnx.export`` (fixed input shape: batch 1, the plans' patch size; nnU-Net always calls
the network on whole patches; about 10 s for the study network) and the ONNX bytes are kept in memory beside
the predictor (no file; ~63 MiB per study-size fold), so a process that segments several participants exports
once. Each fold's session is freed before the next one's is built, so at most one session's arena is held.

**compiled** (``--nnunet-engine compiled``; CPU). ``torch.compile`` with inductor's ``freezing``: the fold's
weights become constants of the compiled graph, which lets oneDNN pre-pack them. Study patch on 2 cores:
3.1–3.2 s with bf16 autocast (eager bf16 4.7–5.0 s), 6.2 s in fp32 (onnxruntime 7.3 s); the study case's
segmentation step took 0.64× stock nnU-Net's time with identical output in fp32, 0.38× in bf16
(benchmarks/RESULTS.md). Compiling costs ~40 s the first time and ~10 s once inductor's on-disk cache holds
the graph, and needs a C++ compiler, so it pays on study-size images and is never chosen by ``auto``. Because
frozen weights are copied into the graph, each fold gets its own network copy (kept with the predictor, like
the ONNX bytes), compiled once and never reloaded (nnU-Net's fold loop reloads weights into one network,
which a frozen graph would not see).

The network classes are those ``plans.json`` may name (installed packages only, see
``nnunet.check_network_classes``); a network that an engine cannot export, compile or run falls back to torch
(logged by the caller).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import shutil
import time
import warnings
import weakref
from typing import Any

import numpy as np

LOG = logging.getLogger("bids_postop")

ENGINES = ("auto", "torch", "onnxruntime", "compiled")

# predictor -> {(fold index, channels, patch): ONNX bytes}; entries go with the predictor (build_predictor's cache)
_EXPORTED: weakref.WeakKeyDictionary[Any, dict[tuple, bytes]] = weakref.WeakKeyDictionary()
# predictor -> {fold index: compiled fold network}
_COMPILED: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


def resolve_engine(engine: str, device: str, bf16: bool = False) -> str:
    """The engine that runs: ``auto`` is onnxruntime on the CPU in fp32 (faster there), torch on a GPU
    (nnU-Net's own fp16 autocast) or with bf16 (torch's CPU autocast). ``compiled`` is for the CPU (on a GPU
    nnU-Net's torch path runs)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if engine == "auto":
        return "onnxruntime" if device == "cpu" and not bf16 and onnxruntime_available() else "torch"
    if engine == "compiled" and device != "cpu":
        return "torch"
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


class EngineNetwork:
    """What stands in for the torch network in nnU-Net's predictor: called with a (1, C, *patch) tensor, it
    returns the logits tensor. ``to``/``eval`` are accepted (the predictor calls them) and do nothing."""

    def to(self, *_: Any, **__: Any) -> EngineNetwork:
        return self

    def eval(self) -> EngineNetwork:
        return self


class OnnxNetwork(EngineNetwork):
    """The network's calls answered by an onnxruntime session."""

    def __init__(self, session: Any):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: Any) -> Any:
        import torch

        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)  # flips give negative strides
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


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


def exported_network(predictor: Any, index: int, n_channels: int, network: Any) -> bytes:
    """The ONNX bytes of the predictor's fold ``index`` (``network``: the predictor's torch network, not what
    answers its calls now), exported on first use."""
    patch_size = [int(v) for v in predictor.configuration_manager.patch_size]
    models = _EXPORTED.setdefault(predictor, {})
    key = (index, n_channels, tuple(patch_size))
    if key not in models:
        start = time.perf_counter()
        models[key] = export_network(network, predictor.list_of_parameters[index], n_channels, patch_size)
        LOG.debug("network %d exported for onnxruntime in %.1f s", index, time.perf_counter() - start)
    return models[key]


def make_session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (``$CXX``, g++, c++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


class FrozenCompiledNetwork(EngineNetwork):
    """A ``torch.compile``d network called with inductor's ``freezing`` on. Freezing is read while compiling,
    which happens at the first call (and at a recompile, e.g. when bf16 autocast is switched on), so every call
    runs under the setting; ``torch.compile(options={"freezing": True})`` does not reach that step (measured:
    eager speed)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled

    def __call__(self, x: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


def compiled_network(predictor: Any, index: int, network: Any) -> Any:
    """The predictor's fold ``index`` as its own copy of ``network`` (the predictor's torch network, not
    whatever answers its calls now) compiled with inductor freezing (once per predictor; compiling happens at
    the first call)."""
    import torch

    networks = _COMPILED.setdefault(predictor, {})
    if index not in networks:
        if cxx_compiler() is None:
            raise RuntimeError("torch.compile on the CPU needs a C++ compiler (g++ or clang++; none on PATH)")
        # inductor's C++ build logs "No CUDA runtime is found" at WARNING on CPU-only machines: not a problem here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        fold = copy.deepcopy(getattr(network, "_orig_mod", network))
        fold.load_state_dict(predictor.list_of_parameters[index])
        fold.eval()
        networks[index] = FrozenCompiledNetwork(torch.compile(fold))
    return networks[index]


def fold_network(predictor: Any, network: Any, index: int, n_channels: int, engine: str, threads: int) -> Any:
    """What answers fold ``index``'s network calls for ``engine`` (onnxruntime or compiled); ``network`` is
    the predictor's torch network."""
    if engine == "onnxruntime":
        return OnnxNetwork(make_session(exported_network(predictor, index, n_channels, network), threads))
    if engine == "compiled":
        return compiled_network(predictor, index, network)
    raise ValueError(f"engine {engine!r} has no fold networks (torch runs nnU-Net's own loop)")


def predict_logits(predictor: Any, data: Any, threads: int, engine: str = "onnxruntime") -> Any:
    """nnU-Net's ``predict_logits_from_preprocessed_data`` (fold loop, sum, mean) with ``engine``'s fold
    networks.

    ``data`` is the preprocessed (C, z, y, x) tensor. The predictor's torch network is put back afterwards.
    """
    network = predictor.network
    n_channels = int(data.shape[0])
    prediction = None
    try:
        for index in range(len(predictor.list_of_parameters)):
            start = time.perf_counter()
            # replaces (for onnxruntime: frees) the last fold's
            predictor.network = fold_network(predictor, network, index, n_channels, engine, threads)
            logits = predictor.predict_sliding_window_return_logits(data).to("cpu")
            LOG.debug("fold %d (%s): %.1f s", index, engine, time.perf_counter() - start)
            prediction = logits if prediction is None else prediction + logits
    finally:
        predictor.network = network
    if len(predictor.list_of_parameters) > 1:
        prediction /= len(predictor.list_of_parameters)
    return prediction
