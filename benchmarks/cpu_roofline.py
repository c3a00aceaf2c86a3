"""Benchmark: how close the nnU-Net forward pass is to what this CPU can compute (issue #9; by hand).

    python benchmarks/cpu_roofline.py [--models DIR] [--threads 2] [--repeats 2] [--quick]

The segmentation step's time is the sliding window's forward passes (36 on the study case). This script says
whether a faster engine could still shorten them with the same arithmetic:

- the study network's work per patch, counted from its layers (multiply-accumulates of every convolution and
  transposed convolution for one 1×C×patch input; ×2 = floating-point operations);
- the CPU's attainable throughput: a 4096×4096×4096 matrix product (oneDNN/MKL through torch) in fp32 and bf16;
- each engine's forward pass (torch fp32, onnxruntime fp32, torch bf16 autocast, and with a C++ compiler the
  compiled engine in fp32 and bf16), its time (best of ``--repeats`` after a first call, whose time is given
  too: it includes the compile) and its achieved GFLOP/s as a share of the matrix-product figure of the same
  precision.

Random weights (benchmarks/make_study_models.py, fold 0; built under ``--models`` when missing): timing does not
depend on them. Prints one JSON object (machine, versions, figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_cases import machine  # noqa: E402


def network_macs(network, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of every (transposed) convolution of ``network`` for one input of ``shape``."""
    import torch

    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        if isinstance(module, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            total += inputs[0].numel() * module.out_channels * kernel // module.groups
        else:
            total += output.numel() * (module.in_channels // module.groups) * kernel

    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    handles = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            network(torch.zeros(shape))
    finally:
        for handle in handles:
            handle.remove()
    return total


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(dtype, repeats: int, n: int = 4096) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up (oneDNN/MKL kernel selection)
    return 2 * n ** 3 / best_of(repeats * 2, lambda: a @ b) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/study_models"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="forward passes per engine (best is kept)")
    parser.add_argument("--quick", action="store_true", help="the ~8x cheaper study-like model")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import make_study_models as msm

    from bids_postop.segmentation import nnunet_engines
    from bids_postop.segmentation.nnunet import build_predictor

    name = "nnunet_B_quick" if args.quick else "nnunet_B"
    folder = args.models.resolve() / name / "nnunet"
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        msm.build_nnunet_model(args.models.resolve(), folds=5, quick=args.quick)
    predictor = build_predictor(folder, (0,), "checkpoint_final.pth", "cpu", use_mirroring=False,
                                tile_step_size=0.5)
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    patch = [int(v) for v in predictor.configuration_manager.patch_size]
    shape = (1, 2, *patch)
    gflop = 2 * network_macs(network, shape) / 1e9
    peak = {"fp32": gemm_gflops(torch.float32, args.repeats), "bf16": gemm_gflops(torch.bfloat16, args.repeats)}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def torch_fp32() -> None:
        with torch.inference_mode():
            network(x)

    def torch_bf16() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            network(x)

    exported = nnunet_engines.export_network(network, predictor.list_of_parameters[0], 2, patch)
    session = nnunet_engines.make_session(exported, args.threads)
    ort_net = nnunet_engines.OnnxNetwork(session)
    engines = {"torch fp32": (torch_fp32, "fp32"), "onnxruntime fp32": (lambda: ort_net(x), "fp32")}
    bf16 = nnunet_engines.cpu_computes_bf16()
    if bf16:
        engines["torch bf16 autocast"] = (torch_bf16, "bf16")
    if nnunet_engines.cxx_compiler():
        compiled = nnunet_engines.compiled_network(predictor, 0, network)

        def compiled_run(enabled: bool) -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                compiled(x)

        engines["compiled fp32"] = (lambda: compiled_run(False), "fp32")
        if bf16:
            engines["compiled bf16 autocast"] = (lambda: compiled_run(True), "bf16")
    forward = {}
    for label, (run, precision) in engines.items():
        start = time.perf_counter()
        run()  # warm-up (the compiled engine compiles here)
        first = time.perf_counter() - start
        seconds = best_of(args.repeats, run)
        forward[label] = {"s": round(seconds, 2), "first_call_s": round(first, 1),
                          "gflop_per_s": round(gflop / seconds, 1),
                          "share_of_gemm_peak": round(gflop / seconds / peak[precision], 2)}
        print(f"{label}: {seconds:.2f} s, {gflop / seconds:.0f} GFLOP/s", file=sys.stderr, flush=True)
    info = machine()
    print(json.dumps({"machine": info, "model": name, "patch": patch, "threads": args.threads,
                      "gflop_per_patch": round(gflop, 1),
                      "gemm_gflop_per_s": {k: round(v, 1) for k, v in peak.items()}, "forward": forward}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
