//! Opening a checkpoint (a folder, one `.safetensors` file, or a sharded set) and reading NVFP4
//! modules from it in canonical form.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::{self, DeclaredConfig, Inferred, Nvfp4Plan, Overrides, ScaleLayout};
use super::format::{e4m3_decode, swap_nibbles, NibbleOrder, GROUP_SIZE};
use super::layout::{unswizzle_scales, Nvfp4Weight};
use crate::error::{CResult, CandiffError};
use crate::safetensors::{fmt_shape, Dtype, MappedFile};

/// An opened checkpoint: its files, declarations and the resolved NVFP4 plan (if any).
pub struct Checkpoint {
    pub root: PathBuf,
    pub files: Vec<MappedFile>,
    /// The checkpoint's own `config.json`, when there is one.
    pub config: Option<Value>,
    pub declared: Vec<DeclaredConfig>,
    pub inferred: Inferred,
    pub plan: Option<Nvfp4Plan>,
}

pub fn read_json(path: &Path) -> CResult<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| CandiffError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        CandiffError::bad_config(path.display(), format!("not valid JSON ({e})"), "Re-download or fix the file.")
    })
}

/// The safetensors files of a folder: the index's shards if there is an index, else every
/// `*.safetensors` in it (sorted).
pub fn weight_files(dir: &Path) -> CResult<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| CandiffError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    if let Some(index) = entries.iter().find(|p| p.to_string_lossy().ends_with(".safetensors.index.json")) {
        let v = read_json(index)?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            CandiffError::bad_config(index.display(), "no `weight_map` object", "Re-download the index file.")
        })?;
        let mut shards: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        shards.sort();
        shards.dedup();
        return Ok(shards);
    }
    Ok(entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect())
}

/// A folder's `config.json` (returned whole) and the NVFP4 declarations in it and in
/// `hf_quant_config.json`.
pub fn declared_configs(dir: &Path) -> CResult<(Option<Value>, Vec<DeclaredConfig>)> {
    let mut declared = Vec::new();
    let mut config = None;
    let cfg_path = dir.join("config.json");
    if cfg_path.is_file() {
        let v = read_json(&cfg_path)?;
        if let Some(d) = config::parse_model_config(&v, &cfg_path.display().to_string())? {
            declared.push(d);
        }
        config = Some(v);
    }
    let hq = dir.join("hf_quant_config.json");
    if hq.is_file() {
        declared.push(config::parse_hf_quant_config(&read_json(&hq)?, &hq.display().to_string())?);
    }
    Ok((config, declared))
}

impl Checkpoint {
    /// Opens `path` (folder or `.safetensors` file); `config.json` and `hf_quant_config.json` are
    /// read from the folder (or the file's folder). `extra_files` are more shards of the same model.
    pub fn open(path: &Path, overrides: &Overrides) -> CResult<Self> {
        let (root, paths) = if path.is_dir() {
            (path.to_path_buf(), weight_files(path)?)
        } else if path.is_file() {
            (path.parent().map(Path::to_path_buf).unwrap_or_default(), vec![path.to_path_buf()])
        } else {
            return Err(CandiffError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        };
        if paths.is_empty() {
            return Err(CandiffError::bad_config(
                path.display(),
                "holds no .safetensors file",
                "Point at a model folder (e.g. a diffusers `transformer/`) or a .safetensors file.",
            ));
        }
        let files = paths.iter().map(|p| MappedFile::open(p)).collect::<CResult<Vec<_>>>()?;
        // A single file next to another model's config must not borrow it: only folders read configs.
        let (config, declared) = if path.is_dir() { declared_configs(&root)? } else { (None, Vec::new()) };
        let headers: Vec<(String, &crate::safetensors::Header)> = files.iter().map(|f| (f.name(), &f.header)).collect();
        let inferred = config::infer(&headers)?;
        let plan = config::resolve(&declared, &inferred, overrides)?;
        Ok(Self { root, files, config, declared, inferred, plan })
    }

    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    /// Reads one NVFP4 module in canonical form, plus its `input_scale` (None when absent).
    /// `borrow` supplies `input_scale` / `weight_scale_2` for layers the checkpoint lacks them for.
    pub fn load_nvfp4(&self, module: &str, borrow: Option<&MappedFile>) -> CResult<(Nvfp4Weight, Option<f32>)> {
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| CandiffError::Unsupported(format!("`{module}`: this checkpoint has no NVFP4 layers")))?;
        let e = plan
            .modules
            .get(module)
            .ok_or_else(|| CandiffError::Unsupported(format!("`{module}` is not an NVFP4 layer of this checkpoint")))?;
        let f = &self.files[e.file];
        let fname = f.name();
        let mut packed = f.bytes(&e.weight_key).expect("key from header").to_vec();
        if plan.nibbles == NibbleOrder::High {
            swap_nibbles(&mut packed);
        }
        let kb = e.k / GROUP_SIZE;
        let raw_scales = f.bytes(&e.scale_key).expect("key from header");
        let scales = match plan.scale_layout {
            ScaleLayout::Linear => {
                if e.scale_shape != [e.n, kb] {
                    return Err(CandiffError::bad_tensor(
                        &fname,
                        &e.scale_key,
                        format!("linear scales [{}, {kb}]", e.n),
                        format!("shape {}", fmt_shape(&e.scale_shape)),
                        "The scales look swizzled: try --nvfp4-scale-layout swizzled.",
                    ));
                }
                raw_scales.to_vec()
            }
            ScaleLayout::Swizzled => unswizzle_scales(raw_scales, e.n, kb).map_err(|err| {
                CandiffError::bad_tensor(
                    &fname,
                    &e.scale_key,
                    "128x4-swizzled scales",
                    format!("shape {} ({err})", fmt_shape(&e.scale_shape)),
                    "The scales look linear: try --nvfp4-scale-layout linear.",
                )
            })?,
        };
        if let Some(i) = scales.iter().position(|&s| s & 0x7F == 0x7F || (s & 0x80 != 0 && s & 0x7F != 0)) {
            return Err(CandiffError::bad_tensor(
                &fname,
                &e.scale_key,
                "finite non-negative E4M3 block scales",
                format!("{} at row {}, block {}", e4m3_decode(scales[i]), i / kb, i % kb),
                "The checkpoint is corrupted; re-download or re-export it.",
            ));
        }
        let read_scalar = |file: &MappedFile, key: &str, reciprocal: bool| -> CResult<f32> {
            let info = file.info(key).expect("key from header");
            let b = file.bytes(key).expect("key from header");
            let v = match info.dtype {
                Dtype::F32 => f32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
                Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                ref d => {
                    return Err(CandiffError::bad_tensor(
                        file.name(),
                        key,
                        "an F32 scalar",
                        format!("dtype {d}"),
                        "Re-export the checkpoint.",
                    ))
                }
            };
            if !(v.is_finite() && v > 0.0) {
                return Err(CandiffError::bad_tensor(
                    file.name(),
                    key,
                    "a finite positive scale",
                    format!("{v}"),
                    "The checkpoint is corrupted; re-download or re-export it.",
                ));
            }
            Ok(if reciprocal { 1.0 / v } else { v })
        };
        let borrowed = |suffix: &str| -> Option<String> {
            let key = format!("{module}.{suffix}");
            borrow.and_then(|b| b.info(&key).filter(|t| t.numel() == 1).map(|_| key))
        };
        let ws2 = match (&e.weight_scale_2_key, borrowed("weight_scale_2")) {
            (Some(k), _) => read_scalar(f, k, e.reciprocal_scales)?,
            (None, Some(k)) => read_scalar(borrow.expect("borrowed"), &k, false)?,
            (None, None) => 1.0,
        };
        let input_scale = match (&e.input_scale_key, borrowed("input_scale")) {
            (Some(k), _) => Some(read_scalar(f, k, e.reciprocal_scales)?),
            (None, Some(k)) => Some(read_scalar(borrow.expect("borrowed"), &k, false)?),
            (None, None) => None,
        };
        let w = Nvfp4Weight::new(e.n, e.k, packed, scales, ws2)?;
        Ok((w, input_scale))
    }
}
