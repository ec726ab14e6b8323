#!/usr/bin/env python3
"""Train the demo/fixture ResNet and write every fixture the Rust tests use.

Outputs (all committed; CI never runs this script):
  tests/fixtures/models/shapes_fp32.onnx          fp32, NCHW [1,3,64,64], logits
  tests/fixtures/models/shapes_int8_qlinear.onnx  QLinearConv, standard ops only, per-tensor U8S8
  tests/fixtures/models/shapes_int8_qdq.onnx      onnxruntime quantize_static defaults (QDQ)
  tests/fixtures/models/shapes_int8_qop.onnx      onnxruntime QOperator defaults (com.microsoft ops)
  tests/fixtures/models/shapes_int8_qlinear_pc.onnx  QLinearConv, standard ops, per-channel weights
  tests/fixtures/models/shapes_int8_qdq_pc.onnx   QDQ with per-channel weights
  tests/fixtures/models/unsupported_op.onnx       a tiny graph with a contrib op edgesight
                                                  does not translate (error-message test)
  tests/fixtures/labels.txt                       one label per line, class index = line number
  tests/fixtures/samples/<class>/<n>.{png,jpg}    held-out samples (the demo "camera")
  tests/fixtures/reference/inputs.bin             each sample resized to 64x64 RGB8 by PIL (parity input)
  tests/fixtures/reference/reference.json         onnxruntime outputs for every model form and sample
  config/imagenet_labels.txt                      ImageNet-1k labels (for users' torchvision ResNets)

Deterministic given the seed; takes ~2-4 minutes on two CPU cores.
"""

import argparse
import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PER_TENSOR_FORMS = ("qlinear", "qdq", "qop")
PER_CHANNEL_FORMS = ("qlinear_pc", "qdq_pc")
CLASSES = ["circle", "square", "triangle", "cross", "hstripes", "vstripes", "checker"]
RENDER = 128  # samples are rendered at this size, like a small camera frame
INPUT = 64  # model input side
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ---------------------------------------------------------------- images
def rand_color(rng, avoid=None):
    while True:
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid)) > 160:
            return c


def background(rng, size):
    c0 = np.array(rand_color(rng), dtype=np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:
        img = np.broadcast_to(c0, (size, size, 3)).copy()
    else:
        c1 = np.array(rand_color(rng), dtype=np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)
        t = t[None, :, None] if kind == 1 else t[:, None, None]
        img = c0 * (1 - t) + c1 * t
        img = np.broadcast_to(img, (size, size, 3)).copy()
    return img, tuple(int(v) for v in c0)


def render(cls, rng, size=RENDER):
    bg, bgc = background(rng, size)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    fg = rand_color(rng, avoid=bgc)
    s = size
    if cls in ("circle", "square", "triangle", "cross"):
        r = rng.uniform(0.18, 0.38) * s
        cx = rng.uniform(r, s - r)
        cy = rng.uniform(r, s - r)
        if cls == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif cls == "square":
            a = rng.uniform(0, math.pi / 2)
            pts = [(cx + r * math.cos(a + k * math.pi / 2), cy + r * math.sin(a + k * math.pi / 2)) for k in range(4)]
            d.polygon(pts, fill=fg)
        elif cls == "triangle":
            a = rng.uniform(0, 2 * math.pi)
            pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
            d.polygon(pts, fill=fg)
        else:  # cross
            w = r * rng.uniform(0.25, 0.4)
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    else:
        period = rng.uniform(0.08, 0.2) * s
        phase = rng.uniform(0, period)
        arr = np.array(img)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        if cls == "hstripes":
            mask = ((yy + phase) % period) < period / 2
        elif cls == "vstripes":
            mask = ((xx + phase) % period) < period / 2
        else:  # checker
            mask = (((yy + phase) % period) < period / 2) ^ (((xx + phase) % period) < period / 2)
        # patterns cover a random sub-rectangle, at least half the frame
        x0, y0 = rng.integers(0, s // 4, 2)
        x1, y1 = s - rng.integers(0, s // 4, 2)
        region = np.zeros_like(mask)
        region[y0:y1, x0:x1] = True
        arr[mask & region] = fg
        img = Image.fromarray(arr)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    arr = np.array(img).astype(np.float32)
    arr += rng.normal(0, rng.uniform(0, 12), arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def to_input_rgb(img):
    """What the daemon does to a frame before normalising: stretch to 64x64, bilinear."""
    return np.array(img.convert("RGB").resize((INPUT, INPUT), Image.BILINEAR))


def normalize(rgb):
    x = (rgb.astype(np.float32) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def jpeg_roundtrip(img, rng):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(60, 95)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def dataset(n_per_class, seed):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n_per_class):
        for ci, c in enumerate(CLASSES):
            img = render(c, rng)
            if rng.random() < 0.5:
                img = jpeg_roundtrip(img, rng)
            xs.append(normalize(to_input_rgb(img))[0])
            ys.append(ci)
    return torch.tensor(np.stack(xs)), torch.tensor(ys)


# ---------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + idt)


class ShapesResNet(nn.Module):
    """ResNet with basic blocks, 64x64 input: stem, 3 stages (16/32/64), GAP, FC."""

    def __init__(self, n_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def train(model, xtr, ytr, xva, yva, epochs):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * math.ceil(len(xtr) / 64))
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            xb = xtr[idx]
            if random.random() < 0.5:
                xb = torch.flip(xb, dims=[3])
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, xva, yva)
        print(f"epoch {ep + 1}/{epochs}: loss {loss.item():.3f} held-out acc {acc:.4f}", flush=True)
    return acc


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------- export + quantise
def export(model, path):
    model.eval()
    dummy = torch.zeros(1, 3, INPUT, INPUT)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=13, do_constant_folding=True)
    try:
        torch.onnx.export(model, dummy, str(path), dynamo=False, **kwargs)
    except TypeError:
        torch.onnx.export(model, dummy, str(path), **kwargs)


class Calib:
    def __init__(self, x):
        self.it = iter([{"input": x[i : i + 1].numpy()} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


def quantize(fp32, out, calib, form):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    if form == "qlinear":
        # Standard ONNX ops only (tract loads them): no com.microsoft QLinearAdd/QGemm/...
        quantize_static(str(pre), str(out), Calib(calib), quant_format=QuantFormat.QOperator,
                        per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Relu", "MaxPool", "MatMul"])
    elif form == "qlinear_pc":
        quantize_static(str(pre), str(out), Calib(calib), quant_format=QuantFormat.QOperator,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Relu", "MaxPool", "MatMul"])
    elif form == "qdq":
        quantize_static(str(pre), str(out), Calib(calib))  # onnxruntime defaults: QDQ
    elif form == "qdq_pc":
        quantize_static(str(pre), str(out), Calib(calib), per_channel=True)
    elif form == "qop":
        quantize_static(str(pre), str(out), Calib(calib), quant_format=QuantFormat.QOperator)
    pre.unlink()


def make_nhwc(fp32, out):
    """The fp32 model behind a Transpose: input [1,64,64,3] (NHWC), as Keras exports are."""
    import onnx
    from onnx import helper, TensorProto

    m = onnx.load(str(fp32))
    g = m.graph
    old = g.input[0].name
    for n in g.node:
        n.input[:] = ["input_nchw" if i == old else i for i in n.input]
    g.node.insert(0, helper.make_node("Transpose", ["input"], ["input_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
    g.input.pop(0)
    g.input.insert(0, helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, INPUT, INPUT, 3]))
    onnx.checker.check_model(m)
    onnx.save(m, str(out))


def ort_run(path, x):
    import onnxruntime as ort

    if "nhwc" in Path(path).name:
        x = x.transpose(0, 2, 3, 1).copy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train-per-class", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples-per-class", type=int, default=6)
    ap.add_argument("--only-nhwc", action="store_true",
                    help="only (re)derive shapes_fp32_nhwc.onnx and its reference outputs")
    ap.add_argument("--only-per-channel", action="store_true",
                    help="only (re)derive the per-channel int8 forms from the committed fp32 model")
    args = ap.parse_args()
    if args.only_nhwc:
        return only_nhwc()
    if args.only_per_channel:
        make_unsupported(FIX / "models" / "unsupported_op.onnx")
        return only_per_channel(args.seed)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)

    print("rendering training and held-out sets ...", flush=True)
    xtr, ytr = dataset(args.train_per_class, args.seed)
    xva, yva = dataset(150, args.seed + 1)
    model = ShapesResNet(len(CLASSES))
    acc = train(model, xtr, ytr, xva, yva, args.epochs)
    if acc < 0.95:
        raise SystemExit(f"held-out accuracy {acc:.4f} < 0.95; raise --epochs or --train-per-class")

    mdir = FIX / "models"
    mdir.mkdir(parents=True, exist_ok=True)
    fp32 = mdir / "shapes_fp32.onnx"
    export(model, fp32)
    calib = xtr[torch.randperm(len(xtr))[:256]]
    forms = {"fp32": fp32}
    for form in PER_TENSOR_FORMS + PER_CHANNEL_FORMS:
        p = mdir / f"shapes_int8_{form}.onnx"
        quantize(fp32, p, calib, form)
        forms[f"int8_{form}"] = p
    forms["fp32_nhwc"] = mdir / "shapes_fp32_nhwc.onnx"
    make_nhwc(fp32, forms["fp32_nhwc"])
    make_unsupported(mdir / "unsupported_op.onnx")

    (FIX / "labels.txt").write_text("\n".join(CLASSES) + "\n")

    # Held-out samples: a seed the training never saw; half PNG, half JPEG.
    sdir = FIX / "samples"
    rng = np.random.default_rng(args.seed + 1000)
    files, rgbs, truth = [], [], []
    for c in CLASSES:
        (sdir / c).mkdir(parents=True, exist_ok=True)
        for old in (sdir / c).iterdir():
            old.unlink()
    for k in range(args.samples_per_class):
        for ci, c in enumerate(CLASSES):
            img = render(c, rng)
            ext = "png" if k % 2 == 0 else "jpg"
            p = sdir / c / f"{k:02d}.{ext}"
            if ext == "png":
                img.save(p, optimize=True)
            else:
                img.save(p, quality=90)
            reread = Image.open(p).convert("RGB")
            files.append(str(p.relative_to(ROOT)))
            rgbs.append(to_input_rgb(reread))
            truth.append(ci)
    rgb = np.stack(rgbs)
    rdir = FIX / "reference"
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "inputs.bin").write_bytes(rgb.astype(np.uint8).tobytes())
    x = np.concatenate([normalize(r) for r in rgb])

    ref = {"input_shape": [1, 3, INPUT, INPUT], "inputs_bin": "NHWC uint8, 64x64 RGB per sample, in `files` order",
           "classes": CLASSES, "files": files, "truth": truth, "forms": {}}
    for name, p in forms.items():
        logits = ort_run(p, x)
        probs = softmax(logits)
        top1 = probs.argmax(1)
        acc = float((top1 == np.array(truth)).mean())
        print(f"{name:14s} {p.stat().st_size / 1024:7.1f} KiB  onnxruntime accuracy on samples {acc:.3f}")
        ref["forms"][name] = {"file": str(p.relative_to(ROOT)), "accuracy": acc,
                              "logits": [[round(float(v), 6) for v in row] for row in logits]}
    (rdir / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")

    try:
        import torchvision

        cats = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
        (ROOT / "config" / "imagenet_labels.txt").write_text("\n".join(cats) + "\n")
    except Exception as e:  # torchvision is optional; the file is committed
        print(f"imagenet labels not rewritten: {e}")


def add_reference(ref, name, path):
    """onnxruntime's logits for the committed samples (inputs.bin) on `path`, into `ref`."""
    rgb = np.frombuffer((FIX / "reference" / "inputs.bin").read_bytes(), dtype=np.uint8)
    x = np.concatenate([normalize(r) for r in rgb.reshape(-1, INPUT, INPUT, 3)])
    logits = ort_run(path, x)
    acc = float((logits.argmax(1) == np.array(ref["truth"])).mean())
    ref["forms"][name] = {"file": str(path.relative_to(ROOT)), "accuracy": acc,
                          "logits": [[round(float(v), 6) for v in row] for row in logits]}
    print(f"{name:14s} {path.stat().st_size / 1024:7.1f} KiB  onnxruntime accuracy on samples {acc:.3f}")


def only_per_channel(seed):
    """Per-channel forms of the committed fp32 model, calibrated on freshly rendered images
    (the training set is not kept; any representative images calibrate)."""
    rdir = FIX / "reference"
    ref = json.loads((rdir / "reference.json").read_text())
    calib, _ = dataset(40, seed + 2000)
    for form in PER_CHANNEL_FORMS:
        p = FIX / "models" / f"shapes_int8_{form}.onnx"
        quantize(FIX / "models" / "shapes_fp32.onnx", p, calib, form)
        add_reference(ref, f"int8_{form}", p)
    (rdir / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")


def make_unsupported(out):
    """input -> QuantizeLinear -> com.microsoft QLinearSoftmax -> DequantizeLinear: a real
    onnxruntime contrib op that neither tract nor edgesight translates. (It was
    QLinearSigmoid until edgesight learnt that one.)"""
    import onnx
    from onnx import helper, TensorProto

    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]),
             helper.make_tensor("z", TensorProto.UINT8, [], [128]),
             helper.make_tensor("so", TensorProto.FLOAT, [], [1 / 256]),
             helper.make_tensor("zo", TensorProto.UINT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"], name="q"),
             helper.make_node("QLinearSoftmax", ["xq", "s", "z", "so", "zo"], ["yq"], name="softmax",
                              domain="com.microsoft", axis=1, opset=13),
             helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["logits"], name="dq")]
    g = helper.make_graph(nodes, "unsupported", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(m, str(out))


def only_nhwc():
    mdir, rdir = FIX / "models", FIX / "reference"
    out = mdir / "shapes_fp32_nhwc.onnx"
    make_nhwc(mdir / "shapes_fp32.onnx", out)
    ref = json.loads((rdir / "reference.json").read_text())
    rgb = np.frombuffer((rdir / "inputs.bin").read_bytes(), dtype=np.uint8).reshape(-1, INPUT, INPUT, 3)
    x = np.concatenate([normalize(r) for r in rgb])
    logits = ort_run(out, x)
    acc = float((logits.argmax(1) == np.array(ref["truth"])).mean())
    ref["forms"]["fp32_nhwc"] = {"file": str(out.relative_to(ROOT)), "accuracy": acc,
                                 "logits": [[round(float(v), 6) for v in row] for row in logits]}
    (rdir / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    print(f"fp32_nhwc onnxruntime accuracy on samples {acc:.3f}")


if __name__ == "__main__":
    main()
