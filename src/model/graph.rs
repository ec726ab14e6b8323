//! Small readers of tract's typed graph shared by the rewrites (int8's and the f32
//! conv's): a node's constant inputs.

use tract_core::internal::*;

/// The constant input `ix` of `node` as a flat vector of `T`.
pub(crate) fn konst<T: Datum + Copy>(
    model: &TypedModel,
    node: &TypedNode,
    ix: usize,
) -> Option<Vec<T>> {
    let k = model.outlet_fact(node.inputs[ix]).ok()?.konst.clone()?;
    let k = k.cast_to::<T>().ok()?;
    Some(k.try_as_plain_ram().ok()?.as_slice::<T>().ok()?.to_vec())
}

/// `t`'s single repeated value as a rank-0 tensor, if every element is the same.
pub(crate) fn uniform_value(t: &Tensor) -> TractResult<Option<Tensor>> {
    let bytes = t.try_as_plain_ram()?.as_bytes().to_vec();
    let size = t.datum_type().size_of();
    if size == 0 || bytes.is_empty() || bytes.chunks(size).any(|c| c != &bytes[..size]) {
        return Ok(None);
    }
    Ok(Some(t.nth(0)?))
}

/// Replace the value at `replaced` by the output of a new node `op` (named `name`) on
/// `inputs`: the patch every rewrite that swaps in one of edgesight's ops makes.
pub(crate) fn rewire<O: Into<Box<dyn TypedOp>>>(
    model: &mut TypedModel,
    replaced: OutletId,
    name: impl Into<String>,
    op: O,
    inputs: &[OutletId],
) -> TractResult<()> {
    let mut patch = TypedModelPatch::default();
    let taps = inputs
        .iter()
        .map(|o| patch.tap_model(model, *o))
        .collect::<TractResult<TVec<_>>>()?;
    let out = patch.wire_node(name, op, &taps)?;
    patch.shunt_outside(model, replaced, out[0])?;
    patch.apply(model)
}
