//! The CLI takes its key from `ALIBABA_CLOUD_ACCESS_KEY_ID` and
//! `ALIBABA_CLOUD_ACCESS_KEY_SECRET`, as FC's SDKs and Serverless Devs
//! do, over the credentials file's; the endpoint and CA stay the file's.
//! Against a real gateway and scheduler in this process.

mod common;

use std::process::Output;

use kiln_pki::DevPki;

const ACCOUNT: &str = "1000000000000004";
const AK: &str = "AKCLI00000000004";
const SK: &str = "secret-of-the-cli-test-004";

fn kiln(creds: &std::path::Path, env: &[(&str, &str)]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--credentials")
        .arg(creds)
        .args(["functions", "list"])
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .env_remove("ALIBABA_CLOUD_SECURITY_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_key_is_used_over_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let sched = common::loopback_scheduler(dir.path(), &pki).await;
    let (_gw, creds, _client) = common::cli_gateway(
        dir.path(),
        &pki,
        &format!("https://127.0.0.1:{}", sched.addr().port()),
        (ACCOUNT, AK, SK),
    )
    .await;
    // The file's secret is wrong from here on.
    let mut file = kiln::credentials::Credentials::load(&creds).unwrap();
    file.access_key_secret = "not-the-secret".into();
    file.write(&creds).unwrap();
    let run = |env: Vec<(&'static str, &'static str)>| {
        let creds = creds.clone();
        async move {
            tokio::task::spawn_blocking(move || kiln(&creds, &env))
                .await
                .unwrap()
        }
    };
    let text = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let o = run(vec![]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("SignatureNotMatch"), "{}", text(&o));

    let o = run(vec![
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", AK),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SK),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));

    let o = run(vec![
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", "AKUNKNOWN0000000"),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SK),
    ])
    .await;
    assert!(!o.status.success());
    assert!(text(&o).contains("InvalidAccessKeyId"), "{}", text(&o));

    let o = run(vec![("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SK)]).await;
    assert!(!o.status.success());
    assert!(
        text(&o).contains("ALIBABA_CLOUD_ACCESS_KEY_ID is not"),
        "half a key is refused before any call: {}",
        text(&o)
    );
}
