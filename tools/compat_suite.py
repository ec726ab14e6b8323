#!/usr/bin/env python3
"""The models users bring (issue 16): common classifiers exported the ways exporters do it,
each run by edgesight and by onnxruntime on the same inputs.

    python3 tools/compat_suite.py [--out target/compat] [--bin target/debug/edgesight]
                                  [--models resnet18,mobilenet_v2] [--exports script13,...]

Models come from torchvision with random seeded weights (the numbers do not matter, the
graphs do). Exports:
  script11/13/17  torch.onnx.export, TorchScript exporter, that opset
  dynamo          torch.onnx.export(dynamo=True), its default opset
  nhwc            NHWC input, permuted inside the model (Transposes in the graph)
  bn              BatchNorm left as Sub/Mul/Add after bias-less convs (not folded)
  dynbatch        a dynamic batch dimension
  softmax         a Softmax at the end (probabilities out: not to be softmaxed twice)
  qdq_u8s8, qop_u8s8, qdq_s8s8, qop_s8s8
                  onnxruntime's static quantisation of script13, per-channel weights
keras_resnet50 (Keras 3's own ONNX export, torch backend; caffe preprocessing): keras and
keras_dynbatch (static or Keras's default dynamic batch), and quantised forms of each.

Each row: loads or not (edgesight's error, first line), top-1 equal to onnxruntime on
every input, the largest |probability difference|. Writes OUT/matrix.md and prints it.
Needs torch, torchvision, onnx, onnxruntime, numpy, pillow (tools/requirements.txt).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keras ResNet50 has exports of its own (--exports is for the torchvision models).
KERAS_EXPORTS = ["keras", "keras_dynbatch", "qdq_u8s8", "qdq_u8s8_dynbatch", "qop_u8s8", "qdq_s8s8"]
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
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    keras.utils.set_random_seed(0)
    m = keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    batch = None if kind.endswith("dynbatch") else 1
    m.export(path, format="onnx", opset_version=13,
             input_signature=[keras.InputSpec(shape=(batch, SIZE, SIZE, 3), dtype="float32")])


def export(name, kind, path):
    if name == "keras_resnet50":
        return export_keras(kind, path)
    m = model(name)
    x = torch.rand(1, 3, SIZE, SIZE)
    opset, dynamo, axes = 13, False, None
    if kind.startswith("script"):
        opset = int(kind[6:])
    elif kind == "dynamo":
        dynamo, opset = True, None
    elif kind == "nhwc":
        m, x = Nhwc(m), x.permute(0, 2, 3, 1).contiguous()
    elif kind == "bn":
        m = explicit_bn(m)
    elif kind == "dynbatch":
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
    elif kind == "softmax":
        m = WithSoftmax(m)
    kw = {"input_names": ["input"], "output_names": ["output"], "dynamic_axes": axes}
    if dynamo:
        torch.onnx.export(m, (x,), path, dynamo=True, input_names=["input"], output_names=["output"])
    else:
        torch.onnx.export(m, (x,), path, opset_version=opset, dynamo=False, do_constant_folding=True, **kw)


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
    act = QuantType.QInt8 if form.endswith("s8s8") else QuantType.QUInt8
    quantize_static(pre, dst, Reader(), quant_format=fmt, per_channel=True,
                    activation_type=act, weight_type=QuantType.QInt8)
    os.remove(pre)


def caffe_tensor(img):
    """Keras's "caffe" preprocessing: BGR, 0..255 minus the ImageNet means, NHWC."""
    bgr = img[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
    return np.ascontiguousarray(bgr[None], np.float32)


def model_inputs(name, tensors, caffe):
    return caffe if name == "keras_resnet50" else tensors


def inputs(out, n=3):
    rng = np.random.default_rng(7)
    files, tensors, caffe = [], [], []
    for i in range(n):
        # Smooth random images (a few blobs), like a scene rather than noise.
        img = np.zeros((SIZE, SIZE, 3), np.float32)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        for _ in range(6):
            cy, cx, r = rng.integers(0, SIZE, 2).tolist() + [int(rng.integers(20, 80))]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        img = img.astype(np.uint8)
        f = os.path.join(out, f"input{i}.png")
        Image.fromarray(img).save(f)
        files.append(f)
        t = ((img.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
        tensors.append(np.ascontiguousarray(t, np.float32))
        caffe.append(caffe_tensor(img))
    return files, tensors, caffe


def reference(path, tensors, nhwc, probs_out):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    for t in tensors:
        x = t.transpose(0, 2, 3, 1).copy() if nhwc else t
        y = sess.run(None, {name: x})[0][0].astype(np.float64)
        if not probs_out:
            y = np.exp(y - y.max())
            y /= y.sum()
        out.append(y)
    return out


def ours(binary, path, labels, files, preprocess):
    cfg = path + ".toml"
    with open(cfg, "w") as f:
        f.write(f'[model]\npath = "{path}"\nlabels = "{labels}"\npreprocess = "{preprocess}"\n'
                '[[camera]]\nname = "x"\npath = "x"\n')
    r = subprocess.run([binary, "classify", "--json", "--config", cfg, *files],
                       capture_output=True, text=True)
    if r.returncode != 0:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        return None, (lines[-1] if lines else f"exit {r.returncode}")
    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")], None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "compat"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "edgesight"))
    ap.add_argument("--models", default="resnet18,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,squeezenet1_1,keras_resnet50")
    ap.add_argument("--exports", default="script11,script13,script17,dynamo,nhwc,bn,dynbatch,softmax,qdq_u8s8,qop_u8s8,qdq_s8s8,qop_s8s8")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    labels = os.path.join(a.out, "labels.txt")
    with open(labels, "w") as f:
        f.write("".join(f"class{i}\n" for i in range(1000)))
    files, tensors, caffe = inputs(a.out)
    rows = ["| model | export | loads | top-1 equal | max abs p diff | note |", "|---|---|---|---|---|---|"]
    for name in a.models.split(","):
        kinds = KERAS_EXPORTS if name == "keras_resnet50" else a.exports.split(",")
        for kind in kinds:
            path = os.path.join(a.out, f"{name}_{kind}.onnx")
            try:
                keras_model = name == "keras_resnet50"
                if kind.startswith("q"):
                    base_kind = "keras_dynbatch" if keras_model and "dynbatch" in kind else (
                        "keras" if keras_model else "script13")
                    base = os.path.join(a.out, f"{name}_{base_kind}.onnx")
                    if not os.path.exists(base):
                        export(name, base_kind, base)
                    quantise(base, path, kind.replace("_dynbatch", ""), model_inputs(name, tensors, caffe))
                else:
                    export(name, kind, path)
            except Exception as e:  # an exporter failure is the exporter's, not ours
                rows.append(f"| {name} | {kind} | (export failed) | | | {str(e).splitlines()[0][:100]} |")
                continue
            keras_model = name == "keras_resnet50"
            if keras_model:
                want = reference(path, caffe, False, False)
            else:
                want = reference(path, tensors, kind == "nhwc", kind == "softmax")
            got, err = ours(a.bin, path, labels, files, "caffe" if keras_model else "torchvision")
            if got is None:
                rows.append(f"| {name} | {kind} | **no** | | | {err[:160]} |")
            else:
                top_ok, worst = True, 0.0
                for g, w in zip(got, want):
                    top_ok &= g["top"][0]["class"] == int(np.argmax(w))
                    for t in g["top"]:
                        worst = max(worst, abs(t["score"] - w[t["class"]]))
                rows.append(f"| {name} | {kind} | yes | {'yes' if top_ok else '**no**'} | {worst:.1e} | |")
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    with open(os.path.join(a.out, "matrix.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
