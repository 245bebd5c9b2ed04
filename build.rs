//! Compiles `kernels/*.cu` into fatbins under the `cuda` feature (the default build needs no
//! CUDA). SASS for Ampere, Hopper and both Blackwell lines plus PTX for newer GPUs, so one binary
//! runs everywhere from sm_80 up; the Hopper-only GEMM (`nvfp4_sm90.cu`) is sm_90a SASS alone.

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

/// `-gencode` flags of the portable kernels: every GENCODES pair plus PTX_ARCH.
fn portable_gencodes() -> Vec<String> {
    let mut v: Vec<String> = GENCODES.iter().map(|(virt, real)| format!("-gencode=arch={virt},code={real}")).collect();
    v.push(format!("-gencode=arch={PTX_ARCH},code={PTX_ARCH}"));
    v
}

/// Hopper-only kernels (wgmma exists on sm_90a alone): SASS for sm_90a and nothing else; the host
/// loads them only on compute capability 9.0.
const SM90A_GENCODE: &str = "-gencode=arch=compute_90a,code=sm_90a";

/// `kernels/<name>.cu` into a fatbin; `flags`: its `-gencode` flags and any defines.
fn compile_fatbin(nvcc: &Path, name: &str, includes: &[String], flags: &[String], out: &Path) {
    let src = Path::new("kernels").join(format!("{name}.cu"));
    let dst = out.join(format!("{name}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-fatbin", "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]);
    for inc in includes {
        cmd.arg(format!("-I{inc}"));
    }
    cmd.args(flags);
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

fn env_path(var: &str, what: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: the {what} are needed. Run scripts/setup-cuda.sh --cudnn and `source .toolchain/cuda/env.sh`")
    })
}

/// CUTLASS's block-scaled NVFP4 GEMM for sm_100a (host launcher + kernel) as a static library; it
/// uses the CUDA runtime, so libcudart is linked too.
fn build_sm100(nvcc: &Path, cutlass_include: &str, out: &Path) {
    let obj = out.join("nvfp4_sm100.o");
    let output = Command::new(nvcc)
        .args(["-c", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"])
        .arg(format!("-I{cutlass_include}"))
        .arg("-gencode=arch=compute_100a,code=sm_100a")
        .arg("-o")
        .arg(&obj)
        .arg("kernels/nvfp4_sm100.cu")
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!("nvcc failed on kernels/nvfp4_sm100.cu:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    archive(&obj, &out.join("libcandiff_sm100.a"));
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=candiff_sm100");
    link_cudart();
}

fn archive(obj: &Path, lib: &Path) {
    let _ = std::fs::remove_file(lib);
    let status = Command::new("ar").arg("crs").arg(lib).arg(obj).status().expect("ar");
    assert!(status.success(), "ar failed");
}

fn link_cudart() {
    let cuda =
        std::env::var("CUDA_ROOT").or_else(|_| std::env::var("CUDA_PATH")).unwrap_or_else(|_| "/usr/local/cuda".into());
    println!("cargo:rustc-link-search=native={cuda}/lib");
    println!("cargo:rustc-link-search=native={cuda}/lib64");
    println!("cargo:rustc-link-lib=dylib=cudart");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

/// The cuDNN variant's C++ shim over cudnn-frontend, as a static library.
fn build_cudnn_shim(out: &Path) {
    let fe = env_path("CUDNN_FRONTEND_INCLUDE", "cudnn-frontend headers");
    let inc = env_path("CUDNN_INCLUDE", "cuDNN headers");
    let cuda =
        std::env::var("CUDA_ROOT").or_else(|_| std::env::var("CUDA_PATH")).unwrap_or_else(|_| "/usr/local/cuda".into());
    let obj = out.join("cudnn_nvfp4.o");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-fPIC", "-c"])
        .arg(format!("-I{fe}"))
        .arg(format!("-I{inc}"))
        .arg(format!("-I{cuda}/include"))
        .arg("kernels/cudnn_nvfp4.cpp")
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| panic!("could not run {cxx}: {e}"));
    assert!(status.success(), "compiling kernels/cudnn_nvfp4.cpp failed");
    archive(&obj, &out.join("libcandiff_cudnn.a"));
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=candiff_cudnn");
    if let Ok(dir) = std::env::var("CUDNN_LIB") {
        println!("cargo:rustc-link-search=native={dir}");
    }
    println!("cargo:rustc-link-lib=dylib=cudnn");
    link_cudart();
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo::rustc-check-cfg=cfg(candiff_cutlass)");
    println!("cargo::rustc-check-cfg=cfg(candiff_sm100)");
    for var in [
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CANDIFF_CUDA_STUBS",
        "CUTLASS_INCLUDE",
        "CUDNN_INCLUDE",
        "CUDNN_FRONTEND_INCLUDE",
        "CUDNN_LIB",
    ] {
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
    let portable = portable_gencodes();
    compile_fatbin(&nvcc, "nvfp4", &[], &portable, &out);
    let mut sm90_flags = vec![SM90A_GENCODE.to_string()];
    if std::env::var_os("CARGO_FEATURE_SM90_PHASES").is_some() {
        // The GEMM's phase marks (src/nvfp4/phases.rs).
        sm90_flags.push("-DCANDIFF_SM90_PHASES".to_string());
    }
    compile_fatbin(&nvcc, "nvfp4_sm90", &[], &sm90_flags, &out);
    compile_fatbin(&nvcc, "fused", &[], &portable, &out);
    compile_fatbin(&nvcc, "fp8", &[], &portable, &out);
    match std::env::var("CUTLASS_INCLUDE") {
        Ok(inc) => {
            compile_fatbin(&nvcc, "nvfp4_cutlass", std::slice::from_ref(&inc), &portable, &out);
            println!("cargo:rustc-cfg=candiff_cutlass");
            build_sm100(&nvcc, &inc, &out);
            println!("cargo:rustc-cfg=candiff_sm100");
        }
        Err(_) => println!(
            "cargo:warning=CUTLASS_INCLUDE is not set: the `cutlass` NVFP4 variant is left out (scripts/setup-cuda.sh --cutlass installs the headers)"
        ),
    }
    if std::env::var_os("CARGO_FEATURE_CUDNN").is_some() {
        build_cudnn_shim(&out);
    }
}
