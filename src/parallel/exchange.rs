//! Tensor-level calls of the exchange kernels (src/cuda/exchange.rs); GPU tensors only (the
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

/// Local `[B, H, S_local, D]` q, k, v into the flat all-to-all send buffer `[n, 3, S_local, B, H/n, D]`.
#[cfg(feature = "cuda")]
pub fn pack_qkv(q: &Tensor, k: &Tensor, v: &Tensor, n: usize) -> Result<Tensor> {
    let len = 3 * q.elem_count();
    let s = with_cuda(&[q, k, v], |a| crate::cuda::exchange::pack_qkv([a[0], a[1], a[2]], n))?;
    Ok(cuda_tensor(s, len))
}

/// The received q, k, v pieces into `[3, S, B, h, D]` in the single-rank token order.
#[cfg(feature = "cuda")]
pub fn unpack_qkv(recv: &Tensor, map: &Tensor, (s, b, h, d): (usize, usize, usize, usize)) -> Result<Tensor> {
    let st = with_cuda(&[recv, map], |a| crate::cuda::exchange::unpack_qkv(a[0], a[1], s, (b, h, d)))?;
    Ok(cuda_tensor(st, (3, s, b, h, d)))
}

/// This rank's heads of the attention output `[B, h, S, D]` into the flat send buffer (member order).
#[cfg(feature = "cuda")]
pub fn pack_out(o: &Tensor, map: &Tensor) -> Result<Tensor> {
    let len = o.elem_count();
    let s = with_cuda(&[o, map], |a| crate::cuda::exchange::pack_out(a[0], a[1]))?;
    Ok(cuda_tensor(s, len))
}

/// The received outputs `[n, S_local, B, h, D]` into `[B, S_local, n*h, D]`.
#[cfg(feature = "cuda")]
pub fn unpack_out(recv: &Tensor, (n, s, b, h, d): (usize, usize, usize, usize, usize)) -> Result<Tensor> {
    let st = with_cuda(&[recv], |a| crate::cuda::exchange::unpack_out(a[0], (n, s, b, h, d)))?;
    Ok(cuda_tensor(st, (b, s, n * h, d)))
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> candle_core::Error {
    candle_core::Error::Msg("the sequence-parallel exchange kernels need a CUDA build".into())
}

#[cfg(not(feature = "cuda"))]
pub fn pack_qkv(_: &Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<Tensor> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
pub fn unpack_qkv(_: &Tensor, _: &Tensor, _: (usize, usize, usize, usize)) -> Result<Tensor> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
pub fn pack_out(_: &Tensor, _: &Tensor) -> Result<Tensor> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
pub fn unpack_out(_: &Tensor, _: (usize, usize, usize, usize, usize)) -> Result<Tensor> {
    Err(no_cuda())
}
