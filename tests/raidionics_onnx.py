"""Closed-form ONNX networks in the Raidionics layout, built with the onnx helper API (no training, no torch):
the test networks of the Raidionics backend's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_onnx(path: Path, n_in: int, *, weights, channels_first: bool = False, ramp=(0.021, -0.013, 0.034),
              centre: float = 1.0, gain: float = 4.0, output: str = "softmax", decoy: bool = False) -> Path:
    """p = sigmoid(gain × (Σ_c w_c x_c × (1 + ramp · (i, j, k)) − centre)) with (i, j, k) the 1-based voxel index
    on the network grid. ``output``: ``softmax`` (classes [1 − p, p]), ``logits`` ([0, logit]: softmax of it is
    the same), ``sigmoid`` (one class p), ``sigmoid_logit`` (one class, the logit). ``decoy`` adds a second output
    (what a deep-supervision model's lower resolutions would be): the official library must ignore it."""
    from onnx import TensorProto, checker, helper, numpy_helper, save

    w = np.asarray(weights, np.float32)
    assert w.shape == (n_in,)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k)
             for k, v in {"zero": 0.0, "one": 1.0, "centre": centre, "gain": gain}.items()]
    if channels_first:
        inits.append(numpy_helper.from_array(w.reshape(1, n_in, 1, 1, 1), "W"))
        nodes = [helper.make_node("Conv", ["input", "W"], ["s"])]
        axes, cat = (2, 3, 4), 1
    else:
        inits.append(numpy_helper.from_array(w.reshape(n_in, 1), "W"))
        nodes = [helper.make_node("MatMul", ["input", "W"], ["s"])]
        axes, cat = (1, 2, 3), 4
    nodes += [helper.make_node("Mul", ["s", "zero"], ["z0"]), helper.make_node("Add", ["z0", "one"], ["ones"])]
    terms = ["one"]
    for k, (axis, slope) in enumerate(zip(axes, ramp, strict=True)):
        inits += [numpy_helper.from_array(np.asarray(axis, np.int64), f"axis{k}"),
                  numpy_helper.from_array(np.asarray(slope, np.float32), f"slope{k}")]
        nodes += [helper.make_node("CumSum", ["ones", f"axis{k}"], [f"index{k}"]),
                  helper.make_node("Mul", [f"index{k}", f"slope{k}"], [f"term{k}"])]
        terms.append(f"term{k}")
    nodes += [helper.make_node("Sum", terms, ["ramp"]), helper.make_node("Mul", ["s", "ramp"], ["sr"]),
              helper.make_node("Sub", ["sr", "centre"], ["d"]), helper.make_node("Mul", ["d", "gain"], ["logit"]),
              helper.make_node("Sigmoid", ["logit"], ["p"]), helper.make_node("Sub", ["one", "p"], ["q"])]
    last = {"softmax": ["q", "p"], "logits": ["z0", "logit"], "sigmoid": ["p"], "sigmoid_logit": ["logit"]}[output]
    nodes.append(helper.make_node("Concat", last, ["output"], axis=cat))
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None] * 5)]
    if decoy:
        nodes.append(helper.make_node("Concat", ["p", "p", "q"], ["decoy"], axis=cat))
        outputs.append(helper.make_tensor_value_info("decoy", TensorProto.FLOAT, [None] * 5))
    dims = ["b", n_in, "x", "y", "z"] if channels_first else ["b", "x", "y", "z", n_in]
    graph = helper.make_graph(nodes, "closed_form", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))
    return path
