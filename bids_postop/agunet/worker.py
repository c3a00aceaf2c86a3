"""The TensorFlow process: ``python -m bids_postop.agunet.worker COMMAND ...``.

TensorFlow must not share a process with torch's triton (importing it first makes a later triton import
segfault), so ``bids_postop-train`` runs every TensorFlow step here, as a subprocess:

- ``train JOB.json [--onnx FILE]``: train (or resume) one fold (:mod:`bids_postop.agunet.training`), then
  export its best model to ONNX;
- ``export MODEL.keras FOLDER [--config B --threshold 0.4]``: a Raidionics package of one Keras model;
- ``build SPEC.json MODEL.keras [--seed N] [--random-statistics]``: a freshly initialised AGU-Net (e.g. as
  ``--init-model``, or for tests; ``--random-statistics`` draws batch-norm statistics too);

Exit codes: 0 done, 1 failed (traceback on stderr), 64 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _build(args: argparse.Namespace) -> int:
    import keras
    import numpy as np

    from bids_postop.agunet.architecture import NetworkSpec, build_agunet

    keras.utils.set_random_seed(args.seed)
    model = build_agunet(NetworkSpec.from_json(json.loads(Path(args.spec).read_text())))
    if args.random_statistics:
        rng = np.random.default_rng(args.seed)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                gamma, beta, mean, var = layer.get_weights()
                layer.set_weights([gamma * rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.2, beta.shape),
                                   rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2, var.shape)])
    Path(args.model).parent.mkdir(parents=True, exist_ok=True)
    model.save(args.model)
    return 0


def _export(args: argparse.Namespace) -> int:
    import keras

    from bids_postop.agunet.export import export_package

    models = [keras.models.load_model(m, compile=False) for m in args.model]
    export_package(models[0], args.folder, configuration=args.config, threshold=args.threshold,
                   folds=models if len(models) > 1 else ())
    return 0


def _train(args: argparse.Namespace) -> int:
    from bids_postop.agunet.training import main_train

    return main_train(Path(args.job), Path(args.onnx) if args.onnx else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bids_postop.agunet.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one fold from a job file")
    p.add_argument("job")
    p.add_argument("--onnx", help="export the best model to this ONNX file")
    p.set_defaults(func=_train)
    p = sub.add_parser("export", help="Raidionics package of Keras model(s); several models = folds")
    p.add_argument("folder")
    p.add_argument("model", nargs="+")
    p.add_argument("--config", choices=["A", "B", "C", "D", "E"], help="also write a model card")
    p.add_argument("--threshold", type=float)
    p.set_defaults(func=_export)
    p = sub.add_parser("build", help="a freshly initialised AGU-Net")
    p.add_argument("spec", help="JSON of a NetworkSpec")
    p.add_argument("model", help="output .keras file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-statistics", action="store_true")
    p.set_defaults(func=_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
