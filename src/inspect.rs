//! `candiff inspect`: what a checkpoint holds and how candiff will load it.

use std::path::{Path, PathBuf};

use crate::error::{CResult, CandiffError};
use crate::nvfp4::{Checkpoint, Overrides};

/// Module naming convention of a transformer checkpoint.
pub fn naming(ckpt: &Checkpoint) -> &'static str {
    let keys = || ckpt.files.iter().flat_map(|f| f.header.tensors.keys());
    if keys().any(|k| k.contains("double_blocks.") || k.contains("single_blocks.")) {
        "BFL (double_blocks / single_blocks)"
    } else if keys().any(|k| k.contains("transformer_blocks.") || k.starts_with("blocks.")) {
        "diffusers"
    } else {
        "other"
    }
}

/// Where the Hugging Face cache lives (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
pub fn hf_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// A local folder or file as is; `org/name` from the local Hugging Face cache (snapshot of `main`).
pub fn resolve_target(target: &str) -> CResult<PathBuf> {
    let p = Path::new(target);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let parts: Vec<&str> = target.split('/').collect();
    if parts.len() >= 2 && !target.starts_with('.') && !target.starts_with('/') {
        let (repo, sub) = (format!("{}/{}", parts[0], parts[1]), parts[2..].join("/"));
        let dir = hf_cache_dir().join(format!("models--{}", repo.replace('/', "--")));
        let rev = std::fs::read_to_string(dir.join("refs/main")).ok();
        if let Some(rev) = rev {
            let snap = dir.join("snapshots").join(rev.trim()).join(&sub);
            if snap.exists() {
                return Ok(snap);
            }
        }
        return Err(CandiffError::Unsupported(format!(
            "`{target}` is neither a local path nor a repository in the Hugging Face cache ({}). Download it first (e.g. `huggingface-cli download {repo}`), or pass a local folder or .safetensors file.",
            hf_cache_dir().display()
        )));
    }
    Err(CandiffError::io(p, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")))
}

fn safetensors_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.retain(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"));
    v.sort();
    v
}

/// `model-00001-of-00003.safetensors` style names.
fn is_shard_name(p: &Path) -> bool {
    let s = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    s.split('-')
        .collect::<Vec<_>>()
        .windows(3)
        .any(|w| w[1] == "of" && w[0].parse::<u32>().is_ok() && w[2].parse::<u32>().is_ok())
}

/// The checkpoints under `path`: a file; a folder that is one model (an index, one file, or shards);
/// otherwise each loose file and each component folder (a diffusers repository root).
pub fn checkpoints_under(path: &Path) -> CResult<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let has_index = std::fs::read_dir(path)
        .map_err(|e| CandiffError::io(path, e))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors.index.json"));
    let files = safetensors_in(path);
    if has_index || files.len() == 1 || (!files.is_empty() && files.iter().all(|f| is_shard_name(f))) {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = files;
    let mut subs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| CandiffError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !safetensors_in(p).is_empty())
        .collect();
    subs.sort();
    out.extend(subs);
    if out.is_empty() {
        return Err(CandiffError::bad_config(
            path.display(),
            "holds no .safetensors files",
            "Point at a model folder or file.",
        ));
    }
    Ok(out)
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub path: String,
    pub files: usize,
    pub bytes: u64,
    pub tensors: usize,
    pub naming: &'static str,
    pub quantization: Option<QuantReport>,
}

#[derive(Debug, serde::Serialize)]
pub struct QuantReport {
    pub format: String,
    pub scale_layout: String,
    pub nibble_order: String,
    pub group_size: usize,
    pub nvfp4_layers: usize,
    pub excluded_layers: usize,
    pub missing_input_scale: usize,
    pub missing_weight_scale_2: usize,
    pub decisions: Vec<crate::nvfp4::config::Decision>,
    pub warnings: Vec<String>,
    pub excluded: Vec<String>,
}

pub fn inspect(path: &Path, overrides: &Overrides) -> CResult<Report> {
    let ckpt = Checkpoint::open(path, overrides)?;
    let bytes = ckpt.files.iter().map(|f| std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0)).sum();
    let quantization = ckpt.plan.as_ref().map(|p| {
        let (inp, ws2) = p.missing_scales();
        QuantReport {
            format: p.format.to_string(),
            scale_layout: p.scale_layout.to_string(),
            nibble_order: p.nibbles.to_string(),
            group_size: p.group_size,
            nvfp4_layers: p.modules.len(),
            excluded_layers: p.excluded.len(),
            missing_input_scale: inp.len(),
            missing_weight_scale_2: ws2.len(),
            decisions: p.decisions.clone(),
            warnings: p.warnings.clone(),
            excluded: p.excluded.keys().cloned().collect(),
        }
    });
    Ok(Report {
        path: path.display().to_string(),
        files: ckpt.files.len(),
        bytes,
        tensors: ckpt.files.iter().map(|f| f.header.tensors.len()).sum(),
        naming: naming(&ckpt),
        quantization,
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.path)?;
        writeln!(
            f,
            "  files: {} ({:.2} GB), tensors: {}, names: {}",
            self.files,
            self.bytes as f64 / 1e9,
            self.tensors,
            self.naming
        )?;
        let Some(q) = &self.quantization else {
            return writeln!(f, "  quantization: none (dense weights)");
        };
        writeln!(f, "  NVFP4 layers: {}, excluded (unquantized) linears: {}", q.nvfp4_layers, q.excluded_layers)?;
        for d in &q.decisions {
            writeln!(f, "  {:<13} {:<40} [{}: {}]", format!("{}:", d.what), d.value, d.source, d.why)?;
        }
        if q.missing_input_scale + q.missing_weight_scale_2 > 0 {
            writeln!(
                f,
                "  missing scales: input_scale on {} layers, weight_scale_2 on {}",
                q.missing_input_scale, q.missing_weight_scale_2
            )?;
        }
        if !q.excluded.is_empty() {
            const SHOWN: usize = 12;
            let mut s = q.excluded.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
            if q.excluded.len() > SHOWN {
                s.push_str(&format!(", ... ({} more)", q.excluded.len() - SHOWN));
            }
            writeln!(f, "  excluded: {s}")?;
        }
        for w in &q.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        Ok(())
    }
}
