use std::path::Path;
use std::time::Duration;

use kiln_core::{FcErrorCode, InstanceSpec, ManualClock};
use kiln_internal_api::Tenancy;
use kiln_pki::TlsFiles;

use super::*;
use crate::agent::FakeAgent;
use crate::placement::tests::{registration, spec};
use crate::store::SqliteSchedulerStore;

fn config(dir: &Path) -> SchedulerConfig {
    let tls = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("c.pem"),
        key: dir.join("k.pem"),
    };
    let mut c = SchedulerConfig::new(dir.to_owned(), "127.0.0.1:0".parse().unwrap(), tls);
    c.node_failure_after_ms = 3_600_000;
    c
}

struct Fixture {
    sched: Scheduler,
    agent: Arc<FakeAgent>,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

fn fixture_with(c: impl FnOnce(&mut SchedulerConfig), delay: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    c(&mut cfg);
    let agent = FakeAgent::new(delay);
    let clock = ManualClock::new(1_000_000);
    let store = Arc::new(
        SqliteSchedulerStore::open(&cfg.db_path(), SqliteSchedulerStore::test_sealer()).unwrap(),
    );
    let (sched, _) = Scheduler::new(
        &cfg,
        SchedulerDeps {
            clock: Arc::new(clock.clone()),
            agent: agent.clone(),
            store,
        },
    )
    .unwrap();
    sched
        .register(&registration(
            Some("n1"),
            64 * 1024,
            Tenancy::Dedicated,
            None,
        ))
        .unwrap();
    Fixture {
        sched,
        agent,
        clock,
        _dir: dir,
    }
}

fn fixture(delay: Duration) -> Fixture {
    fixture_with(|_| {}, delay)
}

fn acquire_req(s: &InstanceSpec) -> AcquireLease {
    AcquireLease {
        request_id: "r-1".into(),
        spec: s.clone(),
    }
}

/// Let spawned destroys run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn two_hundred_simultaneous_calls_start_twenty_instances() {
    let f = fixture(Duration::from_millis(200));
    let s = spec("1", "burst", 10, 128);
    let calls = (0..200).map(|_| {
        let sched = f.sched.clone();
        let req = acquire_req(&s);
        tokio::spawn(async move { sched.acquire(req).await })
    });
    let leases: Vec<Lease> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(f.agent.created(), 20);
    assert_eq!(f.sched.instances().len(), 20);
    assert_eq!(leases.iter().filter(|l| l.cold_start).count(), 20);
    assert!(f.sched.instances().iter().all(|i| i.in_flight == 10));
    for l in &leases {
        f.sched.release(&l.lease_id, LeaseOutcome::Ok).unwrap();
    }
    assert!(f.sched.instances().iter().all(|i| i.in_flight == 0));
    assert_eq!(f.sched.metrics().cold_starts.get(), 20);
    assert_eq!(f.sched.metrics().acquires.get(), 200);
}

#[tokio::test]
async fn a_start_failure_fails_every_waiter_with_the_agents_error() {
    let f = fixture(Duration::from_millis(50));
    f.agent.fail_creates(Some(FcError::new(
        FcErrorCode::FunctionNotStarted,
        "the runtime exited with status 1",
    )));
    let s = spec("1", "broken", 5, 128);
    let calls = (0..5).map(|_| {
        let sched = f.sched.clone();
        let req = acquire_req(&s);
        tokio::spawn(async move { sched.acquire(req).await })
    });
    for r in futures_util::future::join_all(calls).await {
        let err = r.unwrap().unwrap_err();
        assert_eq!(err.code, FcErrorCode::FunctionNotStarted);
        assert_eq!(err.message, "the runtime exited with status 1");
    }
    assert!(f.sched.instances().is_empty());
    settle().await;
    assert_eq!(
        f.agent.destroyed().len(),
        1,
        "the agent is asked to clean up"
    );
    // It works again once the agent does.
    f.agent.fail_creates(None);
    assert!(f.sched.acquire(acquire_req(&s)).await.unwrap().cold_start);
}

#[tokio::test]
async fn a_slow_start_times_out() {
    let f = fixture_with(
        |c| c.instance_start_timeout_ms = 100,
        Duration::from_secs(5),
    );
    let err = f
        .sched
        .acquire(acquire_req(&spec("1", "slow", 1, 128)))
        .await
        .unwrap_err();
    assert_eq!(err.code, FcErrorCode::FunctionNotStarted);
    assert!(err.message.contains("100 ms"), "{}", err.message);
    assert!(f.sched.instances().is_empty());
}

#[tokio::test]
async fn idle_instances_are_destroyed_on_the_agent() {
    let f = fixture(Duration::ZERO);
    let l = f
        .sched
        .acquire(acquire_req(&spec("1", "f", 1, 128)))
        .await
        .unwrap();
    f.sched.release(&l.lease_id, LeaseOutcome::Ok).unwrap();
    f.clock.advance(Duration::from_secs(299));
    f.sched.tick();
    settle().await;
    assert_eq!(f.agent.running(), vec![l.instance_id.clone()]);
    f.clock.advance(Duration::from_secs(1));
    f.sched.tick();
    settle().await;
    assert!(f.agent.running().is_empty());
    assert_eq!(f.agent.destroyed(), vec![l.instance_id]);
    assert!(f.sched.instances().is_empty());
}

#[tokio::test]
async fn a_failed_instance_is_destroyed_when_its_calls_end() {
    let f = fixture(Duration::ZERO);
    let s = spec("1", "f", 2, 128);
    let a = f.sched.acquire(acquire_req(&s)).await.unwrap();
    let b = f.sched.acquire(acquire_req(&s)).await.unwrap();
    f.sched
        .release(&a.lease_id, LeaseOutcome::InstanceFailed)
        .unwrap();
    settle().await;
    assert!(f.agent.destroyed().is_empty());
    f.sched.release(&b.lease_id, LeaseOutcome::Ok).unwrap();
    settle().await;
    assert_eq!(f.agent.destroyed(), vec![a.instance_id]);
}

#[tokio::test]
async fn a_node_failure_fails_waiting_calls_with_a_retryable_error() {
    let f = fixture_with(
        |c| c.node_failure_after_ms = 10_000,
        Duration::from_millis(300),
    );
    let s = spec("1", "f", 2, 128);
    let sched = f.sched.clone();
    let req = acquire_req(&s);
    let waiter = tokio::spawn(async move { sched.acquire(req).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.clock.advance(Duration::from_secs(11));
    f.sched.tick();
    let err = waiter.await.unwrap().unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
    assert!(err.code.is_retryable());
    assert_eq!(f.sched.nodes()[0].state, "failed");
    // The late start is cleaned up on the agent.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(f.agent.running().is_empty());
}

#[tokio::test]
async fn an_abandoned_acquire_gives_its_slot_back() {
    let f = fixture(Duration::from_millis(200));
    let s = spec("1", "f", 1, 128);
    let sched = f.sched.clone();
    let req = acquire_req(&s);
    let call = tokio::spawn(async move { sched.acquire(req).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.abort();
    let _ = call.await;
    assert_eq!(f.sched.instances()[0].in_flight, 0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The instance started anyway and is warm for the next call.
    let l = f.sched.acquire(acquire_req(&s)).await.unwrap();
    assert!(!l.cold_start);
    assert_eq!(f.agent.created(), 1);
}

#[tokio::test]
async fn a_restart_reloads_nodes_and_instances() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let agent = FakeAgent::new(Duration::ZERO);
    let clock = ManualClock::new(5_000);
    let deps = || SchedulerDeps {
        clock: Arc::new(clock.clone()),
        agent: agent.clone(),
        store: Arc::new(
            SqliteSchedulerStore::open(&cfg.db_path(), SqliteSchedulerStore::test_sealer())
                .unwrap(),
        ),
    };
    let (sched, writer) = Scheduler::new(&cfg, deps()).unwrap();
    let reg = sched
        .register(&registration(None, 8192, Tenancy::Dedicated, None))
        .unwrap();
    let s = spec("1", "f", 4, 512);
    let l = sched.acquire(acquire_req(&s)).await.unwrap();
    sched.flush().await.unwrap();
    drop(sched);
    writer.abort();

    let (sched, _writer) = Scheduler::new(&cfg, deps()).unwrap();
    let nodes = sched.nodes();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_id, reg.node_id);
    assert_eq!(nodes[0].memory_used_mb, 512);
    let instances = sched.instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].instance_id, l.instance_id);
    assert_eq!(instances[0].in_flight, 0, "leases do not survive a restart");
    // The old lease's release is harmless; the instance is warm.
    sched.release(&l.lease_id, LeaseOutcome::Ok).unwrap();
    let again = sched.acquire(acquire_req(&s)).await.unwrap();
    assert_eq!(again.instance_id, l.instance_id);
    assert!(!again.cold_start);
    // The agent re-registers with the same id and what it runs: nothing to
    // destroy, nothing forgotten.
    let mut r = registration(Some(reg.node_id.as_str()), 8192, Tenancy::Dedicated, None);
    r.instances = vec![l.instance_id.clone()];
    let reg2 = sched.register(&r).unwrap();
    assert_eq!(reg2.node_id, reg.node_id);
    assert!(reg2.destroy.is_empty());
    assert_eq!(sched.instances().len(), 1);
}

/// Which certificate holds a live node survives a restart: another
/// certificate for the same node id, registering from another address
/// after the restart, is refused as before it.
#[tokio::test]
async fn a_restart_keeps_which_certificate_holds_each_node() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let agent = FakeAgent::new(Duration::ZERO);
    let clock = ManualClock::new(5_000);
    let open = || {
        let store = Arc::new(
            SqliteSchedulerStore::open(&cfg.db_path(), SqliteSchedulerStore::test_sealer())
                .unwrap(),
        );
        let trust =
            crate::trust::Trust::open(store.clone(), Arc::new(clock.clone()), "kiln-test", None)
                .unwrap();
        let deps = SchedulerDeps {
            clock: Arc::new(clock.clone()),
            agent: agent.clone(),
            store,
        };
        let (sched, writer) = Scheduler::new(&cfg, deps).unwrap();
        sched.attach_trust(Arc::new(trust));
        (sched, writer)
    };
    let (sched, writer) = open();
    let held = registration(Some("n-held"), 8192, Tenancy::Dedicated, None);
    sched.register_with(&held, Some([1; 32])).unwrap();
    sched.flush().await.unwrap();
    drop(sched);
    writer.abort();

    let (sched, _writer) = open();
    let mut thief = held.clone();
    thief.agent_url = "https://127.0.0.1:9999".into();
    assert!(matches!(
        sched.register_with(&thief, Some([2; 32])),
        Err(RegisterError::Held { .. })
    ));
    // The holder itself, from its address, registers as ever.
    sched.register_with(&held, Some([1; 32])).unwrap();
}

#[tokio::test]
async fn retire_destroys_idle_old_revisions() {
    let f = fixture(Duration::ZERO);
    let old = spec("1", "f", 2, 128);
    let l = f.sched.acquire(acquire_req(&old)).await.unwrap();
    f.sched.release(&l.lease_id, LeaseOutcome::Ok).unwrap();
    f.sched.retire(&RetireFunction {
        account_id: old.account_id.clone(),
        function_name: old.function_name.clone(),
        keep_revision: Some("other".into()),
        keep_versions: Vec::new(),
        abort_in_flight: false,
    });
    settle().await;
    assert_eq!(f.agent.destroyed(), vec![l.instance_id]);
    assert!(f.sched.instances().is_empty());
}

#[tokio::test]
async fn rebalancing_moves_load_to_a_cool_node_and_counts_it() {
    let f = fixture_with(
        |c| {
            c.rebalance.enabled = true;
            c.rebalance.interval_s = 1;
            c.rebalance.high_watermark_pct = 80;
            c.rebalance.low_watermark_pct = 30;
        },
        Duration::ZERO,
    );
    // Nine 7 GB instances on n1 (64 GB): 96 % used, all idle.
    for i in 0..9 {
        let l = f
            .sched
            .acquire(acquire_req(&spec("1", &format!("f{i}"), 1, 7 * 1024)))
            .await
            .unwrap();
        f.sched.release(&l.lease_id, LeaseOutcome::Ok).unwrap();
    }
    f.sched
        .register(&registration(
            Some("n2"),
            64 * 1024,
            Tenancy::Dedicated,
            Some("1"),
        ))
        .unwrap();
    // A round every 4 ticks (250 ms each).
    for _ in 0..4 {
        f.clock.advance(Duration::from_millis(250));
        f.sched.tick();
    }
    settle().await;
    // 63 GB -> 49 GB (77 %): two moved, destroyed at once (idle).
    assert_eq!(f.sched.metrics().rebalanced.get(), 2);
    assert_eq!(f.agent.destroyed().len(), 2);
    assert_eq!(f.sched.instances().len(), 7);
    // The next call of a moved function starts on n2.
    let moved: Vec<String> = (0..9)
        .map(|i| format!("f{i}"))
        .filter(|n| {
            !f.sched
                .instances()
                .iter()
                .any(|i| i.function_name.as_str() == n)
        })
        .collect();
    assert_eq!(moved.len(), 2);
    let l = f
        .sched
        .acquire(acquire_req(&spec("1", &moved[0], 1, 7 * 1024)))
        .await
        .unwrap();
    assert_eq!(l.node_id.as_str(), "n2");
}
