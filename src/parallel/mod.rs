//! Several ranks making one output: Ulysses sequence parallelism and CFG parallelism.
//!
//! Every rank runs the same pipeline code (SPMD) in its own thread, on its own device. The
//! transformers shard their tokens over a [`Group`] ([`SeqParallel`]): all per-token work runs on
//! the local tokens, and attention exchanges heads for tokens (all-to-all) so each rank attends
//! over the whole sequence for `heads / n` of the heads. With classifier-free guidance and an even
//! rank count, the conditional and unconditional branches run on two halves of the ranks
//! ([`Plan`]). Ranks agree on noise and embeddings by broadcast from rank 0; each rank then
//! steps the full latents identically, and only rank 0 writes output.
//!
//! Transports: [`nccl`] (one rank per GPU, the `nccl` feature) and [`local`] (all ranks on one
//! device, in-process; the CPU tests and single-GPU checks of the sharded code paths).

mod exchange;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod pack;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Result, Tensor};

use crate::error::CandiffError;

/// Splits `n` items into `parts` contiguous runs, the first `n % parts` one longer.
pub fn split_sizes(n: usize, parts: usize) -> Vec<usize> {
    (0..parts).map(|i| n / parts + usize::from(i < n % parts)).collect()
}

/// The first failure of a run, seen by every rank: waits end with it instead of hanging. Also
/// when each rank last made progress (an exchange or a fence), for the watchdog.
#[derive(Debug)]
pub struct Health {
    failed: Mutex<Option<(usize, String)>>,
    beats: Mutex<Vec<Instant>>,
}

impl Health {
    fn new(n: usize) -> Self {
        Self { failed: Mutex::default(), beats: Mutex::new(vec![Instant::now(); n]) }
    }

    /// `rank` made progress.
    pub fn beat(&self, rank: usize) {
        if let Some(b) = self.beats.lock().unwrap_or_else(|p| p.into_inner()).get_mut(rank) {
            *b = Instant::now();
        }
    }

    /// The rank that has gone longest without progress, and for how long.
    fn stalest(&self, done: &[AtomicBool]) -> Option<(usize, Duration)> {
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats
            .iter()
            .enumerate()
            .filter(|(r, _)| !done[*r].load(Ordering::Acquire))
            .map(|(r, b)| (r, b.elapsed()))
            .max_by_key(|(_, d)| *d)
    }

    /// Records `rank`'s failure unless an earlier one is recorded (the root cause is kept).
    pub fn fail(&self, rank: usize, why: impl Into<String>) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some((rank, why.into()));
        }
    }

    pub fn failure(&self) -> Option<(usize, String)> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The error a waiting rank returns once a peer failed.
    pub(crate) fn peer_error(&self, me: usize) -> Option<candle_core::Error> {
        self.failure()
            .map(|(r, why)| CandiffError::Parallel(format!("rank {me} stopped: rank {r} failed ({why})")).into())
    }
}

/// A run of `len` elements starting at element `at` of a flat buffer: (at, len).
pub type Span = (usize, usize);

/// Moves tensors between the ranks of one run.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The general exchange among `members` (world ranks; this rank is one of them), started
    /// without making this rank's later work wait for it. `send` is 1-D; `sends[i]` lists the
    /// pieces of it for `members[i]`, and `recvs[i]` where the pieces from `members[i]` go in the
    /// `recv_len`-element result: the k-th piece this rank sends to a member lands in that
    /// member's k-th receive piece from this rank (same lengths). The receive pieces must cover
    /// the result. It may be read only after [`Pending::wait`] (work enqueued in between runs
    /// alongside the transfer; transports without a separate channel finish at once). Every
    /// member calls it with the same `members`, in the same order of calls.
    fn exchange_start(
        &self,
        members: &[usize],
        send: &Tensor,
        sends: &[Vec<Span>],
        recv_len: usize,
        recvs: &[Vec<Span>],
    ) -> Result<(Tensor, Pending)>;
    /// The all-to-all: `send` holds `send_counts[i]` elements for `members[i]`, in member
    /// order; the result holds `recv_counts[i]` elements from each, in member order.
    fn all_to_all_start(
        &self,
        members: &[usize],
        send: &Tensor,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<(Tensor, Pending)> {
        let runs = |counts: &[usize]| -> Vec<Vec<Span>> {
            let mut at = 0;
            counts
                .iter()
                .map(|&c| {
                    at += c;
                    vec![(at - c, c)]
                })
                .collect()
        };
        self.exchange_start(members, send, &runs(send_counts), recv_counts.iter().sum(), &runs(recv_counts))
    }
    /// [`Transport::all_to_all_start`] and its wait.
    fn all_to_all(
        &self,
        members: &[usize],
        send: &Tensor,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Tensor> {
        let (out, pending) = self.all_to_all_start(members, send, send_counts, recv_counts)?;
        pending.wait()?;
        Ok(out)
    }
    /// Waits until this rank's queued work (communication included) is done, within the run's
    /// timeout; errors naming the rank when a peer failed or the wait timed out.
    fn fence(&self) -> Result<()>;
    /// Ends this rank's communication at once (from any thread): pending and later exchanges
    /// fail instead of waiting for a peer that will not come.
    fn abort(&self) {}
}

/// Errors unless the pieces of an exchange lie inside a `send_len`-element send buffer and the
/// receive pieces tile the `recv_len`-element result exactly (each element written once).
pub(crate) fn check_spans(sends: &[Vec<Span>], send_len: usize, recvs: &[Vec<Span>], recv_len: usize) -> Result<()> {
    if let Some(&(at, len)) = sends.iter().flatten().find(|(at, len)| at + len > send_len) {
        candle_core::bail!("exchange: send piece {at}..{} outside the {send_len}-element buffer", at + len);
    }
    let mut r: Vec<Span> = recvs.iter().flatten().copied().filter(|s| s.1 > 0).collect();
    r.sort_unstable();
    let mut next = 0;
    for (at, len) in r {
        if at != next {
            candle_core::bail!(
                "exchange: receive pieces leave a gap or overlap at element {next} (next piece at {at})"
            );
        }
        next = at + len;
    }
    if next != recv_len {
        candle_core::bail!("exchange: receive pieces cover {next} of {recv_len} elements");
    }
    Ok(())
}

/// An exchange in flight ([`Transport::all_to_all_start`]): `wait` orders this rank's later
/// work after it. Dropped unwaited (an error path), it waits then, so buffers the transfer still
/// uses are never released under it.
#[must_use = "the received data is valid only after `wait`"]
pub struct Pending(Option<Box<dyn FnOnce() -> Result<()> + Send + Sync>>);

thread_local! {
    /// Exchanges this rank thread has started and not yet waited for.
    static IN_FLIGHT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether this rank thread has an exchange in flight: GEMMs enqueued now run beside the
/// transfer (and leave it multiprocessors, see `crate::cuda::lt`).
pub fn transfers_in_flight() -> bool {
    IN_FLIGHT.with(|c| c.get() > 0)
}

impl Pending {
    /// Nothing in flight.
    pub fn done() -> Self {
        Self(None)
    }

    /// `wait` runs `f` (which keeps alive what the transfer uses until then). Made and waited
    /// for on the rank's own thread.
    pub fn new(f: impl FnOnce() -> Result<()> + Send + Sync + 'static) -> Self {
        IN_FLIGHT.with(|c| c.set(c.get() + 1));
        Self(Some(Box::new(f)))
    }

    pub fn wait(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        match self.0.take() {
            Some(f) => {
                IN_FLIGHT.with(|c| c.set(c.get().saturating_sub(1)));
                f()
            }
            None => Ok(()),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A subset of the ranks that exchange data together, in a fixed member order.
#[derive(Clone)]
pub struct Group {
    t: Arc<dyn Transport>,
    members: Vec<usize>,
    index: usize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(members {:?}, me {})", self.members, self.members[self.index])
    }
}

impl Group {
    /// All ranks of the transport's run.
    pub fn world(t: Arc<dyn Transport>) -> Self {
        let index = t.rank();
        Self { members: (0..t.world()).collect(), t, index }
    }

    /// The sub-group of `members` (world ranks, which must include this rank).
    pub fn sub(&self, members: Vec<usize>) -> Result<Self> {
        let me = self.t.rank();
        let index = members
            .iter()
            .position(|&m| m == me)
            .ok_or_else(|| candle_core::Error::Msg(format!("rank {me} is not in the group {members:?}")))?;
        Ok(Self { t: self.t.clone(), members, index })
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// This rank's position in the group.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn rank(&self) -> usize {
        self.t.rank()
    }

    pub fn fence(&self) -> Result<()> {
        self.t.fence()
    }

    /// Sends `pieces[i]` to member `i` and returns what each member sent here, shaped
    /// `shapes[i]` (all in the dtype of the pieces).
    pub fn all_to_all(&self, pieces: &[Tensor], shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
        let n = self.size();
        if pieces.len() != n || shapes.len() != n {
            candle_core::bail!("all_to_all over {n} ranks needs {n} pieces and shapes");
        }
        if n == 1 {
            return Ok(vec![pieces[0].clone()]);
        }
        let flat = pieces.iter().map(|p| p.flatten_all()).collect::<Result<Vec<_>>>()?;
        let send = Tensor::cat(&flat, 0)?;
        let send_counts: Vec<usize> = pieces.iter().map(|p| p.elem_count()).collect();
        let recv_counts: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let recv = self.all_to_all_flat(&send, &send_counts, &recv_counts)?;
        let mut out = Vec::with_capacity(n);
        let mut at = 0;
        for (s, c) in shapes.iter().zip(&recv_counts) {
            out.push(recv.narrow(0, at, *c)?.reshape(s.as_slice())?);
            at += c;
        }
        Ok(out)
    }

    /// [`Transport::exchange_start`] among the group's members (pieces as (start, length) in
    /// elements of `send` and of the `recv_len`-element result, per member in member order).
    pub fn exchange_start(
        &self,
        send: &Tensor,
        sends: &[Vec<Span>],
        recv_len: usize,
        recvs: &[Vec<Span>],
    ) -> Result<(Tensor, Pending)> {
        self.t.exchange_start(&self.members, send, sends, recv_len, recvs)
    }

    /// [`Transport::all_to_all`] among the group's members: `send` is 1-D, `send_counts[i]`
    /// elements for member `i` in member order; returns `recv_counts[i]` from each, in order.
    pub fn all_to_all_flat(&self, send: &Tensor, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor> {
        self.t.all_to_all(&self.members, send, send_counts, recv_counts)
    }

    /// Concatenates every member's `x` along `dim`; member `i`'s extent there is `sizes[i]`.
    pub fn all_gather(&self, x: &Tensor, dim: usize, sizes: &[usize]) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        let shapes: Vec<Vec<usize>> = sizes
            .iter()
            .map(|&s| {
                let mut d = x.dims().to_vec();
                d[dim] = s;
                d
            })
            .collect();
        let x = x.contiguous()?;
        let pieces = vec![x; self.size()];
        Tensor::cat(&self.all_to_all(&pieces, &shapes)?, dim)
    }

    /// Member `root`'s `x` on every member (`x` gives the shape on the others).
    pub fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        let empty = x.flatten_all()?.narrow(0, 0, 0)?;
        let pieces: Vec<Tensor> =
            (0..self.size()).map(|_| if self.index == root { x.clone() } else { empty.clone() }).collect();
        let shapes: Vec<Vec<usize>> =
            (0..self.size()).map(|i| if i == root { x.dims().to_vec() } else { vec![0] }).collect();
        Ok(self.all_to_all(&pieces, &shapes)?.swap_remove(root))
    }
}

/// Ulysses sequence parallelism over a group: each member holds a contiguous share of every
/// segment of the sequence (FLUX: text then image tokens; Wan: one segment of video tokens).
#[derive(Debug, Clone)]
pub struct SeqParallel {
    group: Group,
    /// `sizes[seg][member]`: tokens of segment `seg` held by `member`.
    sizes: Vec<Vec<usize>>,
    /// Head chunks asked for ([`SeqParallel::with_head_chunks`]); `None`: [`SP_CHUNKS_ENV`] or
    /// the default.
    chunks: Option<usize>,
}

/// `CANDIFF_SP_CHUNKS`: how many head chunks each sequence-parallel attention exchanges and
/// attends over one after another (a divisor of the heads each rank attends over).
pub const SP_CHUNKS_ENV: &str = "CANDIFF_SP_CHUNKS";

/// Head chunks by default (the largest divisor of a rank's heads not above it): chunk `c`'s
/// attention runs while chunk `c + 1`'s q, k, v arrive and chunk `c - 1`'s output goes back, so
/// only the first chunk's inputs and the last one's output wait in the open.
pub const SP_CHUNKS_DEFAULT: usize = 2;

/// [`SP_CHUNKS_ENV`] as set, read once (every sharded attention asks).
fn sp_chunks_env() -> Option<&'static str> {
    static V: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    V.get_or_init(|| std::env::var(SP_CHUNKS_ENV).ok()).as_deref()
}

impl SeqParallel {
    /// Shards segments of `totals` tokens evenly over the group.
    pub fn new(group: Group, totals: &[usize]) -> Self {
        let n = group.size();
        Self { sizes: totals.iter().map(|&t| split_sizes(t, n)).collect(), group, chunks: None }
    }

    /// Exchanges and attends over the heads in `chunks` parts (see [`SP_CHUNKS_DEFAULT`]);
    /// it must divide the heads each rank attends over.
    pub fn with_head_chunks(mut self, chunks: usize) -> Self {
        self.chunks = Some(chunks);
        self
    }

    /// Head chunks for `hl` heads per rank: the count asked for (by [`Self::with_head_chunks`],
    /// else [`SP_CHUNKS_ENV`]), which must divide `hl`; else the largest divisor of `hl` up to
    /// [`SP_CHUNKS_DEFAULT`]. One rank exchanges nothing: one chunk.
    pub(crate) fn head_chunks(&self, hl: usize) -> Result<usize> {
        if self.group.size() == 1 || hl == 0 {
            return Ok(1);
        }
        let asked = match self.chunks {
            Some(c) => Some((c, "with_head_chunks".to_string())),
            None => match sp_chunks_env() {
                Some(v) => Some((
                    v.trim().parse::<usize>().map_err(|_| {
                        CandiffError::Parallel(format!(
                            "{SP_CHUNKS_ENV}={v}: expected a positive whole number of head chunks"
                        ))
                    })?,
                    format!("{SP_CHUNKS_ENV}={v}"),
                )),
                None => None,
            },
        };
        match asked {
            Some((c, _)) if c >= 1 && hl.is_multiple_of(c) => Ok(c),
            Some((_, why)) => {
                let ok: Vec<String> = (1..=hl).filter(|c| hl.is_multiple_of(*c)).map(|c| c.to_string()).collect();
                Err(CandiffError::Parallel(format!(
                    "{why}: the head chunks must divide the {hl} heads each rank attends over; use one of: {}",
                    ok.join(", ")
                ))
                .into())
            }
            None => Ok((1..=SP_CHUNKS_DEFAULT.min(hl)).rev().find(|c| hl.is_multiple_of(*c)).unwrap_or(1)),
        }
    }

    /// Whether the exchange kernels apply (a CUDA build, tensors on a GPU).
    fn fused(x: &Tensor) -> bool {
        static GENERIC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        cfg!(feature = "cuda")
            && x.device().is_cuda()
            && !*GENERIC.get_or_init(|| std::env::var_os(SP_GENERIC_ENV).is_some())
    }

    /// Ranks sharing the sequence.
    pub fn ranks(&self) -> usize {
        self.group.size()
    }

    /// (offset, length) of this rank's share of segment `seg`, in the segment's own positions.
    pub fn local(&self, seg: usize) -> (usize, usize) {
        let s = &self.sizes[seg];
        let i = self.group.index();
        (s[..i].iter().sum(), s[i])
    }

    /// This rank's share of segment `seg` of `x` along `dim` (where `x` holds that segment).
    pub fn shard(&self, x: &Tensor, dim: usize, seg: usize) -> Result<Tensor> {
        let (o, l) = self.local(seg);
        x.narrow(dim, o, l)
    }

    /// The whole segment `seg` from every member's share along `dim`.
    pub fn gather(&self, x: &Tensor, dim: usize, seg: usize) -> Result<Tensor> {
        self.group.all_gather(x, dim, &self.sizes[seg])
    }

    /// A joint text-then-image sequence (FLUX): this rank's text tokens, image tokens (both
    /// `[B, S, C]`, segments 0 and 1) and their rows of the RoPE tables of the full sequence.
    pub fn shard_joint(&self, txt: &Tensor, img: &Tensor, rope: &(Tensor, Tensor)) -> Result<JointShard> {
        let s_txt = txt.dim(1)?;
        let ((to, tl), (io, il)) = (self.local(0), self.local(1));
        let rows = |t: &Tensor| Tensor::cat(&[t.narrow(0, to, tl)?, t.narrow(0, s_txt + io, il)?], 0);
        Ok((self.shard(txt, 1, 0)?, self.shard(img, 1, 1)?, (rows(&rope.0)?, rows(&rope.1)?)))
    }

    /// Tokens member `m` holds, over all segments.
    fn held(&self, m: usize) -> usize {
        self.sizes.iter().map(|s| s[m]).sum()
    }

    /// Start of member `m`'s share of segment `seg` in the full sequence (segments in order).
    fn global_start(&self, seg: usize, m: usize) -> usize {
        let before: usize = self.sizes[..seg].iter().map(|s| s.iter().sum::<usize>()).sum();
        before + self.sizes[seg][..m].iter().sum::<usize>()
    }

    /// Start of this member's share of segment `seg` among its local tokens.
    fn local_start(&self, seg: usize, m: usize) -> usize {
        self.sizes[..seg].iter().map(|s| s[m]).sum()
    }

    /// The pieces of head chunk `chunk`'s q, k, v exchange out of the token-major pack buffer
    /// (`[C*n, S_local, 3, B, h, D]`, `row` = 3*B*h*D elements per token): to
    /// member `m`, its heads of the chunk (piece `chunk * n + m`) of this rank's tokens, one run
    /// per segment; from member `p`, its tokens of this rank's heads of the chunk, placed in the
    /// single-rank token order (`[S, 3, B, h, D]`). Returns (sends, receives, received length).
    fn qkv_spans(&self, row: usize, chunk: usize) -> (Vec<Vec<Span>>, Vec<Vec<Span>>, usize) {
        let (n, me) = (self.group.size(), self.group.index());
        let s_loc = self.held(me);
        let s_total: usize = self.sizes.iter().flatten().sum();
        let segs = 0..self.sizes.len();
        let piece = |m: usize| (chunk * n + m) * s_loc;
        let sends = (0..n)
            .map(|m| {
                segs.clone()
                    .map(|seg| ((piece(m) + self.local_start(seg, me)) * row, self.sizes[seg][me] * row))
                    .collect()
            })
            .collect();
        let recvs = (0..n)
            .map(|p| segs.clone().map(|seg| (self.global_start(seg, p) * row, self.sizes[seg][p] * row)).collect())
            .collect();
        (sends, recvs, s_total * row)
    }

    /// The pieces of the output exchange: to member `m`, the attention output rows of its tokens
    /// (segment by segment, as they lie in the single-rank order); from member `p`, this rank's
    /// tokens of `p`'s heads, into piece `p` of `[n, S_local, ...]`.
    fn out_spans(&self, row: usize) -> (Vec<Vec<Span>>, Vec<Vec<Span>>, usize) {
        let (n, me) = (self.group.size(), self.group.index());
        let s_loc = self.held(me);
        let segs = 0..self.sizes.len();
        let sends = (0..n)
            .map(|m| segs.clone().map(|seg| (self.global_start(seg, m) * row, self.sizes[seg][m] * row)).collect())
            .collect();
        let recvs = (0..n)
            .map(|p| {
                segs.clone()
                    .map(|seg| ((p * s_loc + self.local_start(seg, me)) * row, self.sizes[seg][me] * row))
                    .collect()
            })
            .collect();
        (sends, recvs, n * s_loc * row)
    }

    /// Starts the q, k, v exchanges of a packed buffer `[C*n, S_local, 3, B, h, D]`
    /// ([`pack::QkvPack`]), one per head chunk; each result, `[S, 3, B, h, D]` in the single-rank
    /// token order, is valid after its wait.
    fn start_qkv(&self, qkv: &Tensor) -> Result<(ChunksInFlight, (usize, usize, usize))> {
        let &[pieces, s_loc, 3, b, h, d] = qkv.dims() else {
            candle_core::bail!(
                "sequence-parallel exchange: expected a [pieces, S, 3, B, h, D] buffer, found {:?}",
                qkv.dims()
            )
        };
        let n = self.group.size();
        if !pieces.is_multiple_of(n) || s_loc != self.held(self.group.index()) {
            candle_core::bail!(
                "sequence-parallel exchange: a buffer of {pieces} pieces x {s_loc} tokens, the group has {n} ranks and this one holds {}",
                self.held(self.group.index())
            );
        }
        let g = &self.group;
        let send = qkv.flatten_all()?;
        let chunks = (0..pieces / n)
            .map(|c| {
                let (sends, recvs, len) = self.qkv_spans(3 * b * h * d, c);
                crate::profile::transfer_labelled("q/k/v in", || {
                    g.t.exchange_start(&g.members, &send, &sends, len, &recvs)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((chunks, (b, h, d)))
    }

    /// Attention once the q, k, v exchanges are under way, chunk by chunk: waits for a chunk's
    /// inputs, attends over the whole sequence for its heads, and starts sending each member its
    /// tokens' outputs, while the next chunk's inputs are still arriving ([`Returning::wait`]
    /// joins the heads of the local tokens).
    fn finish_start<'a>(
        &'a self,
        recvs: ChunksInFlight,
        (b, h, d): (usize, usize, usize),
        attn: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Returning<'a>> {
        let g = &self.group;
        let s_total: usize = self.sizes.iter().flatten().sum();
        let (sends, back_spans, len) = self.out_spans(b * h * d);
        let mut backs = Vec::with_capacity(recvs.len());
        for (recv, pending) in recvs {
            let dev = recv.device().clone();
            span(Part::ExchangeWaitIn, &dev, || pending.wait())?;
            let qkv = recv.reshape((s_total, 3, b, h, d))?;
            // Each of q, k, v: [S, B, h, D] rows 3*B*h*D apart, seen as [B, h, S, D] (the attention
            // takes any strides with a unit one along D).
            let pick = |t: usize| qkv.narrow(1, t, 1)?.squeeze(1)?.permute((1, 2, 0, 3));
            let o = span(Part::Attention, &dev, || attn(&pick(0)?, &pick(1)?, &pick(2)?))?;
            // Token-major rows (a view of the attention's [B, S, h, D] output when B = 1): each
            // member's tokens are runs of them.
            let rows = o.permute((2, 0, 1, 3))?.contiguous()?.flatten_all()?;
            backs.push(span(Part::Exchange, &dev, || {
                crate::profile::transfer_labelled("output back", || {
                    g.t.exchange_start(&g.members, &rows, &sends, len, &back_spans)
                })
            })?);
        }
        Ok(Returning(Ret::InFlight { sp: self, backs, dims: (b, h, d) }))
    }

    /// The received outputs, `[n, S_local, B, h, D]` per head chunk (after the waits), as
    /// `[B, H, S_local, D]`: chunk `c`'s member `j` holds heads `(c*n + j)*h ..`.
    fn join_heads(&self, backs: ChunksInFlight, (b, h, d): (usize, usize, usize)) -> Result<Tensor> {
        let n = self.group.size();
        let s_loc = self.held(self.group.index());
        let mut recv = Vec::with_capacity(backs.len());
        for (back, pending) in backs {
            span(Part::ExchangeWaitOut, back.device(), || pending.wait())?;
            recv.push(back);
        }
        let dev = recv[0].device().clone();
        let heads = recv.len() * n * h;
        span(Part::Exchange, &dev, || {
            if Self::fused(&recv[0]) {
                exchange::unpack_out(&recv, (n, s_loc, b, h, d))
            } else {
                // C x [n, S_local, B, h, D] -> [C*n, S_local, B, h, D] -> [B, S_local, C*n*h, D].
                let pieces = recv.iter().map(|r| r.reshape((n, s_loc, b, h, d))).collect::<Result<Vec<_>>>()?;
                Tensor::cat(&pieces, 0)?.permute((2, 1, 0, 3, 4))?.contiguous()?.reshape((b, s_loc, heads, d))
            }
        })?
        .transpose(1, 2)
    }
}

/// Per head chunk, an exchange's received buffer and its transfer (valid after the wait).
type ChunksInFlight = Vec<(Tensor, Pending)>;

/// Set (to anything), the exchanges use the Candle composition instead of the exchange kernels
/// on GPUs too (a diagnostic: the composition is their CPU reference).
pub const SP_GENERIC_ENV: &str = "CANDIFF_SP_GENERIC";

/// An attention whose inputs are on their way ([`attend_start`], [`attend_packed_start`]): work
/// queued before [`Attending::finish`] overlaps the exchange of q, k, v on GPUs.
pub struct Attending<'a>(Started<'a>);

enum Started<'a> {
    Local(Tensor, Tensor, Tensor),
    /// One (received q/k/v, pending transfer) per head chunk.
    Sharded {
        sp: &'a SeqParallel,
        recvs: ChunksInFlight,
        dims: (usize, usize, usize),
    },
}

/// Starts the attention of local q, k, v `[B, H, S_local, D]` (any strides with a unit last
/// one). With sharded tokens (Ulysses) heads are traded for tokens: q, k, v are packed
/// ([`pack::QkvPack`]) and their all-to-all begins here; [`Attending::finish`] waits for it, runs
/// `attn` over the whole sequence in the single-rank token order for `H / n` heads, and sends the
/// outputs back to the ranks holding the tokens (`[B, H, S_local, D]`). Models that make q, k, v
/// themselves fill a [`pack::QkvPack`] directly and call [`attend_packed_start`].
pub fn attend_start<'a>(sp: Option<&'a SeqParallel>, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Attending<'a>> {
    match sp {
        Some(sp) if sp.group.size() > 1 => {
            let (b, heads, s_loc, d) = q.dims4()?;
            let mut pack = pack::QkvPack::new(Some(sp), q, s_loc, b, heads, d)?;
            span(Part::Exchange, q.device(), || {
                for (slot, x) in [(pack::Slot::Q, q), (pack::Slot::K, k), (pack::Slot::V, v)] {
                    pack.put(slot, 0, x, None, None)?;
                }
                Ok(())
            })?;
            attend_packed_start(Some(sp), pack.finish()?)
        }
        _ => Ok(Attending(Started::Local(q.clone(), k.clone(), v.clone()))),
    }
}

/// Starts the attention of a packed q, k, v ([`pack::QkvPack::finish`], made for `sp`).
pub fn attend_packed_start(sp: Option<&SeqParallel>, qkv: Tensor) -> Result<Attending<'_>> {
    match sp {
        Some(sp) if sp.group.size() > 1 => {
            let (recvs, dims) = span(Part::Exchange, qkv.device(), || sp.start_qkv(&qkv))?;
            Ok(Attending(Started::Sharded { sp, recvs, dims }))
        }
        _ => {
            let (q, k, v) = pack::views(&qkv)?;
            Ok(Attending(Started::Local(q, k, v)))
        }
    }
}

impl<'a> Attending<'a> {
    /// The attention output `[B, H, S_local, D]` (`attn` runs on whole-sequence q, k, v).
    pub fn finish(self, attn: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        self.finish_start(attn)?.wait()
    }

    /// Runs the attention and, with sharded tokens, starts sending the outputs back: work queued
    /// before [`Returning::wait`] overlaps that exchange on GPUs.
    pub fn finish_start(self, attn: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>) -> Result<Returning<'a>> {
        match self.0 {
            Started::Local(q, k, v) => {
                Ok(Returning(Ret::Done(span(Part::Attention, q.device(), || attn(&q, &k, &v))?)))
            }
            Started::Sharded { sp, recvs, dims } => sp.finish_start(recvs, dims, attn),
        }
    }
}

/// An attention output on its way back to the ranks holding its tokens
/// ([`Attending::finish_start`]).
pub struct Returning<'a>(Ret<'a>);

enum Ret<'a> {
    Done(Tensor),
    /// One (received outputs, pending transfer) per head chunk.
    InFlight {
        sp: &'a SeqParallel,
        backs: ChunksInFlight,
        dims: (usize, usize, usize),
    },
}

impl Returning<'_> {
    /// An output already in place (`[B, H, S_local, D]`).
    pub fn done(o: Tensor) -> Self {
        Returning(Ret::Done(o))
    }

    /// The attention output of the local tokens, `[B, H, S_local, D]`.
    pub fn wait(self) -> Result<Tensor> {
        match self.0 {
            Ret::Done(o) => Ok(o),
            Ret::InFlight { sp, backs, dims } => sp.join_heads(backs, dims),
        }
    }
}

/// This rank's (text, image, RoPE rows) of a joint sequence.
pub type JointShard = (Tensor, Tensor, (Tensor, Tensor));

use crate::profile::{span, Part};

/// Attention through the group when the tokens are sharded, else `attn` directly.
pub fn attend(
    sp: Option<&SeqParallel>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attn: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    attend_start(sp, q, k, v)?.finish(attn)
}

/// Errors unless `n` ranks can split a model of `heads` attention heads (`cfg`: the step runs a
/// conditional and an unconditional branch, which go to two halves of the ranks when `n` is even).
pub fn check_split(n: usize, heads: usize, cfg: bool) -> Result<()> {
    let cfg_split = cfg && n.is_multiple_of(2);
    let sp_n = if cfg_split { n / 2 } else { n };
    if n <= 1 || heads.is_multiple_of(sp_n) {
        return Ok(());
    }
    let ok: Vec<String> = (1..=heads)
        .filter(|d| heads.is_multiple_of(*d))
        .map(|d| if cfg_split { 2 * d } else { d })
        .filter(|&d| d > 1)
        .map(|d| d.to_string())
        .collect();
    Err(CandiffError::Parallel(format!(
        "{n} ranks shard each transformer call over {sp_n} ranks{}, but the model's {heads} attention heads do not divide by {sp_n}; use one of: {}",
        if cfg_split { " (the other half runs the unconditional branch)" } else { "" },
        ok.join(", ")
    ))
    .into())
}

/// How `n` ranks divide a step (for the user): e.g. "2 GPUs: the guidance branches on one GPU each".
pub fn describe_split(n: usize, cfg: bool, unit: &str) -> String {
    let cfg_split = cfg && n.is_multiple_of(2);
    let sp_n = if cfg_split { n / 2 } else { n };
    let plural = |k: usize| if k == 1 { unit.to_string() } else { format!("{unit}s") };
    match (cfg_split, sp_n) {
        (true, 1) => format!("{n} {}: the guidance branches on one {unit} each", plural(n)),
        (true, k) => {
            format!("{n} {}: the guidance branches on {k} {} each, tokens sharded {k} ways", plural(n), plural(k))
        }
        (false, k) if cfg => format!("{n} {}: tokens sharded {k} ways, both guidance branches in turn", plural(n)),
        (false, k) => format!("{n} {}: tokens sharded {k} ways", plural(n)),
    }
}

/// How a run's ranks divide the work of one denoising step.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The ranks sharing one transformer call's tokens (absent with one rank).
    pub sp: Option<Group>,
    /// With guidance on an even number of ranks: the partner holding the same tokens of the
    /// other branch, and this rank's branch (0 conditional, 1 unconditional).
    pub cfg: Option<(Group, usize)>,
    world: Option<Group>,
}

impl Plan {
    /// One rank: nothing shared.
    pub fn single() -> Self {
        Self { sp: None, cfg: None, world: None }
    }

    /// The plan of `world` (one rank without it).
    pub fn of(world: Option<&Group>, heads: usize, cfg: bool) -> Result<Self> {
        match world {
            Some(w) => Self::new(w, heads, cfg),
            None => Ok(Self::single()),
        }
    }

    /// Waits for this rank's queued work and its exchanges (see [`Transport::fence`]); nothing to
    /// do on one rank.
    pub fn fence(&self) -> Result<()> {
        match &self.world {
            Some(w) => w.fence(),
            None => Ok(()),
        }
    }

    /// Splits the world for a model of `heads` attention heads; `cfg` when the step runs a
    /// conditional and an unconditional branch.
    pub fn new(world: &Group, heads: usize, cfg: bool) -> Result<Self> {
        let n = world.size();
        if n == 1 {
            return Ok(Self::single());
        }
        let (sp_members, cfg_split) = if cfg && n.is_multiple_of(2) {
            let half = n / 2;
            let branch = world.index() / half;
            let mine = world.index() % half;
            let sp: Vec<usize> = (branch * half..(branch + 1) * half).map(|i| world.members[i]).collect();
            let pair = world.sub(vec![world.members[mine], world.members[mine + half]])?;
            (sp, Some((pair, branch)))
        } else {
            (world.members.clone(), None)
        };
        check_split(n, heads, cfg)?;
        let sp_n = sp_members.len();
        let sp = (sp_n > 1).then(|| world.sub(sp_members)).transpose()?;
        Ok(Self { sp, cfg: cfg_split, world: Some(world.clone()) })
    }

    /// The sequence-parallel context of one call over segments of `totals` tokens.
    pub fn seq(&self, totals: &[usize]) -> Option<SeqParallel> {
        self.sp.as_ref().map(|g| SeqParallel::new(g.clone(), totals))
    }

    /// The conditional and (with guidance) unconditional predictions: `branch(0)` and
    /// `branch(1)`, on two halves of the ranks when the plan splits them, else one after the other.
    pub fn guided(&self, with_cfg: bool, branch: impl Fn(usize) -> Result<Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        if !with_cfg {
            return Ok((branch(0)?, None));
        }
        match &self.cfg {
            None => Ok((branch(0)?, Some(branch(1)?))),
            Some((pair, mine)) => {
                let y = branch(*mine)?.contiguous()?;
                let shape = y.dims().to_vec();
                let mut got = pair.all_to_all(&[y.clone(), y], &[shape.clone(), shape])?;
                let uncond = got.pop().expect("two members");
                Ok((got.pop().expect("two members"), Some(uncond)))
            }
        }
    }
}

/// One rank of a run, handed to the function every rank runs.
#[derive(Clone)]
pub struct Rank {
    pub device: Device,
    pub world: Group,
}

impl Rank {
    pub fn index(&self) -> usize {
        self.world.rank()
    }
}

/// How the ranks of a run are placed.
#[derive(Debug, Clone)]
pub enum Placement {
    /// One rank per GPU `0..n`, NCCL between them.
    Gpus(usize),
    /// `n` ranks sharing one device, in-process exchange (checks of the sharded code paths;
    /// no speed-up).
    Shared(usize, Device),
}

impl Placement {
    pub fn ranks(&self) -> usize {
        match self {
            Placement::Gpus(n) | Placement::Shared(n, _) => *n,
        }
    }

    /// What a rank is called in messages.
    pub fn unit(&self) -> &'static str {
        match self {
            Placement::Gpus(_) => "GPU",
            Placement::Shared(..) => "rank",
        }
    }
}

/// Default wait for a peer before a run is declared hung (covers a slow first step; a failed
/// peer is noticed at once, not after this).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Set to a rank number, that rank fails on purpose a moment after starting (checks that the
/// others stop with its error instead of hanging).
pub const FAULT_ENV: &str = "CANDIFF_TEST_FAIL_RANK";
/// How long an injected failure waits, so the other ranks are inside their work.
const FAULT_DELAY: Duration = Duration::from_secs(2);
/// How often the watchdog looks at the ranks.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// How long ranks get to stop after a failure before a command-line run gives up on them.
const STUCK_GRACE: Duration = Duration::from_secs(20);
/// Exit status of a command-line run whose ranks could not be stopped.
const STUCK_EXIT_CODE: i32 = 1;
static EXIT_WHEN_STUCK: AtomicBool = AtomicBool::new(false);

/// Command-line programs: when a rank fails and another stays blocked in a collective that
/// cannot be aborted, print the root cause and exit the process instead of waiting forever (a
/// library caller keeps the default: wait, retrying the abort).
pub fn exit_when_stuck(on: bool) {
    EXIT_WHEN_STUCK.store(on, Ordering::Relaxed);
}

/// Runs `f` on every rank, each in its own thread, and returns the results in rank order. When
/// any rank fails, the others stop at their next exchange or fence (a watchdog aborts their
/// communication, which also frees a rank blocked in a copy that waits on it), and the error
/// reported is the first failure (the root cause), naming its rank. A rank that makes no progress
/// (no exchange or fence) for `timeout` fails the run the same way.
pub fn launch<T: Send>(
    placement: &Placement,
    timeout: Duration,
    f: impl Fn(Rank) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let n = placement.ranks();
    if n == 0 {
        return Err(CandiffError::Parallel("a run needs at least one rank".into()).into());
    }
    let health = Arc::new(Health::new(n));
    let shared = match placement {
        Placement::Shared(_, device) => Some(shared_device(device)?),
        Placement::Gpus(_) => None,
    };
    let ranks: Vec<(Device, Arc<dyn Transport>)> = match &shared {
        Some(device) => local::LocalTransport::create(n, health.clone(), timeout)
            .into_iter()
            .map(|t| (device.clone(), Arc::new(t) as Arc<dyn Transport>))
            .collect(),
        None => gpu_ranks(n, health.clone(), timeout)?,
    };
    let fault: Option<usize> = std::env::var(FAULT_ENV).ok().and_then(|v| v.parse().ok());
    let transports: Vec<Arc<dyn Transport>> = ranks.iter().map(|(_, t)| t.clone()).collect();
    let done: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    let results: Vec<Option<Result<T>>> = std::thread::scope(|s| {
        let (health_w, done_w, transports) = (health.clone(), &done, &transports);
        s.spawn(move || {
            let mut failed_at: Option<Instant> = None;
            loop {
                std::thread::sleep(WATCH_EVERY);
                if done_w.iter().all(|d| d.load(Ordering::Acquire)) {
                    return;
                }
                if health_w.failure().is_none() {
                    match health_w.stalest(done_w) {
                        Some((r, d)) if d > timeout => health_w.fail(
                            r,
                            format!("made no progress for {d:.0?} (hung? raise --parallel-timeout if a step or a load takes that long)"),
                        ),
                        _ => continue,
                    }
                }
                // A rank failed: end everyone's communication (retried: a rank inside an NCCL
                // call holds its communicator until the call returns).
                for t in transports {
                    t.abort();
                }
                let since = *failed_at.get_or_insert_with(Instant::now);
                if since.elapsed() > STUCK_GRACE && EXIT_WHEN_STUCK.load(Ordering::Relaxed) {
                    let stuck: Vec<usize> =
                        (0..done_w.len()).filter(|&r| !done_w[r].load(Ordering::Acquire)).collect();
                    let (r, why) = health_w.failure().expect("recorded");
                    eprintln!(
                        "error: rank {r} of {} failed: {why}\nranks {stuck:?} did not stop within {STUCK_GRACE:?} (blocked in a collective); exiting",
                        done_w.len()
                    );
                    std::process::exit(STUCK_EXIT_CODE);
                }
            }
        });
        let handles: Vec<_> = ranks
            .into_iter()
            .enumerate()
            .map(|(i, (device, t))| {
                let (f, health, done) = (&f, health.clone(), &done[i]);
                std::thread::Builder::new()
                    .name(format!("rank-{i}"))
                    .spawn_scoped(s, move || {
                        let r = if fault == Some(i) {
                            std::thread::sleep(FAULT_DELAY);
                            Err(CandiffError::Parallel(format!("injected failure ({FAULT_ENV}={i})")).into())
                        } else {
                            // A panicking rank fails the run like an error (its peers must not wait for it).
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                f(Rank { device, world: Group::world(t) })
                            }))
                            .unwrap_or_else(|p| {
                                let msg = p
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default();
                                Err(CandiffError::Parallel(format!("panicked: {msg}")).into())
                            })
                        };
                        if let Err(e) = &r {
                            health.fail(i, e.to_string());
                        }
                        log::debug!("rank {i}: finished ({})", if r.is_ok() { "ok" } else { "error" });
                        done.store(true, Ordering::Release);
                        r
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| match h.join() {
                Ok(r) => Some(r),
                Err(_) => {
                    health.fail(i, "panicked");
                    done[i].store(true, Ordering::Release);
                    None
                }
            })
            .collect()
    });
    if let Some((r, why)) = health.failure() {
        return Err(CandiffError::Parallel(format!("rank {r} of {n} failed: {why}")).into());
    }
    // The ranks' results go back to the caller's stream: finish the shared one's work first.
    if let Some(device) = &shared {
        device.synchronize()?;
    }
    results.into_iter().map(|r| r.expect("no failure recorded")).collect()
}

/// The device ranks sharing `device` run on: on a GPU, one stream of its own that every rank
/// thread enqueues to, so their work is ordered exactly as one thread's would be. Candle's plain
/// CUDA device uses the *per-thread* default stream; handed to several threads it would give
/// each rank its own stream, and then the in-process exchange (a rank reading another's buffer),
/// the per-device cuBLASLt and cuDNN workspaces and the cuBLAS handle would all be used from
/// several streams at once without ordering: wrong results, varying from run to run (what
/// docs/PERF.md session 12 measured). What the caller queued on `device` is finished first, so
/// the ranks can read it. One such device per GPU for the process: every device made carries its
/// own caches (cuBLASLt workspace, loaded modules), which later launches reuse.
fn shared_device(device: &Device) -> Result<Device> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => {
            device.synchronize()?;
            static SHARED: std::sync::OnceLock<Mutex<std::collections::HashMap<usize, Device>>> =
                std::sync::OnceLock::new();
            let mut made = SHARED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = made.get(&gpu_id) {
                return Ok(d.clone());
            }
            let d = crate::cuda_support::cuda_device(gpu_id, true)?;
            made.insert(gpu_id, d.clone());
            Ok(d)
        }
        _ => Ok(device.clone()),
    }
}

/// `f` on `device` alone, or on every rank of `placement` with rank 0's result returned (the
/// others' results are dropped; they return no output).
pub fn run_on<T: Send>(
    placement: Option<&Placement>,
    timeout: Duration,
    device: &Device,
    f: impl Fn(&Device, Option<&Group>) -> Result<T> + Sync,
) -> Result<T> {
    match placement {
        None => f(device, None),
        Some(p) => Ok(launch(p, timeout, |rank| f(&rank.device, Some(&rank.world)))?.swap_remove(0)),
    }
}

/// Rank 0's `t` on every rank of `world` (`t` itself without one): every rank must start from the
/// same embeddings and noise.
pub fn from_root(world: Option<&Group>, t: Tensor) -> Result<Tensor> {
    match world {
        Some(w) => w.broadcast(&t.contiguous()?, 0),
        None => Ok(t),
    }
}

/// What a rank other than 0 returns instead of images or frames (it decodes and writes nothing):
/// `[0, height, width, 3]`; `None` on rank 0 or without ranks.
pub fn no_output(world: Option<&Group>, height: usize, width: usize) -> Result<Option<Tensor>> {
    if is_root(world) {
        return Ok(None);
    }
    Ok(Some(Tensor::zeros((0, height, width, 3), candle_core::DType::F32, &Device::Cpu)?))
}

/// Whether this is the rank that reports progress and writes output.
pub fn is_root(world: Option<&Group>) -> bool {
    world.is_none_or(|w| w.rank() == 0)
}

#[cfg(feature = "nccl")]
fn gpu_ranks(n: usize, health: Arc<Health>, timeout: Duration) -> Result<Vec<(Device, Arc<dyn Transport>)>> {
    nccl::NcclTransport::create(n, health, timeout)
}

#[cfg(not(feature = "nccl"))]
fn gpu_ranks(n: usize, _: Arc<Health>, _: Duration) -> Result<Vec<(Device, Arc<dyn Transport>)>> {
    Err(CandiffError::Unsupported(format!(
        "--gpus {n} needs NCCL, and this binary was built without it; rebuild with `--features nccl` (see README), or use --ranks {n} to check the sharded code paths on one device"
    ))
    .into())
}
