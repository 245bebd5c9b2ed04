//! `candiff inspect`: what a checkpoint holds and how candiff will load it.

use std::path::{Path, PathBuf};

use crate::error::{CResult, CandiffError};
use crate::hub;
use crate::nvfp4::checkpoint::{declared_configs, weight_files};
use crate::nvfp4::config::{self, DeclaredConfig};
use crate::nvfp4::Overrides;
use crate::safetensors::{read_header, Header};

/// Module naming convention of a transformer checkpoint, from its tensor names.
pub fn naming<'a>(mut keys: impl Iterator<Item = &'a String> + Clone) -> &'static str {
    if keys.clone().any(|k| k.contains("double_blocks.") || k.contains("single_blocks.")) {
        "BFL (double_blocks / single_blocks)"
    } else if keys.any(|k| k.contains("transformer_blocks.") || k.starts_with("blocks.")) {
        "diffusers"
    } else {
        "other"
    }
}

/// What `inspect` was pointed at.
pub enum Target {
    Local(PathBuf),
    /// A repository that is not in the local cache: read over HTTP, headers only.
    Remote {
        repo: String,
        subfolder: String,
        revision: String,
    },
}

/// A local folder or file as is; `org/name[/subfolder]` from the local Hugging Face cache, else
/// from the Hub (unless `HF_HUB_OFFLINE=1`).
pub fn resolve_target(target: &str, revision: &str) -> CResult<Target> {
    let p = Path::new(target);
    if p.exists() {
        return Ok(Target::Local(p.to_path_buf()));
    }
    let parts: Vec<&str> = target.split('/').collect();
    if parts.len() >= 2 && !target.starts_with('.') && !target.starts_with('/') && parts.iter().all(|p| !p.is_empty()) {
        let (repo, sub) = (format!("{}/{}", parts[0], parts[1]), parts[2..].join("/"));
        if let Some(snap) = hub::cached_snapshot(&repo, revision) {
            let path = snap.join(&sub);
            if path.exists() {
                return Ok(Target::Local(path));
            }
        }
        if hub::offline() {
            return Err(CandiffError::Unsupported(format!(
                "`{target}` is neither a local path nor in the Hugging Face cache ({}), and HF_HUB_OFFLINE is set. Download it first, unset HF_HUB_OFFLINE, or pass a local folder or .safetensors file.",
                hub::cache_dir().display()
            )));
        }
        return Ok(Target::Remote { repo, subfolder: sub, revision: revision.to_string() });
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

/// The headers and declarations of one checkpoint, however they were read.
pub struct HeaderSet {
    pub label: String,
    pub headers: Vec<(String, Header)>,
    pub bytes: u64,
    pub declared: Vec<DeclaredConfig>,
}

impl HeaderSet {
    /// A local file or model folder (headers only; no tensor data is read).
    pub fn local(path: &Path) -> CResult<Self> {
        let (files, declared) = if path.is_dir() {
            (weight_files(path)?, declared_configs(path)?.1)
        } else {
            (vec![path.to_path_buf()], Vec::new())
        };
        let mut headers = Vec::new();
        let mut bytes = 0;
        for f in &files {
            headers.push((f.display().to_string(), read_header(f)?));
            bytes += std::fs::metadata(f).map_err(|e| CandiffError::io(f, e))?.len();
        }
        Ok(Self { label: path.display().to_string(), headers, bytes, declared })
    }

    /// The checkpoints of a remote repository (or one subfolder of it): one set per folder that
    /// holds safetensors files, read with range requests.
    pub fn remote(repo: &str, subfolder: &str, revision: &str) -> CResult<Vec<Self>> {
        let remote = hub::Remote::new(repo, revision);
        let files = remote.files()?;
        let prefix = if subfolder.is_empty() { String::new() } else { format!("{}/", subfolder.trim_end_matches('/')) };
        let mut folders: Vec<String> = files
            .iter()
            .filter(|f| f.starts_with(&prefix) && f.ends_with(".safetensors"))
            .map(|f| f.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default())
            .collect();
        folders.sort();
        folders.dedup();
        if folders.is_empty() {
            return Err(CandiffError::bad_config(
                format!("{repo}/{subfolder}"),
                "holds no .safetensors files",
                "Name the folder of a model component, e.g. org/name/transformer.",
            ));
        }
        let mut sets = Vec::new();
        for dir in folders {
            let join = |name: &str| if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
            let mut declared = Vec::new();
            if files.contains(&join("config.json")) {
                let label = format!("{repo}/{}", join("config.json"));
                if let Some(d) = config::parse_model_config(&remote.json(&join("config.json"))?, &label)? {
                    declared.push(d);
                }
            }
            if files.contains(&join("hf_quant_config.json")) {
                let label = format!("{repo}/{}", join("hf_quant_config.json"));
                declared.push(config::parse_hf_quant_config(&remote.json(&join("hf_quant_config.json"))?, &label)?);
            }
            let mut headers = Vec::new();
            let mut bytes = 0u64;
            for f in files
                .iter()
                .filter(|f| f.ends_with(".safetensors") && f.rsplit_once('/').map(|(d, _)| d).unwrap_or("") == dir)
            {
                let h = remote.header(f)?;
                bytes += h.data_start as u64 + h.tensors.values().map(|t| t.end as u64).max().unwrap_or(0);
                headers.push((format!("{repo}/{f}"), h));
            }
            sets.push(Self { label: format!("{repo}/{dir} (remote, {revision})"), headers, bytes, declared });
        }
        Ok(sets)
    }
}

pub fn report(set: &HeaderSet, overrides: &Overrides) -> CResult<Report> {
    let refs: Vec<(String, &Header)> = set.headers.iter().map(|(n, h)| (n.clone(), h)).collect();
    let inferred = config::infer(&refs)?;
    let plan = config::resolve(&set.declared, &inferred, overrides)?;
    let quantization = plan.as_ref().map(|p| {
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
        path: set.label.clone(),
        files: set.headers.len(),
        bytes: set.bytes,
        tensors: set.headers.iter().map(|(_, h)| h.tensors.len()).sum(),
        naming: naming(set.headers.iter().flat_map(|(_, h)| h.tensors.keys())),
        quantization,
    })
}

/// Inspects a local file or folder.
pub fn inspect(path: &Path, overrides: &Overrides) -> CResult<Report> {
    report(&HeaderSet::local(path)?, overrides)
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
