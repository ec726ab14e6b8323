//! tract's optimiser passes as edgesight runs them: the workaround for the tract bug that
//! stopped some exports from loading (docs/models.md, "tract bugs"), and [`fold_weights`],
//! the constant folding tract's memory budget leaves to every inference.
//!
//! **ChangeAxes after a dynamic bias.** tract's conv declutter folds an Add (or Sub, Mul,
//! Div) that follows a convolution into the conv's bias whenever the other operand is
//! shaped `[1, C, 1, 1]`, constant or not. When it is computed from the image (a
//! globally pooled branch added back to a conv's output), the bias becomes a wire of the
//! graph, and the layout pass (ChangeAxes) later moves an axis along that wire into the
//! conv's bias input, which `Conv::change_axes` mistakes for a change of the image input:
//! "Bias should be scalar or a vector with one value per output channel. Output channels
//! is 32, bias is 32,1". onnxruntime runs such files. The graph is correct without the
//! layout pass, only its transposes stay where the exporter put them, so a load that
//! fails in ChangeAxes is retried without it.

use anyhow::{Error, bail};
use tract_core::optim::Optimizer;
use tract_onnx::prelude::*;

/// Whether tract's layout pass runs in declutter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeAxes {
    Run,
    /// After it failed on this graph: see the module's doc.
    Skip,
}

impl ChangeAxes {
    /// What a user is told when the pass was left out (the start-up log, `check`).
    pub fn note(self) -> Option<&'static str> {
        (self == ChangeAxes::Skip).then_some(
            "tract's layout pass (ChangeAxes) fails on this graph (a tract bug: a conv's \
             output plus a [1,C,1,1] tensor computed from the image) and was left out; the \
             model runs correctly, with its transposes where the exporter put them \
             (docs/models.md)",
        )
    }
}

/// tract's declutter, with or without its ChangeAxes pass.
pub fn declutter(model: &mut TypedModel, change_axes: ChangeAxes) -> TractResult<()> {
    let mut optimizer = Optimizer::declutter();
    if change_axes == ChangeAxes::Skip {
        let before = optimizer.passes.len();
        optimizer
            .passes
            .retain(|p| !is_change_axes(&format!("{p:?}")));
        // A tract that renamed the pass would otherwise retry the same failure.
        if optimizer.passes.len() != before - 1 {
            bail!("tract's declutter has no pass named ChangeAxes to leave out");
        }
    }
    optimizer.optimize(model)
}

/// [`declutter`], then tract's codegen: `TypedModel::into_optimized` with the choice.
pub fn into_optimized(mut model: TypedModel, change_axes: ChangeAxes) -> TractResult<TypedModel> {
    declutter(&mut model, change_axes)?;
    model.optimize()?;
    Ok(model)
}

/// The most [`fold_weights`] may add to a model's constants, in all.
const WEIGHT_FOLD_BUDGET: u64 = 64 << 20;

/// Compute once, at load, what tract leaves to run on every inference to save memory:
/// nodes whose inputs are all constants, each input used by that node alone. tract's own
/// folding stops at 4 MB of growth (`CONST_FOLD_MEM_BUDGET`), so a quantised
/// classifier's int8 FC weights (ResNet-50: 2048 x 1000) were cast, scaled and packed
/// again each frame: 5.7 of its 40 ms here. The values are the ones tract would compute
/// at run time. What is folded is bounded by [`WEIGHT_FOLD_BUDGET`], counted from the
/// output facts before anything is computed, so a crafted file cannot make the load
/// allocate more. Returns how many nodes.
pub fn fold_weights(model: &mut TypedModel) -> TractResult<usize> {
    use tract_core::ops::konst::Const;
    let (mut folded, mut budget) = (0, WEIGHT_FOLD_BUDGET);
    for id in model.eval_order()? {
        let node = model.node(id);
        if node.op_is::<Const>() || node.inputs.is_empty() {
            continue;
        }
        let size: Option<u64> = node
            .outputs
            .iter()
            .map(|o| {
                o.fact
                    .mem_size()
                    .as_i64()
                    .and_then(|m| u64::try_from(m).ok())
            })
            .sum();
        let Some(size) = size.filter(|s| *s <= budget) else {
            continue;
        };
        let sole = |o: &OutletId| model.outlet_successors(*o).len() == 1;
        let konst: Option<TVec<TValue>> = model
            .node_input_facts(id)?
            .iter()
            .map(|f| f.konst.clone().map(|k| k.into_tvalue()))
            .collect();
        let Some(inputs) = konst.filter(|_| node.inputs.iter().all(sole)) else {
            continue;
        };
        let Ok(Some(outputs)) = node.op.eval_out_of_plan(inputs) else {
            continue;
        };
        if outputs.len() != node.outputs.len() {
            continue;
        }
        let mut patch = TypedModelPatch::default();
        for (ix, t) in outputs.into_iter().enumerate() {
            let wire = patch.add_const(format!("{}.folded{ix}", node.name), t.into_arc_tensor())?;
            patch.shunt_outside(model, OutletId::new(id, ix), wire)?;
        }
        patch.apply(model)?;
        budget -= size;
        folded += 1;
    }
    if folded > 0 {
        model.compact()?;
    }
    Ok(folded)
}

/// The error came from tract's ChangeAxes pass (its optimiser names the pass it ran).
pub fn failed_in_change_axes(e: &Error) -> bool {
    e.chain().any(|cause| {
        cause
            .to_string()
            .strip_prefix("running pass ")
            .is_some_and(is_change_axes)
    })
}

fn is_change_axes(pass: &str) -> bool {
    pass == "ChangeAxes"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::array::MultiBroadcastTo;
    use tract_core::ops::cast::cast;
    use tract_core::ops::einsum::EinSum;
    use tract_core::ops::math::mul;

    /// An int8 weight dequantised (Cast, Mul) then multiplied by the input, as a QDQ
    /// classifier's FC is, 2 MB growing to 8 MB in f32, past tract's own folding (it
    /// folds on wiring under its budget): folded once, same outputs. A constant that would
    /// grow past our budget (a broadcast to 400 MB) is left alone, unevaluated.
    #[test]
    fn weights_are_folded_once_within_the_budget() {
        let (k, n) = (1024, 2048);
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, k])).unwrap();
        let w: Vec<i8> = (0..k * n).map(|v| (v % 251) as i8).collect();
        let w = m
            .add_const("w", tensor1(&w).into_shape(&[k, n]).unwrap())
            .unwrap();
        let wf = m
            .wire_node("w.cast", cast(f32::datum_type()), &[w])
            .unwrap();
        let scale = m.add_const("scale", tensor2(&[[0.5f32]])).unwrap();
        let wf = m.wire_node("w.scale", mul(), &[wf[0], scale]).unwrap();
        let axes = "mk,kn->mn".parse().unwrap();
        let y = m
            .wire_node("fc", EinSum::new(axes, f32::datum_type()), &[x, wf[0]])
            .unwrap();
        let one = m.add_const("one", tensor1(&[1f32])).unwrap();
        let big = MultiBroadcastTo::new(tvec![100_000_000.to_dim()].into());
        let big = m.wire_node("big", big, &[one]).unwrap();
        m.select_output_outlets(&[y[0], big[0]]).unwrap();
        let run = |m: &TypedModel| {
            let x: Vec<f32> = (0..k).map(|v| (v % 7) as f32 - 3.0).collect();
            let x = tensor1(&x).into_shape(&[1, k]).unwrap().into_tvalue();
            let out = m.clone().into_runnable().unwrap().run(tvec![x]).unwrap();
            out[0].clone().into_tensor()
        };
        let want = run(&m);
        assert_eq!(fold_weights(&mut m).unwrap(), 2, "the cast and the scale");
        assert!(
            m.nodes()
                .iter()
                .all(|n| n.name != "w.cast" && n.name != "w.scale")
        );
        assert!(m.nodes().iter().any(|n| n.name == "big"), "over the budget");
        assert_eq!(run(&m), want);
    }

    #[test]
    fn the_change_axes_pass_is_found_by_name() {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 3])).unwrap();
        m.select_output_outlets(&[x]).unwrap();
        declutter(&mut m, ChangeAxes::Skip).unwrap();
        let e = anyhow::anyhow!("Bias should be scalar").context("running pass ChangeAxes");
        assert!(failed_in_change_axes(
            &e.context("model file m.onnx: cannot optimise")
        ));
        let e = anyhow::anyhow!("x").context("running pass PropConst");
        assert!(!failed_in_change_axes(&e));
    }
}
