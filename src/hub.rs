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
