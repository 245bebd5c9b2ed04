//! The one linear abstraction every model uses: a dense Candle linear or an NVFP4 linear, chosen
//! per module from the checkpoint's NVFP4 plan. Models never see the difference.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nvfp4::{ActMode, Backend, Checkpoint, Nvfp4Linear};
use crate::safetensors::MappedFile;

#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    Nvfp4(Nvfp4Linear),
    /// A layer under observation (calibration, per-layer error diagnosis); see [`Probe`].
    Probed(Box<Probed>),
}

/// A gate of the blocks' gated residuals (`[B, N]` or `[B, 1, N]` f32, one per batch element) and,
/// where the block's [`modulation`] made them, its products with the weight scales and biases of
/// the fp8 layers it multiplies: those layers then skip their own fold launch.
#[derive(Debug, Clone)]
pub struct Gate {
    pub vec: Tensor,
    folds: Vec<crate::nvfp4::linear::Folded>,
}

impl From<&Tensor> for Gate {
    fn from(vec: &Tensor) -> Self {
        Gate { vec: vec.clone(), folds: Vec::new() }
    }
}

impl Gate {
    /// How many layers' folds came with the gate.
    pub fn fold_count(&self) -> usize {
        self.folds.len()
    }

    /// The fold made for the layer whose weight scales and bias are `scale` and `bias`.
    pub fn folded_for(&self, scale: &Tensor, bias: Option<&Tensor>) -> Option<&crate::nvfp4::linear::Folded> {
        let of = (scale.id(), bias.map(Tensor::id));
        self.folds.iter().find(|f| f.of == of)
    }
}

/// A block's `n` modulation vectors `layer(temb_act)` (each `[B, F / n]`) as f32, the form the
/// fused ops read, and one [`Gate`] per `(chunk, layers)` of `gated`, folded for each of those
/// layers that takes its gate in its GEMM ([`Linear::folds_gate`]). On a GPU the f32 copy and every
/// fold are one launch after the projection (else a cast and a launch per fold: 1.2 ms in 305
/// launches of a FLUX.1 fp8 step, docs/PERF.md session 17).
pub fn modulation(
    layer: &Linear,
    temb_act: &Tensor,
    n: usize,
    gated: &[(usize, &[&Linear])],
) -> Result<(Vec<Tensor>, Vec<Gate>)> {
    let y = layer.forward(temb_act)?;
    let width = y.dim(candle_core::D::Minus1)?;
    if n == 0 || !width.is_multiple_of(n) || gated.iter().any(|&(c, _)| c >= n) {
        candle_core::bail!(
            "modulation: {width} features into {n} vectors, gates at {gated:?}",
            gated = gated.iter().map(|g| g.0).collect::<Vec<_>>()
        );
    }
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() {
        let dim = width / n;
        let mut jobs = Vec::new();
        let mut owners = Vec::new();
        for (i, &(c, layers)) in gated.iter().enumerate() {
            // A per-sample gate view, only to ask the layers (no copy).
            let gate = y.narrow(candle_core::D::Minus1, c * dim, dim)?;
            for l in layers {
                let Linear::Nvfp4(q) = l else { continue };
                if !l.folds_gate(&y, &gate) {
                    continue;
                }
                // The launch writes folded biases in the modulation's dtype; a layer whose bias
                // has another folds the gate itself (Nvfp4Linear::forward_gated_fp8).
                if let Some((scale, bias)) = q.fold_parts(dim).filter(|(_, b)| b.is_none_or(|b| b.dtype() == y.dtype()))
                {
                    jobs.push(crate::cuda::fp8::FoldJob { scale, bias, gate: c * dim });
                    owners.push((i, (scale.id(), bias.map(Tensor::id))));
                }
            }
        }
        let (v, folded) = crate::cuda::fp8::modulation_finish(&y, &jobs)?;
        let vecs = v.chunk(n, candle_core::D::Minus1)?;
        let mut gates: Vec<Gate> = gated.iter().map(|&(c, _)| Gate::from(&vecs[c])).collect();
        for ((i, of), (scale, bias)) in owners.into_iter().zip(folded) {
            gates[i].folds.push(crate::nvfp4::linear::Folded { of, scale, bias });
        }
        return Ok((vecs, gates));
    }
    let vecs = y.to_dtype(DType::F32)?.chunk(n, candle_core::D::Minus1)?;
    let gates = gated.iter().map(|&(c, _)| Gate::from(&vecs[c])).collect();
    Ok((vecs, gates))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

/// `x W^T + b` for a dense layer, with the bias (and GELU when `gelu`) in the GEMM's epilogue on
/// the GPU (cuBLASLt, half precision), else in one fused pass after it: Candle's broadcast add
/// alone costs two thirds of a 3072x3072 GEMM.
fn dense_forward(l: &candle_nn::Linear, x: &Tensor, gelu: bool) -> Result<Tensor> {
    let split = GEMM_ROW_SPLIT.with(|c| c.get());
    if split > 1 && x.rank() == 3 && x.dim(1)? >= split {
        let mut parts = Vec::with_capacity(split);
        let mut at = 0;
        for len in crate::parallel::split_sizes(x.dim(1)?, split) {
            parts.push(dense_forward_whole(l, &x.narrow(1, at, len)?, gelu)?);
            at += len;
        }
        return Tensor::cat(&parts, 1);
    }
    dense_forward_whole(l, x, gelu)
}

thread_local! {
    /// See [`with_gemm_row_split`].
    static GEMM_ROW_SPLIT: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

/// Runs `f` with every dense linear of this thread applied to `n` contiguous token blocks
/// separately (`[B, S, C]` inputs split along S as sequence parallelism over `n` ranks splits
/// them). A diagnostic for multi-GPU agreement: GEMM libraries pick kernels by shape, and
/// kernels that split the reduction round differently, so the same rows can come out differently
/// at M = S and at M = S / n.
pub fn with_gemm_row_split<T>(n: usize, f: impl FnOnce() -> T) -> T {
    let prev = GEMM_ROW_SPLIT.with(|c| c.replace(n.max(1)));
    let out = f();
    GEMM_ROW_SPLIT.with(|c| c.set(prev));
    out
}

fn dense_forward_whole(l: &candle_nn::Linear, x: &Tensor, gelu: bool) -> Result<Tensor> {
    // Half precision on a GPU: bias and GELU in cuBLASLt's epilogue, no extra pass.
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::lt::dense_linear(x, l.weight(), l.bias(), gelu, None)? {
        return Ok(y);
    }
    match l.bias() {
        Some(b) if x.device().is_cuda() => {
            let y = candle_nn::Linear::new(l.weight().clone(), None).forward(x)?;
            crate::models::fused::bias_act(&y, b, gelu)
        }
        _ => {
            let y = l.forward(x)?;
            if gelu {
                crate::models::ops::gelu_tanh(&y)
            } else {
                Ok(y)
            }
        }
    }
}

/// A layer input: a tensor or, for fp8-mode layers on a GPU, its E4M3 rows with one scale per row,
/// quantized once for every layer that reads it.
#[derive(Debug, Clone)]
pub enum Input {
    Tensor(Tensor),
    #[cfg(feature = "cuda")]
    Fp8(crate::cuda::fp8::Fp8Act),
}

impl Input {
    /// `LayerNorm(x) * (1 + scale) + shift` for `layers`: where every one of them is an fp8-mode
    /// layer on a GPU reading bf16, quantized in the normalization's own kernel (neither the bf16
    /// output nor each layer's quantization pass is made; the bytes are the same); otherwise the
    /// normalized tensor. `CANDIFF_LN_FP8=0` turns the fused form off, for A/B measurements.
    pub fn ln_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64, layers: &[&Linear]) -> Result<Input> {
        #[cfg(feature = "cuda")]
        {
            static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let enabled = *ENABLED.get_or_init(|| std::env::var("CANDIFF_LN_FP8").as_deref() != Ok("0"));
            let k = x.dims().last().copied().unwrap_or(0);
            if enabled
                && !layers.is_empty()
                && x.device().is_cuda()
                && layers.iter().all(|l| l.reads_fp8_act(k, x.dtype()))
            {
                return Ok(Input::Fp8(crate::models::fused::ln_modulate_fp8(x, shift, scale, eps)?));
            }
        }
        let _ = layers;
        Ok(Input::Tensor(crate::models::fused::ln_modulate(x, shift, scale, eps)?))
    }
}

impl Linear {
    /// Whether this layer reads a quantized [`Input::Fp8`] of `k` features standing for a `dtype`
    /// tensor (an fp8-mode layer on a GPU; see [`Nvfp4Linear::reads_fp8_act`]).
    pub fn reads_fp8_act(&self, k: usize, dtype: DType) -> bool {
        #[cfg(feature = "cuda")]
        if let Linear::Nvfp4(q) = self {
            return q.reads_fp8_act(k, dtype);
        }
        let _ = (k, dtype);
        false
    }

    /// `x W^T + b` for either form of input.
    pub fn forward_input(&self, x: &Input) -> Result<Tensor> {
        self.forward_input_act(x, false)
    }

    /// `gelu_tanh(x W^T + b)` for either form of input.
    pub fn forward_gelu_input(&self, x: &Input) -> Result<Tensor> {
        self.forward_input_act(x, true)
    }

    fn forward_input_act(&self, x: &Input, gelu: bool) -> Result<Tensor> {
        match x {
            Input::Tensor(t) if gelu => self.forward_gelu(t),
            Input::Tensor(t) => self.forward(t),
            #[cfg(feature = "cuda")]
            Input::Fp8(a) => match self {
                Linear::Nvfp4(q) => {
                    let device = a.q.device().clone();
                    crate::profile::span(crate::profile::Part::Linear, &device, || q.forward_fp8_act(a, gelu))
                }
                _ => candle_core::bail!("an E4M3 input for a layer that is not in fp8 mode"),
            },
        }
    }

    /// Layers reading the same input joined into one (outputs concatenated), where each is dense
    /// (same dtype, all with or all without a bias) or each an fp8-mode NVFP4 layer: one GEMM
    /// (and, in fp8 mode, one activation quantization) instead of several. `None` otherwise.
    pub fn concat(parts: &[Linear]) -> Result<Option<Linear>> {
        if parts.len() < 2 {
            return Ok(None);
        }
        let dense: Option<Vec<&candle_nn::Linear>> =
            parts.iter().map(|l| if let Linear::Dense(d) = l { Some(d) } else { None }).collect();
        if let Some(ds) = dense {
            let k = ds[0].weight().dim(1)?;
            let biased = ds[0].bias().is_some();
            if ds.iter().any(|d| d.weight().dim(1).ok() != Some(k) || d.bias().is_some() != biased)
                || ds.iter().any(|d| d.weight().dtype() != ds[0].weight().dtype())
            {
                return Ok(None);
            }
            let w = Tensor::cat(&ds.iter().map(|d| d.weight()).collect::<Vec<_>>(), 0)?;
            let b = if biased {
                Some(Tensor::cat(&ds.iter().map(|d| d.bias().expect("biased")).collect::<Vec<_>>(), 0)?)
            } else {
                None
            };
            return Ok(Some(Linear::Dense(candle_nn::Linear::new(w, b))));
        }
        let fp8: Option<Vec<&Nvfp4Linear>> =
            parts.iter().map(|l| if let Linear::Nvfp4(q) = l { Some(q) } else { None }).collect();
        match fp8 {
            Some(qs) => Ok(Nvfp4Linear::concat_fp8(&qs)?.map(Linear::Nvfp4)),
            None => Ok(None),
        }
    }

    /// `acc + x W^T + b`: on the GPU a dense half-precision layer adds `acc` inside the GEMM
    /// (cuBLASLt, beta = 1), no extra pass.
    pub fn forward_acc(&self, x: &Tensor, acc: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        match self {
            Linear::Dense(l) => {
                let y = crate::profile::span(crate::profile::Part::Linear, x.device(), || {
                    crate::cuda::lt::dense_linear(x, l.weight(), l.bias(), false, Some(acc))
                })?;
                if let Some(y) = y {
                    return Ok(y);
                }
            }
            Linear::Nvfp4(q) if q.mode() == ActMode::Fp8 && x.device().is_cuda() => {
                return crate::profile::span(crate::profile::Part::Linear, x.device(), || q.forward_acc_fp8(x, acc));
            }
            _ => {}
        }
        acc + self.forward(x)?
    }

    /// [`Linear::forward_acc`] for either form of input.
    pub fn forward_acc_input(&self, x: &Input, acc: &Tensor) -> Result<Tensor> {
        match x {
            Input::Tensor(t) => self.forward_acc(t, acc),
            #[cfg(feature = "cuda")]
            Input::Fp8(a) => match self {
                Linear::Nvfp4(q) => {
                    crate::profile::span(crate::profile::Part::Linear, acc.device(), || q.forward_acc_fp8_act(a, acc))
                }
                _ => candle_core::bail!("an E4M3 input for a layer that does not read one (a dense layer)"),
            },
        }
    }

    /// [`Linear::forward_gated`] for either form of input.
    pub fn forward_gated_input(&self, x: &Input, gate: &Gate, residual: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Linear::Nvfp4(q) = self {
            if self.folds_gate(residual, &gate.vec) {
                let folded = q.fold_parts(gate.vec.elem_count()).and_then(|(scale, bias)| gate.folded_for(scale, bias));
                let g = gate.vec.flatten_all()?.to_dtype(candle_core::DType::F32)?;
                let y = crate::profile::span(crate::profile::Part::Linear, residual.device(), || match x {
                    Input::Tensor(t) => q.forward_gated_fp8(t, &g, folded, residual),
                    Input::Fp8(a) => q.forward_gated_fp8_act(a, &g, folded, residual),
                })?;
                if let Some(y) = y {
                    return Ok(y);
                }
            }
        }
        crate::models::fused::gated_add(residual, &self.forward_input(x)?, &gate.vec)
    }

    /// Whether [`Linear::forward_gated`] folds `gate` into this layer's GEMM (an fp8-mode layer on
    /// a GPU, one gate vector: batch 1) instead of a separate gated-add pass.
    /// `CANDIFF_GATE_FOLD=0` turns the folding off (the GEMM then the gated-add pass), for A/B
    /// measurements.
    pub fn folds_gate(&self, x: &Tensor, gate: &Tensor) -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| std::env::var("CANDIFF_GATE_FOLD").as_deref() != Ok("0"));
        let one_gate = gate.dims().iter().rev().skip(1).all(|&d| d == 1);
        cfg!(feature = "cuda")
            && enabled
            && one_gate
            && x.device().is_cuda()
            && matches!(self, Linear::Nvfp4(q) if q.mode() == ActMode::Fp8 && gate.elem_count() == q.out_features())
    }

    /// `residual + gate ⊙ (x W^T + b)`, the gated residual of the transformer blocks (`gate`
    /// `[B, N]` or `[B, 1, N]` f32, one per batch element). Where [`Linear::folds_gate`], the gate
    /// rides in the fp8 GEMM's scales and bias and the residual is its C; otherwise the GEMM then
    /// the fused gated add.
    pub fn forward_gated(&self, x: &Tensor, gate: &Gate, residual: &Tensor) -> Result<Tensor> {
        self.forward_gated_input(&Input::Tensor(x.clone()), gate, residual)
    }

    /// A dense half-precision or fp8-mode layer on a GPU split along its input features at `at`:
    /// (the first `at` inputs, no bias; the rest, with the bias), so `cat(a, b)` through the layer
    /// is `a W1^T + b W2^T + bias` as two GEMMs, the second accumulating onto the first. Any other
    /// layer comes back unchanged (`Err`): there the split buys nothing.
    pub fn split_inputs(self, at: usize) -> Result<std::result::Result<(Linear, Linear), Linear>> {
        if let Linear::Nvfp4(q) = &self {
            if q.prepared().0.device().is_cuda() {
                if let Some((a, b)) = q.split_inputs_fp8(at)? {
                    return Ok(Ok((Linear::Nvfp4(a), Linear::Nvfp4(b))));
                }
            }
        }
        match &self {
            Linear::Dense(l)
                if l.weight().device().is_cuda()
                    && matches!(l.weight().dtype(), DType::BF16 | DType::F16)
                    && at < l.weight().dim(1)? =>
            {
                let w = l.weight();
                let k = w.dim(1)?;
                let first = candle_nn::Linear::new(w.narrow(1, 0, at)?.contiguous()?, None);
                let rest = candle_nn::Linear::new(w.narrow(1, at, k - at)?.contiguous()?, l.bias().cloned());
                Ok(Ok((Linear::Dense(first), Linear::Dense(rest))))
            }
            _ => Ok(Err(self)),
        }
    }

    /// The layer followed by tanh-GELU (fused with the bias add on the GPU).
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, true)
    }

    /// Whether [`Linear::forward_gelu_from`] runs as one GEMM with the activation in its epilogue
    /// (a W4A16 NVFP4 layer on Hopper); elsewhere it costs a pass over the activated features.
    pub fn gelu_from_in_gemm(&self, x: &Tensor) -> Result<bool> {
        match self {
            Linear::Nvfp4(q) if q.mode() == ActMode::W4A16 => q.act_in_gemm(x),
            _ => Ok(false),
        }
    }

    /// The layer with tanh-GELU on output features `>= from` only (the MLP part of a fused
    /// q/k/v/MLP projection).
    pub fn forward_gelu_from(&self, x: &Tensor, from: usize) -> Result<Tensor> {
        if let Linear::Nvfp4(q) = self {
            return crate::profile::span(crate::profile::Part::Linear, x.device(), || q.forward_act_from(x, from));
        }
        crate::models::ops::gelu_tanh_from(&self.forward(x)?, from)
    }

    /// Whether [`Linear::forward_parts`] reads an input split after `c` features, rows as `like`'s,
    /// in one GEMM without writing the concatenation (a W4A16 NVFP4 layer on Hopper).
    pub fn reads_parts_like(&self, like: &Tensor, c: usize) -> Result<bool> {
        match self {
            Linear::Nvfp4(q) => q.reads_parts_like(like, c),
            _ => Ok(false),
        }
    }

    /// `cat(first, second) W^T + b`: where the layer reads the parts in place, one GEMM and no
    /// concatenation; else the concatenation, then the layer.
    pub fn forward_parts(&self, first: &Tensor, second: &Tensor) -> Result<Tensor> {
        if let Linear::Nvfp4(q) = self {
            return crate::profile::span(crate::profile::Part::Linear, first.device(), || {
                q.forward_parts(first, second)
            });
        }
        self.forward(&Tensor::cat(&[first, second], candle_core::D::Minus1)?)
    }

    fn forward_act(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        let gelu_after = |y: Tensor| if gelu { crate::models::ops::gelu_tanh(&y) } else { Ok(y) };
        match self {
            Linear::Dense(l) => {
                crate::profile::span(crate::profile::Part::Linear, x.device(), || dense_forward(l, x, gelu))
            }
            Linear::Nvfp4(l) => {
                crate::profile::span(crate::profile::Part::Linear, x.device(), || l.forward_act(x, gelu))
            }
            // Probes observe the plain linear output.
            Linear::Probed(p) => gelu_after(p.forward(x)?),
        }
    }

    /// The dense layer, seen through a probe wrapper.
    pub fn as_dense(&self) -> Option<&candle_nn::Linear> {
        match self {
            Linear::Dense(d) => Some(d),
            Linear::Probed(p) => p.inner.as_dense(),
            Linear::Nvfp4(_) => None,
        }
    }

    /// Output features (N).
    pub fn out_features(&self) -> Result<usize> {
        match self {
            Linear::Dense(d) => d.weight().dim(0),
            Linear::Nvfp4(q) => Ok(q.out_features()),
            Linear::Probed(p) => p.inner.out_features(),
        }
    }

    pub fn is_nvfp4(&self) -> bool {
        match self {
            Linear::Nvfp4(_) => true,
            Linear::Probed(p) => p.inner.is_nvfp4(),
            Linear::Dense(_) => false,
        }
    }
}

/// What a [`Probe`] gathered for one linear.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LayerStats {
    /// max |input| over every call (calibration of `input_scale`).
    pub input_amax: f32,
    /// Sum over calls of |y - y_ref|^2 and |y_ref|^2 (NVFP4 layers with a dense twin).
    pub err_sq: f64,
    pub ref_sq: f64,
    pub calls: usize,
}

impl LayerStats {
    /// Relative L2 error of the layer's output against its dense twin, over all calls.
    pub fn rel_l2(&self) -> Option<f64> {
        (self.ref_sq > 0.0).then(|| (self.err_sq / self.ref_sq).sqrt())
    }
}

/// Observes linears while a model runs: input ranges (to calibrate NVFP4 activation scales from a
/// reference run) and, for NVFP4 layers built with a dense twin, the error of each output against
/// the dense layer on the same real activations. The statistics stay on the device while the
/// model runs (a reduction per call, no host sync, so probed runs keep their speed); [`Probe::stats`]
/// reads them.
#[derive(Debug, Default)]
pub struct Probe {
    running: std::sync::Mutex<std::collections::BTreeMap<String, Running>>,
}

/// Per-layer device scalars: max |input|, and the sums of |y - y_ref|^2 and |y_ref|^2.
#[derive(Debug, Default)]
struct Running {
    amax: Option<Tensor>,
    err_sq: Option<Tensor>,
    ref_sq: Option<Tensor>,
    calls: usize,
}

impl Probe {
    /// The statistics so far, per layer (one device read per value).
    pub fn stats(&self) -> Result<std::collections::BTreeMap<String, LayerStats>> {
        let running = self.running.lock().expect("probe poisoned");
        let read = |t: &Option<Tensor>| -> Result<f64> {
            t.as_ref().map_or(Ok(0.0), |t| t.to_dtype(DType::F64)?.to_scalar::<f64>())
        };
        running
            .iter()
            .map(|(n, r)| {
                let s = LayerStats {
                    input_amax: read(&r.amax)? as f32,
                    err_sq: read(&r.err_sq)?,
                    ref_sq: read(&r.ref_sq)?,
                    calls: r.calls,
                };
                Ok((n.clone(), s))
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Probed {
    name: String,
    inner: Linear,
    dense_twin: Option<candle_nn::Linear>,
    probe: Arc<Probe>,
}

impl Probed {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.inner.forward(x)?;
        // Row-wise first, then over rows: a whole-tensor reduction is one long serial one on the GPU.
        let rows = |t: &Tensor| -> Result<Tensor> { t.flatten_to(candle_core::D::Minus2) };
        let amax = rows(&x.abs()?)?.max(1)?.max(0)?.to_dtype(DType::F32)?;
        let sum_sq = |t: &Tensor| -> Result<Tensor> { rows(&t.sqr()?)?.sum(1)?.sum(0) };
        let twin = match &self.dense_twin {
            Some(d) => {
                let yr = d.forward(x)?.to_dtype(DType::F32)?;
                Some((sum_sq(&(y.to_dtype(DType::F32)? - &yr)?)?, sum_sq(&yr)?))
            }
            None => None,
        };
        let mut running = self.probe.running.lock().expect("probe poisoned");
        let r = running.entry(self.name.clone()).or_default();
        let fold = |acc: Option<Tensor>, v: Tensor, max: bool| -> Result<Tensor> {
            match acc {
                Some(a) if max => a.maximum(&v),
                Some(a) => a + v,
                None => Ok(v),
            }
        };
        r.amax = Some(fold(r.amax.take(), amax, true)?);
        if let Some((e, rs)) = twin {
            r.err_sq = Some(fold(r.err_sq.take(), e, false)?);
            r.ref_sq = Some(fold(r.ref_sq.take(), rs, false)?);
        }
        r.calls += 1;
        Ok(y)
    }
}

/// NVFP4 amax target of the ModelOpt rule (E2M1 max 6 x E4M3 max 448): `input_scale = amax / 2688`.
const NVFP4_AMAX: f32 = 2688.0;

/// Quantizes dense linears to NVFP4 while loading (the ModelOpt weight rule), for comparing
/// precisions on a bf16 checkpoint.
#[derive(Debug, Clone, Default)]
pub struct QuantizeSpec {
    /// Module paths containing one of these are quantized (e.g. `transformer_blocks.`).
    pub include: Vec<String>,
    /// ... unless they match one of these (substring, or `*` wildcards).
    pub exclude: Vec<String>,
    /// Calibrated input amax per module (W4A4 needs it).
    pub input_amax: std::collections::BTreeMap<String, f32>,
    /// Keep each quantized layer's dense weight to measure its output error (needs a probe).
    pub keep_dense_twin: bool,
    /// Quantized weights by checkpoint and module path, shared by every load of one run: the ModelOpt rule
    /// gives the same codes whatever the backend or mode, so a comparison quantizes each layer
    /// once instead of once per (variant, output) (~10^10 values for a 12B model).
    pub cache: QuantCache,
}

/// See [`QuantizeSpec::cache`].
#[derive(Debug, Clone, Default)]
pub struct QuantCache(Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<crate::nvfp4::Nvfp4Weight>>>>);

impl QuantCache {
    fn get_or_quantize(
        &self,
        module: &str,
        dense: &Tensor,
        n: usize,
        k: usize,
    ) -> Result<Arc<crate::nvfp4::Nvfp4Weight>> {
        if let Some(w) = self.0.lock().expect("quant cache poisoned").get(module) {
            return Ok(w.clone());
        }
        let w: Vec<f32> = dense.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let q = Arc::new(crate::nvfp4::quant::quantize_weight(&w, n, k)?);
        self.0.lock().expect("quant cache poisoned").insert(module.to_string(), q.clone());
        Ok(q)
    }
}

impl QuantizeSpec {
    pub fn matches(&self, module: &str) -> bool {
        self.include.iter().any(|p| module.contains(p.as_str()))
            && !self
                .exclude
                .iter()
                .any(|p| crate::nvfp4::config::pattern_matches(p, module) || module.contains(p.as_str()))
    }
}

/// Optional load-time behaviour of a [`WeightBuilder`].
#[derive(Debug, Clone, Default)]
pub struct LoadHooks {
    pub quantize: Option<Arc<QuantizeSpec>>,
    pub probe: Option<Arc<Probe>>,
    /// A sibling NVFP4 file supplying `input_scale` / `weight_scale_2` tensors the checkpoint
    /// lacks (`--nvfp4-scales-from`; e.g. the official FLUX.2 `-mixed` file).
    pub borrow_scales: Option<Arc<MappedFile>>,
}

/// How NVFP4 layers are executed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nvfp4Options {
    pub backend: Backend,
    pub mode: ActMode,
    /// fp8 mode's accumulation (`--fp8-accum`).
    pub fp8_accum: crate::nvfp4::fp8::Fp8Accum,
}

/// Where weights come from.
#[derive(Clone)]
enum WeightSource {
    Checkpoint(Arc<Checkpoint>),
    /// Random weights of the right shapes (benchmarks of full-size models without downloads);
    /// linears whose path matches one of `nvfp4` are random NVFP4 layers.
    Synthetic {
        nvfp4: Arc<Vec<String>>,
    },
}

/// Standard deviation of synthetic dense weights: keeps activations of deep random stacks finite.
const SYNTHETIC_STD: f64 = 0.02;

/// Normal(0, `SYNTHETIC_STD`) tensors for any requested name, generated on the device.
struct RandomBackend;

impl candle_nn::var_builder::SimpleBackend for RandomBackend {
    /// Each tensor is drawn from a generator seeded by its name, so every run, every thread
    /// (ranks of a multi-GPU benchmark, in any order) and every variant of a comparison builds
    /// the same weights on a device (the CPU and GPU generators differ).
    /// Norm scales (1-D `weight` / `scale`, `gamma`) are 1 + noise, as trained ones are near 1: drawn
    /// around 0 they would silence every normalized path (a constant image out of the VAE).
    fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        // Wan's RMS norms call theirs `gamma`, shaped [C, 1, 1(, 1)].
        let is_norm_scale =
            (s.rank() == 1 && (name.ends_with("weight") || name.ends_with("scale"))) || name.ends_with("gamma");
        let offset = if is_norm_scale { 1.0 } else { 0.0 };
        if dev.is_cuda() {
            static DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one_at_a_time = DRAW.lock().unwrap_or_else(|p| p.into_inner());
            dev.set_seed(name_seed(name))?;
            return Tensor::randn(offset, SYNTHETIC_STD as f32, s, dev)?.to_dtype(dtype);
        }
        // The CPU generator cannot be seeded: draw from our own, seeded the same way.
        let mut rng = crate::rng::Rng::new(name_seed(name));
        let v: Vec<f32> = (0..s.elem_count()).map(|_| (offset as f64 + rng.normal() * SYNTHETIC_STD) as f32).collect();
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("synthetic weights need a shape for `{name}`")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// FNV-1a of a tensor name: the seed of its synthetic values.
fn name_seed(name: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0100_0000_01b3;
    name.bytes().fold(FNV_OFFSET, |h, b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

/// A `VarBuilder` of random Normal(0, 0.02) tensors for any name (benchmarks of full-size
/// components without downloads).
pub fn random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend), dtype, device.clone())
}

/// Builds a model's modules from one checkpoint: `pp` walks the module tree like a `VarBuilder`
/// (checkpoint names), `linear` returns the right kind of layer for the current path.
#[derive(Clone)]
pub struct WeightBuilder<'a> {
    vb: VarBuilder<'a>,
    source: WeightSource,
    borrow: Option<Arc<MappedFile>>,
    opts: Nvfp4Options,
    hooks: LoadHooks,
}

impl<'a> WeightBuilder<'a> {
    /// `dtype` is the compute dtype of dense tensors; NVFP4 layers keep their own storage.
    pub fn new(ckpt: Arc<Checkpoint>, dtype: DType, device: &Device, opts: Nvfp4Options) -> Result<Self> {
        // SAFETY: read-only mapping of checkpoint files (see `MappedFile::open`).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&ckpt.file_paths(), dtype, device)? };
        Ok(Self { vb, source: WeightSource::Checkpoint(ckpt), borrow: None, opts, hooks: LoadHooks::default() })
    }

    /// Random weights; linears whose path contains one of `nvfp4_paths` become NVFP4 layers
    /// (random codes and scales, prepared for `opts.backend`).
    pub fn synthetic(dtype: DType, device: &Device, nvfp4_paths: Vec<String>, opts: Nvfp4Options) -> Self {
        let vb = VarBuilder::from_backend(Box::new(RandomBackend), dtype, device.clone());
        Self {
            vb,
            source: WeightSource::Synthetic { nvfp4: Arc::new(nvfp4_paths) },
            borrow: None,
            opts,
            hooks: LoadHooks::default(),
        }
    }

    /// Supplies missing `input_scale` / `weight_scale_2` tensors from a sibling file.
    pub fn with_borrowed_scales(mut self, file: Arc<MappedFile>) -> Self {
        self.borrow = Some(file);
        self
    }

    /// On-the-fly quantization and probes (see [`LoadHooks`]).
    pub fn with_hooks(mut self, hooks: LoadHooks) -> Self {
        if let Some(b) = &hooks.borrow_scales {
            self.borrow = Some(b.clone());
        }
        self.hooks = hooks;
        self
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Self { vb: self.vb.pp(s), ..self.clone() }
    }

    /// This builder for layers whose input is one row per sample (modulation, timestep and
    /// guidance embedders, the final modulation): their M is the batch size, where a layer is a
    /// weight read and the `trtllm` W4A16 GEMV reads 4.5 bits per weight against the 8 of fp8
    /// mode's E4M3 copy. So fp8 mode runs them as W4A16 (FLUX.1-dev: 1.5 ms per step for them
    /// against 1.8, 1.3 GiB less memory, and no activation rounding: docs/PERF.md, session 17);
    /// every other mode, and other backends, unchanged.
    pub fn per_sample(&self) -> Self {
        let mut opts = self.opts;
        if opts.mode == ActMode::Fp8 && opts.backend == crate::nvfp4::Backend::Trtllm {
            opts.mode = ActMode::W4A16;
        }
        Self { opts, ..self.clone() }
    }

    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    /// The linear at the current path (`weight` `[out, in]`, optional `bias`).
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let module = self.vb.prefix();
        let mut twin = None;
        let mut l = self.load_linear(&module, in_dim, out_dim, bias)?;
        if let (Linear::Dense(d), Some(q)) = (&l, &self.hooks.quantize) {
            if q.matches(&module) && in_dim.is_multiple_of(crate::nvfp4::format::GROUP_SIZE) {
                // Keyed by checkpoint too: the experts of a two-expert model share module names.
                let key = match &self.source {
                    WeightSource::Checkpoint(c) => format!("{:?}:{module}", c.file_paths()),
                    WeightSource::Synthetic { .. } => format!("random:{module}"),
                };
                let qw = q.cache.get_or_quantize(&key, d.weight(), out_dim, in_dim)?;
                let input_scale = q.input_amax.get(&module).filter(|a| **a > 0.0).map(|a| a / NVFP4_AMAX);
                if self.opts.mode == ActMode::W4A4 && input_scale.is_none() {
                    candle_core::bail!(
                        "`{module}`: W4A4 needs the layer's input range; run a calibrating reference first (candiff compare does)"
                    );
                }
                let nl = self.nvfp4_layer(&qw, input_scale, d.bias().cloned())?;
                if q.keep_dense_twin {
                    twin = Some(d.clone());
                }
                l = Linear::Nvfp4(nl);
            }
        }
        Ok(match &self.hooks.probe {
            Some(p) => Linear::Probed(Box::new(Probed { name: module, inner: l, dense_twin: twin, probe: p.clone() })),
            None => l,
        })
    }

    fn load_linear(&self, module: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let module = module.to_string();
        let ckpt = match &self.source {
            WeightSource::Checkpoint(c) => c,
            WeightSource::Synthetic { nvfp4 } => {
                let b = if bias { Some(self.vb.get(out_dim, "bias")?) } else { None };
                if !nvfp4.iter().any(|p| module.contains(p.as_str()))
                    || !in_dim.is_multiple_of(crate::nvfp4::format::GROUP_SIZE)
                {
                    let w = self.vb.get((out_dim, in_dim), "weight")?;
                    return Ok(Linear::Dense(candle_nn::Linear::new(w, b)));
                }
                let w = random_nvfp4(out_dim, in_dim, module.len() as u64)?;
                return Ok(Linear::Nvfp4(self.nvfp4_layer(&w, Some(1.0), b)?));
            }
        };
        let is_nvfp4 = ckpt.plan.as_ref().is_some_and(|p| p.is_quantized(&module));
        if !is_nvfp4 {
            let w = self.vb.get((out_dim, in_dim), "weight")?;
            let b = if bias { Some(self.vb.get(out_dim, "bias")?) } else { None };
            return Ok(Linear::Dense(candle_nn::Linear::new(w, b)));
        }
        let (w, input_scale) = ckpt.load_nvfp4(&module, self.borrow.as_deref())?;
        if (w.n, w.k) != (out_dim, in_dim) {
            candle_core::bail!(
                "`{module}`: the model expects a [{out_dim}, {in_dim}] weight, the checkpoint holds NVFP4 [{}, {}]; is this the right checkpoint for the config?",
                w.n,
                w.k
            );
        }
        let b = if bias { Some(self.vb.get(out_dim, "bias")?) } else { None };
        Ok(Linear::Nvfp4(self.nvfp4_layer(&w, input_scale, b)?))
    }

    /// An NVFP4 layer of `w` as this builder's options say (backend, mode, fp8 accumulation).
    fn nvfp4_layer(
        &self,
        w: &crate::nvfp4::Nvfp4Weight,
        input_scale: Option<f32>,
        bias: Option<Tensor>,
    ) -> Result<Nvfp4Linear> {
        let o = self.opts;
        Ok(Nvfp4Linear::new(w, input_scale, bias, o.backend, o.mode, self.vb.device())?.with_fp8_accum(o.fp8_accum))
    }
}

/// Random NVFP4 weight: uniform codes, block scales around 1, and a global scale giving weights of
/// roughly `SYNTHETIC_STD`.
fn random_nvfp4(n: usize, k: usize, seed: u64) -> Result<crate::nvfp4::Nvfp4Weight> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut packed = vec![0u8; n * k / 2];
    for chunk in packed.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    // E4M3 0x30..0x3F: 0.5 to 1.875.
    let scales: Vec<u8> = (0..n * k / 16).map(|_| 0x30 | (rng.next_u64() as u8 & 0x0F)).collect();
    const TYPICAL_CODE_TIMES_SCALE: f64 = 2.5;
    Ok(crate::nvfp4::Nvfp4Weight::new(n, k, packed, scales, (SYNTHETIC_STD / TYPICAL_CODE_TIMES_SCALE) as f32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard-normal f32 CPU tensors of any shape, drawn in turn from one seeded stream.
    fn normal_tensors(seed: u64) -> impl FnMut(&[usize]) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        move |shape: &[usize]| {
            let n: usize = shape.iter().product();
            Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
        }
    }

    /// The row-split diagnostic computes the same rows (the CPU GEMM does not depend on M), in
    /// order, with the bias, for uneven blocks; 2-D inputs are left whole.
    #[test]
    fn gemm_row_split_keeps_every_row() {
        let mut draw = normal_tensors(11);
        let l = Linear::Dense(candle_nn::Linear::new(draw(&[5, 8]), Some(draw(&[5]))));
        let x = draw(&[2, 7, 8]);
        let whole = l.forward(&x).unwrap();
        let split = with_gemm_row_split(3, || l.forward(&x)).unwrap();
        assert_eq!(split.dims(), &[2, 7, 5]);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&split), flat(&whole));
        let x2 = draw(&[7, 8]);
        assert_eq!(flat(&with_gemm_row_split(3, || l.forward(&x2)).unwrap()), flat(&l.forward(&x2).unwrap()));
        // The setting ends with the closure.
        assert_eq!(GEMM_ROW_SPLIT.with(|c| c.get()), 1);
    }

    /// The gated residual of a layer that does not fold the gate (CPU, any layer kind) is
    /// `residual + gate ⊙ (x W^T + b)`, gate per batch element, against plain tensor ops.
    #[test]
    fn forward_gated_is_the_gated_residual() {
        let mut draw = normal_tensors(5);
        let l = Linear::Dense(candle_nn::Linear::new(draw(&[6, 8]), Some(draw(&[6]))));
        let (x, gate, residual) = (draw(&[2, 3, 8]), draw(&[2, 6]), draw(&[2, 3, 6]));
        assert!(!l.folds_gate(&x, &gate));
        let got = l.forward_gated(&x, &Gate::from(&gate), &residual).unwrap();
        let want = (&residual + l.forward(&x).unwrap().broadcast_mul(&gate.unsqueeze(1).unwrap()).unwrap()).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-5, "max difference {d}");
    }

    /// A block's modulation on the CPU: the projection's output as f32 in `n` chunks, each gate
    /// the chunk it names (no folds off the GPU), and a width that does not split into `n` or a
    /// gate past the last chunk refused.
    #[test]
    fn modulation_is_the_projection_in_f32_chunks() {
        let mut draw = normal_tensors(11);
        let proj = Linear::Dense(candle_nn::Linear::new(
            draw(&[12, 5]).to_dtype(DType::BF16).unwrap(),
            Some(draw(&[12]).to_dtype(DType::BF16).unwrap()),
        ));
        let gated = Linear::Dense(candle_nn::Linear::new(draw(&[4, 4]), None));
        let temb = draw(&[1, 5]).to_dtype(DType::BF16).unwrap();
        let (vecs, gates) = modulation(&proj, &temb, 3, &[(1, &[&gated]), (2, &[])]).unwrap();
        let want = proj.forward(&temb).unwrap().to_dtype(DType::F32).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(vecs.len(), 3);
        for (i, v) in vecs.iter().enumerate() {
            assert_eq!(v.dtype(), DType::F32);
            assert_eq!(flat(v), flat(&want.narrow(1, 4 * i, 4).unwrap()));
        }
        assert_eq!(gates.len(), 2);
        assert_eq!(flat(&gates[0].vec), flat(&vecs[1]));
        assert_eq!(flat(&gates[1].vec), flat(&vecs[2]));
        assert_eq!(gates[0].fold_count(), 0);
        assert!(modulation(&proj, &temb, 5, &[]).is_err());
        assert!(modulation(&proj, &temb, 3, &[(3, &[])]).is_err());
    }

    /// Layers that do not read E4M3 get the normalized tensor itself, and a layer reads either
    /// form of input the same way.
    #[test]
    fn ln_modulate_input_is_the_normalized_tensor_for_other_layers() {
        let mut draw = normal_tensors(9);
        let l = Linear::Dense(candle_nn::Linear::new(draw(&[6, 8]), Some(draw(&[6]))));
        let (x, shift, scale) = (draw(&[2, 3, 8]), draw(&[2, 8]), draw(&[2, 8]));
        assert!(!l.reads_fp8_act(8, DType::BF16));
        // (Without the cuda feature `Input` has one form, so the `else` arm cannot be reached.)
        #[allow(irrefutable_let_patterns)]
        let Input::Tensor(n) = Input::ln_modulate(&x, &shift, &scale, 1e-6, &[&l]).unwrap() else {
            panic!("an E4M3 input for a dense CPU layer")
        };
        let want = crate::models::fused::ln_modulate(&x, &shift, &scale, 1e-6).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&n), flat(&want));
        assert_eq!(flat(&l.forward_input(&Input::Tensor(n.clone())).unwrap()), flat(&l.forward(&n).unwrap()));
    }

    /// In fp8 mode a per-sample layer (M = batch size) is the W4A16 layer of the same weight, on
    /// `trtllm` only; other layers, and other backends, stay in fp8 mode.
    #[test]
    fn per_sample_layers_run_w4a16_in_fp8_mode() {
        use crate::nvfp4::Backend;
        let builder = |backend, mode| {
            WeightBuilder::synthetic(
                DType::F32,
                &Device::Cpu,
                vec!["blocks".into()],
                Nvfp4Options { backend, mode, ..Default::default() },
            )
        };
        let mode = |l: &Linear| match l {
            Linear::Nvfp4(q) => q.mode(),
            _ => panic!("an NVFP4 layer expected"),
        };
        let fp8 = builder(Backend::Trtllm, ActMode::Fp8);
        let per_sample = fp8.per_sample().pp("blocks.0.mod").linear(64, 32, false).unwrap();
        assert_eq!(mode(&per_sample), ActMode::W4A16);
        assert_eq!(mode(&fp8.pp("blocks.0.mod").linear(64, 32, false).unwrap()), ActMode::Fp8);
        let cutlass = builder(Backend::Cutlass, ActMode::Fp8).per_sample().pp("blocks.0.mod").linear(64, 32, false);
        assert_eq!(mode(&cutlass.unwrap()), ActMode::Fp8);
        // The same random weight (seeded by the module path) as the W4A16 layer: the same outputs.
        let w4a16 = builder(Backend::Trtllm, ActMode::W4A16).pp("blocks.0.mod").linear(64, 32, false).unwrap();
        let mut rng = crate::rng::Rng::new(3);
        let x = Tensor::from_vec((0..128).map(|_| rng.normal() as f32).collect::<Vec<_>>(), (2, 64), &Device::Cpu);
        let x = x.unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(per_sample.forward(&x).unwrap()), flat(w4a16.forward(&x).unwrap()));
    }

    /// `--fp8-accum` reaches every NVFP4 layer a builder makes (the GPU GEMM reads it from the op).
    #[test]
    fn fp8_accumulation_reaches_the_layers() {
        use crate::nvfp4::fp8::Fp8Accum;
        use crate::nvfp4::Backend;
        for accum in [Fp8Accum::F32, Fp8Accum::Fast] {
            let opts = Nvfp4Options { backend: Backend::Trtllm, mode: ActMode::Fp8, fp8_accum: accum };
            let b = WeightBuilder::synthetic(DType::F32, &Device::Cpu, vec!["blocks".into()], opts);
            match b.pp("blocks.0.ff").linear(64, 32, true).unwrap() {
                Linear::Nvfp4(q) => assert_eq!(q.op().fp8_accum, accum),
                _ => panic!("an NVFP4 layer expected"),
            }
        }
    }
}
