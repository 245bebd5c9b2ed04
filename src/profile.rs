//! `CANDIFF_PROFILE=1`: GPU time of each kind of work in a step, without synchronizing.
//!
//! A [`span`] records a CUDA event on the device's stream before and after the work it wraps;
//! [`take`] synchronizes once and adds up the elapsed times per [`Part`]. The timeline stays as it
//! runs (the host keeps queueing ahead), so a part's time is what the stream spent on it,
//! including any wait inside it (an exchange's transfer, or the GPU idling for the host). Spans
//! do not nest; what no span covers is the rest of the step (element-wise kernels, copies).
//! Each rank thread keeps its own record.

#[cfg(feature = "cuda")]
use std::cell::RefCell;

use candle_core::{Device, Result};

/// What a span measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Linear layers (GEMM and the fused bias / activation pass after it).
    Linear,
    /// The attention kernel.
    Attention,
    /// Sequence-parallel exchanges: starting the transfers, the copy of a generic q/k/v into the
    /// send buffer, the join of the returned heads.
    Exchange,
    /// Sequence-parallel exchanges: the compute stream waiting for a transfer to arrive (the
    /// transfer's time not hidden behind other work, and any lag of a peer).
    ExchangeWait,
}

/// Parts in report order.
pub const PARTS: [Part; 4] = [Part::Linear, Part::Attention, Part::Exchange, Part::ExchangeWait];

/// The environment variable that turns spans on.
pub const PROFILE_ENV: &str = "CANDIFF_PROFILE";

pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(PROFILE_ENV).is_ok_and(|v| v == "1"))
}

#[cfg(feature = "cuda")]
type Mark = candle_core::cuda_backend::cudarc::driver::CudaEvent;

#[cfg(feature = "cuda")]
thread_local! {
    static SPANS: RefCell<Vec<(Part, Mark, Mark)>> = const { RefCell::new(Vec::new()) };
}

#[cfg(feature = "cuda")]
fn mark(device: &Device) -> Result<Option<Mark>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    match device {
        Device::Cuda(d) => {
            let s = d.cuda_stream();
            Ok(Some(s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(candle_core::Error::wrap)?))
        }
        _ => Ok(None),
    }
}

/// Runs `f`, timing it on `device`'s stream as `part` when profiling is on (CUDA devices only).
pub fn span<T>(part: Part, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    #[cfg(feature = "cuda")]
    if enabled() {
        if let Some(start) = mark(device)? {
            let out = f()?;
            let end = mark(device)?.expect("a CUDA device");
            SPANS.with(|s| s.borrow_mut().push((part, start, end)));
            return Ok(out);
        }
    }
    let _ = (part, device);
    f()
}

/// Milliseconds per [`Part`] (in [`PARTS`] order) spent since the last call on this thread, and
/// forgets them; `None` unless profiling is on. Waits for `device`'s queued work.
pub fn take(device: &Device) -> Result<Option<[f64; 4]>> {
    if !enabled() {
        return Ok(None);
    }
    device.synchronize()?;
    // Spans are recorded only in CUDA builds; elsewhere every part stays 0.
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut out = [0f64; 4];
    #[cfg(feature = "cuda")]
    for (part, a, b) in SPANS.with(|s| std::mem::take(&mut *s.borrow_mut())) {
        let i = PARTS.iter().position(|p| *p == part).expect("listed");
        out[i] += a.elapsed_ms(&b).map_err(candle_core::Error::wrap)? as f64;
    }
    Ok(Some(out))
}

/// While alive, the range of work a profiler started with `--profile-from-start off` collects
/// (Nsight Compute's `ncu --profile-from-start off`): a bench wraps its timed calls in one, so
/// that kernel timings cover those calls and not the weights' synthesis or the warm-up.
pub struct ProfilerRange {
    #[cfg(feature = "cuda")]
    _inner: Option<candle_core::cuda_backend::cudarc::driver::Profiler>,
}

/// A [`ProfilerRange`] when `on` and `device` is a CUDA device (else nothing is marked).
pub fn profiler_range(on: bool, device: &Device) -> Result<ProfilerRange> {
    #[cfg(feature = "cuda")]
    if let (true, Device::Cuda(d)) = (on, device) {
        // cuProfilerStart acts on the calling thread's current context.
        d.cuda_stream().context().bind_to_thread().map_err(candle_core::Error::wrap)?;
        let p = candle_core::cuda_backend::cudarc::driver::Profiler::new().map_err(candle_core::Error::wrap)?;
        return Ok(ProfilerRange { _inner: Some(p) });
    }
    let _ = (on, device);
    Ok(ProfilerRange {
        #[cfg(feature = "cuda")]
        _inner: None,
    })
}
