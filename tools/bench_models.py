#!/usr/bin/env python3
"""edgesight against onnxruntime, side by side, on real ResNets in every int8 form.

Generates (into target/bench-models/, not committed) torchvision ResNet-18/34/50/101/152
with random weights (seeded) and a Keras ResNet50 (NHWC, "caffe" preprocessing; needs
`pip install keras`, uses the torch backend, no TensorFlow), each as

  fp32        the exported float model
  qlinear     QLinearConv, standard ONNX ops only, per-tensor U8S8
  qlinear_pc  QLinearConv, standard ops, per-channel weights
  qdq_pc      onnxruntime's QDQ format, per-channel weights (its default S8S8)
  qop         onnxruntime's QOperator default (com.microsoft QLinearAdd,
              QLinearGlobalAveragePool, QGemm; what Model Zoo int8 ResNets use; S8S8)
  qdq_u8      QDQ, per-channel, U8S8: what users quantising for x86 pick (onnxruntime's
              fastest form there)
  qop_u8      QOperator, per-channel, U8S8

then runs onnxruntime and `edgesight bench` on the same file, the same input tensors and
the same cores (taskset), and prints one Markdown table: median/min ms, the
edgesight/onnxruntime ratio, GOP/s and share of this core's peak, top-1 agreement and the
largest probability difference, peak RSS, and edgesight's load+optimise time.

  tools/bench_models.py --models r50 --threads 1,2
  tools/bench_models.py --models r18,r34,r50,r101,r152,keras50 --runs 10
  tools/bench_models.py --forms qdq_u8 --int8-kernel avx512vnni   # one kernel forced

Needs: torch, torchvision, onnx, onnxruntime (tools/requirements.txt), a release build of
edgesight (built if missing), util-linux's taskset.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench-models"
FORMS = ("fp32", "qlinear", "qlinear_pc", "qdq_pc", "qop", "qdq_u8", "qop_u8")
TORCHVISION = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101",
               "r152": "resnet152"}


# ---------------------------------------------------------------- inputs
def images(n, seed):
    """n deterministic 224x224 RGB uint8 images: smooth gradients, blobs and noise (random
    weights classify anything; what matters is realistic activation statistics)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224].astype(np.float32) / 224
    out = []
    for _ in range(n):
        img = np.zeros((224, 224, 3), np.float32)
        for c in range(3):
            a, b, p = rng.uniform(-1, 1, 3)
            img[..., c] = 128 + 90 * np.sin(6 * (a * x + b * y) + p)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, 1, 3) * [1, 1, 0.3]
            mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        out.append(img.clip(0, 255).astype(np.uint8))
    return out


def prepare(img, keras):
    if keras:  # Keras "caffe": BGR, 0-255 minus the ImageNet means, NHWC
        x = img[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
        return x[None]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((img.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]


# ---------------------------------------------------------------- models
def keras_resnet50(size):
    """keras.applications.ResNet50 with random weights (seeded) on the torch backend
    (../shared/notes/keras-resnet50.md). Its BatchNorms get statistics, scales and shifts
    like a trained net's: left at identity, the exporter's Sub/Mul/Add are by zeros and
    one shared scale, which no trained model has."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    keras.utils.set_random_seed(0)
    m = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape  # gamma, beta, moving mean, moving variance
            layer.set_weights([rng.uniform(lo, hi, n).astype(np.float32)
                               for lo, hi in [(0.8, 1.2), (-0.1, 0.1), (-0.1, 0.1), (0.5, 1.5)]])
    return m


def export(name, path):
    import torch

    torch.manual_seed(0)
    if name == "keras50":
        import keras

        m = keras_resnet50(224)
        m.export(str(path), format="onnx", opset_version=13,
                 input_signature=[keras.InputSpec(shape=(1, 224, 224, 3), dtype="float32")])
        return
    import torchvision

    m = getattr(torchvision.models, TORCHVISION[name])(weights=None).eval()
    # Random init leaves BatchNorm at identity statistics; give it some, like a trained net.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=13,
                  do_constant_folding=True)
    try:
        torch.onnx.export(m, torch.zeros(1, 3, 224, 224), str(path), dynamo=False, **kwargs)
    except TypeError:
        torch.onnx.export(m, torch.zeros(1, 3, 224, 224), str(path), **kwargs)


def quantize(fp32, out, form, calib):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self):
            import onnx

            name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
            self.it = iter([{name: x} for x in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    std_ops = dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                   weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Relu", "MaxPool", "MatMul"])
    if form == "qlinear":
        quantize_static(str(pre), str(out), Reader(), per_channel=False, **std_ops)
    elif form == "qlinear_pc":
        quantize_static(str(pre), str(out), Reader(), per_channel=True, **std_ops)
    elif form == "qdq_pc":
        quantize_static(str(pre), str(out), Reader(), per_channel=True)
    elif form == "qop":
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QOperator)
    elif form in ("qdq_u8", "qop_u8"):
        fmt = QuantFormat.QDQ if form == "qdq_u8" else QuantFormat.QOperator
        quantize_static(str(pre), str(out), Reader(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()


def macs(fp32):
    """Multiply-accumulates of the Conv and Gemm/MatMul nodes, from inferred shapes."""
    import onnx
    from onnx import numpy_helper, shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(fp32)))
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {t.name: numpy_helper.to_array(t).shape for t in m.graph.initializer}
    total = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            w = inits.get(n.input[1])
            out = shapes.get(n.output[0])
            if w and out:
                total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            w = inits.get(n.input[1])
            if w:
                total += int(np.prod(w))
    return total


def build_models(names, forms, calib_n):
    OUT.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        fp32 = OUT / f"{name}_fp32.onnx"
        if not fp32.exists():
            print(f"# exporting {name}", file=sys.stderr, flush=True)
            export(name, fp32)
        calib = [prepare(i, name == "keras50") for i in images(calib_n, 1)]
        for form in forms:
            p = fp32 if form == "fp32" else OUT / f"{name}_{form}.onnx"
            if not p.exists():
                print(f"# quantising {name} -> {form}", file=sys.stderr, flush=True)
                quantize(fp32, p, form, calib)
            paths[(name, form)] = p
    return paths


# ---------------------------------------------------------------- runners
def ort_child(args):
    """Runs in a child process (pinned by taskset): onnxruntime timings, outputs, RSS."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    s = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    name = s.get_inputs()[0].name
    inputs = [np.load(p) for p in args.inputs]
    outputs = [s.run(None, {name: x})[0].ravel().tolist() for x in inputs]
    for _ in range(2):
        s.run(None, {name: inputs[0]})
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        s.run(None, {name: inputs[0]})
        times.append((time.perf_counter() - t0) * 1e3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"median_ms": float(np.median(times)), "min_ms": min(times), "load_ms": load_ms,
                      "rss_mb": rss, "outputs": outputs}))


def cores(threads):
    return ",".join(str(i) for i in range(threads))


def run_ort(model, inputs, threads, runs):
    cmd = ["taskset", "-c", cores(threads), sys.executable, __file__, "--ort-child", str(model),
           "--threads", str(threads), "--runs", str(runs), "--inputs", *map(str, inputs)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def run_edgesight(exe, model, inputs, threads, runs, kernel="best"):
    outs = []
    timing = None
    for k, x in enumerate(inputs):
        raw = x.with_suffix(".f32")
        np.load(x).astype("<f4").tofile(raw)
        cmd = ["taskset", "-c", cores(threads), str(exe), "bench", "--model", str(model),
               "--threads", str(threads), "--input", str(raw), "--outputs",
               "--runs", str(runs if k == 0 else 1), "--warmup", "2" if k == 0 else "0",
               "--int8-kernel", kernel]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
        v = json.loads(r.stdout)
        outs.append(v["output"])
        if k == 0:
            timing = v
    timing["outputs"] = outs
    return timing


def softmax(v):
    v = np.asarray(v, np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def peak_gops(kind, threads):
    """This core's peak from its ISA and nominal clock: int8 with AVX-512 VNNI on Zen 4 is
    two 256-bit VPDPBUSD per cycle (64 MAC = 128 op/cycle), with AVX2 alone two 256-bit
    VPMADDUBSW/VPMADDWD pairs (32 MAC = 64 op/cycle); fp32 two 256-bit FMA pipes
    (32 flop/cycle). Other CPUs: pass --peak-int8 / --peak-fp32 (GOP/s per core)."""
    mhz, flags = 0.0, set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz") and not mhz:
            mhz = float(line.split(":")[1])
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":")[1].split())
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    per_cycle = (128 if vnni else 64) if kind == "int8" else 32
    return per_cycle * mhz / 1e3 * threads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="r50")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--threads", default="1")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--inputs-n", type=int, default=4, help="inputs compared for top-1 agreement")
    ap.add_argument("--calib", type=int, default=16, help="calibration images")
    ap.add_argument("--peak-int8", type=float)
    ap.add_argument("--peak-fp32", type=float)
    ap.add_argument("--edgesight", default=str(ROOT / "target" / "release" / "edgesight"))
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--int8-kernel", default="best", help="edgesight's int8 conv kernel (bench --int8-kernel)")
    # internal: the onnxruntime child
    ap.add_argument("--ort-child")
    ap.add_argument("--inputs", nargs="*")
    args = ap.parse_args()
    if args.ort_child:
        args.model = args.ort_child
        args.threads = int(args.threads)
        return ort_child(args)

    exe = Path(args.edgesight)
    if not exe.exists():
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    names = args.models.split(",")
    forms = args.forms.split(",")
    paths = build_models(names, forms, args.calib)
    rows, records = [], []
    for name in names:
        keras = name == "keras50"
        inputs = []
        for k, img in enumerate(images(args.inputs_n, 2)):
            p = OUT / f"input_{'nhwc' if keras else 'nchw'}_{k}.npy"
            np.save(p, prepare(img, keras))
            inputs.append(p)
        gmacs = macs(OUT / f"{name}_fp32.onnx") / 1e9  # exported whatever the forms
        for threads in map(int, args.threads.split(",")):
            for form in forms:
                model = paths[(name, form)]
                ort = run_ort(model, inputs, threads, args.runs)
                es = run_edgesight(exe, model, inputs, threads, args.runs, args.int8_kernel)
                rec = {"model": name, "form": form, "threads": threads, "gmacs": gmacs, "ort": ort,
                       "edgesight": {k: v for k, v in es.items() if k != "outputs"}}
                records.append(rec)
                if "error" in es:
                    rows.append(f"| {name} | {form} | {threads} | {ort['median_ms']:.1f} | — | — | — | — | — | "
                                f"{es['error'][:60]} | — | — |")
                    continue
                agree = sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(es["outputs"], ort["outputs"]))
                dp = max(float(np.abs(softmax(a) - softmax(b)).max()) for a, b in zip(es["outputs"], ort["outputs"]))
                kind = "fp32" if form == "fp32" else "int8"
                peak = (args.peak_fp32 if kind == "fp32" else args.peak_int8) or peak_gops(kind, threads)
                gops = 2 * gmacs / (es["median_ms"] / 1e3)
                rows.append(
                    f"| {name} | {form} | {threads} | {ort['median_ms']:.1f} / {ort['min_ms']:.1f} | "
                    f"{es['median_ms']:.1f} / {es['min_ms']:.1f} | {es['median_ms'] / ort['median_ms']:.2f} | "
                    f"{gops:.0f} | {100 * gops / peak:.0f} % | {agree}/{len(inputs)} | {dp:.1e} | "
                    f"{es['rss_mb']:.0f} / {ort['rss_mb']:.0f} | {es['load_ms'] + es['optimize_ms']:.0f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("| model | form | threads | onnxruntime median / min ms | edgesight median / min ms | "
          "edgesight / ort | GOP/s | % of peak | top-1 agree | max Δp | RSS MB (es / ort) | load+opt ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
