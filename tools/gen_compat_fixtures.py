#!/usr/bin/env python3
"""Small committed models, one per pattern tools/compat_suite.py found edgesight refusing
or mishandling, with onnxruntime's outputs (issue 16). Read by tests/model.rs
(`every_compat_pattern_matches_onnxruntime`).

    python3 tools/gen_compat_fixtures.py      (writes tests/fixtures/compat/)

- qop_sigmoid_concat: onnxruntime's QOperator quantisation of a conv net with a sigmoid
  gate (EfficientNet's SiLU / squeeze-excitation), a LeakyRelu branch and a channel
  Concat (SqueezeNet's fire modules): com.microsoft QLinearSigmoid, QLinearLeakyRelu and
  QLinearConcat, which tract does not know and edgesight expands at load.
- qdq_dynbatch_pad: a conv net with a dynamic batch and an explicit Pad (Keras's
  ZeroPadding2D), quantised by onnxruntime after its quant_pre_process, which writes
  the symbolic batch into the graph's value_info: tract failed on the Pad ("Failed
  analyse"), as on Keras ResNet50 quantised with its default dynamic batch.
- softmax_end: an fp32 conv net whose graph ends in Softmax (torchvision models exported
  with their probabilities, Keras's default classifier_activation): its outputs are
  probabilities already and must not be softmaxed twice.
- conv_add_pooled: a channels-last conv net (NHWC input, Transposes) in which a bias-less
  conv's output gets a globally pooled branch, shaped [1,C,1,1], added to it: tract folds
  that Add into the conv's bias, then its ChangeAxes pass breaks the bias ("Output
  channels is 8, bias is 8,1"), the failure issue 16 reports from a real ResNet-50.
  Edgesight retries without that pass (src/model/passes.rs).
- fp16_gemm: a conv net converted to float16 by onnxconverter-common with float inputs
  and outputs kept (Casts at both ends), as users shrink models: tract's Gemm came out
  f32 from f16 operands and the load failed. Edgesight widens float16 models to float32
  first (src/model/proto_fixes.rs).
- keras_bn_fp32, keras_bn_qdq, keras_bn_qop: a channels-last conv net with BatchNorm as
  the Keras exporter writes it (Sub/Mul/Add by per-channel constants after each conv,
  between Transposes), fp32 and quantised by onnxruntime in QDQ and QOperator forms. On
  Keras's ResNet50 those BatchNorms, quantised op by op, were more than half of the int8
  run; edgesight folds each chain into a per-channel table (src/model/int8/tables.rs).
Needs onnx, onnxruntime, onnxconverter-common, numpy.
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "compat")
SHAPE = [1, 3, 16, 16]


def initializers(rng):
    """(the graph's initializer list, w(*shape): random weights, init(name, tensor): the
    tensor added to the list under that name, which it returns)."""
    inits = []

    def w(*shape):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32))

    def init(name, t):
        t.name = name
        inits.append(t)
        return name

    return inits, w, init


def float_model(path):
    rng = np.random.default_rng(3)
    inits, w, init = initializers(rng)

    nodes = [
        helper.make_node("Conv", ["x", init("w0", w(8, 3, 3, 3)), init("b0", w(8))], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c0"], ["s0"]),
        helper.make_node("Mul", ["c0", "s0"], ["silu"]),
        helper.make_node("Conv", ["silu", init("w1", w(8, 8, 1, 1)), init("b1", w(8))], ["c1"]),
        helper.make_node("LeakyRelu", ["c1"], ["l1"], alpha=0.1),
        helper.make_node("Conv", ["silu", init("w2", w(8, 8, 3, 3)), init("b2", w(8))], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Concat", ["l1", "r2"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", init("fw", w(5, 16)), init("fb", w(5))], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "sigmoid_concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def dynbatch_pad_model(path):
    rng = np.random.default_rng(4)
    inits, w, init = initializers(rng)

    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 3, 3], np.int64), "pads")
    inits.append(pads)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Pad", ["t", "pads"], ["p"], mode="constant"),
        helper.make_node("Conv", ["p", init("w0", w(8, 3, 7, 7)), init("b0", w(8))], ["c0"], strides=[2, 2]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", init("w1", w(8, 8, 3, 3)), init("b1", w(8))], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", init("fw", w(5, 8)), init("fb", w(5))], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "dynbatch_pad",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 16, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def reference(dst, xs, ops, optimised=True):
    opts = ort.SessionOptions()
    if not optimised:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return {"onnxruntime": ort.__version__, "optimised": optimised, "ops": ops, "input_shape": list(xs[0].shape),
            "cases": [{"input": x.flatten().tolist(), "logits": sess.run(None, {name: x})[0][0].tolist()}
                      for x in xs]}


def quantise(src, dst, xs, fmt):
    """onnxruntime's static quantisation, per-channel U8S8, calibrated on `xs`."""

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x} for x in xs])

        def get_next(self):
            return next(self.it, None)

    quantize_static(src, dst, Reader(), quant_format=fmt, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def write_reference(name, dst, xs, ops, optimised=True):
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(reference(dst, xs, ops, optimised), f)
        f.write("\n")


def make_dynbatch_pad():
    from onnxruntime.quantization.shape_inference import quant_pre_process
    rng = np.random.default_rng(6)
    xs = [rng.normal(0, 1, [1, 16, 16, 3]).astype(np.float32) for _ in range(4)]
    src, pre = os.path.join(OUT, "f.tmp.onnx"), os.path.join(OUT, "pre.tmp.onnx")
    dynbatch_pad_model(src)
    quant_pre_process(src, pre)

    dst = os.path.join(OUT, "qdq_dynbatch_pad.onnx")
    quantise(pre, dst, xs, QuantFormat.QDQ)
    os.remove(src)
    os.remove(pre)
    m = onnx.load(dst)
    symbolic = [v.name for v in m.graph.value_info
                if any(d.dim_param for d in v.type.tensor_type.shape.dim)]
    assert symbolic, "quant_pre_process left no symbolic value_info: the pattern is gone"
    ops = sorted({n.op_type for n in m.graph.node})
    write_reference("qdq_dynbatch_pad", dst, xs, ops)
    print(f"qdq_dynbatch_pad.onnx: {ops}, {len(symbolic)} value_info with a symbolic dim")


def finish(name, nodes, inits, rng, shape=SHAPE, convert=lambda m: m):
    """A graph from input x (`shape`) to output y ([1, 5]) saved as tests/fixtures/compat/
    NAME.onnx, after `convert`, with onnxruntime's outputs on four inputs drawn from `rng`.
    Returns its op types."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    m = convert(m)
    onnx.checker.check_model(m)
    dst = os.path.join(OUT, f"{name}.onnx")
    onnx.save(m, dst)
    xs = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(4)]
    ops = sorted({n.op_type for n in m.graph.node})
    write_reference(name, dst, xs, ops)
    print(f"{name}.onnx: {ops}")
    return ops


def make_softmax_end():
    rng = np.random.default_rng(8)
    w = lambda name, *s: numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), name)
    inits = [w("w0", 8, 3, 3, 3), w("b0", 8), w("fw", 5, 8), w("fb", 5)]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("GlobalAveragePool", ["r0"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    finish("softmax_end", nodes, inits, rng)


def make_conv_add_pooled():
    rng = np.random.default_rng(9)
    inits, w, init = initializers(rng)
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", init("w0", w(8, 3, 3, 3)), init("b0", w(8))], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        # A bias-less conv, and a [1,8,1,1] branch computed from the image added to it.
        helper.make_node("Conv", ["r0", init("w1", w(8, 8, 1, 1))], ["a1"]),
        helper.make_node("Conv", ["a1", init("w3", w(8, 8, 3, 3))], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r0", init("w2", w(8, 8, 1, 1))], ["b2"]),
        helper.make_node("GlobalAveragePool", ["b2"], ["c2"]),
        helper.make_node("Add", ["c1", "c2"], ["a"]),
        helper.make_node("Relu", ["a"], ["r1"]),
        helper.make_node("Transpose", ["r1"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["nhwc"], ["g"], axes=[1, 2], keepdims=0),
        helper.make_node("Gemm", ["g", init("fw", w(5, 8)), init("fb", w(5))], ["y"], transB=1),
    ]
    finish("conv_add_pooled", nodes, inits, rng, shape=[1, 16, 16, 3])


def make_fp16_gemm():
    from onnxconverter_common import float16

    rng = np.random.default_rng(10)
    inits, w, init = initializers(rng)
    nodes = [
        helper.make_node("Conv", ["x", init("w0", w(8, 3, 3, 3)), init("b0", w(8))], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("GlobalAveragePool", ["r0"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", init("fw", w(5, 8)), init("fb", w(5))], ["y"], transB=1),
    ]
    ops = finish("fp16_gemm", nodes, inits, rng,
                 convert=lambda m: float16.convert_float_to_float16(m, keep_io_types=True))
    assert "Cast" in ops, ops


def keras_bn_model(path, rng):
    """A channels-last conv net as the Keras exporter writes ResNet50 (NHWC input, each
    conv between Transposes, BatchNorm as Sub/Mul/Add by per-channel constants, a
    residual add of two BatchNormed convs), with trained-looking BatchNorm values."""
    inits, w, init = initializers(rng)

    def bn(x, i, c=8):
        m = init(f"mean{i}", numpy_helper.from_array(rng.uniform(-0.2, 0.2, c).astype(np.float32)))
        s = init(f"scale{i}", numpy_helper.from_array(rng.uniform(0.6, 1.4, c).astype(np.float32)))
        b = init(f"beta{i}", numpy_helper.from_array(rng.uniform(-0.2, 0.2, c).astype(np.float32)))
        return [helper.make_node("Sub", [x, m], [f"sub{i}"]), helper.make_node("Mul", [f"sub{i}", s], [f"mul{i}"]),
                helper.make_node("Add", [f"mul{i}", b], [f"bn{i}"])]

    def conv(x, i, cin, k, pads):
        return [helper.make_node("Conv", [x, init(f"w{i}", w(8, cin, k, k)), init(f"b{i}", w(8))], [f"c{i}"],
                                 pads=pads),
                helper.make_node("Transpose", [f"c{i}"], [f"h{i}"], perm=[0, 2, 3, 1])]

    nodes = [helper.make_node("Transpose", ["x"], ["t0"], perm=[0, 3, 1, 2]),
             *conv("t0", 0, 3, 3, [1, 1, 1, 1]), *bn("h0", 0),
             helper.make_node("Relu", ["bn0"], ["r0"]),
             helper.make_node("Transpose", ["r0"], ["t1"], perm=[0, 3, 1, 2]),
             *conv("t1", 1, 8, 3, [1, 1, 1, 1]), *bn("h1", 1),
             *conv("t1", 2, 8, 1, [0, 0, 0, 0]), *bn("h2", 2),
             helper.make_node("Add", ["bn1", "bn2"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["r1"]),
             helper.make_node("ReduceMean", ["r1"], ["g"], axes=[1, 2], keepdims=0),
             helper.make_node("Gemm", ["g", init("fw", w(5, 8)), init("fb", w(5))], ["y"], transB=1)]
    g = helper.make_graph(nodes, "keras_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def make_keras_bn():
    """keras_bn_fp32, and quantised by onnxruntime (U8S8 per channel) as keras_bn_qdq and
    keras_bn_qop. The QDQ form's reference is onnxruntime with its graph optimisations
    off, which runs the ops as the graph writes them, as tract does: optimised, it fuses
    dequantise-op-quantise groups into kernels of its own, which on Keras's ResNet50 round
    apart from the graph's ops (probabilities 2e-2 apart; on this small net they agree)."""
    rng = np.random.default_rng(11)
    xs = [rng.normal(0, 1, [1, 16, 16, 3]).astype(np.float32) for _ in range(4)]
    src = os.path.join(OUT, "keras_bn_fp32.onnx")
    keras_bn_model(src, rng)
    write_reference("keras_bn_fp32", src, xs, sorted({n.op_type for n in onnx.load(src).graph.node}))
    for name, fmt, optimised in [("keras_bn_qdq", QuantFormat.QDQ, False),
                                 ("keras_bn_qop", QuantFormat.QOperator, True)]:
        dst = os.path.join(OUT, f"{name}.onnx")
        quantise(src, dst, xs, fmt)
        ops = sorted({n.op_type for n in onnx.load(dst).graph.node})
        write_reference(name, dst, xs, ops, optimised)
        print(f"{name}.onnx: {ops}")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(5)
    xs = [rng.normal(0, 1, SHAPE).astype(np.float32) for _ in range(4)]
    src = os.path.join(OUT, "float.tmp.onnx")
    float_model(src)
    dst = os.path.join(OUT, "qop_sigmoid_concat.onnx")
    quantise(src, dst, xs, QuantFormat.QOperator)
    os.remove(src)
    ops = sorted({n.op_type for n in onnx.load(dst).graph.node})
    for want in ["QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat"]:
        assert want in ops, f"{want} not in {ops}"
    write_reference("qop_sigmoid_concat", dst, xs, ops)
    print(f"qop_sigmoid_concat.onnx: {ops}")
    make_dynbatch_pad()
    make_softmax_end()
    make_conv_add_pooled()
    make_fp16_gemm()
    make_keras_bn()


if __name__ == "__main__":
    main()
