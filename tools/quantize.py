#!/usr/bin/env python3
"""Quantise your fp32 ONNX image classifier into the int8 form edgesight runs fastest.

  tools/quantize.py model.onnx --calib photos/ [--held-out more_photos/] [-o model_int8.onnx]

The form: QLinearConv with standard ONNX ops only (no com.microsoft operators), U8
activations, S8 weights, per-channel weight scales (accuracy of per-channel; edgesight fuses
its requantisation, so it runs at per-tensor speed: BENCHMARKS.md). `--per-tensor` gives
the per-tensor form instead. BatchNorm is folded and shapes inferred first
(onnxruntime's quant_pre_process).

Calibration images are preprocessed the way the daemon does it: stretched to the model's
input size, then `--preprocess torchvision` (RGB/255, ImageNet mean/std; the default),
`caffe` (Keras ResNet50: BGR, 0-255 minus the ImageNet means) or `raw` (RGB 0-255). Use a
few hundred frames from the camera the model will watch.

Report: top-1 agreement of int8 with fp32 (onnxruntime, one thread) on the held-out images
(`--held-out DIR`, or every fifth image of --calib), the largest probability difference, both
file sizes, and the [model] lines for edgesight's config.

Needs: onnx, onnxruntime, numpy, pillow (tools/requirements.txt).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def image_files(d):
    files = sorted(p for p in Path(d).rglob("*") if p.suffix.lower() in EXTS)
    if not files:
        sys.exit(f"{d}: no images (.jpg, .png, .bmp, .webp)")
    return files


def input_geometry(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        sys.exit(f"{path}: input {inp.name} has rank {len(dims)}; expected a 4-D image tensor")
    if dims[1] == 3:
        return inp.name, "nchw", dims[2], dims[3]
    if dims[3] == 3:
        return inp.name, "nhwc", dims[1], dims[2]
    sys.exit(f"{path}: input shape {dims} has no 3-channel axis at position 1 or 3")


def tensor(path, layout, h, w, preprocess):
    rgb = np.asarray(Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
    if preprocess == "torchvision":
        x = (rgb / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    elif preprocess == "caffe":
        x = rgb[..., ::-1] - [103.939, 116.779, 123.68]
    else:
        x = rgb
    x = x.astype(np.float32)
    return (x.transpose(2, 0, 1) if layout == "nchw" else x)[None].copy()


def session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", required=True, help="folder of calibration images")
    ap.add_argument("--held-out", help="folder of images for the agreement report")
    ap.add_argument("-o", "--output", type=Path)
    ap.add_argument("--preprocess", choices=["torchvision", "caffe", "raw"], default="torchvision")
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales")
    ap.add_argument("--max-calib", type=int, default=500)
    args = ap.parse_args()

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = args.output or args.model.with_name(args.model.stem + "_int8.onnx")
    name, layout, h, w = input_geometry(args.model)
    calib = image_files(args.calib)
    if args.held_out:
        held = image_files(args.held_out)
    else:
        # Every fifth image (not the last fifth: files sorted by folder would hold out
        # whole classes).
        held = calib[4::5] or calib
        calib = [p for i, p in enumerate(calib) if i % 5 != 4] or calib
    calib = calib[: args.max_calib]
    print(f"{args.model}: input {name} {layout.upper()} {h}x{w}; {len(calib)} calibration, "
          f"{len(held)} held-out image(s)")

    class Reader:
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            p = next(self.it, None)
            return None if p is None else {name: tensor(p, layout, h, w, args.preprocess)}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(args.model), str(pre), skip_symbolic_shape=True)
    try:
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator,
                        per_channel=not args.per_tensor, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        # Standard ops only: QLinearConv, and MatMul as MatMulInteger/QLinearMatMul.
                        op_types_to_quantize=["Conv", "Relu", "MaxPool", "MatMul"])
    finally:
        pre.unlink(missing_ok=True)

    f32, i8 = session(args.model), session(out)
    agree, dmax = 0, 0.0
    for p in held:
        x = tensor(p, layout, h, w, args.preprocess)
        a = softmax(f32.run(None, {name: x})[0].ravel())
        b = softmax(i8.run(None, {name: x})[0].ravel())
        agree += int(a.argmax() == b.argmax())
        dmax = max(dmax, float(np.abs(a - b).max()))
    mb = lambda p: p.stat().st_size / 2**20  # noqa: E731
    print(f"wrote {out} ({mb(out):.1f} MB; fp32 {mb(args.model):.1f} MB), "
          f"{'per-tensor' if args.per_tensor else 'per-channel'} U8S8 QLinearConv")
    print(f"top-1 agreement with fp32 on {len(held)} held-out image(s): {agree}/{len(held)} "
          f"({100 * agree / len(held):.1f} %); largest probability difference {dmax:.3f}")
    print("\n[model]")
    print(f'path = "{out.resolve()}"')
    print(f'preprocess = "{args.preprocess}"')


if __name__ == "__main__":
    main()
