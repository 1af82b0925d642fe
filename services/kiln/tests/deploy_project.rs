//! `kiln deploy -f s.yaml` against a real gateway and a real scheduler (in
//! this process, no node): the example project deploys and redeploys, a
//! project with provision config, a zip package and VPC bindings converges
//! on what the file says, and a project with properties Kiln does not
//! support changes nothing and names each of them. No root, no sandbox;
//! `e2e_dev.rs` invokes the example through `kiln dev`.

mod common;

use std::path::Path;
use std::process::Output;

use http::Method;
use kiln::client::FcClient;
use kiln_pki::DevPki;
use serde_json::Value;

const ACCOUNT: &str = "1000000000000003";
const AK: &str = "AKCLI00000000003";
const SK: &str = "secret-of-the-cli-test-003";

fn deploy(creds: &Path, file: &Path, env: &[(&str, &str)]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--credentials")
        .arg(creds)
        .arg("deploy")
        .arg("-f")
        .arg(file)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn get(client: &FcClient, path: &str) -> Value {
    client
        .request(
            Method::GET,
            &format!("/2023-03-30/functions/{path}"),
            &[],
            &[],
            Default::default(),
        )
        .await
        .unwrap()
        .error_for_status()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .json()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_yaml_projects_deploy_converge_and_refuse_what_kiln_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let sched = common::loopback_scheduler(dir.path(), &pki).await;
    let (_gw, creds, client) = common::cli_gateway_with(
        dir.path(),
        &pki,
        &format!("https://127.0.0.1:{}", sched.addr().port()),
        (ACCOUNT, AK, SK),
        |c| {
            c.vpcs = vec![kiln_gateway::vpcs::VpcOwners {
                id: "vpc-a".into(),
                owners: vec![ACCOUNT.parse().unwrap()],
            }]
        },
    )
    .await;
    let run = |file: std::path::PathBuf, env: Vec<(&'static str, &'static str)>| {
        let creds = creds.clone();
        async move {
            tokio::task::spawn_blocking(move || deploy(&creds, &file, &env))
                .await
                .unwrap()
        }
    };

    // The example, as a user would run it.
    let example = common::repo_root().join("examples/s-yaml/s.yaml");
    let out = run(example.clone(), vec![("KILN_EXAMPLE_GREETING", "first")]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("created function s-hello"), "{stdout}");
    assert!(
        stdout.contains("created trigger web: https://s-hello-"),
        "the HTTP trigger's URL is printed: {stdout}"
    );
    assert!(
        text(&out.stderr).contains("note: access"),
        "access is named, not ignored"
    );
    let f = get(&client, "s-hello").await;
    assert_eq!(f["environmentVariables"]["GREETING"], "first");
    assert_eq!(f["memorySize"], 256);
    assert_eq!(f["instanceConcurrency"], 4);
    assert_eq!(
        f["description"],
        "The hello-python example, deployed from s.yaml"
    );
    assert_eq!(
        f["customRuntimeConfig"]["command"],
        serde_json::json!(["python3", "server.py"])
    );
    let a = get(&client, "s-hello/async-invoke-config").await;
    assert_eq!(a["maxAsyncRetryAttempts"], 2);
    assert_eq!(a["maxAsyncEventAgeInSeconds"], 3600);
    assert_eq!(
        get(&client, "s-hello/concurrency").await["reservedConcurrency"],
        10
    );

    // Deploying again updates in place.
    let out = run(example, vec![("KILN_EXAMPLE_GREETING", "second")]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("updated function s-hello"));
    assert!(text(&out.stdout).contains("updated trigger web: https://s-hello-"));
    assert_eq!(
        get(&client, "s-hello").await["environmentVariables"]["GREETING"],
        "second"
    );

    // A zip package, provision config and VPC bindings, converging.
    let project = dir.path().join("job");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("job.zip"),
        common::one_file_zip("app.py", b"print('job')\n"),
    )
    .unwrap();
    let job = |vpcs: &str| {
        format!(
            "edition: 3.0.0\nname: jobs\nresources:\n  job:\n    component: fc3\n    props:\n      \
             functionName: s-job\n      runtime: custom.debian12\n      handler: index.handler\n      \
             code: ./job.zip\n      customRuntimeConfig: {{command: [python3, app.py], port: 9000}}\n      \
             provisionConfig: {{defaultTarget: 1, alwaysAllocateCPU: false}}\n      \
             vpcBinding: {{vpcIds: [{vpcs}]}}\n"
        )
    };
    let file = project.join("s.yaml");
    std::fs::write(&file, job("vpc-a")).unwrap();
    let out = run(file.clone(), vec![]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("bound to VPC vpc-a"));
    let p = get(&client, "s-job/provision-config").await;
    assert_eq!(p["target"], 1);
    assert_eq!(p["alwaysAllocateCPU"], false);
    assert_eq!(
        get(&client, "s-job/vpc-bindings").await["vpcIds"],
        serde_json::json!(["vpc-a"])
    );
    std::fs::write(&file, job("")).unwrap();
    let out = run(file.clone(), vec![]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("unbound from VPC vpc-a"));
    assert_eq!(
        get(&client, "s-job/vpc-bindings").await["vpcIds"],
        serde_json::json!([])
    );

    // What Kiln cannot do is named, and nothing of the project is deployed
    // (the first resource is fine; the second is not).
    std::fs::write(
        &file,
        "edition: 3.0.0\nresources:\n  ok:\n    component: fc3\n    props: {functionName: s-fine, code: ./job.zip, runtime: custom.debian12}\n  \
         web:\n    component: fc3\n    props:\n      functionName: s-web\n      code: ./job.zip\n      \
         nasConfig: {mountPoints: []}\n      triggers: [{triggerName: http, triggerType: http}]\n",
    )
    .unwrap();
    let out = run(file, vec![]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("resources.web.props.nasConfig"), "{err}");
    assert!(err.contains("resources.web.props.triggers"), "{err}");
    assert!(err.contains("nothing was deployed"), "{err}");
    for name in ["s-fine", "s-web"] {
        let e = client.get_function(name).await.unwrap_err();
        assert!(e.to_string().contains("FunctionNotFound"), "{name}: {e}");
    }
}
