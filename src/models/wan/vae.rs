//! `AutoencoderKLWan`: the causal 3D VAEs of Wan2.1 (z 16, 8x spatial, 4x temporal) and Wan2.2
//! (z 48, residual blocks, 2x2 patchify, 16x spatial), diffusers names.
//!
//! Both directions run chunk by chunk in time (decode: one latent frame at a time; encode: frame 0,
//! then groups of 4) with a cache of the last input frames of every causal convolution, so memory
//! is bounded by one chunk whatever the video length. Norms run in f32.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::WanVaeConfig;
use crate::models::conv3d::Conv3d;

/// Frames each causal convolution keeps from the previous chunk (its temporal kernel - 1).
const CACHE_T: usize = 2;
/// Floor of the channel norm in `F.normalize`.
const NORM_EPS: f64 = 1e-12;
/// Frames per encoder chunk after the first frame.
const ENCODE_CHUNK: usize = 4;

/// Cached state of one causal convolution between chunks.
#[derive(Debug, Clone, Default)]
enum Slot {
    #[default]
    Empty,
    /// The first chunk went past a temporal upsampler without its time convolution.
    Rep,
    Frames(Tensor),
}

/// The per-convolution caches of one encode or decode pass, visited in a fixed order per chunk.
#[derive(Debug, Default)]
struct Cache {
    slots: Vec<Slot>,
    idx: usize,
}

impl Cache {
    fn next(&mut self) -> usize {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.idx += 1;
        self.idx - 1
    }

    fn take(&mut self, idx: usize) -> Slot {
        std::mem::take(&mut self.slots[idx])
    }
}

fn frames(x: &Tensor) -> Result<usize> {
    x.dim(2)
}

/// The last `n` frames (fewer if the chunk is shorter), copied so the chunk can be freed.
fn last_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let t = frames(x)?;
    let n = n.min(t);
    x.narrow(2, t - n, n)?.copy()
}

/// Causal 3D convolution: time padded only in front (with cached frames when present), space
/// padded symmetrically with zeros.
#[derive(Debug, Clone)]
struct CausalConv {
    conv: Conv3d,
    pad_t: usize,
}

impl CausalConv {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        stride_t: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        let (kt, ks) = k;
        let w = vb.get((cout, cin, kt, ks, ks), "weight")?;
        let b = vb.get(cout, "bias")?;
        Ok(Self { conv: Conv3d::new(&w, Some(b), (stride_t, 1), pad.1)?, pad_t: 2 * pad.0 })
    }

    fn k3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Self::new(vb, cin, cout, (3, 3), 1, (1, 1))
    }

    fn k1(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Self::new(vb, cin, cout, (1, 1), 1, (0, 0))
    }

    fn forward(&self, x: &Tensor, cached: Option<&Tensor>) -> Result<Tensor> {
        let mut pad = self.pad_t;
        let mut x = x.clone();
        if let (Some(c), true) = (cached, self.pad_t > 0) {
            pad = pad.saturating_sub(frames(c)?);
            x = Tensor::cat(&[c, &x], 2)?;
        }
        if pad > 0 {
            let (b, c, _, h, w) = x.dims5()?;
            let zeros = Tensor::zeros((b, c, pad, h, w), x.dtype(), x.device())?;
            x = Tensor::cat(&[&zeros, &x], 2)?;
        }
        self.conv.forward(&x)
    }

    /// Forward with this convolution's cache slot: the chunk's last `CACHE_T` input frames (with
    /// the previous chunk's last frame when the chunk is shorter) become the next chunk's history.
    fn cached(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let idx = cache.next();
        let prev = cache.take(idx);
        let mut keep = last_frames(x, CACHE_T)?;
        if let (Slot::Frames(p), true) = (&prev, frames(&keep)? < CACHE_T) {
            keep = Tensor::cat(&[&last_frames(p, 1)?, &keep], 2)?;
        }
        let y = self.forward(
            x,
            match &prev {
                Slot::Frames(p) => Some(p),
                _ => None,
            },
        )?;
        cache.slots[idx] = Slot::Frames(keep);
        Ok(y)
    }
}

/// `F.normalize` over channels (dim 1) times sqrt(C) times `gamma`, in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// `[C]` f32 (the checkpoint's `[C, 1, 1(, 1)]`).
    gamma: Tensor,
}

impl RmsNorm {
    /// `images`: gamma is `[C, 1, 1]` (per-frame 4D inputs), else `[C, 1, 1, 1]`.
    fn new(vb: VarBuilder, dim: usize, images: bool) -> Result<Self> {
        let gamma = if images { vb.get((dim, 1, 1), "gamma")? } else { vb.get((dim, 1, 1, 1), "gamma")? };
        Ok(Self { gamma: gamma.to_dtype(DType::F32)?.flatten_all()? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::models::fused::channel_rms(x, &self.gamma, NORM_EPS, false)
    }

    /// The norm followed by SiLU, in one pass.
    fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        crate::models::fused::channel_rms(x, &self.gamma, NORM_EPS, true)
    }
}

#[derive(Debug, Clone)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv,
    norm2: RmsNorm,
    conv2: CausalConv,
    shortcut: Option<CausalConv>,
}

impl ResidualBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            norm1: RmsNorm::new(vb.pp("norm1"), cin, false)?,
            conv1: CausalConv::k3(vb.pp("conv1"), cin, cout)?,
            norm2: RmsNorm::new(vb.pp("norm2"), cout, false)?,
            conv2: CausalConv::k3(vb.pp("conv2"), cout, cout)?,
            shortcut: if cin != cout { Some(CausalConv::k1(vb.pp("conv_shortcut"), cin, cout)?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = self.conv1.cached(&self.norm1.forward_silu(x)?, cache)?;
        let y = self.conv2.cached(&self.norm2.forward_silu(&y)?, cache)?;
        y + h
    }
}

/// Single-head self-attention over the pixels of each frame.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: candle_nn::Conv2d,
    proj: candle_nn::Conv2d,
}

fn conv2d(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    padding: usize,
    stride: usize,
) -> Result<candle_nn::Conv2d> {
    let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d(cin, cout, k, cfg, vb)
}

/// `[B, C, T, H, W]` -> `[B*T, C, H, W]`.
fn to_frames(x: &Tensor) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    x.permute((0, 2, 1, 3, 4))?.reshape((b * t, c, h, w))
}

/// `[B*T, C, H, W]` -> `[B, C, T, H, W]`.
fn from_frames(x: &Tensor, b: usize) -> Result<Tensor> {
    let (bt, c, h, w) = x.dims4()?;
    x.reshape((b, bt / b, c, h, w))?.permute((0, 2, 1, 3, 4))
}

impl AttentionBlock {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(vb.pp("norm"), dim, true)?,
            to_qkv: conv2d(vb.pp("to_qkv"), dim, 3 * dim, 1, 0, 1)?,
            proj: conv2d(vb.pp("proj"), dim, dim, 1, 0, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let f = to_frames(x)?;
        let (bt, c, h, w) = f.dims4()?;
        let qkv = self.to_qkv.forward(&self.norm.forward(&f)?)?;
        // [BT, 3C, HW] -> [BT, 1, HW, 3C]; q, k, v are consecutive channel blocks.
        let qkv = qkv.reshape((bt, 3 * c, h * w))?.transpose(1, 2)?.unsqueeze(1)?;
        let q = qkv.narrow(D::Minus1, 0, c)?;
        let k = qkv.narrow(D::Minus1, c, c)?;
        let v = qkv.narrow(D::Minus1, 2 * c, c)?;
        let o = crate::models::ops::attention_half(&q, &k, &v)?;
        let o = o.squeeze(1)?.transpose(1, 2)?.reshape((bt, c, h, w))?;
        let o = self.proj.forward(&o)?;
        from_frames(&o, b)? + x
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Up2d,
    Up3d,
    Down2d,
    Down3d,
}

#[derive(Debug, Clone)]
struct Resample {
    mode: Mode,
    conv: candle_nn::Conv2d,
    time_conv: Option<CausalConv>,
}

impl Resample {
    fn new(vb: VarBuilder, dim: usize, mode: Mode, up_out: usize) -> Result<Self> {
        let (conv, time_conv) = match mode {
            Mode::Up2d => (conv2d(vb.pp("resample").pp(1), dim, up_out, 3, 1, 1)?, None),
            Mode::Up3d => (
                conv2d(vb.pp("resample").pp(1), dim, up_out, 3, 1, 1)?,
                Some(CausalConv::new(vb.pp("time_conv"), dim, 2 * dim, (3, 1), 1, (1, 0))?),
            ),
            Mode::Down2d => (conv2d(vb.pp("resample").pp(1), dim, dim, 3, 0, 2)?, None),
            Mode::Down3d => (
                conv2d(vb.pp("resample").pp(1), dim, dim, 3, 0, 2)?,
                Some(CausalConv::new(vb.pp("time_conv"), dim, dim, (3, 1), 2, (0, 0))?),
            ),
        };
        Ok(Self { mode, conv, time_conv })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let mut x = x.clone();
        if self.mode == Mode::Up3d {
            let tc = self.time_conv.as_ref().expect("up3d has a time conv");
            let idx = cache.next();
            match cache.take(idx) {
                // First chunk: frames pass without the temporal doubling.
                Slot::Empty => cache.slots[idx] = Slot::Rep,
                prev => {
                    let mut keep = last_frames(&x, CACHE_T)?;
                    if frames(&keep)? < CACHE_T {
                        let before = match &prev {
                            Slot::Frames(p) => last_frames(p, 1)?,
                            _ => keep.zeros_like()?,
                        };
                        keep = Tensor::cat(&[&before, &keep], 2)?;
                    }
                    let y = match &prev {
                        Slot::Frames(p) => tc.forward(&x, Some(p))?,
                        _ => tc.forward(&x, None)?,
                    };
                    cache.slots[idx] = Slot::Frames(keep);
                    // Channels [2, C]: the first half becomes the earlier of each frame pair.
                    x = y.reshape((b, 2, c, t, h, w))?.permute(vec![0, 2, 3, 1, 4, 5])?.reshape((b, c, 2 * t, h, w))?;
                }
            }
        }
        let nb = x.dim(0)?;
        let f = to_frames(&x)?;
        let f = match self.mode {
            Mode::Up2d | Mode::Up3d => {
                let (_, _, fh, fw) = f.dims4()?;
                // Nearest-exact at an integer factor of 2 is plain nearest.
                self.conv.forward(&f.upsample_nearest2d(2 * fh, 2 * fw)?)?
            }
            Mode::Down2d | Mode::Down3d => self.conv.forward(&f.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?,
        };
        let mut x = from_frames(&f, nb)?;
        if self.mode == Mode::Down3d {
            let tc = self.time_conv.as_ref().expect("down3d has a time conv");
            let idx = cache.next();
            match cache.take(idx) {
                Slot::Frames(p) => {
                    let keep = last_frames(&x, 1)?;
                    x = tc.forward(&Tensor::cat(&[&last_frames(&p, 1)?, &x], 2)?, None)?;
                    cache.slots[idx] = Slot::Frames(keep);
                }
                _ => cache.slots[idx] = Slot::Frames(x.copy()?),
            }
        }
        Ok(x)
    }
}

/// Wan2.2's parameter-free shortcut of residual down blocks: average groups of space-time
/// neighbours into channels.
#[derive(Debug, Clone)]
struct AvgDown {
    cout: usize,
    ft: usize,
    fs: usize,
}

impl AvgDown {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ft, fs) = (self.ft, self.fs);
        let pad_t = (ft - frames(x)? % ft) % ft;
        let x = if pad_t > 0 { x.pad_with_zeros(2, pad_t, 0)? } else { x.clone() };
        let (b, c, t, h, w) = x.dims5()?;
        let (t2, h2, w2) = (t / ft, h / fs, w / fs);
        let factor = ft * fs * fs;
        let x = x.reshape(vec![b, c, t2, ft, h2, fs, w2, fs])?.permute(vec![0, 1, 3, 5, 7, 2, 4, 6])?.reshape((
            b,
            c * factor,
            t2,
            h2,
            w2,
        ))?;
        let group = c * factor / self.cout;
        x.reshape(vec![b, self.cout, group, t2, h2, w2])?.mean(2)
    }
}

/// Wan2.2's parameter-free shortcut of residual up blocks: repeat channels into space-time.
#[derive(Debug, Clone)]
struct DupUp {
    cin: usize,
    cout: usize,
    ft: usize,
    fs: usize,
}

impl DupUp {
    fn forward(&self, x: &Tensor, first_chunk: bool) -> Result<Tensor> {
        let (ft, fs) = (self.ft, self.fs);
        let (b, c, t, h, w) = x.dims5()?;
        let repeats = self.cout * ft * fs * fs / self.cin;
        let x = x.unsqueeze(2)?.broadcast_as(vec![b, c, repeats, t, h, w])?.reshape(vec![b, c * repeats, t, h, w])?;
        let x = x
            .reshape(vec![b, self.cout, ft, fs, fs, t, h, w])?
            .permute(vec![0, 1, 5, 2, 6, 3, 7, 4])?
            .reshape((b, self.cout, t * ft, h * fs, w * fs))?;
        if first_chunk {
            let n = frames(&x)?;
            return x.narrow(2, ft - 1, n - (ft - 1));
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            res0: ResidualBlock::new(vb.pp("resnets").pp(0), dim, dim)?,
            attn: AttentionBlock::new(vb.pp("attentions").pp(0), dim)?,
            res1: ResidualBlock::new(vb.pp("resnets").pp(1), dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

#[derive(Debug, Clone)]
enum EncStage {
    Res(ResidualBlock),
    Attn(AttentionBlock),
    Resample(Resample),
    /// Wan2.2: residual blocks + optional downsampler, plus the averaging shortcut.
    ResidualDown {
        resnets: Vec<ResidualBlock>,
        down: Option<Resample>,
        avg: AvgDown,
    },
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: CausalConv,
    stages: Vec<EncStage>,
    mid: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let dim = cfg.base_dim;
        let mut dims = vec![dim];
        dims.extend(cfg.dim_mult.iter().map(|m| dim * m));
        let n = cfg.dim_mult.len();
        let conv_in = CausalConv::k3(vb.pp("conv_in"), cfg.in_channels, dims[0])?;
        let db = vb.pp("down_blocks");
        let mut stages = Vec::new();
        let mut scale = 1.0;
        for i in 0..n {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            let last = i == n - 1;
            if cfg.is_residual {
                let temporal = !last && cfg.temperal_downsample[i];
                let b = db.pp(i);
                let mut resnets = Vec::new();
                for j in 0..cfg.num_res_blocks {
                    resnets.push(ResidualBlock::new(b.pp("resnets").pp(j), cin, cout)?);
                    cin = cout;
                }
                let down = if last {
                    None
                } else {
                    let mode = if temporal { Mode::Down3d } else { Mode::Down2d };
                    Some(Resample::new(b.pp("downsampler"), cout, mode, cout)?)
                };
                let avg = AvgDown { cout, ft: if temporal { 2 } else { 1 }, fs: if last { 1 } else { 2 } };
                stages.push(EncStage::ResidualDown { resnets, down, avg });
            } else {
                for _ in 0..cfg.num_res_blocks {
                    stages.push(EncStage::Res(ResidualBlock::new(db.pp(stages.len()), cin, cout)?));
                    if cfg.attn_scales.contains(&scale) {
                        stages.push(EncStage::Attn(AttentionBlock::new(db.pp(stages.len()), cout)?));
                    }
                    cin = cout;
                }
                if !last {
                    let mode = if cfg.temperal_downsample[i] { Mode::Down3d } else { Mode::Down2d };
                    stages.push(EncStage::Resample(Resample::new(db.pp(stages.len()), cout, mode, cout)?));
                    scale /= 2.0;
                }
            }
        }
        let out = dims[n];
        Ok(Self {
            conv_in,
            stages,
            mid: MidBlock::new(vb.pp("mid_block"), out)?,
            norm_out: RmsNorm::new(vb.pp("norm_out"), out, false)?,
            conv_out: CausalConv::k3(vb.pp("conv_out"), out, 2 * cfg.z_dim)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut x = self.conv_in.cached(x, cache)?;
        for s in &self.stages {
            x = match s {
                EncStage::Res(r) => r.forward(&x, cache)?,
                EncStage::Attn(a) => a.forward(&x)?,
                EncStage::Resample(r) => r.forward(&x, cache)?,
                EncStage::ResidualDown { resnets, down, avg } => {
                    let shortcut = avg.forward(&x)?;
                    let mut y = x;
                    for r in resnets {
                        y = r.forward(&y, cache)?;
                    }
                    if let Some(d) = down {
                        y = d.forward(&y, cache)?;
                    }
                    (y + shortcut)?
                }
            };
        }
        let x = self.mid.forward(&x, cache)?;
        self.conv_out.cached(&self.norm_out.forward_silu(&x)?, cache)
    }
}

#[derive(Debug, Clone)]
struct UpStage {
    resnets: Vec<ResidualBlock>,
    up: Option<Resample>,
    /// Wan2.2's duplicating shortcut.
    dup: Option<DupUp>,
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: CausalConv,
    mid: MidBlock,
    stages: Vec<UpStage>,
    norm_out: RmsNorm,
    conv_out: CausalConv,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let dim = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
        let n = cfg.dim_mult.len();
        let mut dims = vec![dim * cfg.dim_mult[n - 1]];
        dims.extend(cfg.dim_mult.iter().rev().map(|m| dim * m));
        let temperal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let ub = vb.pp("up_blocks");
        let mut stages = Vec::new();
        for i in 0..n {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            if i > 0 && !cfg.is_residual {
                // Wan2.1's upsamplers halve the channels.
                cin /= 2;
            }
            let up_flag = i != n - 1;
            let temporal = up_flag && temperal_up[i];
            let b = ub.pp(i);
            let mut resnets = Vec::new();
            let mut c = cin;
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::new(b.pp("resnets").pp(j), c, cout)?);
                c = cout;
            }
            let mode = if temporal { Mode::Up3d } else { Mode::Up2d };
            let (up, dup) = match (up_flag, cfg.is_residual) {
                (false, _) => (None, None),
                (true, true) => (
                    Some(Resample::new(b.pp("upsampler"), cout, mode, cout)?),
                    Some(DupUp { cin, cout, ft: if temporal { 2 } else { 1 }, fs: 2 }),
                ),
                (true, false) => (Some(Resample::new(b.pp("upsamplers").pp(0), cout, mode, cout / 2)?), None),
            };
            stages.push(UpStage { resnets, up, dup });
        }
        let out = dims[n];
        Ok(Self {
            conv_in: CausalConv::k3(vb.pp("conv_in"), cfg.z_dim, dims[0])?,
            mid: MidBlock::new(vb.pp("mid_block"), dims[0])?,
            stages,
            norm_out: RmsNorm::new(vb.pp("norm_out"), out, false)?,
            conv_out: CausalConv::k3(vb.pp("conv_out"), out, cfg.out_channels)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache, first_chunk: bool) -> Result<Tensor> {
        let x = self.conv_in.cached(x, cache)?;
        let mut x = self.mid.forward(&x, cache)?;
        for s in &self.stages {
            let input = x.clone();
            for r in &s.resnets {
                x = r.forward(&x, cache)?;
            }
            if let Some(u) = &s.up {
                x = u.forward(&x, cache)?;
            }
            if let Some(d) = &s.dup {
                x = (x + d.forward(&input, first_chunk)?)?;
            }
        }
        self.conv_out.cached(&self.norm_out.forward_silu(&x)?, cache)
    }
}

/// `[B, C, F, H, W]` -> `[B, C*p*p, F, H/p, W/p]`, channel = c*p*p + pw*p + ph.
fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, c, f, h, w) = x.dims5()?;
    x.reshape(vec![b, c, f, h / p, p, w / p, p])?.permute(vec![0, 1, 6, 4, 2, 3, 5])?.reshape((
        b,
        c * p * p,
        f,
        h / p,
        w / p,
    ))
}

fn unpatchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, cp, f, h, w) = x.dims5()?;
    let c = cp / (p * p);
    x.reshape(vec![b, c, p, p, f, h, w])?.permute(vec![0, 1, 4, 5, 3, 6, 2])?.reshape((b, c, f, h * p, w * p))
}

pub struct WanVae {
    cfg: WanVaeConfig,
    encoder: Option<Encoder>,
    quant_conv: Option<CausalConv>,
    decoder: Decoder,
    post_quant_conv: CausalConv,
}

impl WanVae {
    /// Loads the decoder, and the encoder when `with_encoder`.
    pub fn new(cfg: &WanVaeConfig, vb: VarBuilder, with_encoder: bool) -> Result<Self> {
        if cfg.temperal_downsample.len() + 1 != cfg.dim_mult.len() {
            candle_core::bail!(
                "Wan VAE config: temperal_downsample has {} entries, dim_mult {} (expected one fewer)",
                cfg.temperal_downsample.len(),
                cfg.dim_mult.len()
            );
        }
        let (encoder, quant_conv) = if with_encoder {
            (
                Some(Encoder::new(vb.pp("encoder"), cfg)?),
                Some(CausalConv::k1(vb.pp("quant_conv"), 2 * cfg.z_dim, 2 * cfg.z_dim)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            encoder,
            quant_conv,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            post_quant_conv: CausalConv::k1(vb.pp("post_quant_conv"), cfg.z_dim, cfg.z_dim)?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &WanVaeConfig {
        &self.cfg
    }

    /// Latents `[B, z, F, h, w]` (already de-normalized) -> video `[B, C, 1 + 4(F-1), H, W]` in
    /// [-1, 1]. Decodes one latent frame at a time; `on_chunk(i, n)` after each.
    pub fn decode(&self, z: &Tensor, mut on_chunk: impl FnMut(usize, usize)) -> Result<Tensor> {
        let x = self.post_quant_conv.forward(z, None)?;
        let n = frames(&x)?;
        let mut cache = Cache::default();
        let mut outs = Vec::with_capacity(n);
        for i in 0..n {
            cache.idx = 0;
            outs.push(self.decoder.forward(&x.narrow(2, i, 1)?, &mut cache, i == 0)?);
            on_chunk(i + 1, n);
        }
        let out = Tensor::cat(&outs, 2)?;
        unpatchify(&out, self.cfg.patch())?.clamp(-1f32, 1f32)
    }

    /// Video `[B, C, F, H, W]` in [-1, 1] (F = 1 + 4k) -> posterior mean `[B, z, 1 + k, h, w]`.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        let (Some(enc), Some(qc)) = (&self.encoder, &self.quant_conv) else {
            candle_core::bail!("this Wan VAE was loaded without its encoder");
        };
        let x = patchify(video, self.cfg.patch())?;
        let f = frames(&x)?;
        if f == 0 || (f - 1) % ENCODE_CHUNK != 0 {
            candle_core::bail!("the Wan VAE encodes 1 + {ENCODE_CHUNK}k frames, found {f}");
        }
        let mut cache = Cache::default();
        let mut outs = Vec::new();
        let mut start = 0;
        while start < f {
            let len = if start == 0 { 1 } else { ENCODE_CHUNK };
            cache.idx = 0;
            outs.push(enc.forward(&x.narrow(2, start, len)?, &mut cache)?);
            start += len;
        }
        let moments = qc.forward(&Tensor::cat(&outs, 2)?, None)?;
        moments.narrow(1, 0, self.cfg.z_dim)
    }

    /// Pipeline latents -> VAE input: `z * std + mean` per channel.
    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        let c = self.cfg.z_dim;
        if self.cfg.latents_mean.len() != c || self.cfg.latents_std.len() != c {
            candle_core::bail!("Wan VAE config: latents_mean/std need {c} entries");
        }
        let shape = (1, c, 1, 1, 1);
        let mean = Tensor::new(self.cfg.latents_mean.iter().map(|v| *v as f32).collect::<Vec<_>>(), z.device())?
            .reshape(shape)?;
        let std = Tensor::new(self.cfg.latents_std.iter().map(|v| *v as f32).collect::<Vec<_>>(), z.device())?
            .reshape(shape)?;
        z.to_dtype(DType::F32)?.broadcast_mul(&std)?.broadcast_add(&mean)
    }
}
