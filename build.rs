//! With the `cuda` feature, compile road's own CUDA kernels (src/kernels/*.cu) to PTX with nvcc,
//! embedded in the binary and loaded on first use. CPU builds do nothing here.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/kernels/road.cu");
    println!("cargo:rerun-if-changed=src/kernels/tail.cu");
    println!("cargo:rerun-if-changed=src/kernels/train.cu");
    println!("cargo:rerun-if-changed=src/kernels/optim.cu");
    println!("cargo:rerun-if-changed=src/kernels/attn.cu");
    println!("cargo:rerun-if-changed=src/kernels/infer.cu");
    println!("cargo:rerun-if-changed=src/kernels/dtype.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("CUDA_HOME").map(|h| format!("{h}/bin/nvcc")).unwrap_or_else(|_| "nvcc".into());
    for (src, ptx) in [
        ("src/kernels/road.cu", "road_kernels.ptx"),
        ("src/kernels/tail.cu", "tail_kernels.ptx"),
        ("src/kernels/train.cu", "train_kernels.ptx"),
        ("src/kernels/optim.cu", "optim_kernels.ptx"),
        ("src/kernels/attn.cu", "attn_kernels.ptx"),
        ("src/kernels/infer.cu", "infer_kernels.ptx"),
    ] {
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(out_dir.join(ptx))
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc}: {e} (set CUDA_HOME, see scripts/build-cuda.sh)"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
