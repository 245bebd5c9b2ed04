//! Model manifests (`models/*.toml`): where each supported checkpoint's components live and the
//! defaults of a run. They are compiled into the binary, so `candiff models` works anywhere.

use serde::Deserialize;

use crate::error::{CResult, CandiffError};

/// The manifests shipped with candiff, (file name, text).
const BUILTIN: &[(&str, &str)] = &[
    ("flux.1-dev.toml", include_str!("../models/flux.1-dev.toml")),
    ("flux.1-schnell.toml", include_str!("../models/flux.1-schnell.toml")),
    ("flux.1-dev-nvfp4.toml", include_str!("../models/flux.1-dev-nvfp4.toml")),
    ("flux.1-tiny.toml", include_str!("../models/flux.1-tiny.toml")),
    ("flux.1-dev-random.toml", include_str!("../models/flux.1-dev-random.toml")),
    ("flux.1-dev-nvfp4-random.toml", include_str!("../models/flux.1-dev-nvfp4-random.toml")),
    ("flux.2-dev.toml", include_str!("../models/flux.2-dev.toml")),
    ("flux.2-dev-nvfp4.toml", include_str!("../models/flux.2-dev-nvfp4.toml")),
    ("flux.2-dev-nvfp4-mixed.toml", include_str!("../models/flux.2-dev-nvfp4-mixed.toml")),
    ("flux.2-klein-4b.toml", include_str!("../models/flux.2-klein-4b.toml")),
    ("flux.2-klein-4b-nvfp4.toml", include_str!("../models/flux.2-klein-4b-nvfp4.toml")),
    ("flux.2-klein-9b.toml", include_str!("../models/flux.2-klein-9b.toml")),
    ("flux.2-klein-9b-nvfp4.toml", include_str!("../models/flux.2-klein-9b-nvfp4.toml")),
    ("flux.2-tiny.toml", include_str!("../models/flux.2-tiny.toml")),
    ("flux.2-klein-tiny.toml", include_str!("../models/flux.2-klein-tiny.toml")),
    ("wan2.2-t2v-a14b.toml", include_str!("../models/wan2.2-t2v-a14b.toml")),
    ("wan2.2-t2v-a14b-nvfp4.toml", include_str!("../models/wan2.2-t2v-a14b-nvfp4.toml")),
    ("wan2.2-ti2v-5b.toml", include_str!("../models/wan2.2-ti2v-5b.toml")),
    ("wan2.2-tiny.toml", include_str!("../models/wan2.2-tiny.toml")),
    ("wan2.2-t2v-a14b-random.toml", include_str!("../models/wan2.2-t2v-a14b-random.toml")),
];

/// Where one component comes from: a Hub repository (or a local folder) and a subfolder or file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Source {
    /// `org/name` on the Hub, or a folder (relative paths are tried from the current directory,
    /// then from the candiff source tree).
    pub repo: String,
    #[serde(default)]
    pub subfolder: Option<String>,
    /// A single file inside the repository instead of a subfolder.
    #[serde(default)]
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Defaults {
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub max_sequence_length: usize,
    /// Video: guidance of the low-noise expert (two-expert models).
    #[serde(default)]
    pub guidance_2: Option<f64>,
    /// Video: expert boundary as a fraction of the training timesteps (when the repository's
    /// `model_index.json` gives none).
    #[serde(default)]
    pub boundary: Option<f64>,
    #[serde(default)]
    pub frames: Option<usize>,
    #[serde(default)]
    pub fps: Option<u32>,
    /// Image: guidance-distilled without an embedded scale (FLUX.2 klein): no CFG pass.
    #[serde(default)]
    pub distilled: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Flux1,
    /// FLUX.2 dev and klein.
    Flux2,
    /// Wan2.2 text-to-video (A14B two-expert, TI2V-5B).
    Wan22,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub family: Family,
    /// The base repository (diffusers layout) every component defaults to.
    pub repo: String,
    #[serde(default = "main_rev")]
    pub revision: String,
    /// Overrides the transformer's source (e.g. an NVFP4 export in another repository).
    #[serde(default)]
    pub transformer: Option<Source>,
    /// Overrides the second (low-noise) expert's source.
    #[serde(default)]
    pub transformer_2: Option<Source>,
    /// Where CLIP's `tokenizer.json` comes from when the base repository ships only vocab/merges.
    #[serde(default)]
    pub clip_tokenizer: Option<Source>,
    /// A sibling NVFP4 file to borrow missing scale tensors from, used only when it is already
    /// present beside the transformer file.
    #[serde(default)]
    pub scales_from: Option<Source>,
    /// The repository holds configs and tokenizers only: every weight is random, drawn per tensor
    /// name (full-size runs of kernels and NVFP4 error without a download; the outputs are noise).
    #[serde(default)]
    pub random_weights: bool,
    /// With random weights: the transformer's linears whose names contain one of these become
    /// random NVFP4 layers (the whole pipeline's memory and speed of an NVFP4 checkpoint, no
    /// download). FLUX.1 only.
    #[serde(default)]
    pub random_nvfp4: Vec<String>,
    pub defaults: Defaults,
}

fn main_rev() -> String {
    "main".into()
}

impl Manifest {
    pub fn parse(text: &str, file: &str) -> CResult<Self> {
        let m: Self = toml::from_str(text)
            .map_err(|e| CandiffError::bad_config(file, format!("invalid manifest: {e}"), "Fix the TOML."))?;
        if !m.random_nvfp4.is_empty() && (!m.random_weights || m.family != Family::Flux1) {
            return Err(CandiffError::bad_config(
                file,
                "random_nvfp4 is set on a manifest that is not a FLUX.1 one with random_weights = true",
                "Drop random_nvfp4, or set random_weights = true on a flux1 manifest.",
            ));
        }
        Ok(m)
    }

    /// Every built-in manifest.
    pub fn all() -> CResult<Vec<Self>> {
        BUILTIN.iter().map(|(f, t)| Self::parse(t, f)).collect()
    }

    /// The built-in manifest `name`, or an error listing the known ones.
    pub fn find(name: &str) -> CResult<Self> {
        let all = Self::all()?;
        let names: Vec<String> = all.iter().map(|m| m.name.clone()).collect();
        all.into_iter().find(|m| m.name == name).ok_or_else(|| {
            CandiffError::Unsupported(format!(
                "unknown model `{name}`; known models: {} (see `candiff models`)",
                names.join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifests_parse_and_have_unique_names() {
        let all = Manifest::all().unwrap();
        let mut names: Vec<_> = all.iter().map(|m| m.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert!(Manifest::find("nope").unwrap_err().to_string().contains("flux.1-dev"));
        let n = Manifest::find("flux.1-dev-nvfp4").unwrap();
        assert_eq!(n.transformer.unwrap().repo, "lmsys/flux1-dev-modelopt-nvfp4-sglang-transformer");
        let w = Manifest::find("wan2.2-t2v-a14b").unwrap();
        assert_eq!(
            (w.family, w.defaults.steps, w.defaults.guidance, w.defaults.guidance_2),
            (Family::Wan22, 40, 4.0, Some(3.0))
        );
        assert_eq!((w.defaults.boundary, w.defaults.frames, w.defaults.fps), (Some(0.875), Some(81), Some(16)));
        let t = Manifest::find("wan2.2-ti2v-5b").unwrap();
        assert_eq!(
            (t.defaults.width, t.defaults.height, t.defaults.frames, t.defaults.fps),
            (1280, 704, Some(121), Some(24))
        );
        assert_eq!((t.defaults.steps, t.defaults.guidance), (50, 5.0));
        let k = Manifest::find("flux.2-klein-4b-nvfp4").unwrap();
        assert_eq!((k.family, k.defaults.steps, k.defaults.distilled), (Family::Flux2, 4, true));
        assert_eq!(k.transformer.unwrap().file.as_deref(), Some("flux-2-klein-4b-nvfp4.safetensors"));
        let d = Manifest::find("flux.2-dev-nvfp4-mixed").unwrap();
        assert_eq!(d.scales_from.unwrap().file.as_deref(), Some("flux2-dev-nvfp4.safetensors"));
        assert!(!Manifest::find("flux.2-dev").unwrap().defaults.distilled);
        let r = Manifest::find("flux.1-dev-nvfp4-random").unwrap();
        assert!(r.random_weights && r.random_nvfp4 == ["transformer_blocks."]);
        assert!(Manifest::find("flux.1-dev-random").unwrap().random_nvfp4.is_empty());
        let bad = "name = \"x\"\ndescription = \"\"\nfamily = \"flux1\"\nrepo = \"r\"\nrandom_nvfp4 = [\"a\"]\n\
                   [defaults]\nsteps = 1\nguidance = 1.0\nwidth = 16\nheight = 16\nmax_sequence_length = 8\n";
        assert!(Manifest::parse(bad, "bad.toml").unwrap_err().to_string().contains("random_nvfp4"));
    }
}
