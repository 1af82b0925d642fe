//! The official FC SDKs, unmodified, against `kiln dev`: Python
//! (`alibabacloud-fc20230330`, in a virtualenv this test creates) and Node
//! (`@alicloud/fc20230330`, installed with npm from tests/sdk's lock file).
//! Both drive create, get, list, update, invoke and delete; the Python one
//! also handler functions on the built-in runtimes (python3.11, nodejs18,
//! python3.13, nodejs20).

mod common;

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) -> bool {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out.status.success()
}

fn write_example_zip(dir: &Path) -> std::path::PathBuf {
    let zip = dir.join("hello-python.zip");
    std::fs::write(&zip, common::example_zip("hello-python")).unwrap();
    zip
}

#[test]
fn official_python_sdk_drives_kiln() {
    if common::skip() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let venv = work.path().join("venv");
    assert!(run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv"
    ));
    let sdk = common::repo_root().join("tests/sdk");
    assert!(
        run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "-r"])
                .arg(sdk.join("requirements.txt")),
            "pip install"
        ),
        "installing the Python SDK failed"
    );
    let zip = write_example_zip(work.path());
    let dev = common::Dev::start();
    let ok = run(
        Command::new(venv.join("bin/python"))
            .arg(sdk.join("python_sdk.py"))
            .arg(&dev.creds_path)
            .arg(&zip),
        "python_sdk.py",
    );
    assert!(ok, "the Python SDK run failed\n{}", dev.log_tail());

    // The built-in runtimes through the same SDK: handler functions.
    let mut pairs = Vec::new();
    for (runtime, example) in [
        ("python3.11", "python-hello"),
        ("nodejs18", "nodejs-hello"),
        ("python3.13", "python-hello"),
        ("nodejs20", "nodejs-hello"),
    ] {
        let zip = work.path().join(format!("{example}.zip"));
        std::fs::write(&zip, common::example_zip(example)).unwrap();
        pairs.push(format!("{runtime}={}", zip.display()));
    }
    let ok = run(
        Command::new(venv.join("bin/python"))
            .arg(sdk.join("python_sdk_builtin.py"))
            .arg(&dev.creds_path)
            .args(&pairs),
        "python_sdk_builtin.py",
    );
    assert!(
        ok,
        "the Python SDK run on the built-in runtimes failed\n{}",
        dev.log_tail()
    );
}

#[test]
fn official_node_sdk_drives_kiln() {
    if common::skip() {
        return;
    }
    if common::skip_without(&["npm", "node"]) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let sdk = common::repo_root().join("tests/sdk");
    // Install into a copy so the source tree stays clean.
    for f in ["package.json", "package-lock.json", "node_sdk.mjs"] {
        std::fs::copy(sdk.join(f), work.path().join(f)).unwrap();
    }
    assert!(
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(work.path()),
            "npm ci"
        ),
        "installing the Node SDK failed"
    );
    let zip = write_example_zip(work.path());
    // A custom domain's certificate, from its owner's own CA.
    let domain = "node-sdk.example.test";
    let (cert, key) = (
        work.path().join("domain.pem"),
        work.path().join("domain.key"),
    );
    kiln_pki::Ca::generate("domain owner")
        .unwrap()
        .issue(&kiln_pki::CertRequest::public_server(domain).names(&[domain.to_owned()]))
        .unwrap()
        .write(&cert, &key)
        .unwrap();
    let dev = common::Dev::start();
    let ok = run(
        Command::new("node")
            .arg(work.path().join("node_sdk.mjs"))
            .arg(&dev.creds_path)
            .arg(&zip)
            .env("KILN_SDK_DOMAIN", domain)
            .env("KILN_SDK_DOMAIN_CERT", &cert)
            .env("KILN_SDK_DOMAIN_KEY", &key)
            .current_dir(work.path()),
        "node_sdk.mjs",
    );
    assert!(ok, "the Node SDK run failed\n{}", dev.log_tail());
}
