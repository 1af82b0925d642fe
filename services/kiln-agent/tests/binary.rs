//! The `kiln-agent` binary: configuration errors are printed once, as a
//! chain, with exit code 1.

use std::process::Command;

fn run(config: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_exit_1_with_the_reason() {
    if !kiln_test_support::is_root() {
        return kiln_test_support::skip(
            kiln_test_support::Category::Root,
            "the agent enters a mount namespace, which needs root",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(&dir.path().join("missing.toml"));
    assert_eq!(code, Some(1));
    assert!(err.contains("Cannot read"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        example.replace("tenancy = \"dedicated\"", "tenancy = \"multi-tenant\""),
    )
    .unwrap();
    let (code, err) = run(&bad);
    assert_eq!(code, Some(1));
    assert!(err.contains("microVM"), "{err}");

    std::fs::write(&bad, example.replace("[node]", "[node]\nmemroy = 1")).unwrap();
    let (code, err) = run(&bad);
    assert_eq!(code, Some(1));
    assert!(err.contains("memroy"), "{err}");
}
