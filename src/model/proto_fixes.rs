//! Rewrites at the protobuf level, before tract parses a file, that step around tract bugs
//! on graphs onnxruntime runs (docs/models.md, "tract bugs"). Each is exact: the graph
//! computes the same thing through ops tract translates correctly.

use tract_onnx::pb::{GraphProto, NodeProto};

use crate::model::onnx_graph::{fresh, get_float, get_int, input, node};

/// ONNX's element type number for float16.
const FLOAT16: i32 = 10;

/// Every fix; returns how many nodes were rewritten.
pub fn apply(graph: &mut GraphProto) -> usize {
    split_f16_gemms(graph)
}

/// **Gemm in float16.** tract-onnx expands `Gemm` into a matrix product plus
/// `beta * C`, with `beta` an f32 constant whatever the operands' type, so an f16 Gemm
/// with a bias comes out f32 and the load fails: "Output mismatch after rewiring expansion
/// for output #0: expected 1,1000,F16 got 1,1000,F32". That is every classifier converted
/// to float16 (onnxconverter-common's `convert_float_to_float16`, which keeps float
/// inputs and outputs by Casts). A Gemm with alpha and beta 1 and an f16 initializer
/// operand becomes `MatMul(A', B') + C`, its transposes as Transpose nodes.
fn split_f16_gemms(graph: &mut GraphProto) -> usize {
    let f16 = |name: &str| {
        graph
            .initializer
            .iter()
            .any(|t| t.name == name && t.data_type == FLOAT16)
    };
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut count = 0;
    for n in std::mem::take(&mut graph.node) {
        let unit = get_float(&n, "alpha").unwrap_or(1.0) == 1.0
            && (get_float(&n, "beta").unwrap_or(1.0) == 1.0 || input(&n, 2).is_none());
        let half = (1..=2).any(|ix| input(&n, ix).is_some_and(f16));
        if n.op_type == "Gemm" && unit && half && n.input.len() >= 2 {
            nodes.extend(split_gemm(graph, &nodes, &n));
            count += 1;
        } else {
            nodes.push(n);
        }
    }
    graph.node = nodes;
    count
}

/// `n` (a Gemm) as Transposes, MatMul and Add. `done` are the nodes already rewritten,
/// whose output names [`fresh`] must also avoid.
fn split_gemm(graph: &GraphProto, done: &[NodeProto], n: &NodeProto) -> Vec<NodeProto> {
    let taken = |name: &str| done.iter().any(|d| d.output.iter().any(|o| o == name));
    let new_name = |base: String| {
        let mut name = fresh(graph, &base);
        while taken(&name) {
            name.push('_');
        }
        name
    };
    let y = n.output.first().cloned().unwrap_or_default();
    let mut out = Vec::new();
    let mut operand = |ix: usize, transposed: bool| -> String {
        let x = n.input[ix].clone();
        if !transposed {
            return x;
        }
        let t = new_name(format!("{y}.t{ix}"));
        out.push(node("Transpose", format!("{}.t{ix}", n.name), &[&x], &[&t]));
        t
    };
    let a = operand(0, get_int(n, "transA").unwrap_or(0) == 1);
    let b = operand(1, get_int(n, "transB").unwrap_or(0) == 1);
    match input(n, 2) {
        None => out.push(node("MatMul", n.name.clone(), &[&a, &b], &[&y])),
        Some(c) => {
            let ab = new_name(format!("{y}.ab"));
            out.push(node("MatMul", format!("{}.ab", n.name), &[&a, &b], &[&ab]));
            out.push(node("Add", n.name.clone(), &[&ab, c], &[&y]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::onnx_graph::{attr_float, attr_int};
    use tract_onnx::pb::TensorProto;

    fn graph(gemm: NodeProto, b_type: i32) -> GraphProto {
        let init = |name: &str| TensorProto {
            name: name.into(),
            data_type: b_type,
            ..Default::default()
        };
        GraphProto {
            node: vec![gemm],
            initializer: vec![init("b"), init("c")],
            ..Default::default()
        }
    }

    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    fn ops(g: &GraphProto) -> Vec<(&str, Vec<&str>, Vec<&str>)> {
        g.node
            .iter()
            .map(|n| (n.op_type.as_str(), strs(&n.input), strs(&n.output)))
            .collect()
    }

    #[test]
    fn an_f16_gemm_becomes_transposes_matmul_and_add() {
        let mut gemm = node("Gemm", "fc".into(), &["a", "b", "c"], &["y"]);
        gemm.attribute
            .extend([attr_int("transA", 1), attr_int("transB", 1)]);
        let mut g = graph(gemm.clone(), FLOAT16);
        assert_eq!(apply(&mut g), 1);
        assert_eq!(
            ops(&g),
            [
                ("Transpose", vec!["a"], vec!["y.t0"]),
                ("Transpose", vec!["b"], vec!["y.t1"]),
                ("MatMul", vec!["y.t0", "y.t1"], vec!["y.ab"]),
                ("Add", vec!["y.ab", "c"], vec!["y"]),
            ]
        );
        // Left alone: f32 operands (tract is right there), and a scaled Gemm (this
        // rewrite has no f16 constant to scale by; tract's error names the node).
        let mut g = graph(gemm.clone(), 1);
        assert_eq!(apply(&mut g), 0);
        gemm.attribute.push(attr_float("alpha", 0.5));
        let mut g = graph(gemm, FLOAT16);
        assert_eq!(apply(&mut g), 0);
        assert_eq!(ops(&g)[0].0, "Gemm");
    }
}
