//! `Nvfp4Linear`: a linear layer whose weight stays 4-bit, prepared once for one backend's layout.
//!
//! The CPU forward here is the reference every GPU kernel is tested against. It reads the prepared
//! layout directly (no conversion back to canonical form), so a layout bug shows up here first.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};

use super::format::{e2m1_decode, e4m3_decode, GROUP_SIZE};
use super::layout::{code_in_row, LayoutKind, Nvfp4Weight, PreparedLayout};
use super::quant::quantize_row;

/// Environment variable choosing the NVFP4 backend when no CLI flag does.
pub const BACKEND_ENV: &str = "CANDIFF_NVFP4_BACKEND";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Our own kernels on trtllm-gen's shuffled layout (the fast path).
    #[default]
    Trtllm,
    /// CUTLASS/CuTe kernels (N, K padded to 32, 128x4 scales).
    Cutlass,
    /// cuDNN graph API block-scale dequantize + matmul (same layout as cutlass).
    Cudnn,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Trtllm, Backend::Cutlass, Backend::Cudnn];

    pub fn layout(self) -> LayoutKind {
        match self {
            Backend::Trtllm => LayoutKind::Trtllm,
            Backend::Cutlass | Backend::Cudnn => LayoutKind::Cutlass,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Trtllm => "trtllm",
            Backend::Cutlass => "cutlass",
            Backend::Cudnn => "cudnn",
        }
    }

    /// Accepts our names and FlashInfer's (`flashinfer_trtllm`, ...).
    pub fn from_name(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.strip_prefix("flashinfer_").unwrap_or(&s) {
            "trtllm" => Some(Backend::Trtllm),
            "cutlass" => Some(Backend::Cutlass),
            "cudnn" => Some(Backend::Cudnn),
            _ => None,
        }
    }

    /// The CLI choice if given, else `CANDIFF_NVFP4_BACKEND`, else `trtllm`. An unknown value in the
    /// environment warns and falls back to the default (a bad CLI value is rejected by clap).
    pub fn resolve(cli: Option<Backend>) -> Backend {
        if let Some(b) = cli {
            return b;
        }
        match std::env::var(BACKEND_ENV) {
            Ok(v) if !v.trim().is_empty() => Backend::from_name(&v).unwrap_or_else(|| {
                log::warn!(
                    "{BACKEND_ENV}={v:?} is not an NVFP4 backend (trtllm, cutlass, cudnn, or flashinfer_*); using trtllm"
                );
                Backend::default()
            }),
            _ => Backend::default(),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Backend::from_name(s).ok_or_else(|| format!("unknown NVFP4 backend `{s}` (expected trtllm, cutlass or cudnn)"))
    }
}

/// What happens to activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActMode {
    /// Weights dequantized, activations as they are (bf16).
    #[default]
    W4A16,
    /// Activations quantized to NVFP4 with the layer's `input_scale` (Blackwell numerics).
    W4A4,
    /// Weights converted at load to FP8 E4M3 with per-row scales, activations quantized to FP8
    /// per token, FP8 tensor cores (cuBLASLt); the backend's NVFP4 layout is not used.
    Fp8,
}

impl std::fmt::Display for ActMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ActMode::W4A16 => "w4a16",
            ActMode::W4A4 => "w4a4",
            ActMode::Fp8 => "fp8",
        })
    }
}

impl std::str::FromStr for ActMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "w4a16" => Ok(ActMode::W4A16),
            "w4a4" => Ok(ActMode::W4A4),
            "fp8" => Ok(ActMode::Fp8),
            _ => Err(format!("unknown activation mode `{s}` (expected w4a16, w4a4 or fp8)")),
        }
    }
}

/// The matmul `y = alpha * (x ⊗ W)` as a Candle op over (x, prepared weight, prepared scales).
#[derive(Debug, Clone)]
pub struct Nvfp4Matmul {
    pub backend: Backend,
    /// The layout the weight was prepared in (the backend's, adapted to the device).
    pub kind: LayoutKind,
    pub n: usize,
    pub k: usize,
    pub weight_row_bytes: usize,
    pub scale_cols: usize,
    pub mode: ActMode,
    pub weight_scale_2: f32,
    pub input_scale: f32,
    /// How fp8 mode's GEMM accumulates (other modes ignore it).
    pub fp8_accum: super::fp8::Fp8Accum,
}

impl Nvfp4Matmul {
    /// `alpha` of the GEMM: `weight_scale_2` (w4a16) or `input_scale * weight_scale_2` (w4a4).
    pub fn alpha(&self) -> f32 {
        match self.mode {
            ActMode::W4A16 => self.weight_scale_2,
            ActMode::W4A4 => self.input_scale * self.weight_scale_2,
            // The per-row scales carry everything.
            ActMode::Fp8 => 1.0,
        }
    }

    fn out_shape(&self, x: &Layout) -> Result<Shape> {
        let dims = x.shape().dims();
        match dims.last() {
            Some(&k) if k == self.k => {}
            _ => candle_core::bail!("nvfp4 linear: input {:?} must end in K = {}", dims, self.k),
        }
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty") = self.n;
        Ok(Shape::from(out))
    }

    /// Block-scaled weight `e2m1 * s` as f32 `[n, k]`, read straight from the prepared layout.
    fn weight_f32(&self, w: &[u8], s: &[u8]) -> Vec<f32> {
        let view = PreparedView {
            kind: self.kind,
            weight: w,
            row_bytes: self.weight_row_bytes,
            scale: s,
            scale_cols: self.scale_cols,
        };
        let kb = self.k / GROUP_SIZE;
        let mut out = vec![0f32; self.n * self.k];
        for r in 0..self.n {
            for b in 0..kb {
                let sv = e4m3_decode(view.scale(r, b));
                for kk in b * GROUP_SIZE..(b + 1) * GROUP_SIZE {
                    out[r * self.k + kk] = e2m1_decode(view.code(r, kk)) * sv;
                }
            }
        }
        out
    }
}

impl Nvfp4Matmul {
    /// FP8 reference: per-token E4M3 activations times the per-row E4M3 weight, products of the
    /// decoded FP8 values summed in f32, then both scales applied (the GEMM's order).
    #[allow(clippy::too_many_arguments)]
    fn cpu_fp8(
        &self,
        x: &[f32],
        dtype: DType,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
        out_shape: Shape,
    ) -> Result<(CpuStorage, Shape)> {
        let w = contiguous_u8(s2, l2, "fp8 weight")?;
        let sw = match (s3, l3.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("nvfp4 linear (fp8): row scales must be contiguous f32"),
        };
        let m = x.len() / self.k;
        let mut xq = vec![0u8; x.len()];
        let mut sa = vec![0f32; m];
        for (i, (row, q)) in x.chunks_exact(self.k).zip(xq.chunks_exact_mut(self.k)).enumerate() {
            sa[i] = super::fp8::quantize_row(row, q);
        }
        let xt = Tensor::from_vec(super::fp8::decode(&xq), (m, self.k), &Device::Cpu)?;
        let wt = Tensor::from_vec(super::fp8::decode(w), (self.n, self.k), &Device::Cpu)?;
        let sa = Tensor::from_vec(sa, (m, 1), &Device::Cpu)?;
        let sw = Tensor::from_vec(sw.to_vec(), (1, self.n), &Device::Cpu)?;
        let y = xt.matmul(&wt.t()?)?.broadcast_mul(&sa)?.broadcast_mul(&sw)?.to_dtype(dtype)?;
        let (st, _) = y.storage_and_layout();
        let out = match &*st {
            candle_core::Storage::Cpu(c) => c.clone(),
            _ => unreachable!("CPU tensor"),
        };
        Ok((out, out_shape))
    }
}

/// Borrowed prepared buffers with the layout's index maps.
struct PreparedView<'a> {
    kind: LayoutKind,
    weight: &'a [u8],
    row_bytes: usize,
    scale: &'a [u8],
    scale_cols: usize,
}

impl PreparedView<'_> {
    /// E2M1 code `k` of logical row `n`.
    #[inline]
    fn code(&self, n: usize, k: usize) -> u8 {
        let p = PreparedLayout::physical_row(self.kind, n);
        code_in_row(self.kind, &self.weight[p * self.row_bytes..(p + 1) * self.row_bytes], k)
    }
    #[inline]
    fn scale(&self, n: usize, b: usize) -> u8 {
        let p = PreparedLayout::physical_row(self.kind, n);
        self.scale[self.kind.scale_offset(p, b, self.scale_cols)]
    }
}

fn contiguous_u8<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u8]> {
    let v = match s {
        CpuStorage::U8(v) => v.as_slice(),
        _ => candle_core::bail!("nvfp4 linear: {what} must be U8"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("nvfp4 linear: {what} must be contiguous"),
    }
}

/// Input rows as f32, rounded to bf16 as the reference quantizer sees them.
fn input_rows(s: &CpuStorage, l: &Layout) -> Result<(Vec<f32>, DType)> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("nvfp4 linear: input must be contiguous".into()))?;
    Ok(match s {
        CpuStorage::BF16(v) => (v[a..b].iter().map(|x| x.to_f32()).collect(), DType::BF16),
        CpuStorage::F16(v) => (v[a..b].iter().map(|x| half::bf16::from_f32(x.to_f32()).to_f32()).collect(), DType::F16),
        CpuStorage::F32(v) => (v[a..b].iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect(), DType::F32),
        _ => candle_core::bail!("nvfp4 linear: input must be bf16, f16 or f32"),
    })
}

impl CustomOp3 for Nvfp4Matmul {
    fn name(&self) -> &'static str {
        "nvfp4-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out_shape = self.out_shape(l1)?;
        let (mut x, dtype) = input_rows(s1, l1)?;
        let m = x.len() / self.k;
        if self.mode == ActMode::Fp8 {
            return self.cpu_fp8(&x, dtype, s2, l2, s3, l3, out_shape);
        }
        let w = contiguous_u8(s2, l2, "weight")?;
        let s = contiguous_u8(s3, l3, "scale")?;
        if self.mode == ActMode::W4A4 {
            // Codes times block scales; `input_scale` goes into alpha like on the hardware.
            let gs = 1.0 / self.input_scale;
            let mut packed = vec![0u8; self.k / 2];
            let mut scales = vec![0u8; self.k / GROUP_SIZE];
            for row in x.chunks_exact_mut(self.k) {
                quantize_row(row, gs, &mut packed, &mut scales);
                for (i, v) in row.iter_mut().enumerate() {
                    let byte = packed[i / 2];
                    let code = if i % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    *v = e2m1_decode(code) * e4m3_decode(scales[i / GROUP_SIZE]);
                }
            }
        }
        let wf = self.weight_f32(w, s);
        let xt = Tensor::from_vec(x, (m, self.k), &Device::Cpu)?;
        let wt = Tensor::from_vec(wf, (self.n, self.k), &Device::Cpu)?;
        let y = (xt.matmul(&wt.t()?)? * self.alpha() as f64)?.to_dtype(dtype)?;
        let (st, _) = y.storage_and_layout();
        let out = match &*st {
            candle_core::Storage::Cpu(c) => c.clone(),
            _ => unreachable!("CPU tensor"),
        };
        Ok((out, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::nvfp4_linear_fwd(self, s1, l1, s2, l2, s3, l3, None)
    }
}

/// The layer `act(x W^T + b)` as one GPU op: the bias and activation in the GEMM's epilogue
/// (where [`crate::cuda::epilogue_in_gemm`] holds), saving a pass that reads and writes the whole
/// output (bias_act: 13.5% of a FLUX.1 1024² W4A16 step, docs/PERF.md session 14).
#[cfg(feature = "cuda")]
struct Nvfp4LinearAct<'a> {
    op: &'a Nvfp4Matmul,
    bias: Option<&'a Tensor>,
    /// tanh-GELU on output features from this one on.
    gelu_from: Option<usize>,
    /// The input's features past the first operand's (read where they lie).
    second: Option<&'a Tensor>,
}

/// A tensor's GPU storage and layout from its read guard, if there is a tensor.
#[cfg(feature = "cuda")]
fn cuda_part<'a>(
    guard: &'a Option<(candle_core::StorageRef<'_>, &'a Layout)>,
    what: &str,
) -> Result<Option<(&'a candle_core::CudaStorage, &'a Layout)>> {
    match guard {
        Some((st, l)) => match &**st {
            candle_core::Storage::Cuda(c) => Ok(Some((c, *l))),
            _ => candle_core::bail!("nvfp4 linear: {what} is not on the GPU"),
        },
        None => Ok(None),
    }
}

#[cfg(feature = "cuda")]
impl CustomOp3 for Nvfp4LinearAct<'_> {
    fn name(&self) -> &'static str {
        "nvfp4-linear-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("nvfp4 linear: the fused epilogue is a GPU path (epilogue_in_gemm is false on the CPU)")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bias_guard, second_guard) =
            (self.bias.map(|t| t.storage_and_layout()), self.second.map(|t| t.storage_and_layout()));
        let bias = cuda_part(&bias_guard, "the bias")?;
        let second = cuda_part(&second_guard, "the input's second part")?;
        let epi = crate::cuda::Epilogue { bias, gelu_from: self.gelu_from, second };
        crate::cuda::nvfp4_linear_fwd(self.op, s1, l1, s2, l2, s3, l3, Some(&epi))
    }
}

/// A gate folded into an fp8 layer ([`Nvfp4Linear::fold_parts`]): its weight scales times the gate
/// and its bias times the gate, and the scale and bias tensors they came from (which layer they
/// belong to: the two parts of a split projection share their scales, only one has the bias).
#[derive(Debug, Clone)]
pub struct Folded {
    pub of: (candle_core::TensorId, Option<candle_core::TensorId>),
    pub scale: Tensor,
    pub bias: Option<Tensor>,
}

/// A linear layer with an NVFP4 weight in one backend's layout.
#[derive(Debug, Clone)]
pub struct Nvfp4Linear {
    op: Nvfp4Matmul,
    weight: Tensor,
    scale: Tensor,
    bias: Option<Tensor>,
    /// Output features (the op's `n` may include FP8 padding rows).
    n_out: usize,
}

/// FP8 weights get rows padded to this multiple (16-byte aligned outputs in every dtype).
pub const FP8_ROW_ALIGN: usize = 16;

impl Nvfp4Linear {
    /// Prepares `w` for `backend` (once) and uploads it to `device`. A missing `input_scale` is 1.0
    /// (the loader has already warned about it).
    pub fn new(
        w: &Nvfp4Weight,
        input_scale: Option<f32>,
        bias: Option<Tensor>,
        backend: Backend,
        mode: ActMode,
        device: &Device,
    ) -> Result<Self> {
        if mode == ActMode::Fp8 {
            // One cuBLASLt path whatever the backend; its own checks run at conversion.
            return Self::fp8(w, bias, backend, backend.layout(), device);
        }
        crate::cuda_support::check_layer(backend, device, w.n, w.k)?;
        let kind = crate::cuda_support::layout_for(backend, device)?;
        Self::with_layout(w, input_scale, bias, backend, kind, mode, device)
    }

    /// As [`Nvfp4Linear::new`] with an explicit layout (no device checks): for tests and tools
    /// that exercise a layout on a device that would not pick it.
    pub fn with_layout(
        w: &Nvfp4Weight,
        input_scale: Option<f32>,
        bias: Option<Tensor>,
        backend: Backend,
        kind: LayoutKind,
        mode: ActMode,
        device: &Device,
    ) -> Result<Self> {
        if mode == ActMode::Fp8 {
            return Self::fp8(w, bias, backend, kind, device);
        }
        let p = PreparedLayout::prepare(w, kind);
        let weight = Tensor::from_vec(p.weight, (p.weight_rows, p.weight_row_bytes), device)?;
        let scale = Tensor::from_vec(p.scale, (p.scale_rows, p.scale_cols), device)?;
        let op = Nvfp4Matmul {
            backend,
            kind: p.kind,
            n: w.n,
            k: w.k,
            weight_row_bytes: p.weight_row_bytes,
            scale_cols: p.scale_cols,
            mode,
            weight_scale_2: w.weight_scale_2,
            input_scale: input_scale.unwrap_or(1.0),
            fp8_accum: Default::default(),
        };
        Ok(Self { op, weight, scale, bias, n_out: w.n })
    }

    /// FP8 mode: E4M3 `[n, k]` and f32 row scales `[n]`, converted on the GPU when the layer
    /// lives there (the CPU loop is the reference and would take minutes on a 32B model). Rows are
    /// padded with zeros to a multiple of [`FP8_ROW_ALIGN`] (cuBLASLt's 16-byte leading
    /// dimensions); the output is narrowed back.
    fn fp8(w: &Nvfp4Weight, bias: Option<Tensor>, backend: Backend, kind: LayoutKind, device: &Device) -> Result<Self> {
        let n_pad = w.n.next_multiple_of(FP8_ROW_ALIGN);
        let padded;
        let w_in = if n_pad == w.n {
            w
        } else {
            let mut packed = w.packed.clone();
            packed.resize(n_pad * w.k / 2, 0);
            let mut scales = w.scales.clone();
            scales.resize(n_pad * (w.k / GROUP_SIZE), 0);
            padded = Nvfp4Weight::new(n_pad, w.k, packed, scales, w.weight_scale_2)?;
            &padded
        };
        let (weight, scale) = match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => crate::cuda::fp8::weight_to_fp8(w_in, device)?,
            _ => {
                let (q, s) = super::fp8::weight_to_fp8(w_in);
                (Tensor::from_vec(q, (n_pad, w.k), device)?, Tensor::from_vec(s, n_pad, device)?)
            }
        };
        let op = Nvfp4Matmul {
            backend,
            kind,
            n: n_pad,
            k: w.k,
            weight_row_bytes: w.k,
            scale_cols: 1,
            mode: ActMode::Fp8,
            weight_scale_2: w.weight_scale_2,
            input_scale: 1.0,
            fp8_accum: Default::default(),
        };
        Ok(Self { op, weight, scale, bias, n_out: w.n })
    }

    /// fp8-mode layers with the same K and unpadded rows joined along N (E4M3 rows and their
    /// per-row scales, which hold each layer's global scale, concatenate as they are); `None` for
    /// any other mix.
    pub fn concat_fp8(parts: &[&Nvfp4Linear]) -> Result<Option<Self>> {
        let first = parts[0];
        let biased = first.bias.is_some();
        let same = parts.iter().all(|p| {
            p.op.mode == ActMode::Fp8 && p.op.k == first.op.k && p.op.n == p.n_out && p.bias.is_some() == biased
        });
        if !same {
            return Ok(None);
        }
        let weight = Tensor::cat(&parts.iter().map(|p| &p.weight).collect::<Vec<_>>(), 0)?;
        let scale = Tensor::cat(&parts.iter().map(|p| &p.scale).collect::<Vec<_>>(), 0)?;
        let bias = if biased {
            Some(Tensor::cat(&parts.iter().map(|p| p.bias.as_ref().expect("biased")).collect::<Vec<_>>(), 0)?)
        } else {
            None
        };
        let n: usize = parts.iter().map(|p| p.n_out).sum();
        let op = Nvfp4Matmul { n, ..first.op.clone() };
        Ok(Some(Self { op, weight, scale, bias, n_out: n }))
    }

    /// An fp8-mode layer split along its inputs at `at` (E4M3 column blocks; the per-row scales
    /// hold for both): (the first `at` inputs, no bias; the rest, with the bias). `None` for other
    /// modes, padded rows, or a split off the 16-byte rows cuBLASLt needs.
    pub fn split_inputs_fp8(&self, at: usize) -> Result<Option<(Self, Self)>> {
        const ROW_ALIGN_BYTES: usize = 16;
        let k = self.op.k;
        if self.op.mode != ActMode::Fp8
            || self.op.n != self.n_out
            || at == 0
            || at >= k
            || !at.is_multiple_of(ROW_ALIGN_BYTES)
        {
            return Ok(None);
        }
        let part = |from: usize, len: usize, bias: Option<Tensor>| -> Result<Self> {
            let op = Nvfp4Matmul { k: len, weight_row_bytes: len, ..self.op.clone() };
            Ok(Self {
                op,
                weight: self.weight.narrow(1, from, len)?.contiguous()?,
                scale: self.scale.clone(),
                bias,
                n_out: self.n_out,
            })
        };
        Ok(Some((part(0, at, None)?, part(at, k - at, self.bias.clone())?)))
    }

    /// `acc + x W^T + b` in fp8 mode on a GPU, `acc` added inside the GEMM where the library
    /// runs the scaled one (else after it).
    #[cfg(feature = "cuda")]
    pub fn forward_acc_fp8(&self, x: &Tensor, acc: &Tensor) -> Result<Tensor> {
        self.forward_acc_fp8_act(&crate::cuda::fp8::Fp8Act::quantize(x)?, acc)
    }

    /// [`Self::forward_acc_fp8`] on activations quantized beforehand.
    #[cfg(feature = "cuda")]
    pub fn forward_acc_fp8_act(&self, x: &crate::cuda::fp8::Fp8Act, acc: &Tensor) -> Result<Tensor> {
        let (y, applied) = crate::cuda::fp8::linear_act_with_epilogue(
            &self.op,
            x,
            &self.weight,
            &self.scale,
            self.bias.as_ref(),
            false,
            Some(acc),
        )?;
        if applied {
            return Ok(y);
        }
        let y = match &self.bias {
            Some(b) => crate::models::fused::bias_act(&y, b, false)?,
            None => y,
        };
        acc + y
    }

    /// `residual + gate ⊙ (x W^T + b)` in fp8 mode on a GPU, with `gate` (`[N]` f32, one value
    /// per output feature) folded into the per-row weight scales and the bias and `residual` added
    /// by the GEMM (beta = 1): one GEMM and one tiny launch instead of a GEMM and a gated-add pass
    /// over the output. `None` where the layer's rows are padded (the caller takes the plain path).
    /// `folded`: the gate's products with this layer's scales and bias made beforehand
    /// ([`Self::fold_parts`], [`crate::cuda::fp8::modulation_finish`]); `None` folds here.
    #[cfg(feature = "cuda")]
    pub fn forward_gated_fp8(
        &self,
        x: &Tensor,
        gate: &Tensor,
        folded: Option<&Folded>,
        residual: &Tensor,
    ) -> Result<Option<Tensor>> {
        if self.fold_parts(gate.elem_count()).is_none() {
            return Ok(None);
        }
        self.forward_gated_fp8_act(&crate::cuda::fp8::Fp8Act::quantize(x)?, gate, folded, residual)
    }

    /// The per-row weight scales and bias a gate of `n` values rides in, where it can: fp8 mode,
    /// unpadded rows, one gate value per output feature.
    pub fn fold_parts(&self, n: usize) -> Option<(&Tensor, Option<&Tensor>)> {
        (self.op.mode == ActMode::Fp8 && self.op.n == self.n_out && n == self.n_out)
            .then_some((&self.scale, self.bias.as_ref()))
    }

    /// [`Self::forward_gated_fp8`] on activations quantized beforehand.
    #[cfg(feature = "cuda")]
    pub fn forward_gated_fp8_act(
        &self,
        x: &crate::cuda::fp8::Fp8Act,
        gate: &Tensor,
        folded: Option<&Folded>,
        residual: &Tensor,
    ) -> Result<Option<Tensor>> {
        if self.fold_parts(gate.elem_count()).is_none() {
            return Ok(None);
        }
        let residual = residual.to_dtype(x.dtype)?;
        let here;
        let (scale, bias) = match folded {
            Some(f) => (&f.scale, f.bias.as_ref()),
            None => {
                here = crate::cuda::fp8::gate_fold(&self.scale, self.bias.as_ref(), gate)?;
                (&here.0, here.1.as_ref())
            }
        };
        let (y, applied) =
            crate::cuda::fp8::linear_act_with_epilogue(&self.op, x, &self.weight, scale, bias, false, Some(&residual))?;
        if applied {
            return Ok(Some(y));
        }
        // No scaled GEMM in this cuBLASLt: y holds gate ⊙ x W^T already; bias and residual after.
        let y = match bias {
            Some(b) => crate::models::fused::bias_act(&y, b, false)?,
            None => y,
        };
        Ok(Some((y + residual)?))
    }

    /// Whether this layer reads activations quantized beforehand ([`crate::cuda::fp8::Fp8Act`]) of
    /// `k` features standing for a `dtype` tensor: an fp8-mode layer with unpadded rows, a bf16
    /// input and its bias (if any) in bf16, as the epilogue path needs.
    #[cfg(feature = "cuda")]
    pub fn reads_fp8_act(&self, k: usize, dtype: DType) -> bool {
        self.op.mode == ActMode::Fp8
            && self.op.k == k
            && self.op.n == self.n_out
            && dtype == DType::BF16
            && self.bias.as_ref().is_none_or(|b| b.dtype() == dtype)
    }

    /// `act(x W^T + b)` (tanh-GELU when `gelu`) on activations quantized beforehand: no
    /// quantization pass of its own.
    #[cfg(feature = "cuda")]
    pub fn forward_fp8_act(&self, x: &crate::cuda::fp8::Fp8Act, gelu: bool) -> Result<Tensor> {
        let k = x.dims.last().copied().unwrap_or(0);
        if !self.reads_fp8_act(k, x.dtype) {
            candle_core::bail!(
                "an E4M3 input of {:?} {:?} for a layer that does not read one ({} mode, K = {}, N = {} of {})",
                x.dims,
                x.dtype,
                self.op.mode,
                self.op.k,
                self.n_out,
                self.op.n
            );
        }
        let out = crate::cuda::fp8::linear_act_with_epilogue(
            &self.op,
            x,
            &self.weight,
            &self.scale,
            self.bias.as_ref(),
            gelu,
            None,
        )?;
        self.finish_act(out, gelu)
    }

    /// An fp8 GEMM's output with the bias and activation its epilogue did not apply (`applied`
    /// false: no scaled GEMM in this cuBLASLt).
    #[cfg(feature = "cuda")]
    fn finish_act(&self, (y, applied): (Tensor, bool), gelu: bool) -> Result<Tensor> {
        if applied {
            return Ok(y);
        }
        match &self.bias {
            Some(b) => crate::models::fused::bias_act(&y, b, gelu),
            None if gelu => crate::models::ops::gelu_tanh(&y),
            None => Ok(y),
        }
    }

    pub fn backend(&self) -> Backend {
        self.op.backend
    }

    pub fn mode(&self) -> ActMode {
        self.op.mode
    }

    /// Switches between W4A16 and W4A4 (same buffers); FP8 layers hold other buffers and are
    /// built in FP8 mode from the start.
    pub fn set_mode(&mut self, mode: ActMode) -> Result<()> {
        if (mode == ActMode::Fp8) != (self.op.mode == ActMode::Fp8) {
            candle_core::bail!("an NVFP4 layer cannot switch to or from fp8 mode after loading; rebuild it");
        }
        self.op.mode = mode;
        Ok(())
    }

    /// How the layer's FP8 GEMM accumulates (fp8 mode; other modes ignore it).
    pub fn with_fp8_accum(mut self, accum: super::fp8::Fp8Accum) -> Self {
        self.op.fp8_accum = accum;
        self
    }

    pub fn in_features(&self) -> usize {
        self.op.k
    }

    pub fn out_features(&self) -> usize {
        self.n_out
    }

    pub fn op(&self) -> &Nvfp4Matmul {
        &self.op
    }

    /// The prepared weight and scale buffers (for checks and for the GPU kernels).
    pub fn prepared(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.scale)
    }

    /// Back to canonical form, read from the prepared buffers.
    pub fn to_canonical(&self) -> Result<Nvfp4Weight> {
        if self.op.mode == ActMode::Fp8 {
            candle_core::bail!("an fp8-mode layer holds E4M3 weights, not NVFP4 ones");
        }
        let p = PreparedLayout {
            kind: self.op.kind,
            n: self.op.n,
            k: self.op.k,
            weight: self.weight.flatten_all()?.to_vec1::<u8>()?,
            weight_rows: self.weight.dim(0)?,
            weight_row_bytes: self.op.weight_row_bytes,
            scale: self.scale.flatten_all()?.to_vec1::<u8>()?,
            scale_rows: self.scale.dim(0)?,
            scale_cols: self.op.scale_cols,
        };
        Ok(p.to_canonical(self.op.weight_scale_2)?)
    }
}

impl Module for Nvfp4Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

impl Nvfp4Linear {
    /// Whether this layer's W4A16 GEMM applies the bias and a GELU of some output features in its
    /// epilogue for input `x` ([`Self::forward_act_from`] then needs no pass after it).
    pub fn act_in_gemm(&self, x: &Tensor) -> Result<bool> {
        #[cfg(feature = "cuda")]
        if self.op.n == self.n_out {
            return crate::cuda::epilogue_in_gemm(&self.op, x, self.bias.as_ref());
        }
        let _ = x;
        Ok(false)
    }

    /// The layer with tanh-GELU on output features `>= from` only (a fused q/k/v/MLP projection
    /// activating its MLP part): in the W4A16 GEMM's epilogue on Hopper, else a pass after it.
    pub fn forward_act_from(&self, x: &Tensor, from: usize) -> Result<Tensor> {
        if from == 0 {
            return self.forward_act(x, true);
        }
        let x = x.contiguous()?;
        #[cfg(feature = "cuda")]
        if self.act_in_gemm(&x)? {
            let op = Nvfp4LinearAct { op: &self.op, bias: self.bias.as_ref(), gelu_from: Some(from), second: None };
            return x.apply_op3_no_bwd(&self.weight, &self.scale, &op);
        }
        crate::models::ops::gelu_tanh_from(&self.forward_act(&x, false)?, from)
    }

    /// `cat(first, second) W^T + b`, the input split along its features after `first`'s: on
    /// Hopper one W4A16 GEMM reads both parts where they lie ([`crate::cuda::parts_in_gemm`]), so
    /// the concatenation is never written; elsewhere it is made and the layer applied.
    pub fn forward_parts(&self, first: &Tensor, second: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.op.mode == ActMode::W4A16
            && self.op.n == self.n_out
            && crate::cuda::parts_in_gemm(&self.op, first, second)?
            && crate::cuda::epilogue_in_gemm(&self.op, first, self.bias.as_ref())?
        {
            let op = Nvfp4LinearAct { op: &self.op, bias: self.bias.as_ref(), gelu_from: None, second: Some(second) };
            return first.apply_op3_no_bwd(&self.weight, &self.scale, &op);
        }
        self.forward_act(&Tensor::cat(&[first, second], candle_core::D::Minus1)?, false)
    }

    /// Whether [`Self::forward_parts`] will read an input split after `c` features, with rows as
    /// `like`'s (bf16, on its device), in one GEMM when both parts are fresh tensors: what a model
    /// asks before it decides to apply the MLP activation in the producer.
    /// `CANDIFF_PARTS_IN_GEMM=0` turns the in-place read off (the concatenation is made), for A/B
    /// measurements.
    pub fn reads_parts_like(&self, like: &Tensor, c: usize) -> Result<bool> {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| std::env::var("CANDIFF_PARTS_IN_GEMM").as_deref() != Ok("0"));
        #[cfg(feature = "cuda")]
        if enabled
            && self.op.mode == ActMode::W4A16
            && self.op.n == self.n_out
            && like.dtype() == DType::BF16
            && c > 0
            && c < self.op.k
            && c.is_multiple_of(crate::nvfp4::tiling::SM90_K_TILE)
            && like.elem_count() / like.dim(candle_core::D::Minus1)?.max(1) > crate::nvfp4::tiling::SM90_GEMV_MAX_M
        {
            return crate::cuda::epilogue_in_gemm(&self.op, like, self.bias.as_ref());
        }
        let _ = (like, c, enabled);
        Ok(false)
    }

    /// The layer, then tanh-GELU when `gelu`; on the GPU the bias add and GELU are one fused pass.
    pub fn forward_act(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        // FP8 on a GPU: bias and GELU in cuBLASLt's epilogue where the library runs the scaled
        // GEMM (and the output needs no narrowing).
        #[cfg(feature = "cuda")]
        if self.op.mode == ActMode::Fp8
            && x.device().is_cuda()
            && self.op.n == self.n_out
            && self.bias.as_ref().is_none_or(|b| b.dtype() == x.dtype())
            && matches!(x.dtype(), DType::BF16 | DType::F16)
        {
            let out = crate::cuda::fp8::linear_with_epilogue(
                &self.op,
                x,
                &self.weight,
                &self.scale,
                self.bias.as_ref(),
                gelu,
                None,
            )?;
            return self.finish_act(out, gelu);
        }
        let x = x.contiguous()?;
        // W4A16 on Hopper: bias and GELU in the GEMM's epilogue.
        #[cfg(feature = "cuda")]
        if (self.bias.is_some() || gelu) && crate::cuda::epilogue_in_gemm(&self.op, &x, self.bias.as_ref())? {
            let op =
                Nvfp4LinearAct { op: &self.op, bias: self.bias.as_ref(), gelu_from: gelu.then_some(0), second: None };
            let y = x.apply_op3_no_bwd(&self.weight, &self.scale, &op)?;
            return if self.op.n != self.n_out { y.narrow(candle_core::D::Minus1, 0, self.n_out) } else { Ok(y) };
        }
        let mut y = x.apply_op3_no_bwd(&self.weight, &self.scale, &self.op)?;
        if self.op.n != self.n_out {
            y = y.narrow(candle_core::D::Minus1, 0, self.n_out)?;
        }
        match &self.bias {
            Some(b) if y.device().is_cuda() => crate::models::fused::bias_act(&y, b, gelu),
            Some(b) => {
                let y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
                if gelu {
                    crate::models::ops::gelu_tanh(&y)
                } else {
                    Ok(y)
                }
            }
            None if gelu => crate::models::ops::gelu_tanh(&y),
            None => Ok(y),
        }
    }
}
