//! 3D convolution for the causal video VAEs. Candle has no conv3d: a `kt x kh x kw` kernel is the
//! sum over `dt` of 2D convolutions of the time-shifted frames with the kernel's slice `dt`, each
//! run as one batched Candle conv2d (frames folded into the batch). The same code runs on the
//! CPU (the reference) and on CUDA (cuDNN's conv2d when built with the `cudnn` feature).

use candle_core::{Module, Result, Tensor};

/// Weights of a 3D convolution: `weight` `[O, C, kt, kh, kw]`, optional `bias` `[O]`.
#[derive(Debug, Clone)]
pub struct Conv3d {
    /// Per temporal tap, `[O, C, kh, kw]`, contiguous.
    taps: Vec<Tensor>,
    bias: Option<Tensor>,
    /// (time, space) stride.
    stride: (usize, usize),
    /// Symmetric spatial zero padding.
    pad_hw: usize,
}

impl Conv3d {
    pub fn new(weight: &Tensor, bias: Option<Tensor>, stride: (usize, usize), pad_hw: usize) -> Result<Self> {
        let (_, _, kt, _, _) = weight.dims5()?;
        let taps = (0..kt).map(|t| weight.narrow(2, t, 1)?.squeeze(2)?.contiguous()).collect::<Result<_>>()?;
        Ok(Self { taps, bias, stride, pad_hw })
    }

    pub fn kernel_t(&self) -> usize {
        self.taps.len()
    }

    /// `x` `[B, C, T, H, W]`, already padded in time -> `[B, O, T', H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let kt = self.taps.len();
        let (st, ss) = self.stride;
        if t < kt {
            candle_core::bail!("conv3d: {t} frames for a temporal kernel of {kt}");
        }
        let t_out = (t - kt) / st + 1;
        // [B, T, C, H, W] so that frame selections fold into the batch without copies of channels.
        let xt = x.permute((0, 2, 1, 3, 4))?.contiguous()?;
        let mut acc: Option<Tensor> = None;
        for (dt, tap) in self.taps.iter().enumerate() {
            let frames = if st == 1 {
                xt.narrow(1, dt, t_out)?
            } else {
                let idx: Vec<u32> = (0..t_out).map(|j| (dt + st * j) as u32).collect();
                xt.index_select(&Tensor::new(idx, x.device())?, 1)?
            };
            let frames = frames.reshape((b * t_out, c, h, w))?;
            let y = frames.conv2d(tap, self.pad_hw, ss, 1, 1)?;
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
        let y = acc.expect("kt >= 1");
        let (_, o, ho, wo) = y.dims4()?;
        let y = y.reshape((b, t_out, o, ho, wo))?.permute((0, 2, 1, 3, 4))?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Module for Conv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Conv3d::forward(self, x)
    }
}

/// Direct (loop) 3D convolution on the CPU in f64, for tests: `x` `[B, C, T, H, W]`, `w`
/// `[O, C, kt, kh, kw]`, strides (time, space), symmetric spatial padding.
pub fn conv3d_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: (usize, usize),
    pad: usize,
) -> Result<Tensor> {
    let (b, c, t, h, wd) = x.dims5()?;
    let (o, _, kt, kh, kw) = w.dims5()?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let ws: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let bs: Vec<f32> = match bias {
        Some(b) => b.to_vec1()?,
        None => vec![0.0; o],
    };
    let (st, ss) = stride;
    let to = (t - kt) / st + 1;
    let ho = (h + 2 * pad - kh) / ss + 1;
    let wo = (wd + 2 * pad - kw) / ss + 1;
    let mut out = vec![0f32; b * o * to * ho * wo];
    for bi in 0..b {
        for oi in 0..o {
            for ti in 0..to {
                for yi in 0..ho {
                    for xi in 0..wo {
                        let mut acc = bs[oi] as f64;
                        for ci in 0..c {
                            for dt in 0..kt {
                                for dy in 0..kh {
                                    for dx in 0..kw {
                                        let (ty, yy, xx) = (
                                            ti * st + dt,
                                            (yi * ss + dy) as isize - pad as isize,
                                            (xi * ss + dx) as isize - pad as isize,
                                        );
                                        if yy < 0 || xx < 0 || yy >= h as isize || xx >= wd as isize {
                                            continue;
                                        }
                                        let xv = xs[(((bi * c + ci) * t + ty) * h + yy as usize) * wd + xx as usize];
                                        let wv = ws[(((oi * c + ci) * kt + dt) * kh + dy) * kw + dx];
                                        acc += xv as f64 * wv as f64;
                                    }
                                }
                            }
                        }
                        out[(((bi * o + oi) * to + ti) * ho + yi) * wo + xi] = acc as f32;
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (b, o, to, ho, wo), x.device())
}
