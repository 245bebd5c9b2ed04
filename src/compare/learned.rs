//! Learned metrics of `candiff compare`: LPIPS (AlexNet, v0.1 linear heads) between a variant's
//! output and the reference's, and CLIP (ViT-L/14 by default) image-text score and image-image
//! cosine similarity. Both run in f32 on the comparison's device.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use candle_transformers::models::clip::{
    text_model::{Activation, ClipTextConfig},
    vision_model::ClipVisionConfig,
    ClipConfig, ClipModel,
};
use serde::Deserialize;

use crate::error::CandiffError;

/// An 8-bit RGB image, rows of `width * 3` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Rgb8<'a> {
    pub width: usize,
    pub height: usize,
    pub px: &'a [u8],
}

/// `[1, 3, H, W]` f32 from an 8-bit image, `v * scale + offset`.
fn to_chw(img: &Rgb8, scale: f64, offset: f64, device: &Device) -> Result<Tensor> {
    let t = Tensor::from_slice(img.px, (img.height, img.width, 3), &Device::Cpu)?;
    (t.to_dtype(DType::F32)?.permute((2, 0, 1))?.unsqueeze(0)? * scale)?.affine(1.0, offset)?.to_device(device)
}

fn weights_of(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: read-only mapping of a weights file that is not modified while in use.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
}

// ---------------------------------------------------------------------------------------------
// LPIPS

/// AlexNet's convolutions as LPIPS taps them: (slice, index in torchvision's `features`,
/// in/out channels, kernel, stride, padding); a 3x3/2 max-pool precedes slices 2 and 3.
const ALEX_TAPS: [(usize, usize, usize, usize, usize, usize, usize); 5] = [
    (1, 0, 3, 64, 11, 4, 2),
    (2, 3, 64, 192, 5, 1, 2),
    (3, 6, 192, 384, 3, 1, 1),
    (4, 8, 384, 256, 3, 1, 1),
    (5, 10, 256, 256, 3, 1, 1),
];
/// LPIPS' guard against dividing by a zero feature norm.
const LPIPS_EPS: f64 = 1e-10;

/// LPIPS with the AlexNet backbone, in the `lpips` package's names (`net.sliceN.I`,
/// `linN.model.1`, `scaling_layer.{shift,scale}`).
pub struct Lpips {
    convs: Vec<Conv2d>,
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
    device: Device,
}

impl Lpips {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let vb = weights_of(path, device)?;
        let mut convs = Vec::new();
        let mut lins = Vec::new();
        for (k, &(slice, idx, cin, cout, kernel, stride, padding)) in ALEX_TAPS.iter().enumerate() {
            let cfg = Conv2dConfig { stride, padding, ..Default::default() };
            convs.push(candle_nn::conv2d(cin, cout, kernel, cfg, vb.pp(format!("net.slice{slice}.{idx}")))?);
            lins.push(vb.get((1, cout, 1, 1), &format!("lin{k}.model.1.weight"))?);
        }
        let shift = vb.get((1, 3, 1, 1), "scaling_layer.shift")?;
        let scale = vb.get((1, 3, 1, 1), "scaling_layer.scale")?;
        Ok(Self { convs, lins, shift, scale, device: device.clone() })
    }

    /// The five tapped ReLU outputs, each unit-normalized over channels.
    fn features(&self, img: &Rgb8) -> Result<Vec<Tensor>> {
        // LPIPS takes [-1, 1] images.
        let x = to_chw(img, 2.0 / 255.0, -1.0, &self.device)?;
        let mut x = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?;
        let mut out = Vec::with_capacity(self.convs.len());
        for (k, conv) in self.convs.iter().enumerate() {
            if k == 1 || k == 2 {
                x = x.max_pool2d_with_stride(3, 2)?;
            }
            x = conv.forward(&x)?.relu()?;
            let norm = (x.sqr()?.sum_keepdim(1)?.sqrt()? + LPIPS_EPS)?;
            out.push(x.broadcast_div(&norm)?);
        }
        Ok(out)
    }

    /// The distance between two images of one size (0 for identical images).
    pub fn distance(&self, a: &Rgb8, b: &Rgb8) -> Result<f64> {
        let (fa, fb) = (self.features(a)?, self.features(b)?);
        let mut total = 0f64;
        for ((a, b), lin) in fa.iter().zip(&fb).zip(&self.lins) {
            // The 1x1 linear head over channels, then the spatial mean.
            let d = (a - b)?.sqr()?.broadcast_mul(lin)?.sum_keepdim(1)?;
            total += d.mean_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(total)
    }
}

// ---------------------------------------------------------------------------------------------
// CLIP

/// The hub repository of the default CLIP model (ViT-L/14, as CLIP scores are usually reported).
pub const DEFAULT_CLIP: &str = "openai/clip-vit-large-patch14";
/// The files a CLIP folder must hold.
pub const CLIP_FILES: [&str; 4] = ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"];
/// torchmetrics' CLIPScore: 100 x the cosine, floored at 0.
const CLIP_SCORE_SCALE: f64 = 100.0;

#[derive(Debug, Deserialize)]
struct HfTextConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
}

#[derive(Debug, Deserialize)]
struct HfVisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    #[serde(default = "three")]
    num_channels: usize,
    #[serde(default = "quick_gelu")]
    hidden_act: String,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}

fn three() -> usize {
    3
}

#[derive(Debug, Deserialize)]
struct HfClipConfig {
    text_config: HfTextConfig,
    vision_config: HfVisionConfig,
    projection_dim: usize,
}

/// `preprocessor_config.json` (CLIPImageProcessor).
#[derive(Debug, Deserialize)]
struct Preprocessor {
    size: ShortestEdge,
    crop_size: CropSize,
    image_mean: [f64; 3],
    image_std: [f64; 3],
}

#[derive(Debug, Deserialize)]
struct ShortestEdge {
    shortest_edge: usize,
}

#[derive(Debug, Deserialize)]
struct CropSize {
    height: usize,
    width: usize,
}

pub struct Clip {
    model: ClipModel,
    tokenizer: tokenizers::Tokenizer,
    pre: Preprocessor,
    max_tokens: usize,
    device: Device,
    /// Where it was loaded from (for the report).
    pub source: PathBuf,
}

impl Clip {
    /// Reads and checks a CLIP folder's configs and files without loading the weights.
    pub fn check(dir: &Path) -> Result<()> {
        Self::configs(dir).map(|_| ())
    }

    fn configs(dir: &Path) -> Result<(HfClipConfig, Preprocessor)> {
        for f in CLIP_FILES {
            if !dir.join(f).is_file() {
                return Err(CandiffError::bad_config(
                    dir.display(),
                    format!("has no {f}"),
                    format!("A CLIP folder holds {}.", CLIP_FILES.join(", ")),
                )
                .into());
            }
        }
        let cfg: HfClipConfig = crate::error::read_json_config(&dir.join("config.json"), "CLIP config.json")?;
        let pre: Preprocessor =
            crate::error::read_json_config(&dir.join("preprocessor_config.json"), "CLIP preprocessor_config.json")?;
        for act in [&cfg.text_config.hidden_act, &cfg.vision_config.hidden_act] {
            if act != "quick_gelu" {
                return Err(CandiffError::bad_config(
                    dir.join("config.json").display(),
                    format!("hidden_act `{act}`: only quick_gelu (OpenAI's CLIP models) is implemented"),
                    "Use an OpenAI CLIP checkpoint such as openai/clip-vit-large-patch14.",
                )
                .into());
            }
        }
        let v = &cfg.vision_config;
        if (pre.crop_size.height, pre.crop_size.width) != (v.image_size, v.image_size) {
            return Err(CandiffError::bad_config(
                dir.join("preprocessor_config.json").display(),
                format!(
                    "crop {}x{} does not match the vision tower's {} pixels",
                    pre.crop_size.width, pre.crop_size.height, v.image_size
                ),
                "Use the preprocessor_config.json of the same CLIP checkpoint.",
            )
            .into());
        }
        Ok((cfg, pre))
    }

    /// From a folder holding [`CLIP_FILES`] (a hub snapshot or a local copy).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (cfg, pre) = Self::configs(dir)?;
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        let config = ClipConfig {
            text_config: ClipTextConfig {
                vocab_size: t.vocab_size,
                embed_dim: t.hidden_size,
                activation: Activation::QuickGelu,
                intermediate_size: t.intermediate_size,
                max_position_embeddings: t.max_position_embeddings,
                pad_with: None,
                num_hidden_layers: t.num_hidden_layers,
                num_attention_heads: t.num_attention_heads,
                projection_dim: cfg.projection_dim,
            },
            vision_config: ClipVisionConfig {
                embed_dim: v.hidden_size,
                activation: Activation::QuickGelu,
                intermediate_size: v.intermediate_size,
                num_hidden_layers: v.num_hidden_layers,
                num_attention_heads: v.num_attention_heads,
                projection_dim: cfg.projection_dim,
                num_channels: v.num_channels,
                image_size: v.image_size,
                patch_size: v.patch_size,
            },
            logit_scale_init_value: 0.0,
            image_size: v.image_size,
        };
        let vb = weights_of(&dir.join("model.safetensors"), device)?;
        let model = ClipModel::new(vb, &config)?;
        let tokenizer = crate::pipelines::tokenizer(&dir.join("tokenizer.json"))?;
        let max_tokens = t.max_position_embeddings;
        Ok(Self { model, tokenizer, pre, max_tokens, device: device.clone(), source: dir.into() })
    }

    /// The processor's `pixel_values` `[1, 3, S, S]`: shortest edge resized (PIL bicubic), center
    /// crop, rescaled to [0, 1] and normalized per channel.
    pub fn pixel_values(&self, img: &Rgb8) -> Result<Tensor> {
        let short = self.pre.size.shortest_edge;
        let (w, h) = (img.width, img.height);
        // transformers: the short side becomes `short`, the long side int(short * long / short).
        let (nw, nh) = if w <= h { (short, short * h / w) } else { (short * w / h, short) };
        let resized = resize_bicubic(img, nw, nh);
        let (cw, ch) = (self.pre.crop_size.width, self.pre.crop_size.height);
        let (top, left) = (nh.saturating_sub(ch) / 2, nw.saturating_sub(cw) / 2);
        let mut px = vec![0f32; 3 * ch * cw];
        for c in 0..3 {
            let (mean, std) = (self.pre.image_mean[c], self.pre.image_std[c]);
            for y in 0..ch {
                for x in 0..cw {
                    let v = resized[((top + y) * nw + left + x) * 3 + c] as f64 / 255.0;
                    px[(c * ch + y) * cw + x] = ((v - mean) / std) as f32;
                }
            }
        }
        Tensor::from_vec(px, (1, 3, ch, cw), &self.device)
    }

    /// Projected image embedding `[1, P]`.
    pub fn image_embeds(&self, img: &Rgb8) -> Result<Tensor> {
        self.model.get_image_features(&self.pixel_values(img)?)
    }

    /// The prompt's token ids: BOS ... EOS, truncated to the text tower's positions (EOS kept).
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc =
            self.tokenizer.encode(prompt, true).map_err(|e| candle_core::Error::Msg(format!("tokenizer: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_tokens {
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_tokens);
            ids[self.max_tokens - 1] = last;
        }
        Ok(ids)
    }

    /// Projected text embedding `[1, P]` (no padding: pooling takes the highest id, the EOS).
    pub fn text_embeds(&self, prompt: &str) -> Result<Tensor> {
        self.text_embeds_of(&self.token_ids(prompt)?)
    }

    pub fn text_embeds_of(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        self.model.get_text_features(&ids)
    }
}

/// Cosine similarity of two `[1, P]` embeddings.
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let n = |t: &Tensor| -> Result<Tensor> { t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?) };
    Ok((n(a)? * n(b)?)?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// CLIP score of an image embedding against a text embedding.
pub fn clip_score(image: &Tensor, text: &Tensor) -> Result<f64> {
    Ok((CLIP_SCORE_SCALE * cosine(image, text)?).max(0.0))
}

// ---------------------------------------------------------------------------------------------
// PIL's bicubic resampling (what CLIPImageProcessor applies to 8-bit images)

/// PIL's fixed-point precision of resampling coefficients.
const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;
/// PIL's bicubic kernel parameter.
const BICUBIC_A: f64 = -0.5;
/// The bicubic kernel's support radius at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * BICUBIC_A
    } else {
        0.0
    }
}

/// For each output position along one axis: the first input index and fixed-point weights.
fn pil_coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the kernel (antialiasing).
    let filter_scale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filter_scale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = w.iter().sum();
            let one = (1i64 << PIL_PRECISION_BITS) as f64;
            let fixed = w
                .iter()
                .map(|v| {
                    let k = if total != 0.0 { v / total } else { 0.0 };
                    if k < 0.0 {
                        (-0.5 + k * one) as i64
                    } else {
                        (0.5 + k * one) as i64
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB8 image as PIL's `Image.resize(size, BICUBIC)`: horizontal pass, then vertical,
/// each rounded to 8 bits.
pub fn resize_bicubic(img: &Rgb8, out_w: usize, out_h: usize) -> Vec<u8> {
    let (w, h) = (img.width, img.height);
    let half = 1i64 << (PIL_PRECISION_BITS - 1);
    let mut tmp = img.px.to_vec();
    if out_w != w {
        let cx = pil_coefficients(w, out_w);
        let mut out = vec![0u8; h * out_w * 3];
        for y in 0..h {
            for (x, (x0, ks)) in cx.iter().enumerate() {
                for c in 0..3 {
                    let acc =
                        ks.iter().enumerate().fold(half, |a, (i, k)| a + tmp[(y * w + x0 + i) * 3 + c] as i64 * k);
                    out[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        tmp = out;
    }
    if out_h != h {
        let cy = pil_coefficients(h, out_h);
        let mut out = vec![0u8; out_h * out_w * 3];
        for (y, (y0, ks)) in cy.iter().enumerate() {
            for x in 0..out_w {
                for c in 0..3 {
                    let acc = ks
                        .iter()
                        .enumerate()
                        .fold(half, |a, (i, k)| a + tmp[((y0 + i) * out_w + x) * 3 + c] as i64 * k);
                    out[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        tmp = out;
    }
    tmp
}
