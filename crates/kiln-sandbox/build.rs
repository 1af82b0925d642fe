//! Compiles `init/main.rs` (the PID 1 of pre-made container sandboxes) as a
//! static, std-only executable that the driver embeds (`KILN_INIT_PATH`):
//! the `custom` runtime's root filesystem has no C library to link against.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "init/main.rs";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("kiln-init");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            "--crate-name=kiln_init",
            "--target",
            &target,
        ])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "strip=symbols", "-C", "target-feature=+crt-static"])
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status()
        .expect("cannot run rustc for kiln-init");
    assert!(
        status.success(),
        "building the static kiln-init failed ({status}); it needs the C library's static archive (libc.a: Debian's libc6-dev)"
    );
    println!("cargo:rustc-env=KILN_INIT_PATH={}", out.display());
}
