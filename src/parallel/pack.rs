//! q, k, v of one attention written once, straight into the buffer the attention (one rank) or
//! the sequence-parallel exchange (several) reads. One rank: `[3, 1, S, B, H, D]`. Several:
//! `[C*n, S_local, 3, B, H/(C*n), D]` for `n` ranks and `C` head chunks
//! ([`SeqParallel::head_chunks`]), piece `c*n + j` holding the heads of chunk `c` that member `j`
//! attends over (heads `(c*n + j)*H/(C*n) ..`), token by token with its q, k and v rows side by
//! side: what a member gets of a chunk is one run per segment of tokens (NCCL's point-to-point
//! transfers cost ~20 us per piece beyond their bytes, docs/PERF.md session 23). The producers
//! (per-head RMSNorm + RoPE of q and k, the copy of v) write their rows there on the GPU
//! (`qk_norm_rope`'s output placement), so no stack, concatenation or packing pass runs between
//! the projections and the all-to-all.
//! With one rank, q is `buf[0, 0]`, a `[S, B, H, D]` array the attention reads through strides.
//!
//! Elsewhere (the CPU, or `CANDIFF_SP_GENERIC` on GPUs) the pieces are kept and joined by Candle
//! ops in [`QkvPack::finish`]: the reference of the placement.

use candle_core::{Result, Tensor};

use super::SeqParallel;
use crate::error::CandiffError;
use crate::models::fused::HeadsOut;

/// Which of q, k, v a write fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Q = 0,
    K = 1,
    V = 2,
}

/// The q, k, v buffer of one attention being filled (see the module's comment).
pub struct QkvPack {
    /// Pieces along the heads: ranks x head chunks.
    pieces: usize,
    /// Token-major (several ranks) rather than slot-major (one).
    token_major: bool,
    s_loc: usize,
    b: usize,
    heads: usize,
    d: usize,
    /// Token runs (start, length) written so far, per slot.
    filled: [Vec<(usize, usize)>; 3],
    store: Store,
}

enum Store {
    #[cfg(feature = "cuda")]
    Gpu(candle_core::CudaStorage, candle_core::DType),
    /// Per slot: (first token, `[B, S_run, H, D]` contiguous).
    Parts([Vec<(usize, Tensor)>; 3]),
}

impl QkvPack {
    /// An empty buffer for `s_loc` local tokens of `b` samples, `heads` heads of size `d`, in the
    /// dtype and on the device of `like`, laid out for `sp`'s ranks (one rank without it).
    pub fn new(
        sp: Option<&SeqParallel>,
        like: &Tensor,
        s_loc: usize,
        b: usize,
        heads: usize,
        d: usize,
    ) -> Result<Self> {
        let n = sp.map_or(1, |sp| sp.group.size());
        if !heads.is_multiple_of(n) {
            return Err(CandiffError::Parallel(format!(
                "sequence parallelism over {n} ranks needs the head count ({heads}) to divide by {n}"
            ))
            .into());
        }
        let pieces = n * sp.map_or(Ok(1), |sp| sp.head_chunks(heads / n))?;
        // Packed on the GPU where the producers can write it; elsewhere the pieces are kept.
        let store = || -> Result<Store> {
            #[cfg(feature = "cuda")]
            if like.device().is_cuda() && (n == 1 || SeqParallel::fused(like)) {
                return Ok(Store::Gpu(crate::cuda::fused::uninit_like(like, 3 * s_loc * b * heads * d)?, like.dtype()));
            }
            let _ = like;
            Ok(Store::Parts(Default::default()))
        };
        Ok(Self { pieces, token_major: n > 1, s_loc, b, heads, d, filled: Default::default(), store: store()? })
    }

    /// Where row (b, s, h) of slot `t`'s tokens from `s0` on goes in the buffer (elements).
    pub fn placement(&self, t: Slot, s0: usize) -> HeadsOut {
        let hl = self.heads / self.pieces;
        let row = self.b * hl * self.d;
        let t = t as usize;
        if self.token_major {
            // [pieces, S, 3, B, hl, D].
            HeadsOut { start: (s0 * 3 + t) * row, yb: hl * self.d, ys: 3 * row, yp: 3 * self.s_loc * row, hl }
        } else {
            // [3, pieces, S, B, hl, D].
            HeadsOut {
                start: ((t * self.pieces) * self.s_loc + s0) * row,
                yb: hl * self.d,
                ys: row,
                yp: self.s_loc * row,
                hl,
            }
        }
    }

    /// Writes tokens `s0 ..` of slot `t` from `x`: `[B, S_run, H*D]` (heads contiguous within a
    /// token, any token stride) or `[B, H, S_run, D]` (unit stride along D). With `norm` (weight
    /// `[D]`, eps) each head row is RMS-normalized, with `rope` (cos, sin `[S_run, D/2]` f32)
    /// rotated in interleaved pairs (norm needs RoPE: FLUX's q/k); neither copies.
    pub fn put(
        &mut self,
        t: Slot,
        s0: usize,
        x: &Tensor,
        norm: Option<(&Tensor, f64)>,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<()> {
        let (b, s_run, hd) = match x.rank() {
            3 => x.dims3()?,
            4 => {
                let (b, h, s, d) = x.dims4()?;
                (b, s, h * d)
            }
            _ => candle_core::bail!("QkvPack::put: expected a rank 3 or 4 tensor, found {:?}", x.dims()),
        };
        if b != self.b
            || hd != self.heads * self.d
            || s0 + s_run > self.s_loc
            || (x.rank() == 4 && x.dim(1)? != self.heads)
        {
            candle_core::bail!(
                "QkvPack::put: {:?} at token {s0} does not fit {} tokens x {} samples x {} heads of {}",
                x.dims(),
                self.s_loc,
                self.b,
                self.heads,
                self.d
            );
        }
        if norm.is_some() && rope.is_none() {
            candle_core::bail!("QkvPack::put: the per-head norm runs only with RoPE");
        }
        if x.rank() == 4 && (norm.is_some() || rope.is_some()) {
            candle_core::bail!("QkvPack::put: norm / RoPE of a [B, H, S, D] view is not supported (copy only)");
        }
        self.filled[t as usize].push((s0, s_run));
        #[cfg(feature = "cuda")]
        let dst = self.placement(t, s0);
        let (heads, d) = (self.heads, self.d);
        match &mut self.store {
            #[cfg(feature = "cuda")]
            Store::Gpu(st, dtype) => {
                let x = x.to_dtype(*dtype)?;
                let x = if x.stride()[x.rank() - 1] == 1 { x } else { x.contiguous()? };
                crate::models::fused::write_heads(&x, heads, norm, rope, st, dst)
            }
            Store::Parts(parts) => {
                let rows = match (x.rank(), norm, rope) {
                    (3, Some((w, eps)), Some((c, s))) => crate::models::fused::qk_norm_rope(x, heads, w, eps, c, s)?,
                    (3, None, Some((c, s))) => crate::models::fused::rope_heads(x, heads, c, s)?,
                    (3, None, None) => x.contiguous()?.reshape((b, s_run, heads, d))?,
                    (4, ..) => x.transpose(1, 2)?.contiguous()?,
                    _ => unreachable!("norm without RoPE refused above"),
                };
                parts[t as usize].push((s0, rows));
                Ok(())
            }
        }
    }

    /// The filled buffer (see the module's comment: `[3, 1, S, B, H, D]` for one rank,
    /// `[C*n, S_local, 3, B, H/(C*n), D]` for several); errors unless every slot's tokens were
    /// written exactly once.
    pub fn finish(self) -> Result<Tensor> {
        for (t, runs) in self.filled.iter().enumerate() {
            let mut runs = runs.clone();
            runs.sort_unstable();
            let mut next = 0;
            for (s0, len) in runs {
                if s0 != next {
                    candle_core::bail!("QkvPack: slot {t} has tokens {next}..{s0} missing or written twice");
                }
                next = s0 + len;
            }
            if next != self.s_loc {
                candle_core::bail!("QkvPack: slot {t} holds {next} of {} tokens", self.s_loc);
            }
        }
        let (n, hl) = (self.pieces, self.heads / self.pieces);
        let shape: candle_core::Shape = if self.token_major {
            (n, self.s_loc, 3, self.b, hl, self.d).into()
        } else {
            (3, n, self.s_loc, self.b, hl, self.d).into()
        };
        match self.store {
            #[cfg(feature = "cuda")]
            Store::Gpu(st, _) => Ok(Tensor::from_storage(
                candle_core::Storage::Cuda(st),
                shape,
                candle_core::op::BackpropOp::none(),
                false,
            )),
            Store::Parts(mut parts) => {
                let mut slots = Vec::with_capacity(3);
                for p in parts.iter_mut() {
                    p.sort_by_key(|(s0, _)| *s0);
                    let rows: Vec<&Tensor> = p.iter().map(|(_, r)| r).collect();
                    // [B, S, H, D] -> [B, S, C*n, h, D] -> [C*n, S, B, h, D].
                    let all = Tensor::cat(&rows, 1)?;
                    slots.push(all.reshape((self.b, self.s_loc, n, hl, self.d))?.permute((2, 1, 0, 3, 4))?);
                }
                Tensor::stack(&slots, if self.token_major { 2 } else { 0 })?.contiguous()?.reshape(shape)
            }
        }
    }
}

/// q, k, v of a packed buffer with one piece (one rank): `[B, H, S, D]` views of it.
pub(crate) fn views(qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let pick = |t: usize| qkv.get(t)?.get(0)?.permute((1, 2, 0, 3));
    Ok((pick(0)?, pick(1)?, pick(2)?))
}
