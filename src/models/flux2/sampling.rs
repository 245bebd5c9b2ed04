//! FLUX.2 sampling: the empirical schedule shift `mu`, 2x2 patchified latents as row-major
//! tokens, and 4-axis position ids. The sigma schedule and Euler step are FLUX.1's
//! (`FlowMatchEulerDiscreteScheduler`, exponential time shift in f32).

use candle_core::{DType, Device, Result, Tensor};

/// Fitted constants of BFL's empirical `mu` (two lines in the image token count S, for 10 and
/// 200 steps, interpolated in the step count N).
const MU_A1: f64 = 8.73809524e-05;
const MU_B1: f64 = 1.89833333;
const MU_A2: f64 = 0.00016927;
const MU_B2: f64 = 0.45666666;
/// Above this many image tokens the 200-step line is used as is.
const MU_LARGE_IMAGE_TOKENS: usize = 4300;

/// The schedule shift for `image_tokens` packed tokens and `steps` steps.
pub fn empirical_mu(image_tokens: usize, steps: usize) -> f64 {
    let s = image_tokens as f64;
    let m200 = MU_A2 * s + MU_B2;
    if image_tokens > MU_LARGE_IMAGE_TOKENS {
        return m200;
    }
    let m10 = MU_A1 * s + MU_B1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * steps as f64 + b
}

/// `[B, C, H, W]` -> `[B, 4C, H/2, W/2]`, channel `c*4 + dy*2 + dx`.
pub fn patchify(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 1, 3, 5, 2, 4))?.reshape((b, c * 4, h / 2, w / 2))
}

/// Inverse of [`patchify`].
pub fn unpatchify(x: &Tensor) -> Result<Tensor> {
    let (b, c4, h, w) = x.dims4()?;
    let c = c4 / 4;
    x.reshape((b, c, 2, 2, h, w))?.permute((0, 1, 4, 2, 5, 3))?.reshape((b, c, h * 2, w * 2))
}

/// `[B, C, h, w]` -> row-major tokens `[B, h*w, C]`.
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// Inverse of [`pack`] for a latent grid of `h` x `w`.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
}

/// Ids `(t, row, col, l)` of the image tokens, `(0, row, col, 0)` row-major: `[h*w, 4]`.
pub fn image_ids(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..h * w).flat_map(|i| [0.0, (i / w) as f32, (i % w) as f32, 0.0]).collect();
    Tensor::from_vec(v, (h * w, 4), device)
}

/// Ids `(0, 0, 0, l)` of `len` text tokens: `[len, 4]`.
pub fn text_ids(len: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..len).flat_map(|l| [0.0, 0.0, 0.0, l as f32]).collect();
    Tensor::from_vec(v, (len, 4), device)
}

/// The transformer's timestep input: the scheduler's `1000 sigma` divided back in f32, as the
/// reference pipeline does (it may differ from sigma by an ulp).
pub fn model_timestep(timestep: f32, batch: usize, device: &Device) -> Result<Tensor> {
    Tensor::full(timestep / 1000.0, batch, device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mu_matches_the_published_value() {
        // Public fixture: S = 12, N = 3, mu = 1.95246 (to the 5 digits printed).
        assert!((empirical_mu(12, 3) - 1.95246).abs() < 1e-5);
        // Above the threshold the 200-step line alone.
        assert_eq!(empirical_mu(4096 + 300, 28), MU_A2 * 4396.0 + MU_B2);
    }

    #[test]
    fn patchify_round_trips_and_orders_channels() {
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 6.0, &Device::Cpu).unwrap().reshape((1, 2, 4, 6)).unwrap();
        let p = patchify(&x).unwrap();
        assert_eq!(p.dims(), &[1, 8, 2, 3]);
        // Channel c*4 + dy*2 + dx at (i, j) is x[c, 2i+dy, 2j+dx].
        let v: Vec<Vec<Vec<f32>>> = p.squeeze(0).unwrap().to_vec3().unwrap();
        let xv: Vec<Vec<Vec<f32>>> = x.squeeze(0).unwrap().to_vec3().unwrap();
        for c in 0..2 {
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                assert_eq!(v[c * 4 + dy * 2 + dx][1][2], xv[c][2 + dy][4 + dx]);
            }
        }
        let back: Vec<f32> = unpatchify(&p).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(back, x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let t = pack(&p).unwrap();
        assert_eq!(t.dims(), &[1, 6, 8]);
        let u: Vec<f32> = unpack(&t, 2, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(u, p.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
