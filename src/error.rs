//! Errors a user can act on. Library code returns `candle::Result`; these convert into it (and
//! back out with `downcast`), so `main` can still print the specific message.

use std::path::PathBuf;

pub type CResult<T> = std::result::Result<T, CandiffError>;

#[derive(Debug, thiserror::Error)]
pub enum CandiffError {
    /// A tensor in a checkpoint does not have the shape/dtype/values its role needs.
    #[error("{file}: tensor `{tensor}`: expected {expected}, found {found}. {hint}")]
    BadTensor { file: String, tensor: String, expected: String, found: String, hint: String },
    /// The safetensors file itself is malformed.
    #[error("{file}: not a readable safetensors file: {reason}. Re-download it (or delete it from the cache) and try again.")]
    BadSafetensors { file: String, reason: String },
    /// A quantization config that cannot be honoured.
    #[error("{file}: {reason}. {hint}")]
    BadConfig { file: String, reason: String, hint: String },
    /// Declared and inferred layouts contradict each other.
    #[error("{file}: the NVFP4 scale layout is declared `{declared}` but tensor `{tensor}` has shape {shape}, which is only possible for `{inferred}`. Fix the config or pass --nvfp4-scale-layout {inferred} if you know the file is right.")]
    LayoutConflict { file: String, tensor: String, declared: String, inferred: String, shape: String },
    /// Internal layout bookkeeping failed (sizes that do not add up).
    #[error("NVFP4 layout: {0}")]
    Layout(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A requested option cannot be satisfied on this build or machine.
    #[error("{0}")]
    Unsupported(String),
    /// A multi-rank run that cannot start or could not finish (names the rank at fault).
    #[error("{0}")]
    Parallel(String),
}

impl CandiffError {
    pub fn layout(msg: impl Into<String>) -> Self {
        Self::Layout(msg.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub fn bad_tensor(
        file: impl std::fmt::Display,
        tensor: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::BadTensor {
            file: file.to_string(),
            tensor: tensor.into(),
            expected: expected.into(),
            found: found.into(),
            hint: hint.into(),
        }
    }

    pub fn bad_config(file: impl std::fmt::Display, reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::BadConfig { file: file.to_string(), reason: reason.into(), hint: hint.into() }
    }
}

impl From<CandiffError> for candle_core::Error {
    fn from(e: CandiffError) -> Self {
        // Not `Error::wrap`: that attaches a backtrace, which is noise in a message meant for users.
        candle_core::Error::Wrapped(Box::new(e))
    }
}

/// Reads a JSON config file into `T`; `what` names the expected file in the error.
pub fn read_json_config<T: serde::de::DeserializeOwned>(path: &std::path::Path, what: &str) -> CResult<T> {
    let text = std::fs::read_to_string(path).map_err(|e| CandiffError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        CandiffError::bad_config(
            path.display(),
            format!("not a valid {what}: {e}"),
            format!("Point at the model's {what}."),
        )
    })
}
