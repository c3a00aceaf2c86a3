"""The study's AGU-Net training recipe for one fold (runs in the TensorFlow worker process).

- loss: class-averaged soft Dice without the background class, averaged over the deep-supervision outputs;
- Adam, learning rate 1e-3; micro-batches of ``batch_size`` (2) whose gradients are accumulated up to
  ``effective_batch_size`` (32) samples before each update (and at the end of an epoch);
- augmentation (:mod:`bids_postop.agunet.augment`) of each training sample;
- one epoch = every training case once (or ``iterations`` micro-batches); after each epoch the validation
  loss (full-resolution output, no augmentation) is computed, the best weights are kept, and training stops
  after ``patience`` (30) epochs without improvement or at ``max_epochs``;
- a checkpoint after every epoch (weights, optimizer state, counters, history) in the fold folder: an
  interrupted fold resumes from its last finished epoch;
- progress: one JSON line per epoch on stdout, prefixed ``AGUNET_PROGRESS`` (the parent logs it with an ETA).

The job (:class:`FoldJob`) is a JSON file written by :mod:`bids_postop.training.agunet`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_postop.agunet.architecture import NetworkSpec

PROGRESS_PREFIX = "AGUNET_PROGRESS "
SMOOTH = 1.0
# a checkpoint resumes under a job that differs from its own only in these (e.g. more epochs)
RESUMABLE_CHANGES = ("max_epochs", "patience", "threads")


@dataclass(frozen=True)
class FoldJob:
    spec: NetworkSpec
    data_dir: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    fold_dir: str
    max_epochs: int = 1000
    patience: int = 30
    batch_size: int = 2
    effective_batch_size: int = 32
    iterations: int | None = None  # micro-batches per epoch; None: every training case once
    learning_rate: float = 1e-3
    augment: bool = True
    seed: int = 0
    init_model: str | None = None
    threads: int = 1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_json()
        data["train"], data["val"] = list(self.train), list(self.val)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FoldJob:
        data = dict(data)
        data["spec"] = NetworkSpec.from_json(data["spec"])
        data["train"], data["val"] = tuple(data["train"]), tuple(data["val"])
        return cls(**data)

    @property
    def accumulation_steps(self) -> int:
        return max(1, self.effective_batch_size // self.batch_size)


def report(**values: Any) -> None:
    print(PROGRESS_PREFIX + json.dumps(values), flush=True)


def dice_loss(truth: Any, probabilities: Any) -> Any:
    """1 − mean soft Dice over the foreground classes; ``truth`` (b, x, y, z) tumour fraction in [0, 1],
    ``probabilities`` (b, x, y, z, classes) softmax. Sums run over the batch and space."""
    import tensorflow as tf

    onehot = tf.stack([1.0 - truth, truth], axis=-1)[..., 1:]
    pred = probabilities[..., 1:]
    axes = [0, 1, 2, 3]
    inter = tf.reduce_sum(onehot * pred, axis=axes)
    total = tf.reduce_sum(onehot, axis=axes) + tf.reduce_sum(pred, axis=axes)
    return 1.0 - tf.reduce_mean((2.0 * inter + SMOOTH) / (total + SMOOTH))


def _load(data_dir: Path, pid: str) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(data_dir / f"{pid}_input.npy", mmap_mode="r"),
            np.load(data_dir / f"{pid}_label.npy", mmap_mode="r"))


def _build_model(job: FoldJob) -> tuple[Any, dict | None]:
    import keras

    from bids_postop.agunet.architecture import adapt_from, build_agunet

    keras.utils.set_random_seed(job.seed)
    model = build_agunet(job.spec)
    adapted = None
    if job.init_model:
        source = keras.models.load_model(job.init_model, compile=False)
        adapted = adapt_from(source, model)
    return model, adapted


def _save_checkpoint(model: Any, optimizer: Any, state: dict, fold_dir: Path) -> None:
    tmp = fold_dir / "tmp.weights.h5"
    model.save_weights(str(tmp))
    np.savez(fold_dir / "optimizer.tmp.npz", *[np.asarray(v) for v in optimizer.variables])
    os.replace(tmp, fold_dir / "last.weights.h5")
    os.replace(fold_dir / "optimizer.tmp.npz", fold_dir / "optimizer.npz")
    (fold_dir / "state.tmp.json").write_text(json.dumps(state, indent=1) + "\n")
    os.replace(fold_dir / "state.tmp.json", fold_dir / "state.json")


def _restore(model: Any, optimizer: Any, fold_dir: Path, job_json: dict) -> dict | None:
    try:
        state = json.loads((fold_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    def fixed(job: dict) -> dict:
        return {k: v for k, v in job.items() if k not in RESUMABLE_CHANGES}

    if fixed(state.get("job", {})) != fixed(job_json) or not (fold_dir / "last.weights.h5").is_file():
        return None
    state["job"] = job_json
    model.load_weights(str(fold_dir / "last.weights.h5"))
    optimizer.build(model.trainable_variables)
    with np.load(fold_dir / "optimizer.npz") as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    for var, value in zip(optimizer.variables, arrays, strict=True):
        var.assign(value)
    return state


def train_fold(job: FoldJob) -> Path:
    """Train (or resume) one fold; returns the path of the best model (``best.keras``)."""
    import keras
    import tensorflow as tf

    from bids_postop.agunet.augment import augment

    fold_dir = Path(job.fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(job.data_dir)
    job_json = job.to_json()
    model, adapted = _build_model(job)
    optimizer = keras.optimizers.Adam(learning_rate=job.learning_rate)
    state = _restore(model, optimizer, fold_dir, job_json)
    if state is None:
        state = {"job": job_json, "epoch": 0, "best_loss": None, "best_epoch": None, "since_best": 0,
                 "history": [], "init_model": adapted}
        optimizer.build(model.trainable_variables)
    else:
        report(event="resumed", epoch=state["epoch"])
    variables = model.trainable_variables
    accumulated = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]

    @tf.function(reduce_retracing=True)
    def accumulate(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            loss = tf.add_n([dice_loss(y, o) for o in outputs]) / len(outputs)
        for acc, grad in zip(accumulated, tape.gradient(loss, variables), strict=True):
            acc.assign_add(grad)
        return loss

    def apply(steps: int) -> None:
        optimizer.apply([acc / float(steps) for acc in accumulated], variables)
        for acc in accumulated:
            acc.assign(tf.zeros_like(acc))

    @tf.function(reduce_retracing=True)
    def evaluate(x: Any, y: Any) -> Any:
        outputs = model(x, training=False)
        return dice_loss(y, outputs[0] if isinstance(outputs, (list, tuple)) else outputs)

    val_ids = job.val or job.train
    while state["epoch"] < job.max_epochs and state["since_best"] < job.patience:
        epoch = state["epoch"] + 1
        start = time.monotonic()
        rng = np.random.default_rng([job.seed, epoch])
        order = list(rng.permutation(len(job.train)))
        steps = job.iterations or max(1, int(np.ceil(len(order) / job.batch_size)))
        order = (order * (steps * job.batch_size // max(len(order), 1) + 1))[:steps * job.batch_size]
        losses, pending = [], 0
        for step in range(steps):
            xs, ys = [], []
            for idx in order[step * job.batch_size:(step + 1) * job.batch_size]:
                x, y = _load(data_dir, job.train[idx])
                if job.augment:
                    x, y = augment(x, y, rng)
                xs.append(np.asarray(x, np.float32))
                ys.append(np.asarray(y, np.float32))
            losses.append(float(accumulate(tf.constant(np.stack(xs)), tf.constant(np.stack(ys)))))
            pending += 1
            if pending == job.accumulation_steps or step == steps - 1:
                apply(pending)
                pending = 0
        val = float(np.mean([float(evaluate(tf.constant(np.asarray(x)[None]), tf.constant(np.asarray(y)[None])))
                             for x, y in (_load(data_dir, pid) for pid in val_ids)]))
        improved = state["best_loss"] is None or val < state["best_loss"]
        if improved:
            model.save_weights(str(fold_dir / "tmp.weights.h5"))
            os.replace(fold_dir / "tmp.weights.h5", fold_dir / "best.weights.h5")
            state.update(best_loss=val, best_epoch=epoch, since_best=0)
        else:
            state["since_best"] += 1
        seconds = time.monotonic() - start
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, "loss": float(np.mean(losses)), "val_loss": val,
                                 "seconds": round(seconds, 2)})
        _save_checkpoint(model, optimizer, state, fold_dir)
        report(event="epoch", epoch=epoch, max_epochs=job.max_epochs, loss=float(np.mean(losses)), val_loss=val,
               best_loss=state["best_loss"], best_epoch=state["best_epoch"], since_best=state["since_best"],
               patience=job.patience, seconds=seconds, updates_per_epoch=int(np.ceil(steps / job.accumulation_steps)))
    model.load_weights(str(fold_dir / "best.weights.h5"))
    best = fold_dir / "best.keras"
    model.save(str(fold_dir / "tmp.keras"))
    os.replace(fold_dir / "tmp.keras", best)
    stop = "early stop" if state["since_best"] >= job.patience else "max epochs"
    report(event="done", epoch=state["epoch"], best_epoch=state["best_epoch"], best_loss=state["best_loss"],
           reason=stop)
    return best


def main_train(job_path: Path, onnx_path: Path | None) -> int:
    import tensorflow as tf

    job = FoldJob.from_json(json.loads(Path(job_path).read_text()))
    tf.config.threading.set_intra_op_parallelism_threads(job.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    best = train_fold(job)
    if onnx_path is not None:
        import keras

        from bids_postop.agunet.export import write_onnx

        write_onnx(keras.models.load_model(str(best), compile=False), onnx_path)
        report(event="exported", onnx=str(onnx_path))
    sys.stdout.flush()
    return 0
