//! Safetensors headers and raw tensor bytes.
//!
//! Reading a header touches only its first `8 + n` bytes, so `inspect` and layout inference work
//! on multi-GB checkpoints instantly. Every field is validated: a truncated or corrupted file is an
//! error naming the file, never a panic or an out-of-bounds read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{CResult, CandiffError};

/// The safetensors format caps its JSON header at 100 MB.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    F16,
    BF16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    F8E4M3,
    F8E5M2,
    /// Any other dtype string (kept so a header with a new type still parses).
    Other(String),
}

impl Dtype {
    fn parse(s: &str) -> Self {
        match s {
            "BOOL" => Self::Bool,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "U16" => Self::U16,
            "I16" => Self::I16,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "U32" => Self::U32,
            "I32" => Self::I32,
            "F32" => Self::F32,
            "U64" => Self::U64,
            "I64" => Self::I64,
            "F64" => Self::F64,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            other => Self::Other(other.to_string()),
        }
    }

    /// Bytes per element, when whole.
    pub fn size(&self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::U16 | Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::Other(_) => return None,
        })
    }

    pub fn is_float(&self) -> bool {
        matches!(self, Self::F16 | Self::BF16 | Self::F32 | Self::F64 | Self::F8E4M3 | Self::F8E5M2)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::U16 => "U16",
            Self::I16 => "I16",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::U32 => "U32",
            Self::I32 => "I32",
            Self::F32 => "F32",
            Self::U64 => "U64",
            Self::I64 => "I64",
            Self::F64 => "F64",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
            Self::Other(s) => s,
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

#[derive(Debug, Clone, Default)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorInfo>,
    /// `__metadata__`; values that are not strings are kept as their JSON text.
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section in the file.
    pub data_start: usize,
}

/// Parses a header from the file's leading bytes. `file_len` (when known) bounds the data offsets.
pub fn parse_header(bytes: &[u8], file_len: Option<u64>, file: &str) -> CResult<Header> {
    let bad = |reason: String| CandiffError::BadSafetensors { file: file.to_string(), reason };
    if bytes.len() < 8 {
        return Err(bad(format!("{} bytes is shorter than the 8-byte header length", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {n} exceeds the format's {MAX_HEADER_BYTES}-byte cap")));
    }
    let n = n as usize;
    if bytes.len() < 8 + n {
        return Err(bad(format!("truncated header: it declares {n} bytes but only {} follow", bytes.len() - 8)));
    }
    let data_start = 8 + n;
    let data_len = match file_len {
        Some(l) if l < data_start as u64 => {
            return Err(bad(format!("file of {l} bytes ends inside its {n}-byte header")))
        }
        Some(l) => Some((l - data_start as u64) as usize),
        None => None,
    };
    let json: serde_json::Value =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| bad(format!("header is not valid JSON ({e})")))?;
    let obj = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut header = Header { data_start, ..Default::default() };
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, val) in m {
                    let s = match val {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    header.metadata.insert(k.clone(), s);
                }
            }
            continue;
        }
        let entry = v.as_object().ok_or_else(|| bad(format!("entry `{name}` is not an object")))?;
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .map(Dtype::parse)
            .ok_or_else(|| bad(format!("tensor `{name}` has no dtype string")))?;
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad(format!("tensor `{name}` has no shape array")))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad(format!("tensor `{name}` has a non-integer dimension")))?;
        let offs = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()? as usize, o[1].as_u64()? as usize)))
            .ok_or_else(|| bad(format!("tensor `{name}` needs data_offsets [start, end]")))?;
        let (start, end) = offs;
        if start > end {
            return Err(bad(format!("tensor `{name}` has data_offsets [{start}, {end}] with start > end")));
        }
        if let Some(dl) = data_len {
            if end > dl {
                return Err(bad(format!(
                    "tensor `{name}` ends at byte {end} of a {dl}-byte data section (truncated download?)"
                )));
            }
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = numel.and_then(|n| dtype.size().map(|s| n.checked_mul(s)));
        match want {
            None => return Err(bad(format!("tensor `{name}` has a shape {shape:?} whose size overflows"))),
            Some(Some(w)) if w != end - start => {
                return Err(bad(format!(
                    "tensor `{name}` ({dtype} {shape:?}) needs {w} bytes but its data_offsets span {}",
                    end - start
                )))
            }
            _ => {}
        }
        header.tensors.insert(name.clone(), TensorInfo { dtype, shape, start, end });
    }
    Ok(header)
}

/// Reads just the header of a file on disk.
pub fn read_header(path: &Path) -> CResult<Header> {
    let file_name = path.display().to_string();
    let mut f = std::fs::File::open(path).map_err(|e| CandiffError::io(path, e))?;
    let len = f.metadata().map_err(|e| CandiffError::io(path, e))?.len();
    let mut lenbuf = [0u8; 8];
    f.read_exact(&mut lenbuf).map_err(|_| CandiffError::BadSafetensors {
        file: file_name.clone(),
        reason: format!("file of {len} bytes is shorter than the 8-byte header length"),
    })?;
    let n = u64::from_le_bytes(lenbuf);
    if n > MAX_HEADER_BYTES || n + 8 > len {
        return parse_header(&lenbuf, Some(len), &file_name);
    }
    let mut buf = vec![0u8; 8 + n as usize];
    buf[..8].copy_from_slice(&lenbuf);
    f.read_exact(&mut buf[8..]).map_err(|e| CandiffError::io(path, e))?;
    parse_header(&buf, Some(len), &file_name)
}

/// A memory-mapped safetensors file with a validated header.
pub struct MappedFile {
    pub path: PathBuf,
    pub header: Header,
    mmap: memmap2::Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> CResult<Self> {
        let f = std::fs::File::open(path).map_err(|e| CandiffError::io(path, e))?;
        // SAFETY: the mapping is read-only; a checkpoint modified while we run is outside what any
        // loader can defend against, and every offset read below was checked against the length.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| CandiffError::io(path, e))?;
        let header = parse_header(&mmap, Some(mmap.len() as u64), &path.display().to_string())?;
        Ok(Self { path: path.to_path_buf(), header, mmap })
    }

    pub fn name(&self) -> String {
        self.path.display().to_string()
    }

    pub fn info(&self, tensor: &str) -> Option<&TensorInfo> {
        self.header.tensors.get(tensor)
    }

    /// The raw bytes of a tensor (bounds were checked when the header was parsed).
    pub fn bytes(&self, tensor: &str) -> Option<&[u8]> {
        let t = self.header.tensors.get(tensor)?;
        let s = self.header.data_start;
        Some(&self.mmap[s + t.start..s + t.end])
    }
}

/// Serializes tensors given as (name, dtype string, shape, raw bytes) into a safetensors file image.
pub fn serialize(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], metadata: Option<serde_json::Value>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), m);
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        map.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let h = serde_json::to_vec(&serde_json::Value::Object(map)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("tensors", &self.header.tensors.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let f = serialize(&[("a.weight", "U8", vec![2, 4], vec![0; 8])], Some(serde_json::json!({"format": "pt"})));
        let h = parse_header(&f, Some(f.len() as u64), "t").unwrap();
        assert_eq!(h.tensors["a.weight"].shape, vec![2, 4]);
        assert_eq!(h.metadata["format"], "pt");
        // Truncated data section.
        let short = &f[..f.len() - 1];
        let e = parse_header(short, Some(short.len() as u64), "t").unwrap_err().to_string();
        assert!(e.contains("truncated download"), "{e}");
        // Truncated header.
        let e = parse_header(&f[..12], None, "t").unwrap_err().to_string();
        assert!(e.contains("truncated header"), "{e}");
        // Size mismatch.
        let f = serialize(&[("a", "F32", vec![3], vec![0; 8])], None);
        assert!(parse_header(&f, Some(f.len() as u64), "t").is_err());
    }
}
