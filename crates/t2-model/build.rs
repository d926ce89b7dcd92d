//! With the `cuda` feature, compiles t2's CUDA kernels (src/cuda/kernels.cu) to PTX with nvcc, for the
//! compute capability in CUDA_COMPUTE_CAP (default 80: Ampere and newer JIT it). Without the feature this
//! does nothing, so CPU builds need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "--use_fast_math",
            &format!("-arch=compute_{cap}"),
        ])
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (needed by the cuda feature): {e}"));
    assert!(status.success(), "{nvcc} failed on src/cuda/kernels.cu");
}
