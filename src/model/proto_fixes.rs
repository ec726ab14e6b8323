//! Rewrites at the protobuf level, before tract parses a file, for graphs onnxruntime
//! runs and tract, as it is, does not (docs/models.md, "tract bugs").

use tract_onnx::pb::{GraphProto, TensorProto, ValueInfoProto, type_proto};
use tract_onnx::prelude::f16;

/// ONNX's element type numbers.
const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;

/// Every fix; returns how many things were rewritten.
pub fn apply(graph: &mut GraphProto) -> usize {
    widen_float16(graph)
}

/// **float16 models run in float32.** A classifier converted to float16 (onnxconverter-
/// common's `convert_float_to_float16`, Casts at both ends) did not load: tract-onnx
/// expands `Gemm` with an f32 `beta` constant, so an f16 Gemm with a bias comes out f32
/// ("Output mismatch after rewiring expansion for output #0: expected 1,1000,F16 got
/// 1,1000,F32"). And it would be slow where it did: x86 and the Pi 4's Cortex-A72 have no
/// float16 arithmetic, so tract emulates it (ResNet-18 took over 40 s a frame here). The
/// weights are widened, exactly, and the Casts to float16 become Casts to float32, so the
/// model computes what it would in float16, more precisely (within float16's step of
/// onnxruntime's float16 run). Tensors stored outside the file are left alone.
fn widen_float16(graph: &mut GraphProto) -> usize {
    let mut count = 0;
    for t in &mut graph.initializer {
        count += widen(t) as usize;
    }
    for n in &mut graph.node {
        let cast = n.op_type == "Cast";
        for a in &mut n.attribute {
            if let Some(t) = a.t.as_mut() {
                count += widen(t) as usize;
            }
            if cast && a.name == "to" && a.i == FLOAT16 as i64 {
                a.i = FLOAT as i64;
                count += 1;
            }
        }
    }
    let values = graph.input.iter_mut().chain(&mut graph.output);
    for v in values.chain(&mut graph.value_info) {
        count += widen_declared(v) as usize;
    }
    count
}

/// A float16 tensor held in the file (raw bytes, or ONNX's int32 carrier) as float32.
fn widen(t: &mut TensorProto) -> bool {
    if t.data_type != FLOAT16 || t.data_location == Some(1) {
        return false;
    }
    let bits: Vec<u16> = if t.raw_data.is_empty() {
        t.int32_data.iter().map(|v| *v as u16).collect()
    } else {
        t.raw_data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    };
    t.float_data = bits
        .into_iter()
        .map(|b| f16::from_bits(b).to_f32())
        .collect();
    t.raw_data.clear();
    t.int32_data.clear();
    t.data_type = FLOAT;
    true
}

fn widen_declared(v: &mut ValueInfoProto) -> bool {
    let tensor = v.r#type.as_mut().and_then(|t| match t.value.as_mut() {
        Some(type_proto::Value::TensorType(tensor)) => Some(tensor),
        _ => None,
    });
    match tensor {
        Some(t) if t.elem_type == FLOAT16 => {
            t.elem_type = FLOAT;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::onnx_graph::{attr_int, node};

    #[test]
    fn float16_tensors_and_casts_become_float32() {
        let half = |v: f32| f16::from_f32(v).to_bits();
        let raw: Vec<u8> = [1.5f32, -0.25, 65504.0]
            .iter()
            .flat_map(|v| half(*v).to_le_bytes())
            .collect();
        let mut cast = node("Cast", "c".into(), &["x"], &["y"]);
        cast.attribute.push(attr_int("to", FLOAT16 as i64));
        let mut keep = node("Cast", "k".into(), &["y"], &["z"]);
        keep.attribute.push(attr_int("to", 7));
        let mut g = GraphProto {
            node: vec![cast, keep],
            initializer: vec![
                TensorProto {
                    name: "raw".into(),
                    data_type: FLOAT16,
                    raw_data: raw,
                    ..Default::default()
                },
                TensorProto {
                    name: "carried".into(),
                    data_type: FLOAT16,
                    int32_data: vec![half(2.0) as i32],
                    ..Default::default()
                },
                TensorProto {
                    name: "f32".into(),
                    data_type: FLOAT,
                    float_data: vec![0.1],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(apply(&mut g), 3);
        let floats: Vec<(i32, Vec<f32>)> = g
            .initializer
            .iter()
            .map(|t| (t.data_type, t.float_data.clone()))
            .collect();
        assert_eq!(
            floats,
            [
                (FLOAT, vec![1.5, -0.25, 65504.0]),
                (FLOAT, vec![2.0]),
                (FLOAT, vec![0.1])
            ]
        );
        let to: Vec<i64> = g.node.iter().map(|n| n.attribute[0].i).collect();
        assert_eq!(to, [FLOAT as i64, 7]);
    }
}
