//! LPIPS and CLIP against the reference packages (`lpips` 0.1.4, transformers' CLIPModel and
//! CLIPImageProcessor) on tiny random models: fixtures from scripts/metrics_learned_reference.py.

mod common;

use candiff::compare::learned::{clip_score, cosine, resize_bicubic, Clip, Lpips, Rgb8};
use candle_core::Device;

/// f32 convolutions / attention against PyTorch's, summed over a handful of layers.
const LPIPS_TOL: f64 = 1e-5;
const EMBED_TOL: f32 = 1e-4;
/// One 8-bit level in normalized CLIP pixels (the smallest channel std, 0.2613).
const ONE_LEVEL: f32 = 1.0 / 255.0 / 0.2613 + 1e-5;

fn u8s(f: &candiff::safetensors::MappedFile, name: &str) -> (Vec<u8>, Vec<usize>) {
    (common::raw(f, name), common::shape(f, name))
}

#[test]
fn lpips_matches_the_lpips_package() {
    let f = common::open("metrics/lpips.safetensors");
    let net = Lpips::load(&common::fixtures().join("metrics/lpips_alex_random.safetensors"), &Device::Cpu).unwrap();
    let want = common::f32s(&f, "distance");
    let (a, s) = u8s(&f, "a");
    let (b, _) = u8s(&f, "b");
    let (c, _) = u8s(&f, "c");
    fn img<'a>(px: &'a [u8], s: &[usize]) -> Rgb8<'a> {
        Rgb8 { width: s[1], height: s[0], px }
    }
    let got = [
        net.distance(&img(&a, &s), &img(&b, &s)).unwrap(),
        net.distance(&img(&a, &s), &img(&c, &s)).unwrap(),
        net.distance(&img(&a, &s), &img(&a, &s)).unwrap(),
    ];
    for (g, w) in got.iter().zip(&want) {
        assert!((g - *w as f64).abs() < LPIPS_TOL, "lpips {got:?} vs {want:?}");
    }
    assert_eq!(got[2], 0.0, "identical images");
    assert!(got[0] < got[1], "a small perturbation is closer than another image");
}

#[test]
fn clip_preprocessing_embeddings_and_scores_match_transformers() {
    let f = common::open("metrics/clip.safetensors");
    let clip = Clip::load(&common::fixtures().join("metrics/clip_tiny"), &Device::Cpu).unwrap();
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("metrics/clip_prompts.json")).unwrap())
            .unwrap();
    // `_pil`: the processor's steps with PIL's resize (OpenAI's CLIP, transformers < 5); without:
    // transformers 5's processor, which resizes with torchvision (one 8-bit level apart).
    let (pix, pix_tv) = (common::f32s(&f, "pixel_values_pil"), common::f32s(&f, "pixel_values"));
    let (img_want, txt_want) = (common::f32s(&f, "image_embeds_pil"), common::f32s(&f, "text_embeds"));
    let p = img_want.len() / 3;
    let (scores, scores_tv) = (common::f32s(&f, "clip_score_pil"), common::f32s(&f, "clip_score"));
    let cos_want = common::f32s(&f, "image_cosine");
    let mut embeds = Vec::new();
    for k in 0..3 {
        let (px, s) = u8s(&f, &format!("image_{k}"));
        let img = Rgb8 { width: s[1], height: s[0], px: &px };
        // The processor's pixels: PIL's bicubic resize and crop reproduced to the 8-bit level.
        let got: Vec<f32> = clip.pixel_values(&img).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let n = got.len();
        let d = common::max_diff(&got, &pix[k * n..(k + 1) * n]);
        assert!(d < 1e-5, "image {k}: pixel values differ from PIL's path by {d}");
        let d = common::max_diff(&got, &pix_tv[k * n..(k + 1) * n]);
        assert!(d < ONE_LEVEL, "image {k}: pixel values differ from transformers 5's by {d}");
        let ie = clip.image_embeds(&img).unwrap();
        let d = common::max_diff(&ie.flatten_all().unwrap().to_vec1().unwrap(), &img_want[k * p..(k + 1) * p]);
        assert!(d < EMBED_TOL, "image {k}: embedding differs by {d}");
        let ids: Vec<i64> = common::raw(&f, &format!("ids_{k}"))
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let got_ids: Vec<i64> = clip.token_ids(&prompts[k]).unwrap().iter().map(|i| *i as i64).collect();
        assert_eq!(got_ids, ids, "tokens of {:?}", prompts[k]);
        let te = clip.text_embeds(&prompts[k]).unwrap();
        let d = common::max_diff(&te.flatten_all().unwrap().to_vec1().unwrap(), &txt_want[k * p..(k + 1) * p]);
        assert!(d < EMBED_TOL, "text {k}: embedding differs by {d}");
        let sc = clip_score(&ie, &te).unwrap();
        assert!((sc - scores[k] as f64).abs() < 1e-3, "clip score {sc} vs {}", scores[k]);
        assert!((sc - scores_tv[k] as f64).abs() < 0.5, "clip score {sc} vs transformers 5's {}", scores_tv[k]);
        embeds.push(ie);
    }
    for i in 0..3 {
        for j in 0..3 {
            let c = cosine(&embeds[i], &embeds[j]).unwrap();
            let (a, b) = (&img_want[i * p..(i + 1) * p], &img_want[j * p..(j + 1) * p]);
            let want = candiff::compare::metrics::cosine(a, b);
            assert!((c - want).abs() < 1e-5, "cosine {i},{j}: {c} vs {want}");
            // transformers 5's (torchvision-resized) embeddings: within the one-level difference.
            assert!((c - cos_want[i * 3 + j] as f64).abs() < 0.05, "cosine {i},{j}: {c}");
        }
    }
}

#[test]
fn bicubic_resize_keeps_constant_images_and_sizes() {
    // A constant image stays constant at any scale (the coefficients sum to one).
    let px = vec![137u8; 37 * 23 * 3];
    let img = Rgb8 { width: 37, height: 23, px: &px };
    for (w, h) in [(10, 7), (80, 50), (37, 9)] {
        let out = resize_bicubic(&img, w, h);
        assert_eq!(out.len(), w * h * 3);
        assert!(out.iter().all(|v| *v == 137), "{w}x{h}");
    }
}
