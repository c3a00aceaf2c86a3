"""Build study-size models with random weights, for timing (run by hand, not in CI).

    python benchmarks/make_study_models.py --out /tmp/study_models [--folds 5] [--quick] [--agunet] [--agunet-config E]

Writes, under ``--out``:

``nnunet_B/`` (``nnunet_B_quick/`` with ``--quick``)
    a bids_postop model (``bids_postop_model.json``, configuration B) around an nnU-Net v2 trained-model
    folder ``nnunet/`` with ``plans.json``, ``dataset.json`` and ``fold_k/checkpoint_final.pth`` for
    k = 0 … folds-1. The 3d_fullres configuration is the study's (SPEC.md): PlainConvUNet, 5 stages,
    features 32/64/128/256/320, kernels 1×3×3 on the first stage then 3×3×3, strided-conv down /
    transposed-conv up, spacing 0.5×0.5×1.0 mm, patch 192×128×80 — in nnU-Net's (z, y, x) array order
    spacing [1.0, 0.5, 0.5] and patch [80, 192, 128] (the 1-voxel kernel axis is the coarse one), z-score
    normalisation inside the nonzero (skull-stripped) mask, nnU-Net's default resampling (order 3 in-plane,
    nearest along z for anisotropic data; probabilities order 1). Checkpoints hold only what
    ``torch.load(weights_only=True)`` accepts (network_weights, trainer_name, init_args,
    inference_allowed_mirroring_axes, current_epoch), as :func:`bids_postop.training.nnunet.strip_checkpoint`
    writes them, so both ``nnUNetv2_predict`` and bids_postop load them. Mirroring axes (0, 1, 2): all 8
    mirrorings, as a stock nnU-Net 3d_fullres model. ``--quick`` keeps the architecture but doubles the
    spacing ([2.0, 1.0, 1.0]) and halves the patch ([40, 96, 64]): the same number of tiles per brain,
    each about 8× cheaper — for validating the benchmark scripts, not for the recorded numbers.

``agunet_B/MRI_GBM_Postop_FV_2p/`` (with ``--agunet``; ``agunet_E/MRI_GBM_Postop_FV_5p/`` with ``--agunet-config E``:
    the same network with configuration E's five input channels)
    a Raidionics-format full-volume model: ``model.onnx`` (input ``input``, 1×128×128×144×2,
    channels_last, softmax output of the same layout) and ``pre_processing.ini`` (1 mm, brain_clip,
    new_axial_size 128, 128, 144). The network is an AGU-Net-sized 3-D U-Net written in torch: 5 levels
    with 16/32/128/256/256 filters, multi-scale inputs (the input, average-pooled, concatenated at every
    encoder level), additive attention gates on the skip connections and deep-supervision heads (only the
    full-resolution head is exported, as the published models' first output). It is not the Keras AGU-Net
    (bids_postop/agunet/), only the same size for timing.

Random weights: the outputs mean nothing; the final layer's bias is set so that a few per cent of
voxels exceed 0.5, which makes Dice between two inference paths a meaningful equivalence check.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

STUDY = {
    "spacing": [1.0, 0.5, 0.5],
    "patch_size": [80, 192, 128],
    "features": [32, 64, 128, 256, 320],
    "kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
}
QUICK = {**STUDY, "spacing": [2.0, 1.0, 1.0], "patch_size": [40, 96, 64]}
AGUNET_FILTERS = (16, 32, 128, 256, 256)
AGUNET_INPUT = (128, 128, 144)

CHANNELS = {"0": "T1w-CE", "1": "T1w"}


def nnunet_plans(geometry: dict) -> dict:
    """plans.json of an nnU-Net v2 3d_fullres PlainConvUNet of the study's architecture."""
    n = len(geometry["features"])
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": geometry["features"],
            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": geometry["kernels"],
            "strides": geometry["strides"], "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": geometry["patch_size"], "median_image_size_in_voxels": [140.0, 340.0, 280.0],
        "spacing": geometry["spacing"],
        "normalization_schemes": ["ZScoreNormalization", "ZScoreNormalization"],
        "use_mask_for_norm": [True, True],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch, "batch_dice": False,
    }
    intensity = {"max": 3000.0, "mean": 800.0, "median": 780.0, "min": 0.0, "percentile_00_5": 150.0,
                 "percentile_99_5": 1900.0, "std": 250.0}
    return {
        "dataset_name": "Dataset990_StudySizeB", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.96, 0.64, 0.67],
        "original_median_shape_after_transp": [180, 461, 430], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": intensity, "1": intensity},
    }


def build_nnunet_model(out: Path, *, folds: int, quick: bool, seed: int = 0) -> Path:
    """Write a bids_postop model folder (card + nnunet/ trained-model folder) with random weights."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    geometry = QUICK if quick else STUDY
    plans = nnunet_plans(geometry)
    dataset = {"channel_names": CHANNELS, "labels": {"background": 0, "residual_tumor": 1}, "numTraining": 0,
               "file_ending": ".nii.gz", "name": "study-size configuration B, random weights (timing only)"}
    folder = out / ("nnunet_B_quick" if quick else "nnunet_B")
    nn_dir = folder / "nnunet"
    nn_dir.mkdir(parents=True, exist_ok=True)
    (nn_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    (nn_dir / "dataset.json").write_text(json.dumps(dataset, indent=1))
    manager = PlansManager(copy.deepcopy(plans))
    configuration = manager.get_configuration("3d_fullres")
    n_params = 0
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        net = nnUNetTrainer.build_network_architecture(manager, configuration, 2, 2, enable_deep_supervision=True)
        weights = dict(net.state_dict())  # no clone: shared encoder tensors are stored once
        # a few per cent of voxels above 0.5: background favoured by the bias of the final 1×1×1 conv
        last = sorted(k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".bias"))[-1]
        weights[last] = torch.tensor([1.5, -1.5], dtype=weights[last].dtype)
        n_params = sum(v.numel() for k, v in weights.items() if not k.startswith("decoder.encoder."))
        ckpt = {"network_weights": weights, "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres", "fold": fold},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0}
        path = nn_dir / f"fold_{fold}" / "checkpoint_final.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
        torch.load(path, map_location="cpu", weights_only=True)
    card = {
        "schema_version": 1, "name": folder.name,
        "description": f"study-size nnU-Net v2 3d_fullres (PlainConvUNet 5 stages {geometry['features']}, "
                       f"spacing {geometry['spacing']} (z, y, x), patch {geometry['patch_size']}), RANDOM weights",
        "intended_use": "timing benchmarks only: random weights, meaningless output",
        "architecture": "nnunet", "configuration": "B", "channels": ["postop_t1ce", "postop_t1"],
        "threshold": 0.5,
        "nnunet": {"trained_model_folder": "nnunet", "checkpoint": "checkpoint_final.pth"},
        "parameters": n_params,
    }
    (folder / "bids_postop_model.json").write_text(json.dumps(card, indent=2))
    return folder


# ---------------------------------------------------------------------------------------- AGU-Net size


def _agunet_class():
    import torch
    from torch import nn

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
                             nn.Conv3d(c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))

    class AttentionGate(nn.Module):
        def __init__(self, c_skip: int, c_gate: int, c_inter: int) -> None:
            super().__init__()
            self.theta = nn.Conv3d(c_skip, c_inter, 2, stride=2)
            self.phi = nn.Conv3d(c_gate, c_inter, 1)
            self.psi = nn.Conv3d(c_inter, 1, 1)

        def forward(self, skip, gate):
            a = torch.relu(self.theta(skip) + self.phi(gate))
            alpha = torch.sigmoid(self.psi(a))
            return skip * nn.functional.interpolate(alpha, size=skip.shape[2:], mode="trilinear")

    class AGUNetSize(nn.Module):
        """Channels-last in and out, like the published Keras models."""

        def __init__(self, n_in: int, filters=AGUNET_FILTERS, n_classes: int = 2) -> None:
            super().__init__()
            self.enc = nn.ModuleList()
            c_prev = 0
            for level, f in enumerate(filters):
                self.enc.append(block(c_prev + n_in, f))  # multi-scale input concatenated at every level
                c_prev = f
                del level
            self.up = nn.ModuleList()
            self.gates = nn.ModuleList()
            self.dec = nn.ModuleList()
            self.heads = nn.ModuleList()
            for level in range(len(filters) - 1, 0, -1):
                f_low, f_skip = filters[level], filters[level - 1]
                self.gates.append(AttentionGate(f_skip, f_low, max(f_skip // 2, 8)))
                self.up.append(nn.ConvTranspose3d(f_low, f_skip, 2, stride=2))
                self.dec.append(block(2 * f_skip, f_skip))
                self.heads.append(nn.Conv3d(f_skip, n_classes, 1))  # deep supervision (last = full resolution)

        def forward(self, x):
            x = x.permute(0, 4, 1, 2, 3)
            skips, h, scaled = [], None, x
            for level, enc in enumerate(self.enc):
                if level:
                    scaled = nn.functional.avg_pool3d(scaled, 2)
                    h = nn.functional.max_pool3d(h, 2)
                    h = enc(torch.cat([h, scaled], 1))
                else:
                    h = enc(scaled)
                skips.append(h)
            outs = []
            for i, (gate, up, dec, head) in enumerate(zip(self.gates, self.up, self.dec, self.heads, strict=True)):
                skip = skips[-2 - i]
                h = dec(torch.cat([gate(skip, h), up(h)], 1))
                outs.append(head(h))
            return torch.softmax(outs[-1], 1).permute(0, 2, 3, 4, 1)

    return AGUNetSize


AGUNET_INI = """[Default]
imaging_modality = MRI
training_backend = TF
task = segmentation
[PreProcessing]
output_spacing = 1.0, 1.0, 1.0
background_cropping = brain_clip
intensity_clipping_range = 0.0, 99.5
normalization_method = zeromean
new_axial_size = 128, 128, 144
number_inputs = {n_inputs}
channels_order = channels_last
[Training]
nb_classes = 2
classes = background, tumor
optimal_thresholds = 0.5, 0.5
deep_supervision = true
activation_layer_included = true
activation_layer_type = softmax
"""


def build_agunet_model(out: Path, *, seed: int = 0, configuration: str = "B") -> Path:
    """The AGU-Net-size Raidionics folder of ``configuration`` (its channels: B = 2, E = 5; the folder name
    ``MRI_GBM_Postop_FV_<n>p`` tells bids_postop the configuration, as for the published models)."""
    import torch

    from bids_postop.configurations import CONFIGURATIONS

    n_inputs = len(CONFIGURATIONS[configuration])
    number = "ABCDE".index(configuration) + 1
    folder = out / f"agunet_{configuration}" / f"MRI_GBM_Postop_FV_{number}p"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = _agunet_class()(n_inputs).eval()
    with torch.no_grad():
        net.heads[-1].bias.copy_(torch.tensor([1.5, -1.5]))
    n_params = sum(p.numel() for p in net.parameters())
    (folder / "pre_processing.ini").write_text(AGUNET_INI.format(n_inputs=n_inputs))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros((1, *AGUNET_INPUT, n_inputs)),), str(folder / "model.onnx"),
                          input_names=["input"], output_names=["output"], dynamo=False, opset_version=17)
    (folder / "PARAMETERS.txt").write_text(f"{n_params} parameters, random weights (timing only)\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="coarser spacing and half patch (script checks)")
    parser.add_argument("--agunet", action="store_true", help="also build the AGU-Net-size ONNX model")
    parser.add_argument("--agunet-config", default="B", choices=["B", "E"], help="its configuration (default B)")
    parser.add_argument("--no-nnunet", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_nnunet:
        folder = build_nnunet_model(args.out, folds=args.folds, quick=args.quick)
        card = json.loads((folder / "bids_postop_model.json").read_text())
        print(f"nnU-Net model: {folder} ({args.folds} folds, {card['parameters'] / 1e6:.1f} M parameters)")
    if args.agunet:
        folder = build_agunet_model(args.out, configuration=args.agunet_config)
        print(f"AGU-Net-size model: {folder} ({(folder / 'PARAMETERS.txt').read_text().strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
