//! The Hugging Face Hub: the local cache layout and header-only remote reads.
//!
//! `inspect` of a repository that is not cached reads only `config.json`, `hf_quant_config.json`,
//! the shard index and the first `8 + n` bytes of each safetensors file (HTTP range requests), so a
//! 20 GB checkpoint is inspected in a few kilobytes.

use std::path::PathBuf;

use serde_json::Value;

use crate::error::{CResult, CandiffError};
use crate::safetensors::{parse_header, Header, MAX_HEADER_BYTES};

/// Where the Hugging Face cache lives (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// `HF_HUB_OFFLINE=1` (or `true`): never touch the network.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").map(|v| v == "1" || v.eq_ignore_ascii_case("true")).unwrap_or(false)
}

/// The snapshot folder of `repo` at `revision` in the local cache, if present.
pub fn cached_snapshot(repo: &str, revision: &str) -> Option<PathBuf> {
    let dir = cache_dir().join(format!("models--{}", repo.replace('/', "--")));
    let commit = match std::fs::read_to_string(dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => revision.to_string(), // a commit hash names its snapshot directly
    };
    let snap = dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// A repository read over HTTP without downloading weights.
pub struct Remote {
    pub endpoint: String,
    pub repo: String,
    pub revision: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Remote {
    pub fn new(repo: &str, revision: &str) -> Self {
        let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        Self { endpoint, repo: repo.into(), revision: revision.into(), token, agent: ureq::agent() }
    }

    fn get(&self, url: &str, range: Option<(u64, u64)>) -> CResult<ureq::Response> {
        let mut req = self.agent.get(url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if let Some((a, b)) = range {
            req = req.set("Range", &format!("bytes={a}-{b}"));
        }
        req.call().map_err(|e| {
            let hint = match &e {
                ureq::Error::Status(401 | 403, _) => {
                    "The repository is gated or private: accept its license on the Hub and set HF_TOKEN."
                }
                ureq::Error::Status(404, _) => "Check the repository id, revision and file name.",
                _ => "Check the network, or set HF_HUB_OFFLINE=1 and use a cached or local copy.",
            };
            CandiffError::bad_config(url, format!("request failed: {e}"), hint)
        })
    }

    fn file_url(&self, path: &str) -> String {
        format!("{}/{}/resolve/{}/{}", self.endpoint, self.repo, self.revision, path)
    }

    /// Every file path in the repository at this revision.
    pub fn files(&self) -> CResult<Vec<String>> {
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, self.repo, self.revision);
        let v: Value = self
            .get(&url, None)?
            .into_json()
            .map_err(|e| CandiffError::bad_config(&url, format!("unreadable answer: {e}"), "Try again later."))?;
        let files = v["siblings"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["rfilename"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        Ok(files)
    }

    pub fn json(&self, path: &str) -> CResult<Value> {
        let url = self.file_url(path);
        self.get(&url, None)?
            .into_json()
            .map_err(|e| CandiffError::bad_config(&url, format!("not valid JSON: {e}"), "Check the file on the Hub."))
    }

    /// The safetensors header of a remote file (two range requests).
    pub fn header(&self, path: &str) -> CResult<Header> {
        let url = self.file_url(path);
        let mut len = [0u8; 8];
        std::io::Read::read_exact(&mut self.get(&url, Some((0, 7)))?.into_reader(), &mut len)
            .map_err(|e| CandiffError::BadSafetensors { file: url.clone(), reason: e.to_string() })?;
        let n = u64::from_le_bytes(len);
        if n == 0 || n > MAX_HEADER_BYTES {
            return parse_header(&len, None, &url);
        }
        let mut buf = len.to_vec();
        std::io::Read::read_to_end(&mut self.get(&url, Some((8, 8 + n - 1)))?.into_reader(), &mut buf)
            .map_err(|e| CandiffError::BadSafetensors { file: url.clone(), reason: e.to_string() })?;
        parse_header(&buf, None, &url)
    }
}

/// Does `path` match `pattern` (`*` within a path segment run, e.g. `transformer/*.safetensors`)?
pub fn glob_match(pattern: &str, path: &str) -> bool {
    crate::nvfp4::config::pattern_matches(pattern, path) && (pattern.contains('*') || pattern == path)
}

/// One file of a repository listing.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub path: String,
    pub size: Option<u64>,
    /// sha256 of LFS files, as the Hub reports it.
    pub sha256: Option<String>,
}

impl Remote {
    /// The commit the revision points to and every file with its size and hash.
    pub fn listing(&self) -> CResult<(String, Vec<RemoteFile>)> {
        let url = format!("{}/api/models/{}/revision/{}?blobs=true", self.endpoint, self.repo, self.revision);
        let v: Value = self
            .get(&url, None)?
            .into_json()
            .map_err(|e| CandiffError::bad_config(&url, format!("unreadable answer: {e}"), "Try again later."))?;
        let sha = v["sha"].as_str().unwrap_or(&self.revision).to_string();
        let files = v["siblings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        Some(RemoteFile {
                            path: s["rfilename"].as_str()?.to_string(),
                            size: s["size"].as_u64().or_else(|| s["lfs"]["size"].as_u64()),
                            sha256: s["lfs"]["sha256"].as_str().map(str::to_string),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((sha, files))
    }

    /// Downloads one file to `dest` through `dest.incomplete`, checking size and sha256; a file
    /// that does not check out is deleted, never left in place.
    pub fn download(&self, file: &RemoteFile, dest: &std::path::Path) -> CResult<()> {
        use sha2::Digest;
        use std::io::{Read, Write};
        let url = self.file_url(&file.path);
        let tmp = dest.with_extension("incomplete");
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CandiffError::io(parent, e))?;
        }
        let mut reader = self.get(&url, None)?.into_reader();
        let mut out = std::fs::File::create(&tmp).map_err(|e| CandiffError::io(&tmp, e))?;
        let bar = indicatif::ProgressBar::new(file.size.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(file.path.clone());
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n_total = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| CandiffError::io(&tmp, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| CandiffError::io(&tmp, e))?;
            n_total += n as u64;
            bar.set_position(n_total);
        }
        bar.finish_and_clear();
        drop(out);
        let bad = |reason: String| {
            let _ = std::fs::remove_file(&tmp);
            CandiffError::BadSafetensors { file: url.clone(), reason }
        };
        if let Some(size) = file.size {
            if size != n_total {
                return Err(bad(format!("download ended at {n_total} of {size} bytes")));
            }
        }
        if let Some(want) = &file.sha256 {
            let got = format!("{:x}", hasher.finalize());
            if &got != want {
                return Err(bad(format!("sha256 {got} differs from the Hub's {want}")));
            }
        }
        std::fs::rename(&tmp, dest).map_err(|e| CandiffError::io(dest, e))
    }
}

/// A local snapshot of `repo` holding every file matching `patterns`, from the Hugging Face cache
/// (downloading what is missing or of the wrong size unless offline). Files are laid out in the
/// standard cache (`models--org--name/snapshots/<commit>/...`, `refs/<revision>`), shared with
/// Python tools.
pub fn snapshot(repo: &str, revision: &str, patterns: &[String]) -> CResult<PathBuf> {
    let matches = |p: &str| patterns.iter().any(|pat| glob_match(pat, p));
    if offline() {
        let snap = cached_snapshot(repo, revision).ok_or_else(|| {
            CandiffError::Unsupported(format!(
                "HF_HUB_OFFLINE is set and {repo} ({revision}) is not in the cache ({}); download it first or unset HF_HUB_OFFLINE",
                cache_dir().display()
            ))
        })?;
        for pat in patterns {
            let found = walk(&snap).iter().any(|p| glob_match(pat, p));
            if !found {
                return Err(CandiffError::Unsupported(format!(
                    "HF_HUB_OFFLINE is set and the cached {repo} has no file matching `{pat}`; download it first"
                )));
            }
        }
        return Ok(snap);
    }
    let remote = Remote::new(repo, revision);
    let (sha, files) = remote.listing()?;
    let dir = cache_dir().join(format!("models--{}", repo.replace('/', "--")));
    let snap = dir.join("snapshots").join(&sha);
    for pat in patterns {
        if !files.iter().any(|f| glob_match(pat, &f.path)) {
            return Err(CandiffError::bad_config(
                format!("{repo}@{revision}"),
                format!("has no file matching `{pat}`"),
                "Check the repository and the manifest.",
            ));
        }
    }
    for f in files.iter().filter(|f| matches(&f.path)) {
        let dest = snap.join(&f.path);
        let ok = std::fs::metadata(&dest).map(|m| f.size.is_none_or(|s| s == m.len())).unwrap_or(false);
        if !ok {
            remote.download(f, &dest)?;
        }
    }
    std::fs::create_dir_all(dir.join("refs")).map_err(|e| CandiffError::io(&dir, e))?;
    std::fs::write(dir.join("refs").join(revision), &sha).map_err(|e| CandiffError::io(&dir, e))?;
    Ok(snap)
}

/// Relative paths of every file under `root`.
fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}
