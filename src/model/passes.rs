//! tract's optimiser passes as edgesight runs them, with the workaround for the tract bug
//! that stops some exports from loading (docs/models.md, "tract bugs").
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
