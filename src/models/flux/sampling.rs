//! FLUX.1 sampling: latent packing, position ids, the flow-matching schedule and the Euler step.
//! Scheduler numerics follow diffusers' `FlowMatchEulerDiscreteScheduler` (f32 sigmas).

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

/// `FlowMatchEulerDiscreteScheduler`'s `scheduler_config.json`, the fields FLUX uses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
}

impl Default for SchedulerConfig {
    /// FLUX.1-dev.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        Ok(crate::error::read_json_config(path, "scheduler_config.json")?)
    }

    /// The resolution-dependent shift `mu`: linear in the image token count between
    /// (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), extrapolated outside.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len) as f64;
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    /// `num_steps + 1` sigmas (the last 0) and `num_steps` timesteps (`sigma * 1000`), in f32.
    /// `mu` applies the exponential time shift (FLUX.1-dev); `None` leaves the schedule unshifted
    /// (schnell).
    pub fn schedule(&self, num_steps: usize, mu: Option<f64>) -> (Vec<f32>, Vec<f32>) {
        let n = num_steps.max(1);
        // np.linspace(1, 1/n, n) in f64, then cast to f32 as the scheduler does.
        let mut sigmas: Vec<f32> = (0..n)
            .map(|i| if n == 1 { 1.0 } else { 1.0 + (1.0 / n as f64 - 1.0) * i as f64 / (n - 1) as f64 } as f32)
            .collect();
        match mu {
            Some(mu) if self.use_dynamic_shifting => {
                let e = mu.exp() as f32;
                for s in &mut sigmas {
                    *s = e / (e + (1.0 / *s - 1.0));
                }
            }
            _ if !self.use_dynamic_shifting && self.shift != 1.0 => {
                let shift = self.shift as f32;
                for s in &mut sigmas {
                    *s = shift * *s / (1.0 + (shift - 1.0) * *s);
                }
            }
            _ => {}
        }
        let timesteps = sigmas.iter().map(|s| s * self.num_train_timesteps as f32).collect();
        sigmas.push(0.0);
        (sigmas, timesteps)
    }
}

/// Euler step of the flow ODE: `x + (sigma_next - sigma) * v`, in f32.
pub fn euler_step(x: &Tensor, v: &Tensor, sigma: f32, sigma_next: f32) -> Result<Tensor> {
    x.to_dtype(DType::F32)? + (v.to_dtype(DType::F32)? * (sigma_next - sigma) as f64)?
}

/// `[B, C, H, W]` -> `[B, (H/2)(W/2), 4C]`, channel index `c*4 + ph*2 + pw`.
pub fn pack_latents(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack_latents`] for latent size `h` x `w`.
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = x.dims3()?;
    let c = c4 / 4;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))
}

/// Position ids `(0, row, col)` of the packed image tokens, `[(h/2)(w/2), 3]`.
pub fn image_ids(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let (h2, w2) = (h / 2, w / 2);
    let mut v = Vec::with_capacity(h2 * w2 * 3);
    for r in 0..h2 {
        for c in 0..w2 {
            v.extend_from_slice(&[0f32, r as f32, c as f32]);
        }
    }
    Tensor::from_vec(v, (h2 * w2, 3), device)
}

/// Initial noise `[B, C, H, W]` drawn on the CPU from `seed` (identical on every device).
pub fn initial_noise(seed: u64, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
    let (b, c, h, w) = shape;
    let mut rng = crate::rng::Rng::new(seed);
    let v: Vec<f32> = (0..b * c * h * w).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, (b, c, h, w), &Device::Cpu)?.to_device(device)
}
