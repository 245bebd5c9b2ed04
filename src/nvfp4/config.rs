//! Which modules of a checkpoint are NVFP4 and how their bytes are laid out.
//!
//! Three sources, in increasing priority: what the checkpoint declares (`config.json`'s
//! `quantization_config`, `hf_quant_config.json`), what its safetensors headers prove (read without
//! touching tensor data), and the user's overrides. The headers are the truth for which modules are
//! quantized; layout flags are OR-ed (a non-`linear` layout wins); every decision is recorded with
//! its reason so `candiff inspect` can show it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::format::{NibbleOrder, GROUP_SIZE};
use super::layout::{ceil_to, SWIZZLE_COLS, SWIZZLE_ROWS};
use crate::error::{CResult, CandiffError};
use crate::safetensors::{fmt_shape, Dtype, Header};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleLayout {
    /// `[N, K/16]` row-major.
    Linear,
    /// 128x4 tiles, rows padded to 128 and scale columns to 4.
    Swizzled,
}

impl std::fmt::Display for ScaleLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScaleLayout::Linear => "linear",
            ScaleLayout::Swizzled => "swizzled",
        })
    }
}

impl std::str::FromStr for ScaleLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "linear" => Ok(Self::Linear),
            "swizzled" | "128x4" => Ok(Self::Swizzled),
            _ => Err(format!("expected `linear` or `swizzled`, found `{s}`")),
        }
    }
}

/// Who wrote the checkpoint, as far as naming of the NVFP4 tensors goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CheckpointFormat {
    /// `weight`, `weight_scale`, `weight_scale_2`, `input_scale`.
    ModelOpt,
    /// `weight_packed`, `weight_scale`, reciprocal `weight_global_scale` / `input_global_scale`.
    CompressedTensors,
    /// BFL/Comfy single file: ModelOpt tensor names on BFL module names (packed QKV).
    BflComfy,
    /// NVFP4 tensors with no declaration and no BFL markers; read with ModelOpt names.
    Undeclared,
}

impl std::fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ModelOpt => "ModelOpt NVFP4",
            Self::CompressedTensors => "compressed-tensors nvfp4-pack-quantized",
            Self::BflComfy => "BFL/Comfy NVFP4 single file",
            Self::Undeclared => "NVFP4 (undeclared)",
        })
    }
}

/// What a config file declares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeclaredConfig {
    pub file: String,
    /// `modelopt`, `compressed-tensors`, or `hf_quant_config`.
    pub method: String,
    pub group_size: Option<usize>,
    /// `ignore` / `exclude_modules` entries (names or `*` globs).
    pub exclude: Vec<String>,
    pub scale_layout: Option<ScaleLayout>,
    pub swap_nibbles: Option<bool>,
}

fn is_nvfp4_algo(s: &str) -> bool {
    s.eq_ignore_ascii_case("nvfp4")
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn optional_flags(q: &Value, file: &str, d: &mut DeclaredConfig) -> CResult<()> {
    if let Some(v) = q.get("checkpoint_weight_scale_layout") {
        let s = v.as_str().unwrap_or_default();
        d.scale_layout = Some(s.parse().map_err(|e: String| {
            CandiffError::bad_config(
                file,
                format!("checkpoint_weight_scale_layout: {e}"),
                "Use `linear` or `swizzled`.",
            )
        })?);
    }
    if let Some(v) = q.get("swap_weight_nibbles") {
        d.swap_nibbles = Some(v.as_bool().ok_or_else(|| {
            CandiffError::bad_config(
                file,
                format!("swap_weight_nibbles must be true or false, found {v}"),
                "Fix the config.",
            )
        })?);
    }
    Ok(())
}

/// Group size from `config_groups.*.weights.group_size` (first group that has one).
fn group_from_groups(q: &Value) -> Option<usize> {
    q.get("config_groups")?
        .as_object()?
        .values()
        .find_map(|g| g.get("weights")?.get("group_size")?.as_u64())
        .map(|g| g as usize)
}

fn groups_look_nvfp4(q: &Value) -> bool {
    q.get("config_groups")
        .and_then(|g| g.as_object())
        .map(|g| {
            g.values().any(|g| {
                g.get("format").and_then(|f| f.as_str()) == Some("nvfp4-pack-quantized")
                    || g.get("weights").is_some_and(|w| {
                        w.get("num_bits").and_then(|b| b.as_u64()) == Some(4)
                            && w.get("type").and_then(|t| t.as_str()) == Some("float")
                    })
            })
        })
        .unwrap_or(false)
}

/// Reads `config.json`'s `quantization_config`; `Ok(None)` when there is none.
pub fn parse_model_config(cfg: &Value, file: &str) -> CResult<Option<DeclaredConfig>> {
    let Some(q) = cfg.get("quantization_config") else {
        return Ok(None);
    };
    if !q.is_object() {
        return Err(CandiffError::bad_config(file, "quantization_config is not an object", "Fix or remove it."));
    }
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("").to_string();
    let algo = q.get("quant_algo").and_then(|m| m.as_str());
    let format = q.get("format").and_then(|m| m.as_str());
    let mut d = DeclaredConfig { file: file.to_string(), method: method.clone(), ..Default::default() };
    match method.as_str() {
        "compressed-tensors" => {
            let nvfp4 = format == Some("nvfp4-pack-quantized") || groups_look_nvfp4(q);
            if !nvfp4 {
                return Err(CandiffError::bad_config(
                    file,
                    format!("compressed-tensors format `{}` is not NVFP4", format.unwrap_or("?")),
                    "candiff reads the `nvfp4-pack-quantized` format; use an NVFP4 export or the bf16 checkpoint.",
                ));
            }
        }
        "modelopt" | "" => {
            match algo {
                Some(a) if is_nvfp4_algo(a) => {}
                Some(a) => return Err(CandiffError::bad_config(
                    file,
                    format!("unsupported quant_algo `{a}`"),
                    "candiff reads NVFP4 checkpoints (quant_algo `NVFP4`); use an NVFP4 export or the bf16 checkpoint.",
                )),
                None if groups_look_nvfp4(q) => {}
                None => {
                    return Err(CandiffError::bad_config(
                        file,
                        "quantization_config has neither quant_algo nor a 4-bit float config group",
                        "Add `\"quant_algo\": \"NVFP4\"` if this is an NVFP4 checkpoint.",
                    ))
                }
            }
        }
        other => {
            return Err(CandiffError::bad_config(
                file,
                format!("unsupported quant_method `{other}`"),
                "candiff reads ModelOpt and compressed-tensors NVFP4 checkpoints.",
            ))
        }
    }
    if d.method.is_empty() {
        d.method = "modelopt".into();
    }
    d.group_size = q.get("group_size").and_then(|g| g.as_u64()).map(|g| g as usize).or_else(|| group_from_groups(q));
    d.exclude = str_list(q.get("ignore"));
    d.exclude.extend(str_list(q.get("exclude_modules")));
    optional_flags(q, file, &mut d)?;
    Ok(Some(d))
}

/// Reads ModelOpt's `hf_quant_config.json` (`quantization.{quant_algo, group_size, exclude_modules}`).
pub fn parse_hf_quant_config(cfg: &Value, file: &str) -> CResult<DeclaredConfig> {
    let q = cfg.get("quantization").filter(|q| q.is_object()).ok_or_else(|| {
        CandiffError::bad_config(file, "no `quantization` object", "This is not a ModelOpt hf_quant_config.json.")
    })?;
    let algo = q.get("quant_algo").and_then(|a| a.as_str()).unwrap_or("");
    if !is_nvfp4_algo(algo) {
        return Err(CandiffError::bad_config(
            file,
            format!("unsupported quant_algo `{algo}`"),
            "candiff reads NVFP4 checkpoints (quant_algo `NVFP4`).",
        ));
    }
    let mut d = DeclaredConfig {
        file: file.to_string(),
        method: "hf_quant_config".into(),
        group_size: q.get("group_size").and_then(|g| g.as_u64()).map(|g| g as usize),
        exclude: str_list(q.get("exclude_modules")),
        ..Default::default()
    };
    optional_flags(q, file, &mut d)?;
    Ok(d)
}

/// Does an `ignore`/`exclude_modules` entry cover this module? Entries are full module names (which
/// also cover their children) or globs with `*`. A bare `proj_out` is the top-level module only,
/// not `single_transformer_blocks.N.proj_out`.
pub fn pattern_matches(pattern: &str, module: &str) -> bool {
    if !pattern.contains('*') {
        return module == pattern || module.strip_prefix(pattern).is_some_and(|r| r.starts_with('.'));
    }
    glob(pattern.as_bytes(), module.as_bytes())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative `*` matcher with one backtrack point: linear time, no recursion.
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// One NVFP4 linear found in the headers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleEntry {
    pub n: usize,
    pub k: usize,
    /// Index of the file holding the module's tensors.
    pub file: usize,
    pub weight_key: String,
    pub scale_key: String,
    pub scale_shape: Vec<usize>,
    pub weight_scale_2_key: Option<String>,
    pub input_scale_key: Option<String>,
    /// compressed-tensors stores global scales (reciprocals of ModelOpt's).
    pub reciprocal_scales: bool,
    pub bias_key: Option<String>,
}

/// What a scale tensor's shape proves about its layout.
#[derive(Debug, Clone, PartialEq)]
pub enum ShapeEvidence {
    /// No module's shape tells linear from swizzled (N a multiple of 128 and K/16 of 4).
    Ambiguous,
    Linear {
        tensor: String,
        shape: Vec<usize>,
    },
    Swizzled {
        tensor: String,
        shape: Vec<usize>,
    },
}

/// What the headers alone say.
#[derive(Debug, Clone)]
pub struct Inferred {
    pub modules: BTreeMap<String, ModuleEntry>,
    /// Rank-2 weights that are not NVFP4, with their dtype.
    pub excluded: BTreeMap<String, String>,
    pub evidence: ShapeEvidence,
    /// Packed-QKV module names found among the NVFP4 modules (a few, for the report).
    pub packed_qkv: Vec<String>,
    pub comfy_markers: Vec<String>,
    pub compressed_tensors_names: bool,
}

/// `double_blocks.N.(img|txt)_attn.qkv` or `single_blocks.N.linear1`, with any prefix.
pub fn is_packed_qkv_name(module: &str) -> bool {
    let p: Vec<&str> = module.split('.').collect();
    let n = p.len();
    let idx = |s: &str| s.parse::<usize>().is_ok();
    (n >= 4
        && p[n - 4] == "double_blocks"
        && idx(p[n - 3])
        && matches!(p[n - 2], "img_attn" | "txt_attn")
        && p[n - 1] == "qkv")
        || (n >= 3 && p[n - 3] == "single_blocks" && idx(p[n - 2]) && p[n - 1] == "linear1")
}

fn scalar_key(h: &Header, key: String) -> Option<String> {
    h.tensors.get(&key).filter(|t| t.numel() == 1).map(|_| key)
}

/// Reads the module structure out of one or more headers (shards of one checkpoint).
pub fn infer(files: &[(String, &Header)]) -> CResult<Inferred> {
    let mut modules = BTreeMap::new();
    let mut excluded = BTreeMap::new();
    let mut packed_qkv = Vec::new();
    let mut comfy_markers = Vec::new();
    let mut ct_names = false;
    let mut linear_proof: Option<(String, Vec<usize>)> = None;
    let mut swizzled_proof: Option<(String, Vec<usize>)> = None;
    for (fi, (fname, h)) in files.iter().enumerate() {
        if h.metadata.contains_key("_quantization_metadata") {
            comfy_markers.push(format!("{fname}: __metadata__._quantization_metadata"));
        }
        for (name, t) in &h.tensors {
            if name.ends_with(".comfy_quant") {
                comfy_markers.push(name.clone());
                continue;
            }
            let (module, packed_name) = if let Some(m) = name.strip_suffix(".weight_packed") {
                (m, true)
            } else if let Some(m) = name.strip_suffix(".weight") {
                (m, false)
            } else {
                continue;
            };
            let scale_key = format!("{module}.weight_scale");
            let scale = h.tensors.get(&scale_key).filter(|s| s.dtype == Dtype::F8E4M3 && s.shape.len() == 2);
            let is_nvfp4 = t.dtype == Dtype::U8 && scale.is_some();
            if !is_nvfp4 {
                if t.shape.len() == 2 && !packed_name {
                    excluded.insert(module.to_string(), t.dtype.to_string());
                }
                continue;
            }
            let scale = scale.expect("checked above");
            if t.shape.len() != 2 {
                return Err(CandiffError::bad_tensor(
                    fname,
                    name,
                    "packed E2M1 codes of rank 2 [N, K/2]",
                    format!("shape {}", fmt_shape(&t.shape)),
                    "The file is not a valid NVFP4 export.",
                ));
            }
            let (n, k) = (t.shape[0], t.shape[1] * 2);
            let (sr, sc) = (scale.shape[0], scale.shape[1]);
            let linear_ok = sr == n && sc > 0 && k % sc == 0 && k / sc == GROUP_SIZE;
            let swizzled_ok =
                k % GROUP_SIZE == 0 && sr == ceil_to(n, SWIZZLE_ROWS) && sc == ceil_to(k / GROUP_SIZE, SWIZZLE_COLS);
            match (linear_ok, swizzled_ok) {
                (true, true) => {}
                (true, false) => {
                    linear_proof.get_or_insert((scale_key.clone(), scale.shape.clone()));
                }
                (false, true) => {
                    swizzled_proof.get_or_insert((scale_key.clone(), scale.shape.clone()));
                }
                (false, false) => {
                    let g = if sr == n && sc > 0 && k % sc == 0 { Some(k / sc) } else { None };
                    let found = format!("weight {} and scales {}", fmt_shape(&t.shape), fmt_shape(&scale.shape));
                    let (expected, hint) = match g {
                        _ if k % GROUP_SIZE != 0 => (
                            format!("K = 2 x {} a multiple of {GROUP_SIZE}", t.shape[1]),
                            "NVFP4 needs K to be a multiple of 16.".to_string(),
                        ),
                        Some(g) => (
                            format!("group size {GROUP_SIZE} (E4M3 block scales mean NVFP4)"),
                            format!("These shapes imply group size {g}, which is not NVFP4."),
                        ),
                        None => (
                            format!(
                                "scales [{n}, {}] (linear) or [{}, {}] (128x4 swizzled)",
                                k / GROUP_SIZE,
                                ceil_to(n, SWIZZLE_ROWS),
                                ceil_to(k / GROUP_SIZE, SWIZZLE_COLS)
                            ),
                            "The scale tensor does not belong to this weight.".to_string(),
                        ),
                    };
                    return Err(CandiffError::bad_tensor(fname, scale_key, expected, found, hint));
                }
            }
            ct_names |= packed_name;
            let (ws2, inp) = if packed_name {
                (
                    scalar_key(h, format!("{module}.weight_global_scale")),
                    scalar_key(h, format!("{module}.input_global_scale")),
                )
            } else {
                (scalar_key(h, format!("{module}.weight_scale_2")), scalar_key(h, format!("{module}.input_scale")))
            };
            if is_packed_qkv_name(module) && packed_qkv.len() < 4 {
                packed_qkv.push(module.to_string());
            }
            let bias_key = format!("{module}.bias");
            modules.insert(
                module.to_string(),
                ModuleEntry {
                    n,
                    k,
                    file: fi,
                    weight_key: name.clone(),
                    scale_key,
                    scale_shape: scale.shape.clone(),
                    weight_scale_2_key: ws2,
                    input_scale_key: inp,
                    reciprocal_scales: packed_name,
                    bias_key: h.tensors.contains_key(&bias_key).then_some(bias_key),
                },
            );
        }
    }
    let evidence = match (linear_proof, swizzled_proof) {
        (Some((lt, ls)), Some((st, ss))) => {
            return Err(CandiffError::bad_config(
                files.first().map(|f| f.0.as_str()).unwrap_or("checkpoint"),
                format!(
                    "mixed scale layouts: `{lt}` {} can only be linear, `{st}` {} only swizzled",
                    fmt_shape(&ls),
                    fmt_shape(&ss)
                ),
                "A checkpoint must use one scale layout; re-export it.",
            ))
        }
        (Some((tensor, shape)), None) => ShapeEvidence::Linear { tensor, shape },
        (None, Some((tensor, shape))) => ShapeEvidence::Swizzled { tensor, shape },
        (None, None) => ShapeEvidence::Ambiguous,
    };
    Ok(Inferred { modules, excluded, evidence, packed_qkv, comfy_markers, compressed_tensors_names: ct_names })
}

/// The user's word, which beats everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    pub scale_layout: Option<ScaleLayout>,
    pub nibbles: Option<NibbleOrder>,
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Declared,
    Inferred,
    Override,
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Declared => "declared",
            Source::Inferred => "inferred",
            Source::Override => "override",
            Source::Default => "default",
        })
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    pub what: &'static str,
    pub value: String,
    pub source: Source,
    pub why: String,
}

/// The resolved way to read a checkpoint's NVFP4 modules.
#[derive(Debug, Clone)]
pub struct Nvfp4Plan {
    pub format: CheckpointFormat,
    pub group_size: usize,
    pub scale_layout: ScaleLayout,
    pub nibbles: NibbleOrder,
    pub modules: BTreeMap<String, ModuleEntry>,
    pub excluded: BTreeMap<String, String>,
    pub decisions: Vec<Decision>,
    pub warnings: Vec<String>,
}

impl Nvfp4Plan {
    pub fn is_quantized(&self, module: &str) -> bool {
        self.modules.contains_key(module)
    }

    /// Modules lacking `input_scale` or `weight_scale_2` (they default to 1.0).
    pub fn missing_scales(&self) -> (Vec<&str>, Vec<&str>) {
        let inp = self.modules.iter().filter(|(_, m)| m.input_scale_key.is_none()).map(|(n, _)| n.as_str()).collect();
        let ws2 =
            self.modules.iter().filter(|(_, m)| m.weight_scale_2_key.is_none()).map(|(n, _)| n.as_str()).collect();
        (inp, ws2)
    }
}

fn summarize(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Merges declarations, header evidence and overrides. `Ok(None)` when nothing is NVFP4 and
/// nothing declares it (a plain bf16 checkpoint).
pub fn resolve(declared: &[DeclaredConfig], inferred: &Inferred, overrides: &Overrides) -> CResult<Option<Nvfp4Plan>> {
    if inferred.modules.is_empty() {
        if let Some(d) = declared.first() {
            return Err(CandiffError::bad_config(
                &d.file,
                "declares NVFP4 quantization but no tensor in the checkpoint is NVFP4 (U8 `weight` + F8_E4M3 `weight_scale`)",
                "Check that the safetensors files belong to this config.",
            ));
        }
        return Ok(None);
    }
    let mut decisions = Vec::new();
    let mut warnings = Vec::new();
    let decl_names = || declared.iter().map(|d| d.file.as_str()).collect::<Vec<_>>().join(", ");

    // Format.
    let bfl = !inferred.packed_qkv.is_empty() || !inferred.comfy_markers.is_empty();
    let (format, why) = if inferred.compressed_tensors_names
        || declared.iter().any(|d| d.method == "compressed-tensors")
    {
        (CheckpointFormat::CompressedTensors, "`weight_packed` tensors / quant_method compressed-tensors".to_string())
    } else if let Some(d) = declared.first() {
        (CheckpointFormat::ModelOpt, format!("{} in {}", d.method, d.file))
    } else if bfl {
        (CheckpointFormat::BflComfy, "packed-QKV module names or Comfy markers, no config".to_string())
    } else {
        (CheckpointFormat::Undeclared, "U8 weights with F8_E4M3 scales, no config".to_string())
    };
    decisions.push(Decision {
        what: "format",
        value: format.to_string(),
        source: if declared.is_empty() { Source::Inferred } else { Source::Declared },
        why,
    });

    // Group size: E4M3 scales fix it at 16; a declaration saying otherwise is an error.
    if let Some(d) = declared.iter().find(|d| d.group_size.is_some_and(|g| g != GROUP_SIZE)) {
        return Err(CandiffError::bad_config(
            &d.file,
            format!("group_size {} is not NVFP4's {GROUP_SIZE}", d.group_size.unwrap_or(0)),
            "NVFP4 uses one E4M3 scale per 16 elements; fix the config.",
        ));
    }
    decisions.push(Decision {
        what: "group size",
        value: GROUP_SIZE.to_string(),
        source: Source::Inferred,
        why: "2 x weight columns / scale columns (padding-aware); E4M3 scales mean NVFP4".into(),
    });

    // Scale layout.
    let declared_layout = declared.iter().find_map(|d| d.scale_layout.map(|l| (l, d.file.clone())));
    let hint_swizzled = bfl;
    let (layout, source, why) = if let Some(l) = overrides.scale_layout {
        (l, Source::Override, "--nvfp4-scale-layout".to_string())
    } else {
        match (&inferred.evidence, &declared_layout) {
            (ShapeEvidence::Swizzled { tensor, shape }, d) => {
                if let Some((ScaleLayout::Linear, f)) = d {
                    warnings.push(format!(
                        "{f} declares linear scales but `{tensor}` {} is padded to 128x4 tiles: reading it as swizzled",
                        fmt_shape(shape)
                    ));
                }
                (
                    ScaleLayout::Swizzled,
                    Source::Inferred,
                    format!("`{tensor}` {} is padded to 128 rows / 4 columns", fmt_shape(shape)),
                )
            }
            (ShapeEvidence::Linear { tensor, shape }, Some((ScaleLayout::Swizzled, f))) => {
                return Err(CandiffError::LayoutConflict {
                    file: f.clone(),
                    tensor: tensor.clone(),
                    declared: "swizzled".into(),
                    inferred: "linear".into(),
                    shape: fmt_shape(shape),
                })
            }
            (ShapeEvidence::Linear { tensor, shape }, _) if hint_swizzled => {
                return Err(CandiffError::LayoutConflict {
                    file: "checkpoint".into(),
                    tensor: tensor.clone(),
                    declared: "swizzled (packed-QKV / Comfy markers)".into(),
                    inferred: "linear".into(),
                    shape: fmt_shape(shape),
                })
            }
            (_, Some((ScaleLayout::Swizzled, f))) => {
                (ScaleLayout::Swizzled, Source::Declared, format!("checkpoint_weight_scale_layout in {f}"))
            }
            (_, _) if hint_swizzled => (
                ScaleLayout::Swizzled,
                Source::Inferred,
                format!(
                    "BFL/Comfy markers ({})",
                    inferred.packed_qkv.first().or(inferred.comfy_markers.first()).map(String::as_str).unwrap_or("")
                ),
            ),
            (_, Some((ScaleLayout::Linear, f))) => {
                (ScaleLayout::Linear, Source::Declared, format!("checkpoint_weight_scale_layout in {f}"))
            }
            (ShapeEvidence::Linear { tensor, shape }, None) => {
                (ScaleLayout::Linear, Source::Inferred, format!("`{tensor}` {} is [N, K/16]", fmt_shape(shape)))
            }
            (ShapeEvidence::Ambiguous, None) => (
                ScaleLayout::Linear,
                Source::Default,
                "no declaration or marker; shapes fit both layouts, linear is the ModelOpt/compressed-tensors default"
                    .into(),
            ),
        }
    };
    // An override can still not make a proven shape readable.
    if source == Source::Override {
        match (&inferred.evidence, layout) {
            (ShapeEvidence::Swizzled { tensor, shape }, ScaleLayout::Linear)
            | (ShapeEvidence::Linear { tensor, shape }, ScaleLayout::Swizzled) => {
                return Err(CandiffError::LayoutConflict {
                    file: "--nvfp4-scale-layout".into(),
                    tensor: tensor.clone(),
                    declared: layout.to_string(),
                    inferred: if layout == ScaleLayout::Linear { "swizzled" } else { "linear" }.into(),
                    shape: fmt_shape(shape),
                })
            }
            _ => {}
        }
    }
    decisions.push(Decision { what: "scale layout", value: layout.to_string(), source, why });

    // Nibble order: flags OR-ed, the override wins.
    let declared_swap = declared.iter().find(|d| d.swap_nibbles == Some(true)).map(|d| d.file.clone());
    let (nibbles, source, why) = if let Some(o) = overrides.nibbles {
        (o, Source::Override, "--nvfp4-nibbles".to_string())
    } else if let Some(f) = declared_swap {
        (NibbleOrder::High, Source::Declared, format!("swap_weight_nibbles in {f}"))
    } else if hint_swizzled {
        (NibbleOrder::High, Source::Inferred, "BFL/Comfy files store element 2i in the high nibble".into())
    } else {
        (NibbleOrder::Low, Source::Default, "ModelOpt / compressed-tensors / FlashInfer convention".into())
    };
    decisions.push(Decision { what: "nibble order", value: nibbles.to_string(), source, why });

    // Exclude list: the headers are the truth; say where a declaration disagrees.
    if !declared.is_empty() {
        let patterns: Vec<&str> = declared.iter().flat_map(|d| d.exclude.iter().map(String::as_str)).collect();
        let wrongly_ignored: Vec<&str> = inferred
            .modules
            .keys()
            .filter(|m| patterns.iter().any(|p| pattern_matches(p, m)))
            .map(String::as_str)
            .collect();
        let not_listed: Vec<&str> = inferred
            .excluded
            .keys()
            .filter(|m| !patterns.iter().any(|p| pattern_matches(p, m)))
            .map(String::as_str)
            .collect();
        if !wrongly_ignored.is_empty() {
            warnings.push(format!(
                "{} lists as excluded, but the tensors are NVFP4 (loading them as NVFP4): {}",
                decl_names(),
                summarize(&wrongly_ignored)
            ));
        }
        if !not_listed.is_empty() {
            warnings.push(format!(
                "{} does not exclude these unquantized linears (loading them unquantized): {}",
                decl_names(),
                summarize(&not_listed)
            ));
        }
    }
    decisions.push(Decision {
        what: "exclude list",
        value: format!("{} modules", inferred.excluded.len()),
        source: Source::Inferred,
        why: "rank-2 weights that are not U8 + F8_E4M3 in the safetensors headers".into(),
    });

    let plan = Nvfp4Plan {
        format,
        group_size: GROUP_SIZE,
        scale_layout: layout,
        nibbles,
        modules: inferred.modules.clone(),
        excluded: inferred.excluded.clone(),
        decisions,
        warnings,
    };
    let (inp, ws2) = plan.missing_scales();
    let mut extra = Vec::new();
    if !inp.is_empty() {
        extra.push(format!(
            "{} NVFP4 layers have no input_scale; w4a4 will use 1.0 for them (borrow them with --nvfp4-scales-from FILE): {}",
            inp.len(),
            summarize(&inp)
        ));
    }
    if !ws2.is_empty() {
        extra.push(format!(
            "{} NVFP4 layers have no weight_scale_2; using 1.0 (borrow them with --nvfp4-scales-from FILE): {}",
            ws2.len(),
            summarize(&ws2)
        ));
    }
    let mut plan = plan;
    plan.warnings.extend(extra);
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("proj_out", "proj_out"));
        assert!(pattern_matches("time_text_embed", "time_text_embed.linear_1"));
        assert!(!pattern_matches("proj", "proj_out"));
        assert!(!pattern_matches("proj_out", "single_transformer_blocks.0.proj_out"));
        assert!(pattern_matches("*proj_out*", "single_transformer_blocks.1.proj_out"));
        assert!(pattern_matches("*.norm*", "a.norm1.linear"));
        assert!(!pattern_matches("a*c", "abd"));
    }

    #[test]
    fn packed_qkv_names() {
        assert!(is_packed_qkv_name("double_blocks.3.img_attn.qkv"));
        assert!(is_packed_qkv_name("model.diffusion_model.double_blocks.0.txt_attn.qkv"));
        assert!(is_packed_qkv_name("single_blocks.12.linear1"));
        assert!(!is_packed_qkv_name("single_blocks.12.linear2"));
        assert!(!is_packed_qkv_name("transformer_blocks.0.attn.to_q"));
    }

    #[test]
    fn unknown_algo_is_an_error() {
        let v = serde_json::json!({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}});
        let e = parse_model_config(&v, "config.json").unwrap_err().to_string();
        assert!(e.contains("unsupported quant_algo `FP8`"), "{e}");
        let v =
            serde_json::json!({"quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["x"]}});
        let d = parse_hf_quant_config(&v, "hf_quant_config.json").unwrap();
        assert_eq!(d.exclude, vec!["x".to_string()]);
        assert_eq!(d.group_size, Some(16));
    }
}
