//! Work shared out over a model's thread pool (tract's current executor): the passes of
//! edgesight's own ops (convs, packing, element-wise) split their output into pieces.

/// Elements per piece of work an element-wise op hands the pool: enough to be worth a
/// task, few enough that a ResNet's smallest maps still split.
pub(crate) const PAR_CHUNK: usize = 16 << 10;

/// `work((i, chunk))` for each `chunk`-sized piece `i` of `out`, shared out over the
/// model's thread pool (tract's current executor) when it has one.
pub(crate) fn par_chunks<T: Send>(
    out: &mut [T],
    chunk: usize,
    work: impl Fn((usize, &mut [T])) + Send + Sync,
) {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    on_pool(out.len().div_ceil(chunk), |parallel| {
        if parallel {
            out.par_chunks_mut(chunk).enumerate().for_each(&work)
        } else {
            out.chunks_mut(chunk).enumerate().for_each(&work)
        }
    })
}

/// [`par_chunks`] over two outputs of the same length, cut at the same elements.
pub(crate) fn par_chunks2<T: Send, U: Send>(
    a: &mut [T],
    b: &mut [U],
    chunk: usize,
    work: impl Fn((usize, &mut [T], &mut [U])) + Send + Sync,
) {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let each = |(i, (a, b))| work((i, a, b));
    on_pool(a.len().div_ceil(chunk), |parallel| {
        if parallel {
            let pairs = a.par_chunks_mut(chunk).zip(b.par_chunks_mut(chunk));
            pairs.enumerate().for_each(each)
        } else {
            let pairs = a.chunks_mut(chunk).zip(b.chunks_mut(chunk));
            pairs.enumerate().for_each(each)
        }
    })
}

/// `work(true)` inside the model's thread pool (tract's current executor) when it has
/// one and there is more than one piece, else `work(false)` on this thread.
fn on_pool(pieces: usize, work: impl FnOnce(bool) + Send) {
    use tract_core::internal::tract_linalg::multithread::{Executor, current_tract_executor};
    match current_tract_executor() {
        Executor::MultiThread(pool) if pieces > 1 => pool.install(|| work(true)),
        Executor::RayonGlobal if pieces > 1 => work(true),
        _ => work(false),
    }
}
