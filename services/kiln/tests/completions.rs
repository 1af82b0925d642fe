//! `kiln completions SHELL` prints a script that knows every command and
//! flag, and refuses a shell it cannot write for.

#[test]
fn completion_scripts_cover_the_commands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in [
            "deploy",
            "invoke",
            "versions",
            "aliases",
            "qualifier",
            "output",
        ] {
            assert!(script.contains(word), "{shell}: {word} missing");
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
