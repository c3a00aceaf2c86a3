"""Benchmark: time per training epoch of the study-size nnU-Net (issue #4; by hand, not in CI).

    python benchmarks/nnunet_epoch_time.py [--device cuda|cpu] [--iterations 20] [--warmup 3] [--quick]
        [--workdir /tmp/epoch_time]

Runs nnU-Net's own ``nnUNetTrainer.train_step`` (its optimiser, deep-supervision Dice + CE loss, gradient
clipping, fp16 autocast and grad scaler on CUDA, ``torch.compile`` where nnU-Net enables it) on the study's
3d_fullres configuration (benchmarks/make_study_models.py: PlainConvUNet 32–320 features, patch 80×192×128,
batch 2, two input channels) with random batches, and reports seconds per iteration and per epoch (nnU-Net's
250 training iterations + 50 validation forward passes). Data loading and augmentation are not included: they
run in nnU-Net's background workers and, on a machine with few CPU cores, may be slower than the GPU — the
figure is the network's share of an epoch. ``--quick``: the ~8× cheaper geometry, for checking the script on
a CPU. Prints one JSON line with the machine, versions and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_study_models import CHANNELS, QUICK, STUDY, nnunet_plans  # noqa: E402
from study_cases import machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--iterations", type=int, default=20, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compile, cuDNN tuning)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nnunet_epoch_"))
    plans = nnunet_plans(QUICK if args.quick else STUDY)
    for env in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[env] = str(workdir / env)
        (workdir / env).mkdir(parents=True, exist_ok=True)
    preprocessed = workdir / "nnUNet_preprocessed" / plans["dataset_name"] / "nnUNetPlans_3d_fullres"
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / "none.b2nd").touch()  # initialize() infers the dataset class from file endings; never read
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    dataset = {"channel_names": CHANNELS, "labels": {"background": 0, "residual_tumor": 1}, "numTraining": 0,
               "file_ending": ".nii.gz"}
    device = torch.device(args.device)
    plans["continue_training"] = False  # nnunetv2 2.8 pops this key (set by its run_training entry point)
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset, device=device)
    trainer.initialize()
    patch = list(trainer.configuration_manager.patch_size)
    batch = trainer.configuration_manager.batch_size
    generator = torch.Generator().manual_seed(0)
    data = torch.randn((batch, 2, *patch), generator=generator)
    full = (torch.rand((batch, 1, *patch), generator=generator) > 0.97).float()
    targets = []
    for scale in trainer._get_deep_supervision_scales():  # nnU-Net's deep-supervision targets, downsampled
        shape = [max(1, round(p * s)) for p, s in zip(patch, scale, strict=True)]
        targets.append(torch.nn.functional.interpolate(full, size=shape, mode="nearest"))

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    trainer.network.train()
    for _ in range(args.warmup):
        trainer.train_step({"data": data, "target": targets})
    synchronize()
    start = time.perf_counter()
    for _ in range(args.iterations):
        trainer.train_step({"data": data, "target": targets})
    synchronize()
    train_s = (time.perf_counter() - start) / args.iterations
    trainer.network.eval()
    with torch.no_grad():
        trainer.validation_step({"data": data, "target": targets})
        synchronize()
        start = time.perf_counter()
        n_val = max(1, args.iterations // 4)
        for _ in range(n_val):
            trainer.validation_step({"data": data, "target": targets})
        synchronize()
    val_s = (time.perf_counter() - start) / n_val
    result = {
        "geometry": "quick" if args.quick else "study", "patch_size": patch, "batch_size": batch,
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "compiled": trainer._do_i_compile(), "train_iteration_s": round(train_s, 4),
        "val_iteration_s": round(val_s, 4),
        "epoch_s_network": round(trainer.num_iterations_per_epoch * train_s
                                 + trainer.num_val_iterations_per_epoch * val_s, 1),
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "machine": machine(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
