//! Links libtorch so the `stowage` binary (and this package's tests) run with no
//! LD_LIBRARY_PATH: libtorch's directory as an rpath, and libtorch_cuda kept even though no
//! symbol of it is referenced (the linker would drop it, and with it the CUDA backend).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let lib = std::path::Path::new(&libtorch).join("lib");
    // Resolve the setup script's link so the rpath survives it being re-pointed.
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
