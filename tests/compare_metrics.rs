//! PSNR and SSIM against scikit-image 0.26 on fixture images (values printed by
//! scripts/metrics_reference.py on the committed fixtures; the images are read through
//! CANDIFF_FIXTURES like every test, but these expected values belong to the committed set).

mod common;

use candiff::compare::metrics::{psnr, ssim, Image};

/// scikit-image's `peak_signal_noise_ratio` / `structural_similarity(gaussian_weights=True,
/// sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)` of these pairs.
const FLUX_VS_WAN0: (f64, f64) = (16.9408241011, 0.0943542854);
const WAN0_VS_WAN4: (f64, f64) = (16.1824934852, 0.0681811993);
/// f32 images, f64 accumulation in both implementations.
const TOL: f64 = 1e-6;

#[test]
fn psnr_and_ssim_match_scikit_image() {
    if std::env::var("CANDIFF_FIXTURES").is_ok() {
        eprintln!("expected values belong to the committed fixtures; checking identities only");
    }
    let flux = common::f32s(&common::open("flux1_tiny/pipeline.safetensors"), "image");
    let frames = common::f32s(&common::open("wan22_tiny/pipeline_a14b.safetensors"), "frames");
    let shape = common::shape(&common::open("wan22_tiny/pipeline_a14b.safetensors"), "frames");
    let (h, w) = (shape[1], shape[2]);
    let n = h * w * 3;
    fn img(px: &[f32], h: usize, w: usize) -> Image<'_> {
        Image { h, w, c: 3, px: &px[..h * w * 3] }
    }
    let (f0, f4) = (&frames[..n], &frames[4 * n..5 * n]);
    assert_eq!(psnr(&img(f0, h, w), &img(f0, h, w)), f64::INFINITY);
    assert!((ssim(&img(f0, h, w), &img(f0, h, w)) - 1.0).abs() < 1e-12);
    if std::env::var("CANDIFF_FIXTURES").is_err() {
        for ((a, b), (p, s)) in [((&flux[..], f0), FLUX_VS_WAN0), ((f0, f4), WAN0_VS_WAN4)] {
            let (gp, gs) = (psnr(&img(a, h, w), &img(b, h, w)), ssim(&img(a, h, w), &img(b, h, w)));
            assert!((gp - p).abs() < TOL && (gs - s).abs() < TOL, "psnr {gp} vs {p}, ssim {gs} vs {s}");
        }
    }
}
