//! Tensor-level call of the exchange kernel (src/cuda/exchange.rs); GPU tensors only (the
//! callers take the Candle composition elsewhere).

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
fn cuda_tensor(s: candle_core::cuda_backend::CudaStorage, shape: impl Into<candle_core::Shape>) -> Tensor {
    Tensor::from_storage(candle_core::Storage::Cuda(s), shape, candle_core::op::BackpropOp::none(), false)
}

/// Runs `f` on the CUDA storages and layouts of `ts`.
#[cfg(feature = "cuda")]
fn with_cuda<T>(
    ts: &[&Tensor],
    f: impl FnOnce(&[(&candle_core::cuda_backend::CudaStorage, &candle_core::Layout)]) -> Result<T>,
) -> Result<T> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut args = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        match &**s {
            candle_core::Storage::Cuda(c) => args.push((c, *l)),
            _ => candle_core::bail!("sequence-parallel exchange kernels take GPU tensors"),
        }
    }
    f(&args)
}

/// The received outputs of each head chunk, `[n, S_local, B, h, D]` each, into
/// `[B, S_local, C*n*h, D]` (chunk `c`, member `j`: heads `(c*n + j)*h ..`).
#[cfg(feature = "cuda")]
pub fn unpack_out(recvs: &[Tensor], (n, s, b, h, d): (usize, usize, usize, usize, usize)) -> Result<Tensor> {
    let refs: Vec<&Tensor> = recvs.iter().collect();
    let st = with_cuda(&refs, |a| crate::cuda::exchange::unpack_out(a, (n, s, b, h, d)))?;
    Ok(cuda_tensor(st, (b, s, recvs.len() * n * h, d)))
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> candle_core::Error {
    candle_core::Error::Msg("the sequence-parallel exchange kernels need a CUDA build".into())
}

#[cfg(not(feature = "cuda"))]
pub fn unpack_out(_: &[Tensor], _: (usize, usize, usize, usize, usize)) -> Result<Tensor> {
    Err(no_cuda())
}
