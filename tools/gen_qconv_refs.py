#!/usr/bin/env python3
"""Single-QLinearConv models and onnxruntime's output integers for them (issue 17):
which of the two int8 conv paths rounds as onnxruntime does, on the outputs where it
matters, the exact ties.

    python3 tools/gen_qconv_refs.py      (writes tests/fixtures/qconv/)

Each case is one QLinearConv (standard ONNX op), its input and onnxruntime's output. The
"ties" cases choose scales whose ratio x_scale * w_scale / y_scale is a power of two (0.5,
0.25), so every odd accumulator lands exactly on .5 before rounding: onnxruntime rounds
those half to even (its requantisation is f32 `nearbyint`). The "random" cases use
ordinary scales and biases. One case is the geometry the qconv fuzz target found tract's
conv one step off on (1 -> 1 channel, 5x5 input, 2x5 kernel, left pad 4; i8 in and out
here: onnxruntime has no QLinearConv with i8 in and u8 out).
The "depthwise" cases (one group per channel, as MobileNet's and EfficientNet's) check
the exact float path edgesight runs those on (src/model/int8/depthwise.rs).
Read by src/model/mod.rs (`matches_onnxruntimes_integers`).

Needs onnx, onnxruntime and numpy (tools/requirements.txt).
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "qconv")

# name: (cin, cout, hw, kernel, stride, pads (top, left, bottom, right), x signed,
#        y signed, per-channel, ties, seed[, groups])
CASES = {
    "ties_u8s8_per_tensor": (4, 8, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1), False, False, False, True, 1),
    "ties_s8s8_per_tensor": (4, 8, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1), True, True, False, True, 2),
    "ties_u8s8_per_channel": (6, 8, (8, 8), (3, 3), (2, 2), (1, 1, 1, 1), False, False, True, True, 3),
    "ties_u8s8_per_tensor_1x1": (16, 8, (7, 7), (1, 1), (1, 1), (0, 0, 0, 0), False, False, False, True, 4),
    "random_u8s8_per_tensor": (8, 16, (10, 10), (3, 3), (1, 1), (1, 1, 1, 1), False, False, False, False, 5),
    "random_u8s8_per_channel": (8, 16, (10, 10), (3, 3), (2, 2), (1, 1, 1, 1), False, False, True, False, 6),
    "random_s8s8_per_channel_7x7": (3, 16, (20, 20), (7, 7), (2, 2), (3, 3, 3, 3), True, True, True, False, 7),
    "fuzz_found_1x1_2x5_pad4": (1, 1, (5, 5), (2, 5), (1, 1), (0, 4, 0, 0), True, True, False, False, 8),
    "ties_u8s8_depthwise": (8, 8, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1), False, False, True, True, 9, 8),
    "random_s8s8_depthwise_5x5_s2": (16, 16, (14, 14), (5, 5), (2, 2), (2, 2, 2, 2), True, True, True, False, 10, 16),
    "random_u8s8_depthwise_per_tensor": (16, 16, (10, 10), (3, 3), (1, 1), (1, 1, 1, 1), False, False, False, False,
                                         11, 16),
}


def case(name, cin, cout, hw, k, stride, pads, xs8, ys8, per_channel, ties, seed, groups=1):
    rng = np.random.default_rng(seed)
    cin_g = cin // groups
    xdt, ydt = (np.int8 if xs8 else np.uint8), (np.int8 if ys8 else np.uint8)
    if ties:
        # Small values, so that accumulators * 0.5 stay inside the output range.
        x_zp = 0 if xs8 else 128
        x = (rng.integers(-3, 4, size=(1, cin, *hw)) + x_zp).astype(xdt)
        w = rng.integers(-3, 4, size=(cout, cin_g, *k)).astype(np.int8)
        x_scale = np.float32(0.5)
        w_scale = (np.array([0.25 if c % 2 else 0.5 for c in range(cout)], np.float32)
                   if per_channel else np.float32(0.25))
        y_scale = np.float32(0.25)  # ratio 0.5 (0.25 * 0.5 / 0.25), 1 for odd channels
        bias = rng.integers(-5, 6, size=cout).astype(np.int32)
    else:
        x_zp = int(rng.integers(-10, 10)) if xs8 else int(rng.integers(100, 156))
        x = rng.integers(-128 if xs8 else 0, 128 if xs8 else 256, size=(1, cin, *hw)).astype(xdt)
        w = rng.integers(-127, 128, size=(cout, cin_g, *k)).astype(np.int8)
        x_scale = np.float32(0.02)
        w_scale = (rng.uniform(0.001, 0.01, size=cout).astype(np.float32)
                   if per_channel else np.float32(0.005))
        y_scale = np.float32(0.05 * max(1, cin_g * k[0] * k[1] / 72))
        bias = rng.integers(-10000, 10001, size=cout).astype(np.int32)
    y_zp = 5 if ys8 else 120
    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(x_zp, xdt), "x_zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.asarray(w_scale, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(cout if per_channel else (), np.int8), "w_zp"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(y_zp, ydt), "y_zp"),
        numpy_helper.from_array(bias, "bias"),
    ]
    node = helper.make_node(
        "QLinearConv",
        ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "bias"],
        ["y"],
        kernel_shape=list(k), strides=list(stride), pads=[pads[0], pads[1], pads[2], pads[3]],
        **({"group": groups} if groups > 1 else {}),
    )
    tx = TensorProto.INT8 if xs8 else TensorProto.UINT8
    ty = TensorProto.INT8 if ys8 else TensorProto.UINT8
    oh = (hw[0] + pads[0] + pads[2] - k[0]) // stride[0] + 1
    ow = (hw[1] + pads[1] + pads[3] - k[1]) // stride[1] + 1
    graph = helper.make_graph(
        [node], name, [helper.make_tensor_value_info("x", tx, [1, cin, *hw])],
        [helper.make_tensor_value_info("y", ty, [1, cout, oh, ow])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(OUT, f"{name}.onnx")
    onnx.save(model, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    # How many outputs were exact ties before rounding (the float requantisation).
    acc = conv_acc(x.astype(np.int32) - x_zp, w.astype(np.int32), stride, pads, groups) + bias[None, :, None, None]
    ratio = (np.float32(x_scale) * np.asarray(w_scale, np.float32) / np.float32(y_scale)).astype(np.float32)
    scaled = acc.astype(np.float32) * (ratio[None, :, None, None] if per_channel else ratio)
    tie = np.abs(scaled - np.floor(scaled) - 0.5) == 0
    return {
        "input_shape": list(x.shape),
        "input": x.flatten().astype(int).tolist(),
        "output_shape": list(y.shape),
        "output": y.flatten().astype(int).tolist(),
        "ties": int(tie.sum()),
    }


def conv_acc(x, w, stride, pads, groups=1):
    """i32 accumulators of a plain NCHW convolution (zero-point already taken off x)."""
    if groups > 1:
        xs, ws = np.split(x, groups, axis=1), np.split(w, groups, axis=0)
        return np.concatenate([conv_acc(a, b, stride, pads) for a, b in zip(xs, ws)], axis=1)
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    xp = np.zeros((n, cin, h + pads[0] + pads[2], wd + pads[1] + pads[3]), np.int64)
    xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x
    oh = (xp.shape[2] - kh) // stride[0] + 1
    ow = (xp.shape[3] - kw) // stride[1] + 1
    out = np.zeros((n, cout, oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    refs = {"onnxruntime": ort.__version__, "cases": {}}
    for name, args in CASES.items():
        refs["cases"][name] = case(name, *args)
        print(f"{name}: {len(refs['cases'][name]['output'])} outputs, "
              f"{refs['cases'][name]['ties']} exact ties")
    with open(os.path.join(OUT, "refs.json"), "w") as f:
        json.dump(refs, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
