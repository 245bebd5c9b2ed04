//! Image quality metrics against a reference, on `[H, W, C]` images with values in [0, 1]
//! (data range 1): PSNR, SSIM (Wang et al. 2004, Gaussian-weighted as scikit-image's
//! `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`), and
//! cosine similarity of latents.

/// SSIM's constants for data range 1: `(K1 L)^2`, `(K2 L)^2`.
const SSIM_C1: f64 = 0.01 * 0.01;
const SSIM_C2: f64 = 0.03 * 0.03;
/// Gaussian window: sigma 1.5, truncated at 3.5 sigma (11 taps), as scikit-image.
const SSIM_SIGMA: f64 = 1.5;
const SSIM_TRUNCATE: f64 = 3.5;

/// An image `[h, w, c]`, row-major, values in [0, 1].
#[derive(Debug, Clone)]
pub struct Image<'a> {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub px: &'a [f32],
}

/// Peak signal-to-noise ratio in dB; `f64::INFINITY` for identical images.
pub fn psnr(a: &Image, b: &Image) -> f64 {
    assert_eq!(a.px.len(), b.px.len(), "psnr: image sizes differ");
    let mse = a.px.iter().zip(b.px).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.px.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}

fn gaussian_taps() -> Vec<f64> {
    let r = (SSIM_TRUNCATE * SSIM_SIGMA + 0.5) as isize;
    let t: Vec<f64> = (-r..=r).map(|x| (-(x * x) as f64 / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp()).collect();
    let s: f64 = t.iter().sum();
    t.into_iter().map(|v| v / s).collect()
}

/// scipy's `reflect` boundary (half-sample symmetric): index -1 -> 0, n -> n-1.
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let mut i = i;
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - i - 1;
        } else {
            return i as usize;
        }
    }
}

/// Separable Gaussian filter of an `h x w` plane.
fn blur(p: &[f64], h: usize, w: usize, taps: &[f64]) -> Vec<f64> {
    let r = (taps.len() / 2) as isize;
    let mut tmp = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            tmp[y * w + x] =
                taps.iter().enumerate().map(|(k, t)| t * p[y * w + reflect(x as isize + k as isize - r, w)]).sum();
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] =
                taps.iter().enumerate().map(|(k, t)| t * tmp[reflect(y as isize + k as isize - r, h) * w + x]).sum();
        }
    }
    out
}

/// Mean SSIM over channels (the border of half a window is left out, as scikit-image does).
pub fn ssim(a: &Image, b: &Image) -> f64 {
    assert_eq!((a.h, a.w, a.c), (b.h, b.w, b.c), "ssim: image sizes differ");
    let (h, w, c) = (a.h, a.w, a.c);
    let taps = gaussian_taps();
    let pad = taps.len() / 2;
    assert!(h > 2 * pad && w > 2 * pad, "ssim needs images larger than {} pixels per side", 2 * pad);
    let mut total = 0.0;
    for ch in 0..c {
        let plane = |im: &Image| -> Vec<f64> { (0..h * w).map(|i| im.px[i * c + ch] as f64).collect() };
        let (x, y) = (plane(a), plane(b));
        let prod = |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(u, v)| u * v).collect() };
        let (ux, uy) = (blur(&x, h, w, &taps), blur(&y, h, w, &taps));
        let (uxx, uyy, uxy) =
            (blur(&prod(&x, &x), h, w, &taps), blur(&prod(&y, &y), h, w, &taps), blur(&prod(&x, &y), h, w, &taps));
        let mut sum = 0.0;
        let mut n = 0usize;
        for yy in pad..h - pad {
            for xx in pad..w - pad {
                let i = yy * w + xx;
                let (vx, vy, vxy) = (uxx[i] - ux[i] * ux[i], uyy[i] - uy[i] * uy[i], uxy[i] - ux[i] * uy[i]);
                let num = (2.0 * ux[i] * uy[i] + SSIM_C1) * (2.0 * vxy + SSIM_C2);
                let den = (ux[i] * ux[i] + uy[i] * uy[i] + SSIM_C1) * (vx + vy + SSIM_C2);
                sum += num / den;
                n += 1;
            }
        }
        total += sum / n as f64;
    }
    total / c as f64
}

/// Cosine similarity of two flattened tensors (1 for identical directions).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return if aa == bb { 1.0 } else { 0.0 };
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Mean and population standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_and_closed_form_cases() {
        let px: Vec<f32> = (0..20 * 24 * 3).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        let a = Image { h: 20, w: 24, c: 3, px: &px };
        assert_eq!(psnr(&a, &a), f64::INFINITY);
        assert!((ssim(&a, &a) - 1.0).abs() < 1e-12);
        // A constant offset d: MSE = d^2.
        let shifted: Vec<f32> = px.iter().map(|v| v + 0.1).collect();
        let b = Image { px: &shifted, ..a.clone() };
        assert!((psnr(&a, &b) - 20.0).abs() < 1e-4, "{}", psnr(&a, &b));
        // Two constant images: SSIM = (2 a b + C1) / (a^2 + b^2 + C1).
        let (ca, cb) = (vec![0.3f32; 20 * 24], vec![0.6f32; 20 * 24]);
        let (ia, ib) = (Image { h: 20, w: 24, c: 1, px: &ca }, Image { h: 20, w: 24, c: 1, px: &cb });
        let want = (2.0 * 0.3f32 as f64 * 0.6f32 as f64 + SSIM_C1)
            / ((0.3f32 as f64).powi(2) + (0.6f32 as f64).powi(2) + SSIM_C1);
        assert!((ssim(&ia, &ib) - want).abs() < 1e-9);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&[1.0, 0.0], &[0.0, 3.0])).abs() < 1e-12);
    }
}
