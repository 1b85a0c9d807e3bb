//! Builds the BPF object from `proxy-ebpf` (with the nightly toolchain and bpf-linker) so that
//! `cargo build` is the whole build and the embedded object can never be stale.

fn main() -> anyhow::Result<()> {
    // aya-build watches proxy-ebpf's own files; the types it shares with this crate live in
    // proxy-common, whose changes must rebuild the object too (a directory is scanned whole).
    println!("cargo:rerun-if-changed={}/../proxy-common/src", env!("CARGO_MANIFEST_DIR"));
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
