// Session 36 record (docs/PERF.md), tried and not kept: frees in runs. The module below was src/defer.rs;
// crate::defer::hold(..) was called on the inputs of Linear::forward_act / forward_input_act (both forms of
// Input) / forward_acc / forward_acc_input / forward_gated_input / forward_parts, of models::ops::attention
// (q, k, v) and of the fused ln_modulate(_fp8), gated_add (x, u), bias_act, cat_act (o, m), norm_rope_impl,
// rms_rope_impl; `let _held = crate::defer::scope();` opened FLUX.1's forward_sharded and FLUX.2's and Wan's run.
// FLUX.1-dev 1024² steps and Wan2.2 TI2V-5B calls with CANDIFF_DEFER_FREE_MIB 256 / 1024 ran as fast as without.

//! Frees in bursts. Candle frees a dropped CUDA tensor with `cuMemFreeAsync` on the compute
//! stream, and on an H200 each free between two kernels costs the GPU ~1.3 us (5-6 us after a
//! 400 us attention kernel), while a run of consecutive frees costs about as much as one
//! (docs/PERF.md, session 36). The inputs of candiff's heavy ops are held here for a while and
//! let go together, so that most frees land in runs.
//!
//! Off unless `CANDIFF_DEFER_FREE_MIB` is set (an A/B measurement while its worth is unknown).
//! Per thread (each rank of a multi-GPU run is a thread with its own device), bounded by a byte
//! budget, and released by [`release`] at the end of each transformer call.

use std::cell::RefCell;

use candle_core::Tensor;

/// Held tensors beyond which the run is let go even under the byte budget: a run of this many
/// frees still costs about one.
const MAX_HELD: usize = 32;

struct Held {
    tensors: Vec<Tensor>,
    bytes: usize,
}

thread_local! {
    static HELD: RefCell<Held> = const { RefCell::new(Held { tensors: Vec::new(), bytes: 0 }) };
}

/// The byte budget: `CANDIFF_DEFER_FREE_MIB` MiB, 0 (off) when unset or unreadable.
fn budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::env::var("CANDIFF_DEFER_FREE_MIB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0) << 20
    })
}

/// Keeps `t`'s storage alive until the next run is let go (CUDA tensors only; no-op when off).
/// The bytes counted are the view's, an upper bound on what holding it adds.
pub fn hold(t: &Tensor) {
    let budget = budget();
    if budget == 0 || !t.device().is_cuda() {
        return;
    }
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    let run = HELD.with(|h| {
        let mut h = h.borrow_mut();
        let run = (h.bytes + bytes > budget || h.tensors.len() >= MAX_HELD).then(|| {
            h.bytes = 0;
            std::mem::take(&mut h.tensors)
        });
        h.tensors.push(t.clone());
        h.bytes += bytes;
        run
    });
    // Dropped outside the borrow: a tensor's drop may free its storage.
    drop(run);
}

/// Lets every held tensor of this thread go (their frees in one run).
pub fn release() {
    let run = HELD.with(|h| {
        let mut h = h.borrow_mut();
        h.bytes = 0;
        std::mem::take(&mut h.tensors)
    });
    drop(run);
}

/// Tensors held on this thread now.
pub fn held() -> usize {
    HELD.with(|h| h.borrow().tensors.len())
}

/// Releases what this thread holds now and again when dropped: a transformer call's bound.
#[must_use = "held tensors are released when this is dropped"]
pub struct Scope(());

impl Drop for Scope {
    fn drop(&mut self) {
        release();
    }
}

/// See [`Scope`].
pub fn scope() -> Scope {
    release();
    Scope(())
}
