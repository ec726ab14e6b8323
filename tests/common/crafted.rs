//! Crafted ONNX models: a fixture model with one thing broken, as a hostile or careless
//! exporter would write it. Each names the error the load must give (finding 2 of the
//! robustness issue: every one of these panicked or wrapped before).

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb::{self, AttributeProto, GraphProto, ModelProto, NodeProto};

pub struct Crafted {
    pub name: &'static str,
    /// The fixture it is made from (tests/fixtures/models/).
    pub base: &'static str,
    pub break_it: fn(&mut GraphProto),
    /// What the load error must say (the node, initializer or limit it names).
    pub error: &'static str,
}

fn node<'g>(g: &'g mut GraphProto, op: &str) -> &'g mut NodeProto {
    g.node
        .iter_mut()
        .find(|n| n.op_type == op)
        .expect("op in fixture")
}

fn set_ints(n: &mut NodeProto, name: &str, v: &[i64]) {
    n.attribute.retain(|a| a.name != name);
    n.attribute.push(AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    });
}

fn input_dims(g: &mut GraphProto) -> &mut Vec<pb::tensor_shape_proto::Dimension> {
    let Some(pb::type_proto::Value::TensorType(t)) =
        g.input[0].r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        panic!("fixture input has a tensor type");
    };
    &mut t.shape.as_mut().expect("input shape").dim
}

fn empty_initializer(g: &mut GraphProto, name: &str) {
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.name == name)
        .expect("initializer");
    t.dims = vec![0];
    t.raw_data.clear();
    t.float_data.clear();
    t.int32_data.clear();
}

pub const CASES: &[Crafted] = &[
    // Found by tests/fuzz.rs: tract indexed the pads by the strides' length
    // (tract-core cnn/padding.rs: index out of bounds).
    Crafted {
        name: "strides_for_one_axis",
        base: "shapes_fp32.onnx",
        break_it: |g| set_ints(node(g, "Conv"), "strides", &[2]),
        error: r#"node "/stem/stem.0/Conv" (Conv): strides [2] is for 1 axes"#,
    },
    Crafted {
        name: "odd_pads",
        base: "shapes_int8_qop.onnx",
        break_it: |g| set_ints(node(g, "QLinearConv"), "pads", &[1, 1, 1]),
        error: r#"(QLinearConv): pads [1, 1, 1]: an odd count"#,
    },
    Crafted {
        name: "stride_zero",
        base: "shapes_int8_qlinear.onnx",
        break_it: |g| set_ints(node(g, "QLinearConv"), "strides", &[0, 0]),
        error: r#"node "/stem/stem.0/Conv_quant" (QLinearConv): strides [0, 0]"#,
    },
    Crafted {
        name: "dilation_zero",
        base: "shapes_fp32.onnx",
        break_it: |g| set_ints(node(g, "Conv"), "dilations", &[0, 0]),
        error: r#"node "/stem/stem.0/Conv" (Conv): dilations [0, 0]"#,
    },
    Crafted {
        name: "pads_and_strides_that_wrap",
        base: "shapes_int8_qop.onnx",
        break_it: |g| {
            let n = node(g, "QLinearConv");
            set_ints(n, "pads", &[i64::MAX / 4; 4]);
            set_ints(n, "strides", &[1 << 58, 1 << 58]);
        },
        error: r#"(QLinearConv): pads"#,
    },
    Crafted {
        name: "empty_scale",
        base: "shapes_int8_qlinear.onnx",
        break_it: |g| empty_initializer(g, "input_scale"),
        error: r#"node "input_QuantizeLinear" (QuantizeLinear): its input "input_scale" is an empty tensor"#,
    },
    Crafted {
        name: "zero_input_channels",
        base: "shapes_int8_qop.onnx",
        break_it: |g| {
            let w = node(g, "QLinearConv").input[3].clone();
            empty_initializer(g, &w);
        },
        error: r#"(QLinearConv): its input "onnx::Conv_90_quantized" is an empty tensor"#,
    },
    Crafted {
        name: "node_without_outputs",
        base: "shapes_fp32.onnx",
        break_it: |g| node(g, "Relu").output.clear(),
        error: "(Relu): has no outputs",
    },
    Crafted {
        name: "no_graph_output",
        base: "shapes_fp32.onnx",
        break_it: |g| g.output.clear(),
        error: "the graph has no output",
    },
    Crafted {
        name: "dangling_graph_output",
        base: "shapes_int8_qdq.onnx",
        break_it: |g| g.output[0].name = "nothing_makes_this".into(),
        error: r#"graph output "nothing_makes_this" is produced by no node"#,
    },
    Crafted {
        name: "dimensions_that_overflow",
        base: "shapes_int8_qdq.onnx",
        break_it: |g| g.initializer[0].dims = vec![1 << 62, 1 << 62],
        error: "] overflow",
    },
    Crafted {
        name: "input_of_a_million_pixels_a_side",
        base: "shapes_fp32.onnx",
        break_it: |g| {
            for d in input_dims(g).iter_mut().skip(2) {
                d.value = Some(pb::tensor_shape_proto::dimension::Value::DimValue(1 << 20));
            }
        },
        error: "height and width must be 1 to 2048",
    },
    Crafted {
        name: "pads_that_blow_up_an_activation",
        base: "shapes_fp32.onnx",
        break_it: |g| set_ints(node(g, "Conv"), "pads", &[4096; 4]),
        error: r#"node "/stem/stem.0/Conv": output of 272514064 values"#,
    },
    Crafted {
        // Passes every check of ours and panics inside tract ("chunk size must be
        // non-zero"): the second wall, a panic during load turned into the load's error.
        name: "tract_panics_inside",
        base: "shapes_int8_qop.onnx",
        break_it: |g| set_ints(node(g, "QLinearConv"), "dilations", &[4000, 4000]),
        error: "a panic while loading the model",
    },
    Crafted {
        // Found by tests/fuzz.rs: a Flatten axis past the input's rank panics inside
        // tract-hir (flatten.rs: slice range); the rank is not known before tract's
        // analysis, so the second wall catches it.
        name: "flatten_past_the_rank",
        base: "shapes_fp32.onnx",
        break_it: |g| {
            let n = node(g, "Flatten");
            n.attribute.retain(|a| a.name != "axis");
            n.attribute.push(AttributeProto {
                name: "axis".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                // Past the rank on 64- and 32-bit targets alike: tract reads the axis
                // `as usize`, which on armv7 keeps the low 32 bits (1 << 40 alone would
                // become axis 0 there, a legal Flatten).
                i: (1 << 40) + 9,
                ..Default::default()
            });
        },
        error: "a panic while loading the model",
    },
];

/// The fixture `base` with `break_it` applied, written to `dir/<name>.onnx`.
pub fn write(dir: &Path, c: &Crafted) -> PathBuf {
    let path = super::root().join("tests/fixtures/models").join(c.base);
    let bytes = std::fs::read(&path).expect("fixture model");
    let mut m = ModelProto::decode(bytes.as_slice()).expect("fixture decodes");
    (c.break_it)(m.graph.as_mut().expect("graph"));
    let out = dir.join(format!("{}.onnx", c.name));
    std::fs::write(&out, m.encode_to_vec()).expect("write crafted model");
    out
}
