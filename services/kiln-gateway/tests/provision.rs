//! FC's provision and concurrency configs end to end: the real gateway and
//! the real scheduler on loopback (DevPki in a tempdir, real mTLS), driven
//! with signed requests. No agent: provisioned instances cannot start, so
//! `current` stays 0, but every configuration is kept and checked.

mod common;

use std::net::SocketAddr;

use common::*;
use http::{Method, StatusCode};
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::{GatewayConfig, GatewayHandle};
use kiln_pki::DevPki;
use kiln_scheduler::{SchedulerConfig, SchedulerHandle};
use serde_json::{json, Value};

struct Env {
    _dir: tempfile::TempDir,
    pki: DevPki,
    state_dir: std::path::PathBuf,
    gateway: GatewayHandle,
    scheduler: SchedulerHandle,
}

impl Env {
    async fn new() -> Env {
        Self::with_agent(None).await
    }

    /// With a fake agent behind the scheduler (instances start at once).
    async fn with_agent(agent: Option<std::sync::Arc<kiln_scheduler::FakeAgent>>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        let sched_dir = dir.path().join("scheduler");
        std::fs::create_dir_all(&sched_dir).unwrap();
        let scheduler = kiln_scheduler::start_with(
            SchedulerConfig::new(
                sched_dir,
                "127.0.0.1:0".parse().unwrap(),
                pki.files("scheduler"),
            ),
            kiln_scheduler::Overrides {
                agent: agent.map(|a| a as std::sync::Arc<dyn kiln_scheduler::AgentClient>),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let state_dir = dir.path().join("gateway");
        let key =
            |account: &str, ak: &str, sk: &str| BootstrapKey::new(account.parse().unwrap(), ak, sk);
        let gateway = kiln_gateway::start(GatewayConfig {
            lease_hold_ms: 0,
            bootstrap_keys: vec![key(ACCOUNT_A, AK_A, SK_A), key(ACCOUNT_B, AK_B, SK_B)],
            ..GatewayConfig::loopback(
                state_dir.clone(),
                "cn-test",
                &format!("https://127.0.0.1:{}", scheduler.addr().port()),
                &pki,
            )
        })
        .await
        .unwrap();
        Env {
            _dir: dir,
            pki,
            state_dir,
            gateway,
            scheduler,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.public_addr()
    }

    fn client(&self, ak: &'static str, sk: &'static str) -> Api {
        Api::new(&self.pki, self.addr(), ak, sk, false)
    }

    async fn shutdown(self) {
        self.gateway.shutdown().await;
        self.scheduler.shutdown().await;
    }
}

impl Api {
    async fn put(&self, path: &str, doc: &Value) -> Answer {
        self.call(Method::PUT, path, doc.to_string().into_bytes())
            .await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, vec![]).await
    }

    async fn create(&self, name: &str) {
        let zip = zip_of(&[("app.py", b"print('hi')\n")]);
        let doc = json!({
            "functionName": name,
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 512,
            "timeout": 10,
            "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
            "code": {"zipFile": b64(&zip)},
        });
        let a = self
            .call(
                Method::POST,
                "/2023-03-30/functions",
                doc.to_string().into_bytes(),
            )
            .await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
    }
}

fn prov(name: &str) -> String {
    format!("/2023-03-30/functions/{name}/provision-config")
}

fn conc(name: &str) -> String {
    format!("/2023-03-30/functions/{name}/concurrency")
}

#[tokio::test]
async fn provision_configs_round_trip_checked_and_scoped() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    a.create("p1").await;
    a.create("p2").await;
    b.create("p1").await;

    // Nothing configured yet: FC's shape with zero targets.
    let v = a.get(&prov("p1")).await.ok_with(StatusCode::OK);
    assert_eq!(
        (v["target"].clone(), v["current"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(
        v["functionArn"],
        format!("acs:fc:cn-test:{ACCOUNT_A}:functions/p1")
    );

    let doc = json!({
        "target": 2,
        "alwaysAllocateCPU": true,
        "scheduledActions": [{
            "name": "night", "scheduleExpression": "cron(0 0 22 * * *)",
            "target": 3, "timeZone": "Asia/Shanghai",
            "startTime": "2020-01-01T00:00:00Z", "endTime": "2099-01-01T00:00:00Z"
        }],
        "targetTrackingPolicies": [],
    });
    let v = a.put(&prov("p1"), &doc).await.ok_with(StatusCode::OK);
    assert_eq!(v["defaultTarget"], 2);
    assert_eq!(v["alwaysAllocateCPU"], true);
    assert_eq!(v["current"], 0, "no node: nothing can start");
    assert_eq!(v["scheduledActions"][0]["timeZone"], "Asia/Shanghai");
    let got = a.get(&prov("p1")).await.ok_with(StatusCode::OK);
    assert_eq!(got["defaultTarget"], 2);
    assert_eq!(got["scheduledActions"], v["scheduledActions"]);
    assert_eq!(got["targetTrackingPolicies"], json!([]));

    // Bad input of every kind: InvalidArgument, the stored config unchanged.
    let bad = [
        (json!({"target": -1}), "target must be between 0"),
        (
            json!({"target": 1, "scheduledActions": [{"name": "x", "scheduleExpression": "cron(nope)", "target": 1}]}),
            "scheduled action \"x\"",
        ),
        (
            json!({"target": 1, "scheduledActions": [{"name": "x", "scheduleExpression": "cron(0 0 8 * * *)", "target": 1, "timeZone": "Mars/Olympus"}]}),
            "scheduled action \"x\"",
        ),
        (
            json!({"target": 1, "scheduledActions": [{"name": "x", "scheduleExpression": "cron(0 0 8 * * *)", "target": 1, "startTime": "yesterday"}]}),
            "scheduled action \"x\"",
        ),
        (
            json!({"target": 1, "targetTrackingPolicies": [{"name": "t", "metricType": "ProvisionedConcurrencyUtilization", "metricTarget": 0.5, "minCapacity": 4, "maxCapacity": 1}]}),
            "minCapacity 4 is greater than maxCapacity 1",
        ),
        (
            json!({"target": 1, "targetTrackingPolicies": [{"name": "t", "metricType": "ProvisionedConcurrencyUtilization", "metricTarget": -0.2, "minCapacity": 1, "maxCapacity": 2}]}),
            "metricTarget",
        ),
        (json!({"target": 1, "unknown": true}), "unknown field"),
    ];
    for (doc, says) in bad {
        let m = a
            .put(&prov("p1"), &doc)
            .await
            .fc_error(400, "InvalidArgument");
        assert!(m.contains(says), "{says:?} not in {m:?}");
    }
    let m = a
        .call(Method::PUT, &prov("p1"), b"{not json".to_vec())
        .await
        .fc_error(400, "InvalidArgument");
    assert!(m.contains("not valid"), "{m}");
    assert_eq!(a.get(&prov("p1")).await.ok_with(StatusCode::OK), got);
    // An alias that does not exist (aliases have their own configurations).
    a.put(
        &format!("{}?qualifier=prod", prov("p1")),
        &json!({"target": 1}),
    )
    .await
    .fc_error(404, "AliasNotFound");

    // Functions that do not exist, or are another account's.
    a.put(&prov("nope"), &json!({"target": 1}))
        .await
        .fc_error(404, "FunctionNotFound");
    a.get(&prov("nope")).await.fc_error(404, "FunctionNotFound");
    a.call(Method::DELETE, &prov("nope"), vec![])
        .await
        .fc_error(404, "FunctionNotFound");
    // B's p1 is B's own: unconfigured, and B cannot see A's.
    assert_eq!(
        b.get(&prov("p1")).await.ok_with(StatusCode::OK)["target"],
        0
    );
    let l = b
        .get("/2023-03-30/provision-configs")
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(l["provisionConfigs"], json!([]));

    // Target tracking on p2; list pages by function name.
    let v = a
        .put(
            &prov("p2"),
            &json!({"target": 0, "targetTrackingPolicies": [{
                "name": "tt", "metricType": "ProvisionedConcurrencyUtilization",
                "metricTarget": 0.5, "minCapacity": 1, "maxCapacity": 4}]}),
        )
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(v["targetTrackingPolicies"][0]["maxCapacity"], 4);
    let l = a
        .get("/2023-03-30/provision-configs")
        .await
        .ok_with(StatusCode::OK);
    let names: Vec<&str> = l["provisionConfigs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["functionArn"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            format!("acs:fc:cn-test:{ACCOUNT_A}:functions/p1"),
            format!("acs:fc:cn-test:{ACCOUNT_A}:functions/p2")
        ]
    );
    assert!(l.get("nextToken").is_none());
    let page = a
        .get("/2023-03-30/provision-configs?limit=1")
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(page["provisionConfigs"].as_array().unwrap().len(), 1);
    let token = page["nextToken"].as_str().unwrap().to_owned();
    let page2 = a
        .get(&format!(
            "/2023-03-30/provision-configs?limit=1&nextToken={token}"
        ))
        .await
        .ok_with(StatusCode::OK);
    assert!(page2["provisionConfigs"][0]["functionArn"]
        .as_str()
        .unwrap()
        .ends_with("/p2"));
    let one = a
        .get("/2023-03-30/provision-configs?functionName=p2")
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(one["provisionConfigs"].as_array().unwrap().len(), 1);
    a.get("/2023-03-30/provision-configs?limit=0")
        .await
        .fc_error(400, "InvalidArgument");
    a.get("/2023-03-30/provision-configs?nextToken=garbage!")
        .await
        .fc_error(400, "InvalidArgument");

    // Delete, idempotently.
    let d = a.call(Method::DELETE, &prov("p1"), vec![]).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    let d = a.call(Method::DELETE, &prov("p1"), vec![]).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    assert_eq!(
        a.get(&prov("p1")).await.ok_with(StatusCode::OK)["defaultTarget"],
        0
    );
    let l = a
        .get("/2023-03-30/provision-configs")
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(l["provisionConfigs"].as_array().unwrap().len(), 1);
    env.shutdown().await;
}

#[tokio::test]
async fn concurrency_configs_round_trip_checked_and_scoped() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    a.create("c1").await;
    a.create("c2").await;
    b.create("c1").await;

    let v = a.get(&conc("c1")).await.ok_with(StatusCode::OK);
    assert_eq!(
        v,
        json!({"functionArn": format!("acs:fc:cn-test:{ACCOUNT_A}:functions/c1")})
    );
    let v = a
        .put(&conc("c1"), &json!({"reservedConcurrency": 5}))
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(v["reservedConcurrency"], 5);
    assert_eq!(
        a.get(&conc("c1")).await.ok_with(StatusCode::OK)["reservedConcurrency"],
        5
    );
    a.put(&conc("c2"), &json!({"reservedConcurrency": 0}))
        .await
        .ok_with(StatusCode::OK);

    // Bad input: InvalidArgument, nothing changed.
    for doc in [
        json!({"reservedConcurrency": -1}),
        json!({}),
        json!({"reservedConcurrency": "many"}),
        // More than the account's burst pool (300 by default, 5 + 0 used).
        json!({"reservedConcurrency": 400}),
    ] {
        a.put(&conc("c1"), &doc)
            .await
            .fc_error(400, "InvalidArgument");
    }
    assert_eq!(
        a.get(&conc("c1")).await.ok_with(StatusCode::OK)["reservedConcurrency"],
        5
    );

    a.put(&conc("nope"), &json!({"reservedConcurrency": 1}))
        .await
        .fc_error(404, "FunctionNotFound");
    a.get(&conc("nope")).await.fc_error(404, "FunctionNotFound");
    // B's c1 is its own.
    assert!(b
        .get(&conc("c1"))
        .await
        .ok_with(StatusCode::OK)
        .get("reservedConcurrency")
        .is_none());
    assert_eq!(
        b.get("/2023-03-30/concurrency-configs")
            .await
            .ok_with(StatusCode::OK)["configs"],
        json!([])
    );

    let l = a
        .get("/2023-03-30/concurrency-configs")
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(
        l["configs"],
        json!([
            {"functionArn": format!("acs:fc:cn-test:{ACCOUNT_A}:functions/c1"), "reservedConcurrency": 5},
            {"functionArn": format!("acs:fc:cn-test:{ACCOUNT_A}:functions/c2"), "reservedConcurrency": 0},
        ])
    );
    let d = a.call(Method::DELETE, &conc("c1"), vec![]).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    let d = a.call(Method::DELETE, &conc("c1"), vec![]).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    assert!(a
        .get(&conc("c1"))
        .await
        .ok_with(StatusCode::OK)
        .get("reservedConcurrency")
        .is_none());
    let l = a
        .get("/2023-03-30/concurrency-configs")
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(l["configs"].as_array().unwrap().len(), 1);
    env.shutdown().await;
}

#[tokio::test]
async fn official_python_sdk_provision_configs() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    env.client(AK_A, SK_A).create("sdk-prov").await;
    run_python_sdk(
        &python,
        "fc_sdk_provision.py",
        env.addr(),
        &env.pki,
        &[std::ffi::OsStr::new("sdk-prov")],
        "SDK provision ok",
    )
    .await;
    let _ = &env.state_dir;
    env.shutdown().await;
}

/// Provision configurations per qualifier: LATEST's and an alias's, each
/// keeping instances of the revision it names; the alias's follows the
/// alias to a new version, survives Disable/Enable, and goes with the
/// alias. A version is not a provision qualifier.
#[tokio::test]
async fn an_alias_has_its_own_provision_config_that_follows_it() {
    let agent = kiln_scheduler::FakeAgent::new(std::time::Duration::ZERO);
    let env = Env::with_agent(Some(agent.clone())).await;
    let sched = env.scheduler.scheduler().clone();
    register_node(&sched);
    let a = env.client(AK_A, SK_A);
    a.create("web").await;
    let publish = async |a: &Api| {
        a.call(
            Method::POST,
            "/2023-03-30/functions/web/versions",
            b"{}".to_vec(),
        )
        .await
        .ok_with(StatusCode::OK)["versionId"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(publish(&a).await, "1");
    a.call(
        Method::POST,
        "/2023-03-30/functions/web/aliases",
        json!({"aliasName": "prod", "versionId": "1"})
            .to_string()
            .into_bytes(),
    )
    .await
    .ok_with(StatusCode::OK);
    let prod = "/2023-03-30/functions/web/provision-config?qualifier=prod";
    a.put(
        &format!("{}?qualifier=1", prov("web")),
        &json!({"target": 1}),
    )
    .await
    .fc_error(400, "InvalidArgument");
    a.put(
        &format!("{}?qualifier=nope", prov("web")),
        &json!({"target": 1}),
    )
    .await
    .fc_error(404, "AliasNotFound");
    let p = a
        .put(prod, &json!({"target": 1}))
        .await
        .ok_with(StatusCode::OK);
    assert!(
        p["functionArn"]
            .as_str()
            .unwrap()
            .ends_with("functions/web/aliases/prod"),
        "{p}"
    );
    a.put(&prov("web"), &json!({"target": 2}))
        .await
        .ok_with(StatusCode::OK);
    let revisions =
        |sched: &kiln_scheduler::Scheduler| -> std::collections::BTreeMap<String, usize> {
            let mut m = std::collections::BTreeMap::new();
            for i in sched.instances() {
                *m.entry(i.revision).or_default() += 1;
            }
            m
        };
    wait_for("LATEST's two and the alias's one", async || {
        sched.tick();
        let p = a.get(prod).await.ok_with(StatusCode::OK);
        let l = a.get(&prov("web")).await.ok_with(StatusCode::OK);
        (p["current"] == 1 && l["current"] == 2).then_some(())
    })
    .await;
    let before = revisions(&sched);
    assert_eq!(
        before.len(),
        2,
        "LATEST's revision and version 1's: {before:?}"
    );
    let listed = a
        .get("/2023-03-30/provision-configs?functionName=web")
        .await
        .ok();
    let arns: Vec<&str> = listed["provisionConfigs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["functionArn"].as_str().unwrap())
        .collect();
    assert!(
        arns[0].ends_with("functions/web") && arns[1].ends_with("functions/web/aliases/prod"),
        "{listed}"
    );

    // A new version; the alias moves to it and its provisioned instance
    // with it.
    a.call(
        Method::PUT,
        "/2023-03-30/functions/web",
        json!({"description": "two"}).to_string().into_bytes(),
    )
    .await
    .ok_with(StatusCode::OK);
    assert_eq!(publish(&a).await, "2");
    a.call(
        Method::PUT,
        "/2023-03-30/functions/web/aliases/prod",
        json!({"versionId": "2"}).to_string().into_bytes(),
    )
    .await
    .ok_with(StatusCode::OK);
    wait_for("the alias's instance on version 2", async || {
        sched.tick();
        let provisioned_revisions: std::collections::BTreeSet<String> = sched
            .instances()
            .into_iter()
            .filter(|i| !before.contains_key(&i.revision))
            .map(|i| i.revision)
            .collect();
        (!provisioned_revisions.is_empty()
            && a.get(prod).await.ok_with(StatusCode::OK)["current"] == 1)
            .then_some(())
    })
    .await;

    // Disabled and enabled: both configurations come back.
    a.call(
        Method::POST,
        "/2023-03-30/functions/web/invoke/disable",
        vec![],
    )
    .await
    .ok_with(StatusCode::OK);
    wait_for("no instance while disabled", async || {
        sched.tick();
        sched.instances().is_empty().then_some(())
    })
    .await;
    assert_eq!(
        a.get(prod).await.ok_with(StatusCode::OK)["defaultTarget"],
        1
    );
    a.call(
        Method::POST,
        "/2023-03-30/functions/web/invoke/enable",
        vec![],
    )
    .await
    .ok_with(StatusCode::OK);
    wait_for("both configurations restored", async || {
        sched.tick();
        let p = a.get(prod).await.ok_with(StatusCode::OK);
        let l = a.get(&prov("web")).await.ok_with(StatusCode::OK);
        (p["current"] == 1 && l["current"] == 2).then_some(())
    })
    .await;

    // The alias goes, and its configuration with it.
    a.call(
        Method::DELETE,
        "/2023-03-30/functions/web/aliases/prod",
        vec![],
    )
    .await;
    let left: Vec<String> = sched
        .provisions()
        .into_iter()
        .map(|p| p.qualifier)
        .collect();
    assert_eq!(left, vec!["LATEST".to_owned()]);
    env.shutdown().await;
}

#[tokio::test]
async fn official_python_sdk_disables_and_enables_invocations() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    let zip_path = env.state_dir.join("sdk.zip");
    std::fs::write(&zip_path, zip_of(&[("app.py", b"print('hi')\n")])).unwrap();
    run_python_sdk(
        &python,
        "fc_sdk_invocation.py",
        env.addr(),
        &env.pki,
        &[zip_path.as_os_str()],
        "SDK invocation restriction ok",
    )
    .await;
    env.shutdown().await;
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn provisioned_instances_start_and_follow_function_updates() {
    let agent = kiln_scheduler::FakeAgent::new(std::time::Duration::ZERO);
    let env = Env::with_agent(Some(agent.clone())).await;
    let sched = env.scheduler.scheduler().clone();
    register_node(&sched);
    let a = env.client(AK_A, SK_A);
    a.create("warm").await;
    a.put(&prov("warm"), &json!({"target": 2}))
        .await
        .ok_with(StatusCode::OK);
    wait_for("two provisioned instances", async || {
        sched.tick();
        (a.get(&prov("warm")).await.ok_with(StatusCode::OK)["current"] == 2).then_some(())
    })
    .await;
    let before: Vec<String> = sched
        .instances()
        .iter()
        .map(|i| i.revision.clone())
        .collect();
    assert_eq!(before.len(), 2);

    // A new revision: the configuration follows it, two new instances.
    let u = a
        .call(
            Method::PUT,
            "/2023-03-30/functions/warm",
            json!({"memorySize": 1024}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(u.status, StatusCode::OK);
    wait_for(
        "two provisioned instances of the new revision",
        async || {
            sched.tick();
            let fresh = sched
                .instances()
                .iter()
                .filter(|i| !before.contains(&i.revision))
                .count();
            (fresh == 2 && a.get(&prov("warm")).await.ok_with(StatusCode::OK)["current"] == 2)
                .then_some(())
        },
    )
    .await;

    // Deleting the function removes its configuration.
    a.call(Method::DELETE, "/2023-03-30/functions/warm", vec![])
        .await;
    wait_for("the configuration to go", async || {
        sched.provisions().is_empty().then_some(())
    })
    .await;
    env.shutdown().await;
}

fn register_node(sched: &kiln_scheduler::Scheduler) {
    sched
        .register(&kiln_internal_api::RegisterNode {
            node_id: None,
            agent_url: "https://127.0.0.1:1".into(),
            capacity: kiln_internal_api::NodeCapacity {
                memory_mb: 16 * 1024,
                cpu_milli: 16_000,
                max_instances: 50,
            },
            labels: kiln_internal_api::NodeLabels {
                zone: "zone-a".into(),
                tenancy: kiln_internal_api::Tenancy::Dedicated,
                sandbox_kinds: vec![kiln_core::SandboxKind::Container],
                dedicated_account: Some(ACCOUNT_A.parse().unwrap()),
                runtimes: None,
                network_isolation: Default::default(),
            },
            instances: vec![],
        })
        .unwrap();
}

/// DisableFunctionInvocation: calls refused, provisioned instances
/// destroyed and not started again while disabled, the configuration kept
/// and restored by EnableFunctionInvocation; bad input and other accounts
/// change nothing.
#[tokio::test]
async fn disabled_invocations_refuse_calls_and_drop_provisioned_instances_until_enabled() {
    let agent = kiln_scheduler::FakeAgent::new(std::time::Duration::ZERO);
    let env = Env::with_agent(Some(agent.clone())).await;
    let sched = env.scheduler.scheduler().clone();
    register_node(&sched);
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    a.create("shop").await;
    a.put(&prov("shop"), &json!({"target": 2}))
        .await
        .ok_with(StatusCode::OK);
    wait_for("two provisioned instances", async || {
        sched.tick();
        (a.get(&prov("shop")).await.ok_with(StatusCode::OK)["current"] == 2).then_some(())
    })
    .await;
    let disable = "/2023-03-30/functions/shop/invoke/disable";
    let enable = "/2023-03-30/functions/shop/invoke/enable";
    let function = "/2023-03-30/functions/shop";

    // Bad bodies and another account's caller change nothing.
    for bad in [&b"{\"abort\": true}"[..], b"[1]", b"{\"reason\": 5}"] {
        a.call(Method::POST, disable, bad.to_vec())
            .await
            .fc_error(400, "InvalidArgument");
    }
    b.call(Method::POST, disable, b"{}".to_vec())
        .await
        .fc_error(404, "FunctionNotFound");
    assert!(a
        .get(function)
        .await
        .ok()
        .get("invocationRestriction")
        .is_none());
    assert_eq!(sched.instances().len(), 2);

    let r = a
        .call(
            Method::POST,
            disable,
            json!({"reason": "maintenance", "abortOngoingRequest": false})
                .to_string()
                .into_bytes(),
        )
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(r, json!({"success": true}));
    let f = a.get(function).await.ok();
    assert_eq!(f["invocationRestriction"]["disable"], true, "{f}");
    assert_eq!(f["invocationRestriction"]["reason"], "maintenance");
    assert!(f["invocationRestriction"]["lastModifiedTime"].is_string());

    // Every kind of call is refused before any instance is asked for.
    let invoke = "/2023-03-30/functions/shop/invocations";
    let e = a.call(Method::POST, invoke, b"{}".to_vec()).await;
    let msg = e.fc_error(403, "FunctionInvocationDisabled");
    assert!(msg.contains("maintenance"), "{msg}");
    a.call_with(
        Method::POST,
        invoke,
        b"{}".to_vec(),
        &[("x-fc-invocation-type", "Async")],
    )
    .await
    .fc_error(403, "FunctionInvocationDisabled");
    a.put(&prov("shop"), &json!({"target": 3}))
        .await
        .fc_error(403, "FunctionInvocationDisabled");

    // The provisioned instances go and are not started again.
    wait_for("the provisioned instances to be destroyed", async || {
        sched.tick();
        sched.instances().is_empty().then_some(())
    })
    .await;
    assert_eq!(agent.destroyed().len(), 2);
    for _ in 0..5 {
        sched.tick();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(sched.instances().is_empty(), "no instance while disabled");
    let p = a.get(&prov("shop")).await.ok_with(StatusCode::OK);
    assert_eq!(
        (
            p["defaultTarget"].clone(),
            p["target"].clone(),
            p["current"].clone()
        ),
        (json!(2), json!(0), json!(0)),
        "{p}"
    );
    let listed = a.get("/2023-03-30/provision-configs").await.ok();
    assert_eq!(
        listed["provisionConfigs"][0]["defaultTarget"], 2,
        "{listed}"
    );

    // Disabling again is idempotent and keeps the configuration.
    a.call(Method::POST, disable, vec![])
        .await
        .ok_with(StatusCode::OK);
    let p = a.get(&prov("shop")).await.ok_with(StatusCode::OK);
    assert_eq!(p["defaultTarget"], 2, "{p}");

    // Enable: calls are taken again and the provisioned instances return.
    let r = a
        .call(Method::POST, enable, vec![])
        .await
        .ok_with(StatusCode::OK);
    assert_eq!(r, json!({"success": true}));
    let f = a.get(function).await.ok();
    assert_eq!(f["invocationRestriction"]["disable"], false, "{f}");
    wait_for("the provisioned instances to return", async || {
        sched.tick();
        (a.get(&prov("shop")).await.ok_with(StatusCode::OK)["current"] == 2).then_some(())
    })
    .await;
    let e = a.call(Method::POST, invoke, b"{}".to_vec()).await;
    assert_ne!(
        e.status,
        StatusCode::FORBIDDEN,
        "enabled: {}",
        String::from_utf8_lossy(&e.body)
    );
    // Enabling an enabled function is a no-op.
    a.call(Method::POST, enable, vec![])
        .await
        .ok_with(StatusCode::OK);
    env.shutdown().await;
}

#[tokio::test]
async fn the_runtime_listing_shows_which_runtimes_the_nodes_offer() {
    let env = Env::new().await;
    let sched = env.scheduler.scheduler().clone();
    let a = env.client(AK_A, SK_A);
    let nodes_of = |v: &serde_json::Value, runtime: &str| {
        v["runtimes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["runtime"] == runtime)
            .unwrap()["nodes"]
            .clone()
    };
    let v = a.get("/2023-03-30/runtimes").await.ok_with(StatusCode::OK);
    assert_eq!(nodes_of(&v, "custom"), 0);
    sched
        .register(&kiln_internal_api::RegisterNode {
            node_id: None,
            agent_url: "https://127.0.0.1:1".into(),
            capacity: kiln_internal_api::NodeCapacity {
                memory_mb: 1024,
                cpu_milli: 1000,
                max_instances: 4,
            },
            labels: kiln_internal_api::NodeLabels {
                zone: "zone-a".into(),
                tenancy: kiln_internal_api::Tenancy::Dedicated,
                sandbox_kinds: vec![kiln_core::SandboxKind::Container],
                dedicated_account: None,
                runtimes: Some(vec![kiln_core::RuntimeName::Custom]),
                network_isolation: Default::default(),
            },
            instances: vec![],
        })
        .unwrap();
    let v = a.get("/2023-03-30/runtimes").await.ok_with(StatusCode::OK);
    assert_eq!(nodes_of(&v, "custom"), 1);
    assert_eq!(nodes_of(&v, "custom.debian12"), 0);
    assert_eq!(v["runtimes"][0]["status"], "Active");
    env.shutdown().await;
}
