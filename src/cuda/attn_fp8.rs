//! FP8 attention on the GPU (`--attention fp8`): q, k, v quantized to E4M3 per tensor
//! (kernels/fp8.cu `attn_fp8_amax` / `attn_fp8_quant`), cuDNN's FP8 flash attention (Hopper and
//! newer; on Hopper it writes E4M3 only), the E4M3 output turned back into the activations' dtype
//! (`attn_fp8_dequant`). The arithmetic, on the CPU: [`crate::models::attn_fp8::reference`].

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};

use super::cudnn::{run_sdpa, SdpaIo};
use super::{function_in, wrap, Kernels};
use crate::models::attn_fp8::{QK_TARGET, V_TARGET};
use crate::nvfp4::format::E4M3_MAX;

/// Shortest key sequence FP8 attention runs on (`--attention fp8`); shorter attention runs the
/// bf16 kernel. Quantizing q, k, v costs time in proportion to the tokens, FP8 saves it in
/// proportion to tokens x keys: on an H200 (docs/PERF.md, session 10) 24 heads x 4608 tokens ran
/// 0.415 ms in FP8 against 0.433 in bf16 (1.04x, within the machine's noise), 27280 tokens 1.40x.
/// Below this length the speed is not worth FP8's error (rel. L2 ~6e-2 against bf16).
pub const MIN_KV_TOKENS: usize = 8192;

/// Whether `--attention fp8` runs attention over `sk` keys in FP8 ([`MIN_KV_TOKENS`]); the first
/// time it does not, the log says so.
pub fn applies(sk: usize) -> bool {
    if sk >= MIN_KV_TOKENS {
        return true;
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::info!(
            "--attention fp8: attention over fewer than {MIN_KV_TOKENS} keys (here {sk}) runs in bf16, where FP8's quantization passes cost more than it saves"
        )
    });
    false
}

/// The scalar buffer's initial values, passed by value to `attn_fp8_init` (`AttnScalarInit`).
#[repr(C)]
#[derive(Clone, Copy)]
struct ScalarInit([f32; SLOTS * SLOT_FLOATS]);
// SAFETY: plain f32 data with the layout of the kernel's `AttnScalarInit`.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for ScalarInit {}

/// A new scalar buffer holding `init`, written by a kernel: a copy from pageable host memory can
/// wait for the stream's queued work, and this runs once per attention call.
fn init_scalars(dev: &CudaDevice, init: &[f32]) -> Result<CudaSlice<f32>> {
    let stream = dev.cuda_stream();
    let values =
        ScalarInit(init.try_into().map_err(|_| candle_core::Error::Msg("fp8 attention: scalar count".into()))?);
    // SAFETY: the kernel writes every element.
    let mut scalars = unsafe { stream.alloc::<f32>(SLOTS * SLOT_FLOATS) }.map_err(wrap("alloc"))?;
    let f = function_in(dev, Kernels::Fp8, "attn_fp8_init")?;
    let cfg =
        LaunchConfig { grid_dim: (1, 1, 1), block_dim: ((SLOTS * SLOT_FLOATS) as u32, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut scalars).arg(&values);
    // SAFETY: argument types match the kernel; one thread per value.
    unsafe { b.launch(cfg) }.map_err(wrap("attn_fp8_init"))?;
    Ok(scalars)
}

/// Floats between two scalars of the scalar buffer (16 bytes: `kSlot` in kernels/fp8.cu,
/// `kSlotFloats` in kernels/cudnn_nvfp4.cpp).
pub const SLOT_FLOATS: usize = 4;
/// Scalar slots: amax q/k/v, descale q/k/v, descale_s, scale_s, scale_o, amax_s, amax_o.
const SLOTS: usize = 11;
/// Slot of q's descale (k, v follow), and of the probabilities' descale and scale.
const DESCALE_SLOT: usize = 3;
const DESCALE_S_SLOT: usize = 6;
const SCALE_S_SLOT: usize = 7;
/// Largest head dimension of cuDNN's FP8 attention on Hopper, and the multiple it needs.
pub const MAX_HEAD_DIM: usize = 256;
pub const HEAD_DIM_ALIGN: usize = 16;
/// FP8 flash attention exists from Hopper on.
const MIN_CAPABILITY: (i32, i32) = (9, 0);
/// Elements per lane access in the quantizer (8 bytes).
const VEC: usize = 4;
/// Threads per block of the row kernels (`kThreads`), warps per block, blocks per SM at most.
const THREADS: u32 = 256;
const WARPS_PER_BLOCK: usize = 8;
const BLOCKS_PER_SM: usize = 8;

/// q, k, v as E4M3 `[B, S, H, D]` each (u8 tensors) and the scalar buffer holding their descales.
pub struct Fp8Qkv {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub scalars: CudaSlice<f32>,
    /// (B, H, Sq, Sk, D).
    pub dims: Dims,
}

impl Fp8Qkv {
    /// The descales of q, k, v (copied to the host).
    pub fn descales(&self) -> Result<[f32; 3]> {
        let s = self.scalars.stream().clone_dtoh(&self.scalars).map_err(wrap("copy"))?;
        Ok([0, 1, 2].map(|i| s[(DESCALE_SLOT + i) * SLOT_FLOATS]))
    }
}

/// q or k of FP8 attention: a bf16/f16 `[B, H, S, D]` view quantized here with a scale from its
/// amax, or E4M3 codes `[B, S, H*D]` (u8) quantized beforehand with `descale`.
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    Half(&'a Tensor),
    Fp8 { codes: &'a Tensor, descale: f32 },
}

/// A half-precision `[B, H, S, D]` view the quantizer reads in 8-byte accesses (else a contiguous
/// copy): its storage, element offset and strides.
fn readable(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = t.to_dtype(dtype)?;
    let st = t.stride();
    let off = t.layout().start_offset();
    if st[3] == 1 && st[..3].iter().all(|s| s % VEC == 0) && off % VEC == 0 {
        Ok(t)
    } else {
        t.contiguous()
    }
}

#[derive(Clone, Copy)]
enum Pass {
    Amax,
    Quantize,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Amax => "amax",
            Pass::Quantize => "quant",
        }
    }
}

/// Values per thread access of the flat kernels (16 bytes of bf16/f16), and their blocks per SM.
const FLAT_VEC: usize = 8;
const FLAT_BLOCKS_PER_SM: usize = 16;

fn flat_grid(dev: &CudaDevice, n: usize) -> Result<LaunchConfig> {
    let blocks = (n / FLAT_VEC).div_ceil(THREADS as usize).min(super::sm_count(dev)? * FLAT_BLOCKS_PER_SM).max(1);
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

fn row_grid(dev: &CudaDevice, rows: usize) -> Result<LaunchConfig> {
    let blocks = rows.div_ceil(WARPS_PER_BLOCK).min(super::sm_count(dev)? * BLOCKS_PER_SM).max(1);
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// (B, H, Sq, Sk, D) of an attention call.
type Dims = (usize, usize, usize, usize, usize);

fn check(q: Operand, k: Operand, v: &Tensor) -> Result<(CudaDevice, DType, Dims)> {
    let candle_core::Device::Cuda(dev) = v.device() else {
        candle_core::bail!(
            "--attention fp8 runs on CUDA devices only; use --attention cudnn or reference on {:?}",
            v.device()
        )
    };
    let cc = super::compute_capability(dev)?;
    if cc < MIN_CAPABILITY {
        candle_core::bail!(
            "--attention fp8 needs cuDNN's FP8 flash attention (compute capability 9.0 or newer); this GPU is {}.{}: use --attention cudnn",
            cc.0,
            cc.1
        );
    }
    let dtype = match v.dtype() {
        DType::BF16 | DType::F16 => v.dtype(),
        d => candle_core::bail!("--attention fp8 takes bf16 or f16 activations, found {d:?}; run with --dtype bf16"),
    };
    let (b, h, sk, d) = v.dims4()?;
    // Each operand's tokens, checked against v's batch, heads and head size.
    let seq = |o: Operand, what: &str| -> Result<usize> {
        let ok = match o {
            Operand::Half(t) => {
                t.dtype() == dtype && t.rank() == 4 && t.dim(0)? == b && t.dim(1)? == h && t.dim(3)? == d
            }
            Operand::Fp8 { codes, .. } => {
                codes.dtype() == DType::U8 && codes.rank() == 3 && codes.dim(0)? == b && codes.dim(2)? == h * d
            }
        };
        let (t, form) = match o {
            Operand::Half(t) => (t, "[B, H, S, D] half precision"),
            Operand::Fp8 { codes, .. } => (codes, "[B, S, H*D] E4M3"),
        };
        if !ok {
            candle_core::bail!(
                "fp8 attention: {what} {:?} {:?} is not {form} matching v {:?} {dtype:?}",
                t.dims(),
                t.dtype(),
                v.dims()
            );
        }
        Ok(match o {
            Operand::Half(t) => t.dim(2)?,
            Operand::Fp8 { codes, .. } => codes.dim(1)?,
        })
    };
    let sq = seq(q, "q")?;
    if seq(k, "k")? != sk {
        candle_core::bail!("fp8 attention: k and v hold different token counts");
    }
    if d > MAX_HEAD_DIM || d % HEAD_DIM_ALIGN != 0 {
        candle_core::bail!(
            "--attention fp8 needs a head dimension that is a multiple of {HEAD_DIM_ALIGN} and at most {MAX_HEAD_DIM} (cuDNN's FP8 attention); this model's is {d}: use --attention cudnn"
        );
    }
    Ok((dev.clone(), dtype, (b, h, sq, sk, d)))
}

/// Quantizes q, k, v (`[B, H, S, D]` views, bf16/f16) to E4M3 `[B, S, H, D]` with one scale each.
pub fn quantize(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Fp8Qkv> {
    quantize_operands(Operand::Half(q), Operand::Half(k), v)
}

/// [`quantize`] where q and/or k may come quantized already.
pub fn quantize_operands(q: Operand, k: Operand, v: &Tensor) -> Result<Fp8Qkv> {
    let (dev, dtype, dims) = check(q, k, v)?;
    let (b, h, sq, sk, d) = dims;
    let stream = dev.cuda_stream();
    // Amax slots start at 0; descales given with pre-quantized operands, and the probabilities'
    // fixed scales, are set here (the quantizer sets the others).
    let mut init = vec![0f32; SLOTS * SLOT_FLOATS];
    // Probabilities in [0, 1] map onto [0, 448].
    init[DESCALE_S_SLOT * SLOT_FLOATS] = 1.0 / E4M3_MAX;
    init[SCALE_S_SLOT * SLOT_FLOATS] = E4M3_MAX;
    for (t, o) in [q, k].into_iter().enumerate() {
        if let Operand::Fp8 { descale, .. } = o {
            init[(DESCALE_SLOT + t) * SLOT_FLOATS] = descale;
        }
    }
    let scalars = init_scalars(&dev, &init)?;
    let suffix = if dtype == DType::F16 { "f16" } else { "bf16" };
    let kernel = |name: &str| function_in(&dev, Kernels::Fp8, &format!("attn_fp8_{name}_{suffix}"));
    let seqs = [sq, sk, sk];
    let operands = [q, k, Operand::Half(v)];
    // (tensor index, half-precision input, its E4M3 output) of the operands quantized here.
    let mut todo = Vec::new();
    for (t, o) in operands.into_iter().enumerate() {
        if let Operand::Half(x) = o {
            // SAFETY: the quantize pass below writes every element.
            let out = unsafe { stream.alloc::<u8>(b * seqs[t] * h * d) }.map_err(wrap("alloc"))?;
            todo.push((t, readable(x, dtype)?, out));
        }
    }
    let (scalars_ptr, _g) = scalars.device_ptr(&stream);
    for pass in [Pass::Amax, Pass::Quantize] {
        for (t, input, out) in todo.iter_mut() {
            let t = *t;
            let (storage, layout) = input.storage_and_layout();
            let candle_core::Storage::Cuda(cs) = &*storage else { candle_core::bail!("fp8 attention: not on CUDA") };
            let elem_ptr = match &cs.slice {
                CudaStorageSlice::BF16(x) => x.device_ptr(&stream).0 + 2 * layout.start_offset() as u64,
                CudaStorageSlice::F16(x) => x.device_ptr(&stream).0 + 2 * layout.start_offset() as u64,
                _ => candle_core::bail!("fp8 attention: q, k, v must be bf16 or f16"),
            };
            let seq = seqs[t];
            let st = layout.stride();
            // Contiguous [B, S, H, D] seen as [B, H, S, D] (any batch stride for one sample):
            // the output's own order, one flat pass.
            let flat =
                (b == 1 || st[0] == seq * h * d) && st[1..] == [d, h * d, 1] && layout.start_offset() % FLAT_VEC == 0;
            let slot = scalars_ptr + (t * SLOT_FLOATS * std::mem::size_of::<f32>()) as u64;
            let (target, ti) = ([QK_TARGET, QK_TARGET, V_TARGET][t], t as i32);
            let n = (b * h * seq * d) as i64;
            let (f, cfg) = if flat {
                (kernel(&format!("{}_flat", pass.name()))?, flat_grid(&dev, n as usize)?)
            } else {
                (kernel(pass.name())?, row_grid(&dev, b * h * seq)?)
            };
            let mut l = stream.launch_builder(&f);
            l.arg(&elem_ptr);
            let (sb, sh, ss) = (st[0] as i64, st[1] as i64, st[2] as i64);
            let (hh, s, dd, rows) = (h as i32, seq as i32, d as i32, (b * h * seq) as i64);
            if flat {
                l.arg(&n);
            } else {
                l.arg(&hh).arg(&s).arg(&dd).arg(&sb).arg(&sh).arg(&ss).arg(&rows);
            }
            match pass {
                Pass::Amax => l.arg(&slot),
                Pass::Quantize => l.arg(&scalars_ptr).arg(&ti).arg(&target).arg(out),
            };
            // SAFETY: argument types match the kernel; the view's strides/rows (8-byte aligned rows,
            // checked by `readable`; 16-byte aligned for the flat form) describe the live input;
            // outputs hold B*S*H*D bytes.
            unsafe { l.launch(cfg) }.map_err(wrap("attn_fp8 quantize"))?;
        }
    }
    drop(_g);
    let mut made: [Option<CudaSlice<u8>>; 3] = Default::default();
    for (t, _, out) in todo {
        made[t] = Some(out);
    }
    let mut codes_of = |t: usize| -> Result<Tensor> {
        match (operands[t], made[t].take()) {
            (Operand::Fp8 { codes, .. }, _) => codes.contiguous(),
            (Operand::Half(_), Some(slice)) => {
                let st = CudaStorage { slice: CudaStorageSlice::U8(slice), device: dev.clone() };
                let none = candle_core::op::BackpropOp::none();
                Ok(Tensor::from_storage(candle_core::Storage::Cuda(st), (b, seqs[t], h * d), none, false))
            }
            (Operand::Half(_), None) => unreachable!("every half-precision operand was quantized above"),
        }
    };
    let (q8, k8, v8) = (codes_of(0)?, codes_of(1)?, codes_of(2)?);
    Ok(Fp8Qkv { q: q8, k: k8, v: v8, scalars, dims })
}

/// The device address of a contiguous u8 tensor's first element.
fn u8_ptr(t: &Tensor, stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(c) = &*st else { candle_core::bail!("fp8 attention: GPU tensors only") };
    let slice = c.as_cuda_slice::<u8>()?;
    let (p, _g) = slice.device_ptr(stream);
    Ok(p + l.start_offset() as u64)
}

/// cuDNN's FP8 attention of quantized q, k, v: the E4M3 output `[B, Sq, H, D]` (its descale is
/// v's: `scale_o = 1 / descale_v`).
fn attend(qkv: &Fp8Qkv, dev: &CudaDevice) -> Result<CudaSlice<u8>> {
    let (b, h, sq, sk, d) = qkv.dims;
    let stream = dev.cuda_stream();
    // SAFETY: the attention graph writes every output element.
    let o8 = unsafe { stream.alloc::<u8>(b * sq * h * d) }.map_err(wrap("alloc"))?;
    // [B, S, H, D] seen as [B, H, S, D].
    let bshd = |s: usize| [(s * h * d) as i64, d as i64, (h * d) as i64, 1];
    let strides: Vec<i64> = [bshd(sq), bshd(sk), bshd(sk), bshd(sq)].concat();
    {
        // The tensors stay alive (and on this stream) for the call.
        let (qp, kp, vp) = (u8_ptr(&qkv.q, &stream)?, u8_ptr(&qkv.k, &stream)?, u8_ptr(&qkv.v, &stream)?);
        let (op, _d) = o8.device_ptr(&stream);
        let (sp, _e) = qkv.scalars.device_ptr(&stream);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        run_sdpa(&stream, (b, h, sq, sk, d), &strides, SdpaIo::Fp8 { scalars: sp }, scale, [qp, kp, vp, op])?;
    }
    Ok(o8)
}

fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        d => candle_core::bail!("fp8 attention: a CUDA tensor expected, found one on {d:?}"),
    }
}

/// `softmax(q k^T / sqrt(D)) v` in FP8 over `[B, H, S, D]` bf16/f16 views -> `[B, Sq, H, D]` in
/// their dtype (contiguous, so merging heads needs no copy).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    attention_operands(Operand::Half(q), Operand::Half(k), v)
}

/// [`attention`] where q and/or k may come quantized already.
pub fn attention_operands(q: Operand, k: Operand, v: &Tensor) -> Result<Tensor> {
    let qkv = quantize_operands(q, k, v)?;
    let dev = cuda_dev(v)?;
    let o8 = attend(&qkv, &dev)?;
    let (b, h, sq, _, d) = qkv.dims;
    let dtype = v.dtype();
    let stream = dev.cuda_stream();
    let n = b * sq * h * d;
    let f = function_in(
        &dev,
        Kernels::Fp8,
        if dtype == DType::F16 { "attn_fp8_dequant_f16" } else { "attn_fp8_dequant_bf16" },
    )?;
    let n64 = n as i64;
    let threads = (n / 8).max(1);
    let cfg = LaunchConfig {
        grid_dim: (threads.div_ceil(THREADS as usize).min(super::sm_count(&dev)? * BLOCKS_PER_SM) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let slice = if dtype == DType::F16 {
        // SAFETY: the dequantize kernel writes every element.
        let mut y = unsafe { stream.alloc::<f16>(n) }.map_err(wrap("alloc"))?;
        let mut l = stream.launch_builder(&f);
        l.arg(&o8).arg(&qkv.scalars).arg(&n64).arg(&mut y);
        // SAFETY: argument types match the kernel; n is a multiple of 8 (D is of 16).
        unsafe { l.launch(cfg) }.map_err(wrap("attn_fp8_dequant"))?;
        CudaStorageSlice::F16(y)
    } else {
        // SAFETY: as above.
        let mut y = unsafe { stream.alloc::<bf16>(n) }.map_err(wrap("alloc"))?;
        let mut l = stream.launch_builder(&f);
        l.arg(&o8).arg(&qkv.scalars).arg(&n64).arg(&mut y);
        // SAFETY: as above.
        unsafe { l.launch(cfg) }.map_err(wrap("attn_fp8_dequant"))?;
        CudaStorageSlice::BF16(y)
    };
    let storage = CudaStorage { slice, device: dev };
    Ok(Tensor::from_storage(
        candle_core::Storage::Cuda(storage),
        (b, sq, h, d),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// [`attention`] with the heads merged and the output left in E4M3, as the input of an fp8-mode
/// projection (`[B, Sq, H*D]` rows, every row's scale v's descale): the output's rounding to
/// E4M3 stands in for the projection's own quantization of its input, so the dequantizing pass,
/// the bf16 output and the per-token quantization pass are never made.
pub fn attention_fp8_act(q: Operand, k: Operand, v: &Tensor) -> Result<super::fp8::Fp8Act> {
    let qkv = quantize_operands(q, k, v)?;
    let dev = cuda_dev(v)?;
    let o8 = attend(&qkv, &dev)?;
    let (b, h, sq, _, d) = qkv.dims;
    let m = b * sq;
    let scalars = Tensor::from_storage(
        candle_core::Storage::Cuda(CudaStorage { slice: CudaStorageSlice::F32(qkv.scalars), device: dev.clone() }),
        SLOTS * SLOT_FLOATS,
        candle_core::op::BackpropOp::none(),
        false,
    );
    let q8 = CudaStorage { slice: CudaStorageSlice::U8(o8), device: dev };
    Ok(super::fp8::Fp8Act {
        q: Tensor::from_storage(candle_core::Storage::Cuda(q8), (m, h * d), candle_core::op::BackpropOp::none(), false),
        scale: scalars.narrow(0, (DESCALE_SLOT + 2) * SLOT_FLOATS, 1)?.broadcast_as(m)?.contiguous()?,
        dims: vec![b, sq, h * d],
        dtype: v.dtype(),
    })
}
