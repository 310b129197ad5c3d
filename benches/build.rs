//! Compiles `csrc/fused_adamw.cpp`, the one libtorch call the optimizer benchmark needs that tch
//! does not bind (`at::_fused_adamw_`), against the libtorch tch links (`LIBTORCH`, set by
//! `.cargo/config.toml` to the `.libtorch` link `scripts/setup.sh` makes), and puts libtorch's
//! directory on the rpath.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        panic!("LIBTORCH is not set: run ./scripts/setup.sh (it installs libtorch and links it at .libtorch)");
    };
    let include = libtorch.join("include");
    if !include.join("ATen").is_dir() {
        panic!(
            "{} has no ATen headers: run ./scripts/setup.sh, or point LIBTORCH at a libtorch with include/",
            include.display()
        );
    }
    // The pip wheels since torch 2.7 use the C++11 ABI, as tch's own build assumes by default.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .file("csrc/fused_adamw.cpp")
        .compile("stowage_fused_adamw");
    // libtorch's directory as an rpath, so the benchmarks and tests run without LD_LIBRARY_PATH
    // (resolved, so the rpath survives the setup script re-pointing its link).
    let lib = libtorch.join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
