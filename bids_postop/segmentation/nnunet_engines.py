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

import contextlib
import copy
import io
import itertools
import logging
import os
import shutil
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    return predict_logits_and_members(predictor, data, threads, engine)[0]


@dataclass
class MemberLogits:
    """The ensemble's members at the network's resolution: each member's logits, (heads, z, y, x) tensors on the
    CPU in the dtype nnU-Net accumulates them in (float16), one per fold (``"folds"``) or per mirrored pass of a
    single fold (``"mirrored passes"``); none for ``"none"``."""

    kind: str
    names: tuple[str, ...] = ()
    logits: list[Any] = field(default_factory=list)
    mirror_scores: list[float] | None = None  # per network: :func:`bids_postop.core.uncertainty.mirror_disagreement`


def members_kind(n_networks: int, use_mirroring: bool, mirror_axes: Any) -> str:
    """``"folds"`` when several fold networks run, ``"mirrored passes"`` for one network with test-time mirroring,
    else ``"none"``."""
    if n_networks > 1:
        return "folds"
    return "mirrored passes" if use_mirroring and mirror_axes else "none"


def mirror_combinations(mirror_axes: Any) -> list[tuple[int, ...]]:
    """nnU-Net's mirrored passes, in its order: every non-empty combination of the mirror axes (spatial axes of
    the (C, z, y, x) data; ``_internal_maybe_mirror_and_predict``)."""
    axes = [int(a) for a in mirror_axes]
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


class _Heads:
    """Stands in for the predictor's label manager during one sliding window: the same, with more output channels
    (the sliding window allocates ``num_segmentation_heads`` channels)."""

    def __init__(self, label_manager: Any, heads: int):
        self._label_manager = label_manager
        self.num_segmentation_heads = heads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._label_manager, name)


@contextlib.contextmanager
def _mirrored_passes_as_channels(predictor: Any) -> Iterator[tuple[int, list[tuple[int, ...]]]]:
    """During nnU-Net's sliding window, every tile returns the mean of its mirrored passes (nnU-Net's own
    ``_internal_maybe_mirror_and_predict``, the same operations in the same order) *followed by* each pass flipped
    back, as extra channels: the window's Gaussian weighting and accumulation then give nnU-Net's mirrored logits in
    the first ``heads`` channels, bit for bit, and each pass's own logits after them, with no extra network call.
    Yields ``heads`` and the mirror combinations (spatial axes)."""
    import torch

    heads = int(predictor.label_manager.num_segmentation_heads)
    combinations = mirror_combinations(predictor.allowed_mirroring_axes)
    n_passes = len(combinations) + 1

    def maybe_mirror_and_predict(x: Any) -> Any:
        assert max(max(c) for c in combinations) <= x.ndim - 3, "mirror_axes does not match the dimension of the input"
        passes = [predictor.network(x)]
        passes += [torch.flip(predictor.network(torch.flip(x, [a + 2 for a in c])), [a + 2 for a in c])
                   for c in combinations]
        mean = passes[0].clone()
        for one in passes[1:]:
            mean += one
        mean /= n_passes
        return torch.cat([mean, *passes], dim=1)

    label_manager = predictor.label_manager
    predictor._internal_maybe_mirror_and_predict = maybe_mirror_and_predict  # instance attribute: shadows the method
    predictor.label_manager = _Heads(label_manager, heads * (1 + n_passes))
    try:
        yield heads, combinations
    finally:
        del predictor._internal_maybe_mirror_and_predict
        predictor.label_manager = label_manager


def _mirror_score(predictor: Any, passes: Any, heads: int, n_passes: int) -> float:
    """:func:`~bids_postop.core.uncertainty.mirror_disagreement` of one network's mirrored passes (the extra
    channels of :func:`_mirrored_passes_as_channels`), foreground = class 1 of nnU-Net's inference nonlinearity."""
    from bids_postop.core.uncertainty import mirror_disagreement

    foreground = [predictor.label_manager.apply_inference_nonlin(passes[heads * k:heads * (k + 1)].float())[1]
                  .numpy() for k in range(n_passes)]
    return mirror_disagreement(foreground)


def predict_logits_and_members(predictor: Any, data: Any, threads: int, engine: str = "onnxruntime", *,
                               keep_members: bool = False, mirror_scores: bool = False) -> tuple[Any, MemberLogits]:
    """nnU-Net's fold loop (each fold's sliding window, their sum, divided by the number of folds: the operations of
    ``predict_logits_from_preprocessed_data``) with ``engine``'s fold networks (``"torch"``: the predictor's own
    network, weights loaded per fold, nnU-Net's thread cap), and, with ``keep_members``, the members' logits.

    Each fold's logits are computed once: with several folds each fold's (mirrored-averaged) logits are kept as a
    member; one fold with test-time mirroring keeps each mirrored pass (:func:`_mirrored_passes_as_channels`). The
    ensemble logits are the same with or without members. ``data`` is the preprocessed (C, z, y, x) tensor; the
    predictor's network is put back afterwards. ``mirror_scores`` (with test-time mirroring) computes each
    network's mirror score from its passes, which ride along in the same sliding window (no extra network call).
    """
    import torch

    network = predictor.network
    n_channels = int(data.shape[0])
    n_networks = len(predictor.list_of_parameters)
    kind = members_kind(n_networks, bool(predictor.use_mirroring), predictor.allowed_mirroring_axes) \
        if keep_members else "none"
    members = MemberLogits(kind)
    capture = kind == "mirrored passes" or (mirror_scores and bool(predictor.use_mirroring)
                                            and bool(predictor.allowed_mirroring_axes))
    if capture and mirror_scores:
        members.mirror_scores = []
    threads_before = torch.get_num_threads()
    if engine == "torch":
        from nnunetv2.configuration import default_num_processes

        torch.set_num_threads(min(default_num_processes, threads_before))
    prediction = None
    try:
        with torch.inference_mode():
            for index in range(n_networks):
                start = time.perf_counter()
                if engine == "torch":
                    getattr(network, "_orig_mod", network).load_state_dict(predictor.list_of_parameters[index])
                else:  # replaces (for onnxruntime: frees) the last fold's
                    predictor.network = fold_network(predictor, network, index, n_channels, engine, threads)
                if capture:
                    with _mirrored_passes_as_channels(predictor) as (heads, combinations):
                        stacked = predictor.predict_sliding_window_return_logits(data).to("cpu")
                    logits = stacked[:heads]
                    if members.mirror_scores is not None:
                        members.mirror_scores.append(_mirror_score(predictor, stacked[heads:], heads,
                                                                   len(combinations) + 1))
                    if kind == "mirrored passes":
                        members.logits.extend(stacked[heads * (k + 1):heads * (k + 2)]
                                              for k in range(len(combinations) + 1))
                        members.names = ("unmirrored", *(f"mirrored axes {'+'.join(map(str, c))}"
                                                         for c in combinations))
                    else:
                        logits = logits.clone()  # the pass channels are freed with ``stacked``
                    del stacked
                else:
                    logits = predictor.predict_sliding_window_return_logits(data).to("cpu")
                if kind == "folds":
                    members.logits.append(logits)
                    logits = logits.clone()  # the sum below is in place
                LOG.debug("fold %d (%s): %.1f s", index, engine, time.perf_counter() - start)
                if prediction is None:
                    prediction = logits
                else:
                    prediction += logits
            if n_networks > 1:
                prediction /= n_networks
    finally:
        predictor.network = network
        torch.set_num_threads(threads_before)
    if kind == "folds":
        members.names = tuple(f"fold_{index}" for index in range(n_networks))
    return prediction, members
