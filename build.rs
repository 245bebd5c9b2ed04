//! Compiles `kernels/*.cu` into one fatbin under the `cuda` feature (the default build needs no
//! CUDA). SASS for Ampere, Hopper and both Blackwell lines plus PTX for newer GPUs, so one binary
//! runs everywhere from sm_80 up.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (virtual arch, real arch) pairs compiled into the fatbin.
const GENCODES: &[(&str, &str)] =
    &[("compute_80", "sm_80"), ("compute_90", "sm_90"), ("compute_100", "sm_100"), ("compute_120", "sm_120")];
/// PTX kept for GPUs newer than the newest SASS.
const PTX_ARCH: &str = "compute_120";

fn nvcc() -> PathBuf {
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Ok(root) = std::env::var(var) {
            let p = Path::new(&root).join("bin/nvcc");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "CANDIFF_CUDA_STUBS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Ok(stubs) = std::env::var("CANDIFF_CUDA_STUBS") {
        // Link against the stub libcuda made by scripts/setup-cuda.sh (no driver on build machines).
        println!("cargo:rustc-link-search=native={stubs}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = nvcc();
    let version = Command::new(&nvcc).arg("--version").output().ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        text.split("release ").nth(1).and_then(|r| r.split(',').next()).map(str::to_string)
    });
    println!("cargo:rustc-env=CANDIFF_NVCC_VERSION={}", version.unwrap_or_else(|| "unknown".into()));
    for name in ["nvfp4"] {
        let src = Path::new("kernels").join(format!("{name}.cu"));
        let dst = out.join(format!("{name}.fatbin"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["-fatbin", "-O3", "-std=c++17", "-lineinfo"]);
        for (virt, real) in GENCODES {
            cmd.arg(format!("-gencode=arch={virt},code={real}"));
        }
        cmd.arg(format!("-gencode=arch={PTX_ARCH},code={PTX_ARCH}"));
        cmd.arg("-o").arg(&dst).arg(&src);
        let output = cmd.output().unwrap_or_else(|e| {
            panic!(
                "could not run {} ({e}). Install the CUDA toolchain with scripts/setup-cuda.sh and `source .toolchain/cuda/env.sh`, or put a CUDA >= 13.0 nvcc on PATH",
                nvcc.display()
            )
        });
        if !output.status.success() {
            panic!("nvcc failed on {}:\n{}", src.display(), String::from_utf8_lossy(&output.stderr));
        }
    }
}
