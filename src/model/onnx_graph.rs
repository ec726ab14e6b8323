//! Small helpers for reading and building ONNX graphs at the protobuf level, for the
//! rewrites made before tract parses a file ([`crate::model::int8::onnx_quant`]) and the
//! tests of [`crate::model::proto_fixes`].

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, attribute_proto};

pub(crate) fn node(op: &str, name: String, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name,
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub(crate) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

pub(crate) fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

pub(crate) fn get_int(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

pub(crate) fn get_float(n: &NodeProto, name: &str) -> Option<f32> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// Input `ix` of `n`, or None when absent or given as "" (ONNX's optional input).
pub(crate) fn input(n: &NodeProto, ix: usize) -> Option<&str> {
    n.input
        .get(ix)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// A fresh tensor name derived from `base` that no node output or initializer uses.
pub(crate) fn fresh(graph: &GraphProto, base: &str) -> String {
    let taken = |n: &str| {
        graph.initializer.iter().any(|t| t.name == n)
            || graph.node.iter().any(|x| x.output.iter().any(|o| o == n))
            || graph.input.iter().any(|i| i.name == n)
    };
    let mut name = base.to_string();
    let mut k = 0;
    while taken(&name) {
        k += 1;
        name = format!("{base}_{k}");
    }
    name
}
