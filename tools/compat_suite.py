#!/usr/bin/env python3
"""The models users bring (issue 16): common classifiers exported the ways exporters do it,
each run by edgesight and by onnxruntime on the same inputs.

    python3 tools/compat_suite.py [--out target/compat] [--bin target/release/edgesight]
                                  [--models resnet18,mobilenet_v2] [--exports script13,...]
                                  [--runs 5]

Models come from torchvision with random seeded weights (the numbers do not matter, the
graphs do). Exports:
  script11/13/17/20  torch.onnx.export, TorchScript exporter, that opset (20: its newest)
  zoo7            opset 7 with BatchNormalization nodes kept, as the ONNX Model Zoo's
                  ResNet v1/v2 files are (MXNet exports; the Zoo cannot be downloaded here)
  dynamo          torch.onnx.export(dynamo=True), its default opset
  nhwc            NHWC input, permuted inside the model (Transposes in the graph)
  bn              BatchNorm left as Sub/Mul/Add after bias-less convs (not folded)
  caffe           as a Caffe model converted to PyTorch is: BatchNorm without its affine
                  part then a Scale (Mul, Add), ceil-mode max pooling, and BGR 0..255
                  input minus the means 104/117/123 (run with channel_order = "bgr",
                  mean = [104, 117, 123])
  fp16            script13 converted to float16 weights by onnxconverter-common with float
                  inputs and outputs kept (Casts at both ends)
  dynbatch        a dynamic batch dimension
  softmax         a Softmax at the end (probabilities out: not to be softmaxed twice)
  qdq_u8s8, qop_u8s8, qdq_s8s8, qop_s8s8
                  onnxruntime's static quantisation of script13, per-channel weights
  qdq_u8s8_pt, qop_u8s8_pt, qdq_s8s8_pt, qop_s8s8_pt
                  the same, per-tensor weights
keras_resnet50 (keras.applications.ResNet50, NHWC, "caffe" preprocessing):
  keras, keras_dynbatch  Keras 3's own ONNX export (torch backend), static or Keras's
                         default dynamic batch
  tf2onnx                TensorFlow backend, converted by tf2onnx
  and quantised forms of each.

Each row: loads or not (edgesight's error, first line), top-1 equal to onnxruntime on
every input, the largest |probability difference| (through `edgesight classify --json`,
from the PNG inputs as a user runs it); then, given --runs, the median ms of
`edgesight bench` and of onnxruntime on one pinned core, same file and input tensor
(tools/bench_models.py's runners), and for int8 files how many of the file's
convolutions run on edgesight's int8 kernel and how many depthwise ones on its exact
float path (src/model/int8/depthwise.rs). Writes OUT/matrix.md and prints it.
Needs tools/requirements.txt (TensorFlow and tf2onnx for the tf2onnx rows).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_models  # noqa: E402  (its side-by-side runners)

TORCH_EXPORTS = ["script11", "script13", "script17", "script20", "zoo7", "dynamo", "nhwc", "bn", "caffe", "fp16",
                 "dynbatch", "softmax", "qdq_u8s8", "qop_u8s8", "qdq_s8s8", "qop_s8s8", "qdq_u8s8_pt",
                 "qop_u8s8_pt", "qdq_s8s8_pt", "qop_s8s8_pt"]
MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2", "mobilenet_v3_small",
          "efficientnet_b0", "squeezenet1_1", "keras_resnet50"]
# Keras ResNet50 has exports of its own (--exports is for the torchvision models).
KERAS_EXPORTS = ["keras", "keras_dynbatch", "tf2onnx", "qdq_u8s8", "qdq_u8s8_dynbatch", "qop_u8s8", "qdq_s8s8",
                 "tf2onnx_qdq_u8s8"]
# What a Caffe model's converter leaves the user to do: BGR, 0..255, minus these.
CAFFE_MEANS = np.array([104, 117, 123], np.float32)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZE = 224


class Nhwc(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.permute(0, 3, 1, 2))


class WithSoftmax(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return torch.softmax(self.m(x), dim=1)


class ExplicitBn(torch.nn.Module):
    """BatchNorm as the arithmetic it is, so the exporter cannot fold it into the conv."""

    def __init__(self, bn):
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("mean", bn.running_mean.view(1, -1, 1, 1).clone())
        self.register_buffer("scale", scale.detach().view(1, -1, 1, 1).clone())
        self.register_buffer("beta", bn.bias.detach().view(1, -1, 1, 1).clone())

    def forward(self, x):
        return (x - self.mean) * self.scale + self.beta


class CaffeBn(torch.nn.Module):
    """Caffe's BatchNorm layer (statistics only) followed by its Scale layer, as a Caffe
    model converted to PyTorch keeps them."""

    def __init__(self, bn):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(bn.num_features, eps=bn.eps, affine=False)
        self.bn.running_mean.copy_(bn.running_mean)
        self.bn.running_var.copy_(bn.running_var)
        self.register_buffer("w", bn.weight.detach().view(1, -1, 1, 1).clone())
        self.register_buffer("b", bn.bias.detach().view(1, -1, 1, 1).clone())

    def forward(self, x):
        return self.bn(x) * self.w + self.b


def caffe_style(m):
    for name, child in m.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(m, name, CaffeBn(child))
        elif isinstance(child, torch.nn.MaxPool2d):
            child.padding, child.ceil_mode = 0, True
        else:
            caffe_style(child)
    return m.eval()


def explicit_bn(m):
    for name, child in m.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(m, name, ExplicitBn(child))
        else:
            explicit_bn(child)
    return m


def model(name):
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None).eval()
    # Random BatchNorm statistics, so that BN does something.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def export_keras(kind, path):
    """keras.applications.ResNet50 through Keras 3's own ONNX export (torch backend;
    ../shared/notes/keras-resnet50.md): NHWC input, BatchNorm as Sub/Mul/Add, each conv
    between transposes. `keras` gives it a static batch, `keras_dynbatch` Keras's default
    dynamic one."""
    import keras

    m = bench_models.keras_resnet50(SIZE)
    batch = None if kind.endswith("dynbatch") else 1
    m.export(path, format="onnx", opset_version=13,
             input_signature=[keras.InputSpec(shape=(batch, SIZE, SIZE, 3), dtype="float32")])


TF2ONNX = """
import keras, tensorflow as tf, tf2onnx
keras.utils.set_random_seed(0)
m = keras.applications.ResNet50(weights=None, input_shape=({size}, {size}, 3), classifier_activation=None)
spec = (tf.TensorSpec((1, {size}, {size}, 3), tf.float32, name="input"),)
tf2onnx.convert.from_function(tf.function(lambda x: m(x, training=False)), input_signature=spec,
                              opset=13, output_path={path!r})
"""


def export_tf2onnx(path):
    """Keras ResNet50 on the TensorFlow backend through tf2onnx (a child process: Keras's
    backend is chosen once per process)."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", TF2ONNX.format(size=SIZE, path=path)], env=env, check=True,
                   capture_output=True)


def export_fp16(src, path):
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(src), keep_io_types=True), path)


def export(name, kind, path):
    if name == "keras_resnet50":
        return export_tf2onnx(path) if kind == "tf2onnx" else export_keras(kind, path)
    m = model(name)
    x = torch.rand(1, 3, SIZE, SIZE)
    opset, dynamo, axes, mode = 13, False, None, torch.onnx.TrainingMode.EVAL
    if kind.startswith("script"):
        opset = int(kind[6:])
    elif kind == "zoo7":
        # PRESERVE keeps BatchNormalization as a node (EVAL folds it into the conv).
        opset, mode = 7, torch.onnx.TrainingMode.PRESERVE
    elif kind == "dynamo":
        dynamo, opset = True, None
    elif kind == "nhwc":
        m, x = Nhwc(m), x.permute(0, 2, 3, 1).contiguous()
    elif kind == "bn":
        m = explicit_bn(m)
    elif kind == "caffe":
        m = caffe_style(m)
    elif kind == "dynbatch":
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
    elif kind == "softmax":
        m = WithSoftmax(m)
    kw = {"input_names": ["input"], "output_names": ["output"], "dynamic_axes": axes}
    if dynamo:
        torch.onnx.export(m, (x,), path, dynamo=True, input_names=["input"], output_names=["output"])
    else:
        torch.onnx.export(m, (x,), path, opset_version=opset, dynamo=False, do_constant_folding=True,
                          training=mode, **kw)


def quantise(src, dst, form, images):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(src).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: t} for t in images[:4]])

        def get_next(self):
            return next(self.it, None)

    pre = dst + ".pre.onnx"
    quant_pre_process(src, pre)
    fmt = QuantFormat.QDQ if form.startswith("qdq") else QuantFormat.QOperator
    act = QuantType.QInt8 if "s8s8" in form else QuantType.QUInt8
    quantize_static(pre, dst, Reader(), quant_format=fmt, per_channel=not form.endswith("_pt"),
                    activation_type=act, weight_type=QuantType.QInt8)
    os.remove(pre)


def bgr_minus(img, means):
    return img[..., ::-1].astype(np.float32) - means


class Inputs:
    """The three test images as PNG files (what edgesight reads) and as the tensor each
    input flavour of model takes (what onnxruntime is given), with the preprocessing keys
    that make edgesight build the same tensor from the PNG."""

    PREPROCESS = {
        "torchvision": 'preprocess = "torchvision"',
        "nhwc": 'preprocess = "torchvision"',
        # Keras's "caffe" preprocessing, a preset.
        "keras": 'preprocess = "caffe"',
        # A converted Caffe model's own numbers, through the individual keys.
        "caffe": 'preprocess = "raw"\nchannel_order = "bgr"\nmean = [104, 117, 123]',
    }

    def __init__(self, out, n=3):
        rng = np.random.default_rng(7)
        self.files, self.tensors = [], {k: [] for k in self.PREPROCESS}
        for i in range(n):
            img = blobs(rng)
            f = os.path.join(out, f"input{i}.png")
            Image.fromarray(img).save(f)
            self.files.append(f)
            chw = ((img.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
            self.tensors["torchvision"].append(np.ascontiguousarray(chw, np.float32))
            self.tensors["nhwc"].append(np.ascontiguousarray(chw.transpose(0, 2, 3, 1)))
            keras_means = np.array([103.939, 116.779, 123.68], np.float32)
            self.tensors["keras"].append(np.ascontiguousarray(bgr_minus(img, keras_means)[None]))
            caffe = bgr_minus(img, CAFFE_MEANS).transpose(2, 0, 1)[None]
            self.tensors["caffe"].append(np.ascontiguousarray(caffe, np.float32))
        # The first tensor of each flavour as .npy, for the timing runners.
        self.npy = {}
        for k, ts in self.tensors.items():
            self.npy[k] = Path(out) / f"input_{k}.npy"
            np.save(self.npy[k], ts[0])


def blobs(rng):
    """A smooth random image (a few blobs), like a scene rather than noise."""
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for _ in range(6):
        cy, cx, r = rng.integers(0, SIZE, 2).tolist() + [int(rng.integers(20, 80))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def flavour(name, kind):
    if name == "keras_resnet50":
        return "keras"
    return {"nhwc": "nhwc", "caffe": "caffe"}.get(kind, "torchvision")


def reference(path, tensors, probs_out):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    for x in tensors:
        y = sess.run(None, {name: x})[0][0].astype(np.float64)
        if not probs_out:
            y = np.exp(y - y.max())
            y /= y.sum()
        out.append(y)
    return out


def ours(binary, path, labels, files, preprocess):
    cfg = path + ".toml"
    with open(cfg, "w") as f:
        f.write(f'[model]\npath = "{path}"\nlabels = "{labels}"\n{preprocess}\n'
                '[[camera]]\nname = "x"\npath = "x"\n')
    r = subprocess.run([binary, "classify", "--json", "--config", cfg, *files],
                       capture_output=True, text=True)
    if r.returncode != 0:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        return None, (lines[-1] if lines else f"exit {r.returncode}")
    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")], None


def make(out, name, kind, inputs):
    """Export (and quantise) one row's file; returns its path."""
    path = os.path.join(out, f"{name}_{kind}.onnx")
    keras_model = name == "keras_resnet50"
    if kind.startswith("q") or kind.startswith("tf2onnx_q") or kind == "fp16":
        if keras_model:
            base_kind = "tf2onnx" if kind.startswith("tf2onnx") else (
                "keras_dynbatch" if "dynbatch" in kind else "keras")
        else:
            base_kind = "script13"
        base = os.path.join(out, f"{name}_{base_kind}.onnx")
        if not os.path.exists(base):
            export(name, base_kind, base)
        if kind == "fp16":
            export_fp16(base, path)
        else:
            form = kind.replace("_dynbatch", "").replace("tf2onnx_", "")
            quantise(base, path, form, inputs.tensors[flavour(name, kind)])
    else:
        export(name, kind, path)
    return path


def file_convs(path):
    """The file's convolutions (Conv, QLinearConv, com.microsoft's fused ones)."""
    return sum(n.op_type in ("Conv", "QLinearConv", "FusedConv") for n in onnx.load(path).graph.node)


def timing(a, path, npy, int8):
    """(edgesight ms, onnxruntime ms, 'n/m' convs on edgesight's int8 kernel or '')."""
    if a.runs == 0:
        return None, None, ""
    es = bench_models.run_edgesight(Path(a.bin), Path(path), [npy], 1, a.runs)
    ort_t = bench_models.run_ort(Path(path), [npy], 1, a.runs)
    if "error" in es:
        return None, ort_t["median_ms"], ""
    rw = es["int8_rewrites"]
    kernel = f"{rw['int8_convs']} + {rw['depthwise_convs']} dw / {file_convs(path)}" if int8 else ""
    return es["median_ms"], ort_t["median_ms"], kernel


HEADER = ["| model | export | loads | top-1 equal | max abs p diff | edgesight ms | onnxruntime ms | ratio "
          "| int8 convs on edgesight's kernel + depthwise path / all | note |", "|---|---|---|---|---|---|---|---|---|---|"]


def row(a, name, kind, inputs, labels):
    try:
        path = make(a.out, name, kind, inputs)
    except Exception as e:  # an exporter failure is the exporter's, not ours
        return f"| {name} | {kind} | (export failed) | | | | | | | {str(e).splitlines()[0][:100]} |"
    fl = flavour(name, kind)
    want = reference(path, inputs.tensors[fl], kind == "softmax")
    got, err = ours(a.bin, path, labels, inputs.files, Inputs.PREPROCESS[fl])
    if got is None:
        return f"| {name} | {kind} | **no** | | | | | | | {err[:160]} |"
    top_ok, worst = True, 0.0
    for g, w in zip(got, want):
        top_ok &= g["top"][0]["class"] == int(np.argmax(w))
        for t in g["top"]:
            worst = max(worst, abs(t["score"] - w[t["class"]]))
    int8 = kind.startswith("q") or "_q" in kind
    es, ort_ms, kernel = timing(a, path, inputs.npy[fl], int8)
    ms = lambda v: "" if v is None else f"{v:.1f}"
    ratio = f"{es / ort_ms:.2f}" if es and ort_ms else ""
    return (f"| {name} | {kind} | yes | {'yes' if top_ok else '**no**'} | {worst:.1e} | {ms(es)} | {ms(ort_ms)} "
            f"| {ratio} | {kernel} | |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "compat"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "edgesight"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--exports", default=",".join(TORCH_EXPORTS))
    ap.add_argument("--runs", type=int, default=5, help="timed runs per engine and row (0: no timing)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    labels = os.path.join(a.out, "labels.txt")
    with open(labels, "w") as f:
        f.write("".join(f"class{i}\n" for i in range(1000)))
    inputs = Inputs(a.out)
    rows = list(HEADER)
    for name in a.models.split(","):
        for kind in KERAS_EXPORTS if name == "keras_resnet50" else a.exports.split(","):
            rows.append(row(a, name, kind, inputs, labels))
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    with open(os.path.join(a.out, "matrix.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
