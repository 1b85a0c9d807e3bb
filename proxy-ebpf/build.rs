//! Linker settings of the BPF object.

fn main() {
    // bpf-linker asks LLVM by default to expand only `memcpy` itself
    // (`--bpf-expand-memcpy-in-order`, for JITs that pattern-match copies, which Linux's do
    // not); every `memset` (a struct literal's zeroed padding, `[0; N]`, `mem::zeroed`) is then
    // a BPF-to-BPF call to compiler_builtins' byte-at-a-time loop: 56 iterations to clear a
    // parsed packet, 64 for the FIB lookup's parameters, on every packet. Without the flag LLVM
    // expands constant-size `memset` and `memcpy` into word stores inline.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
