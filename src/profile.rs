//! `CANDIFF_PROFILE=1`: GPU time of each kind of work in a step, without synchronizing.
//!
//! A [`span`] records a CUDA event on the device's stream before and after the work it wraps;
//! [`take`] synchronizes once and adds up the elapsed times per [`Part`]. The timeline stays as it
//! runs (the host keeps queueing ahead), so a part's time is what the stream spent on it,
//! including any wait inside it (an exchange's transfer, or the GPU idling for the host). Spans
//! do not nest; what no span covers is the rest of the step (element-wise kernels, copies).
//! Each rank thread keeps its own record.
//!
//! Each exchange's transfer is timed on the communication stream too (from when that stream may
//! start it to when it lands, so a late peer counts). With [`TIMELINE_ENV`] set as well, every span
//! and transfer of the measured steps is written out with its block kind ([`set_scope`]): where a
//! sharded step waits, and for what.

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
    /// transfer's time not hidden behind other work, and any lag of a peer): q, k, v going out
    /// before the attention ...
    ExchangeWaitIn,
    /// ... and the attention output coming back.
    ExchangeWaitOut,
}

/// Parts in report order.
pub const PARTS: [Part; 5] =
    [Part::Linear, Part::Attention, Part::Exchange, Part::ExchangeWaitIn, Part::ExchangeWaitOut];

/// The environment variable that turns spans on.
pub const PROFILE_ENV: &str = "CANDIFF_PROFILE";

pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(PROFILE_ENV).is_ok_and(|v| v == "1"))
}

#[cfg(feature = "cuda")]
type Mark = candle_core::cuda_backend::cudarc::driver::CudaEvent;

/// `CANDIFF_PROFILE_TIMELINE=PREFIX` (with [`PROFILE_ENV`]): each rank writes its spans and
/// transfers to `PREFIX.rank<N>.jsonl` ([`write_timeline`]).
pub const TIMELINE_ENV: &str = "CANDIFF_PROFILE_TIMELINE";

/// Where the timeline goes, when asked for.
pub fn timeline_prefix() -> Option<String> {
    static P: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    P.get_or_init(|| std::env::var(TIMELINE_ENV).ok().filter(|p| !p.is_empty() && enabled())).clone()
}

/// A timed interval: what, the block kind it ran in, start and end (ms from the window's first
/// mark), and whether it ran on the communication stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Interval {
    pub what: String,
    pub scope: &'static str,
    pub comm: bool,
    pub start_ms: f64,
    pub end_ms: f64,
}

/// What one profiled window holds: milliseconds per [`Part`] (in [`PARTS`] order), and per kind of
/// transfer (label, count, milliseconds on the communication stream).
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub parts: [f64; PARTS.len()],
    pub transfers: Vec<(&'static str, usize, f64)>,
}

#[cfg(feature = "cuda")]
thread_local! {
    static SPANS: RefCell<Vec<(Part, &'static str, Mark, Mark)>> = const { RefCell::new(Vec::new()) };
    static TRANSFERS: RefCell<Vec<(&'static str, &'static str, Mark, Mark)>> = const { RefCell::new(Vec::new()) };
    static LAST: RefCell<Vec<Interval>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    static SCOPE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
    static NEXT_TRANSFER: std::cell::Cell<&'static str> = const { std::cell::Cell::new("exchange") };
}

/// Labels what this rank thread enqueues from now on (a model's block kind) in the timeline;
/// returns the previous label.
pub fn set_scope(label: &'static str) -> &'static str {
    SCOPE.with(|s| s.replace(label))
}

/// Runs `f` with the transfers it starts labelled `label` in the timeline.
pub fn transfer_labelled<T>(label: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let prev = NEXT_TRANSFER.with(|s| s.replace(label));
    let out = f();
    NEXT_TRANSFER.with(|s| s.set(prev));
    out
}

/// Records a transfer's start and end events (on the communication stream) when profiling.
#[cfg(feature = "cuda")]
pub(crate) fn record_transfer(start: Mark, end: Mark) {
    if enabled() {
        let label = NEXT_TRANSFER.with(|s| s.get());
        let scope = SCOPE.with(|s| s.get());
        TRANSFERS.with(|t| t.borrow_mut().push((label, scope, start, end)));
    }
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
            let scope = SCOPE.with(|s| s.get());
            SPANS.with(|s| s.borrow_mut().push((part, scope, start, end)));
            return Ok(out);
        }
    }
    let _ = (part, device);
    f()
}

/// What was recorded since the last call on this thread (then forgotten); `None` unless
/// profiling is on. Waits for `device`'s queued work. With a timeline asked for, the intervals are
/// kept for [`write_timeline`].
pub fn take(device: &Device) -> Result<Option<Profile>> {
    if !enabled() {
        return Ok(None);
    }
    device.synchronize()?;
    // Spans are recorded only in CUDA builds; elsewhere every part stays 0.
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut out = Profile::default();
    #[cfg(feature = "cuda")]
    {
        let spans = SPANS.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let transfers = TRANSFERS.with(|s| std::mem::take(&mut *s.borrow_mut()));
        // The transfers' events complete once the communication stream has run them.
        if let Device::Cuda(_) = device {
            for (.., b) in &transfers {
                b.synchronize().map_err(candle_core::Error::wrap)?;
            }
        }
        let ms = |a: &Mark, b: &Mark| -> Result<f64> { Ok(a.elapsed_ms(b).map_err(candle_core::Error::wrap)? as f64) };
        for (part, _, a, b) in &spans {
            let i = PARTS.iter().position(|p| p == part).expect("listed");
            out.parts[i] += ms(a, b)?;
        }
        for (label, _, a, b) in &transfers {
            let t = ms(a, b)?;
            match out.transfers.iter_mut().find(|(l, ..)| l == label) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += t;
                }
                None => out.transfers.push((label, 1, t)),
            }
        }
        if timeline_prefix().is_some() {
            let mut rows = Vec::with_capacity(spans.len() + transfers.len());
            if let Some((_, _, base, _)) = spans.first() {
                for (part, scope, a, b) in &spans {
                    let what = format!("{part:?}");
                    rows.push(Interval { what, scope, comm: false, start_ms: ms(base, a)?, end_ms: ms(base, b)? });
                }
                for (label, scope, a, b) in &transfers {
                    let what = label.to_string();
                    rows.push(Interval { what, scope, comm: true, start_ms: ms(base, a)?, end_ms: ms(base, b)? });
                }
            }
            rows.sort_by(|x, y| x.start_ms.total_cmp(&y.start_ms));
            LAST.with(|l| *l.borrow_mut() = rows);
        }
    }
    Ok(Some(out))
}

/// Writes the intervals of this thread's last [`take`] to `PREFIX.rank<rank>.jsonl` when a
/// timeline was asked for ([`TIMELINE_ENV`]); returns the path written.
pub fn write_timeline(rank: usize) -> Result<Option<String>> {
    let Some(prefix) = timeline_prefix() else { return Ok(None) };
    #[cfg(feature = "cuda")]
    let rows = LAST.with(|l| std::mem::take(&mut *l.borrow_mut()));
    #[cfg(not(feature = "cuda"))]
    let rows: Vec<Interval> = Vec::new();
    let path = format!("{prefix}.rank{rank}.jsonl");
    let mut text = String::new();
    for r in &rows {
        text.push_str(&serde_json::to_string(r).map_err(candle_core::Error::wrap)?);
        text.push('\n');
    }
    std::fs::write(&path, text).map_err(|e| candle_core::Error::Msg(format!("writing the timeline {path}: {e}")))?;
    Ok(Some(path))
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
