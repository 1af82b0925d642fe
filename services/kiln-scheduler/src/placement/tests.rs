use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use kiln_core::{Clock, FcErrorCode, ManualClock, RuntimeName, SandboxKind};
use kiln_internal_api::{AccountLimits, NodeCapacity, NodeLabels};

use super::*;

pub(crate) fn spec(
    account: &str,
    function: &str,
    concurrency: u32,
    memory_mb: u32,
) -> InstanceSpec {
    InstanceSpec {
        account_id: account.parse().unwrap(),
        function_name: function.parse().unwrap(),
        revision: String::new(),
        version: None,
        runtime: RuntimeName::Custom,
        handler: "index.handler".into(),
        command: vec!["/code/server".into()],
        args: vec![],
        port: 9000,
        environment: BTreeMap::new(),
        memory_mb,
        cpu_milli: memory_mb / 2,
        disk_mb: 512,
        timeout_s: 3,
        concurrency,
        code_digest: "00".repeat(32),
        code_size: 10,
        initializer: None,
        pre_stop: None,
        layers: Vec::new(),
        role: None,
        network: None,
        image: None,
    }
    .seal()
}

pub(crate) fn registration(
    id: Option<&str>,
    memory_mb: u64,
    tenancy: Tenancy,
    dedicated: Option<&str>,
) -> RegisterNode {
    RegisterNode {
        node_id: id.map(|s| s.parse().unwrap()),
        agent_url: "https://127.0.0.1:7443".into(),
        capacity: NodeCapacity {
            memory_mb,
            cpu_milli: memory_mb,
            max_instances: 100,
        },
        labels: NodeLabels {
            zone: "zone-a".into(),
            tenancy,
            sandbox_kinds: vec![match tenancy {
                Tenancy::Dedicated => SandboxKind::Container,
                Tenancy::MultiTenant => SandboxKind::Microvm,
            }],
            dedicated_account: dedicated.map(|a| a.parse().unwrap()),
            runtimes: None,
            network_isolation: Default::default(),
        },
        instances: vec![],
    }
}

struct Fixture {
    p: Placement,
    clock: ManualClock,
}

impl Fixture {
    /// Nodes never fail here unless a test asks for it.
    fn new() -> Self {
        Self::with(PlacementConfig {
            node_failure_after_ms: u64::MAX / 4,
            ..PlacementConfig::default()
        })
    }

    fn with(config: PlacementConfig) -> Self {
        Self {
            p: Placement::new(config),
            clock: ManualClock::new(1_000_000),
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn node(&mut self, id: &str, memory_mb: u64) -> NodeId {
        let now = self.now();
        self.p
            .register(
                &registration(Some(id), memory_mb, Tenancy::Dedicated, None),
                now,
            )
            .unwrap()
            .node_id
    }

    /// Acquire and, for a new instance, report it started.
    fn acquire_started(&mut self, s: &InstanceSpec) -> Lease {
        let now = self.now();
        match self.p.acquire(s, now).unwrap() {
            Acquired::Ready(l) => l,
            Acquired::Starting { lease, create } => {
                if let Some(job) = create {
                    assert!(self.p.instance_started(&job.instance_id, now).0);
                }
                lease
            }
        }
    }
}

#[test]
fn a_burst_shares_starting_instances() {
    let mut f = Fixture::new();
    f.node("n1", 64 * 1024);
    let s = spec("1", "burst", 10, 128);
    let mut created = 0;
    let mut waiting = 0;
    for _ in 0..200 {
        match f.p.acquire(&s, f.now()).unwrap() {
            Acquired::Starting {
                create: Some(_), ..
            } => created += 1,
            Acquired::Starting { create: None, .. } => waiting += 1,
            Acquired::Ready(_) => panic!("nothing has started yet"),
        }
    }
    assert_eq!(created, 20);
    assert_eq!(waiting, 180);
    assert_eq!(f.p.instance_count(), 20);
    assert!(f.p.instances_info().iter().all(|i| i.in_flight == 10));
}

#[test]
fn warm_calls_go_to_the_busiest_instance_with_room() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "pack", 3, 128);
    let a: Vec<Lease> = (0..4).map(|_| f.acquire_started(&s)).collect();
    // 3 on the first instance, 1 on a second.
    let first = a[0].instance_id.clone();
    let second = a[3].instance_id.clone();
    assert_ne!(first, second);
    assert!(!a[1].cold_start && a[3].cold_start);
    // Free one slot on the first: both have room, the first (2 in flight)
    // is busier than the second (1 in flight).
    f.p.release(&a[0].lease_id, LeaseOutcome::Ok, f.now())
        .unwrap();
    let next = f.acquire_started(&s);
    assert_eq!(next.instance_id, first);
    let next = f.acquire_started(&s);
    assert_eq!(next.instance_id, second, "the first is full again");
    assert_eq!(f.p.instance_count(), 2);
}

#[test]
fn other_revisions_do_not_share_instances() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let a = f.acquire_started(&spec("1", "f", 10, 128));
    let b = f.acquire_started(&spec("1", "f", 10, 256));
    assert_ne!(a.instance_id, b.instance_id);
    assert!(b.cold_start);
}

#[test]
fn new_instances_go_to_the_fullest_node_that_fits() {
    let mut f = Fixture::new();
    f.node("big", 8192);
    f.node("small", 1024);
    // Fits both: the small one has the least free memory.
    let l = f.acquire_started(&spec("1", "a", 1, 512));
    assert_eq!(l.node_id.as_str(), "small");
    // 512 MB left on small: a 1024 MB instance only fits on big.
    let l = f.acquire_started(&spec("1", "b", 1, 1024));
    assert_eq!(l.node_id.as_str(), "big");
    // 512 fits small exactly.
    let l = f.acquire_started(&spec("1", "c", 1, 512));
    assert_eq!(l.node_id.as_str(), "small");
    assert_eq!(
        f.p.node(&"small".parse().unwrap())
            .unwrap()
            .free_memory_mb(),
        0
    );
}

#[test]
fn cpu_and_instance_slots_are_respected() {
    let mut f = Fixture::new();
    let now = f.now();
    let mut r = registration(Some("n1"), 4096, Tenancy::Dedicated, None);
    r.capacity.cpu_milli = 300;
    r.capacity.max_instances = 5;
    f.p.register(&r, now).unwrap();
    let mut s = spec("1", "cpu", 1, 128);
    s.cpu_milli = 200;
    let s = s.seal();
    f.acquire_started(&s);
    let err = f.p.acquire(&s, now).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ResourceThrottled);
    assert!(err.message.contains("cpu"), "{}", err.message);
    assert!(!err.message.contains("memory,"), "{}", err.message);
}

#[test]
fn no_room_is_throttled_naming_what_ran_out() {
    let mut f = Fixture::new();
    f.node("n1", 1024);
    f.acquire_started(&spec("1", "a", 1, 1024));
    let err = f.p.acquire(&spec("1", "b", 1, 128), f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ResourceThrottled);
    assert!(err.message.contains("memory"), "{}", err.message);
    assert_eq!(f.p.instance_count(), 1, "a refused acquire changes nothing");
    assert_eq!(f.p.lease_count(), 1);
}

#[test]
fn no_node_is_unavailable() {
    let mut f = Fixture::new();
    let err = f.p.acquire(&spec("1", "a", 1, 128), f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
    assert!(err.message.contains("no compute node"));
}

#[test]
fn functions_go_only_to_nodes_that_enforce_their_network() {
    use kiln_core::{NetworkSpec, VpcAttachment};
    let with_network = |name: &str, internet_access: bool, vpc: Option<&str>| {
        let mut s = spec("1", name, 1, 128);
        s.network = Some(NetworkSpec {
            internet_access,
            vpc: vpc.map(|v| VpcAttachment {
                vpc_id: v.into(),
                vswitch_ids: vec!["vsw-a".into()],
                security_group_id: "sg-a".into(),
            }),
        });
        s.seal()
    };
    // Only a node without isolation (an older agent, or one whose
    // operator turned it off): FC's default runs, less than the internet
    // is refused, saying why.
    let mut f = Fixture::new();
    f.node("n1", 64 * 1024);
    f.acquire_started(&spec("1", "default", 1, 128));
    for s in [
        with_network("none", false, None),
        with_network("vpc", true, Some("vpc-a")),
    ] {
        let err = f.p.acquire(&s, f.now()).unwrap_err();
        assert_eq!(err.code, FcErrorCode::FunctionNotStarted);
        assert!(
            err.message.contains("no network isolation")
                && err.message.contains("[sandbox.network]"),
            "{}",
            err.message
        );
    }
    assert_eq!(f.p.instance_count(), 1, "a refused acquire changes nothing");

    // A node that enforces isolation and serves vpc-a joins: those go
    // there, never to n1, even with room on n1.
    let mut reg = registration(Some("n2"), 1024, Tenancy::Dedicated, None);
    reg.labels.network_isolation = kiln_internal_api::NetworkIsolation {
        enforced: true,
        vpcs: vec!["vpc-a".into()],
    };
    let n2 = f.p.register(&reg, f.now()).unwrap().node_id;
    for name in ["none", "vpc"] {
        let s = with_network(name, name == "vpc", (name == "vpc").then_some("vpc-a"));
        let lease = f.acquire_started(&s);
        assert_eq!(lease.node_id, n2, "{name}");
    }
    // A VPC no node serves.
    let err =
        f.p.acquire(&with_network("other", false, Some("vpc-b")), f.now())
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::FunctionNotStarted);
    assert!(err.message.contains("VPC vpc-b"), "{}", err.message);
}

#[test]
fn an_unsealed_spec_is_refused() {
    let mut f = Fixture::new();
    f.node("n1", 1024);
    let mut s = spec("1", "a", 1, 128);
    s.memory_mb = 256;
    let err = f.p.acquire(&s, f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::InvalidArgument);
    let mut s = spec("1", "a", 1, 128);
    s.concurrency = 500;
    let err = f.p.acquire(&s.seal(), f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::InvalidArgument);
    assert_eq!(f.p.instance_count(), 0);
}

#[test]
fn account_cap_throttles() {
    let mut f = Fixture::with(PlacementConfig {
        default_limits: AccountLimits {
            burst_instances: 2,
            ..default_account_limits()
        },
        ..PlacementConfig::default()
    });
    let now = f.now();
    f.p.register(
        &registration(Some("mt"), 8192, Tenancy::MultiTenant, None),
        now,
    )
    .unwrap();
    f.acquire_started(&spec("1", "a", 1, 128));
    f.acquire_started(&spec("1", "a", 1, 128));
    let err = f.p.acquire(&spec("1", "a", 1, 128), f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ResourceThrottled);
    assert!(
        err.message.contains("burst pool of 2 instances"),
        "{}",
        err.message
    );
    // Another account is not affected.
    f.acquire_started(&spec("2", "a", 1, 128));
}

#[test]
fn dedicated_nodes_bind_to_their_first_account() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let l = f.acquire_started(&spec("1", "a", 1, 128));
    assert_eq!(l.node_id.as_str(), "n1");
    let err = f.p.acquire(&spec("2", "a", 1, 128), f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ResourceThrottled);
    assert!(err.message.contains("account 2"), "{}", err.message);
    // The binding shows and is journaled.
    let info = f.p.nodes_info();
    assert_eq!(
        info[0].labels.dedicated_account.as_ref().unwrap().as_str(),
        "1"
    );
    assert!(f.p.take_changes().iter().any(|c| matches!(c,
        Change::UpsertNode(r) if r.bound_account.as_ref().map(|a| a.as_str()) == Some("1"))));
    // A multi-tenant node takes the other account.
    let now = f.now();
    f.p.register(
        &registration(Some("mt"), 8192, Tenancy::MultiTenant, None),
        now,
    )
    .unwrap();
    let l = f.acquire_started(&spec("2", "a", 1, 128));
    assert_eq!(l.node_id.as_str(), "mt");
}

#[test]
fn a_preset_dedicated_account_is_honoured() {
    let mut f = Fixture::new();
    let now = f.now();
    f.p.register(
        &registration(Some("n1"), 8192, Tenancy::Dedicated, Some("7")),
        now,
    )
    .unwrap();
    assert!(f.p.acquire(&spec("1", "a", 1, 128), now).is_err());
    f.acquire_started(&spec("7", "a", 1, 128));
}

#[test]
fn inconsistent_registrations_are_refused() {
    let mut f = Fixture::new();
    let now = f.now();
    let mut r = registration(None, 1024, Tenancy::MultiTenant, None);
    r.labels.sandbox_kinds = vec![SandboxKind::Container];
    assert_eq!(
        f.p.register(&r, now).unwrap_err().code,
        FcErrorCode::InvalidArgument
    );
    let r = registration(None, 1024, Tenancy::MultiTenant, Some("1"));
    assert!(f.p.register(&r, now).is_err());
    let mut r = registration(None, 1024, Tenancy::Dedicated, None);
    r.agent_url = "http://plain:80".into();
    assert!(f.p.register(&r, now).is_err());
    let r = registration(None, 0, Tenancy::Dedicated, None);
    assert!(f.p.register(&r, now).is_err());
    assert_eq!(f.p.node_count(), 0);
    assert!(f.p.take_changes().is_empty());
}

#[test]
fn idle_instances_are_released_after_the_timeout() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "idle", 1, 128);
    let l = f.acquire_started(&s);
    f.clock.advance(Duration::from_secs(600));
    // Busy: not idle, however long.
    assert!(f.p.tick(f.now()).destroy.is_empty());
    f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    f.clock.advance(Duration::from_secs(299));
    assert!(f.p.tick(f.now()).destroy.is_empty());
    f.clock.advance(Duration::from_secs(1));
    let e = f.p.tick(f.now());
    assert_eq!(e.destroy.len(), 1);
    assert_eq!(e.destroy[0].instance_id, l.instance_id);
    assert_eq!(f.p.instance_count(), 0);
    assert_eq!(f.p.node(&"n1".parse().unwrap()).unwrap().used_memory_mb, 0);
    // A new call after that cold-starts again.
    assert!(f.acquire_started(&s).cold_start);
}

#[test]
fn use_resets_the_idle_clock() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "idle", 1, 128);
    let l = f.acquire_started(&s);
    f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    f.clock.advance(Duration::from_secs(200));
    let l2 = f.acquire_started(&s);
    assert_eq!(l2.instance_id, l.instance_id);
    f.p.release(&l2.lease_id, LeaseOutcome::Ok, f.now())
        .unwrap();
    f.clock.advance(Duration::from_secs(200));
    assert!(f.p.tick(f.now()).destroy.is_empty());
}

#[test]
fn a_failed_instance_takes_no_calls_and_goes_when_its_calls_end() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "f", 2, 128);
    let a = f.acquire_started(&s);
    let b = f.acquire_started(&s);
    assert_eq!(a.instance_id, b.instance_id);
    let e =
        f.p.release(&a.lease_id, LeaseOutcome::InstanceFailed, f.now())
            .unwrap();
    assert!(e.destroy.is_empty(), "a call still runs on it");
    let c = f.acquire_started(&s);
    assert_ne!(
        c.instance_id, a.instance_id,
        "a failed instance takes no new calls"
    );
    let e = f.p.release(&b.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    assert_eq!(e.destroy.len(), 1);
    assert_eq!(e.destroy[0].instance_id, a.instance_id);
    assert!(f.p.instance(&a.instance_id).is_none());
}

#[test]
fn release_is_idempotent() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let l = f.acquire_started(&spec("1", "f", 2, 128));
    f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    assert_eq!(f.p.instance(&l.instance_id).unwrap().in_flight, 0);
}

#[test]
fn retire_keeps_the_instances_of_published_versions() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let latest = spec("1", "f", 5, 128);
    let mut v1 = latest.clone();
    v1.version = Some("1".into());
    let v1 = v1.seal();
    assert_ne!(
        v1.revision, latest.revision,
        "a version is its own revision"
    );
    let mut old = spec("1", "f", 5, 256);
    old.version = None;
    let old = old.seal();
    let a = f.acquire_started(&latest);
    let b = f.acquire_started(&v1);
    let c = f.acquire_started(&old);
    assert_ne!(a.instance_id, b.instance_id, "LATEST and v1 never share");
    f.p.retire(
        &latest.account_id,
        &latest.function_name,
        Some(&latest.revision),
        std::slice::from_ref(&v1.revision),
    );
    let state = |id: &InstanceId| f.p.instance(id).unwrap().state;
    assert_eq!(state(&a.instance_id), InstanceState::Ready);
    assert_eq!(state(&b.instance_id), InstanceState::Ready);
    assert_eq!(state(&c.instance_id), InstanceState::Draining);
}

#[test]
fn retire_drains_other_revisions() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let old = spec("1", "f", 5, 128);
    let new = spec("1", "f", 5, 256);
    let busy = f.acquire_started(&old);
    let other = f.acquire_started(&spec("1", "g", 5, 128));
    let kept = f.acquire_started(&new);
    let e = f.p.retire(
        &old.account_id,
        &old.function_name,
        Some(&new.revision),
        &[],
    );
    assert!(e.destroy.is_empty(), "the old instance still runs a call");
    assert_eq!(
        f.p.instance(&busy.instance_id).unwrap().state,
        InstanceState::Draining
    );
    // No new calls for the old revision on the draining instance.
    let again = f.acquire_started(&old);
    assert_ne!(again.instance_id, busy.instance_id);
    let e =
        f.p.release(&busy.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap();
    assert_eq!(e.destroy.len(), 1);
    assert_eq!(
        f.p.instance(&kept.instance_id).unwrap().state,
        InstanceState::Ready
    );
    assert_eq!(
        f.p.instance(&other.instance_id).unwrap().state,
        InstanceState::Ready
    );
    // Delete: everything of the function drains; idle ones go at once.
    f.p.release(&kept.lease_id, LeaseOutcome::Ok, f.now())
        .unwrap();
    let e = f.p.retire(&old.account_id, &old.function_name, None, &[]);
    assert_eq!(e.destroy.len(), 1, "the idle new-revision instance goes");
    assert!(f.p.instance(&again.instance_id).is_some(), "busy one waits");
}

#[test]
fn aborting_a_retired_function_destroys_its_busy_instances_now() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "f", 5, 128);
    let busy = f.acquire_started(&s);
    let other = f.acquire_started(&spec("1", "g", 5, 128));
    let e = f.p.retire(&s.account_id, &s.function_name, None, &[]);
    assert!(e.destroy.is_empty(), "without abort the busy one waits");
    let e = f.p.abort_retired(&s.account_id, &s.function_name);
    assert_eq!(
        e.destroy.iter().map(|d| &d.instance_id).collect::<Vec<_>>(),
        vec![&busy.instance_id],
        "only the retired function's instance goes"
    );
    assert!(f.p.instance(&busy.instance_id).is_none());
    assert_eq!(
        f.p.instance(&other.instance_id).unwrap().state,
        InstanceState::Ready
    );
    // The call's lease was written off with it: its late release changes
    // nothing and destroys nothing twice.
    let late = f.p.release(&busy.lease_id, LeaseOutcome::Ok, f.now());
    assert!(late.map_or(true, |e| e.destroy.is_empty()));
    // Another function's instances are untouched by a second abort.
    let e = f.p.abort_retired(&s.account_id, &s.function_name);
    assert!(e.destroy.is_empty());
}

#[test]
fn retiring_a_starting_instance_destroys_it_once_started_and_idle() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "f", 5, 128);
    let Acquired::Starting {
        lease,
        create: Some(job),
    } = f.p.acquire(&s, f.now()).unwrap()
    else {
        panic!("expected a new instance");
    };
    f.p.retire(&s.account_id, &s.function_name, None, &[]);
    let (known, e) = f.p.instance_started(&job.instance_id, f.now());
    assert!(known && e.destroy.is_empty(), "its waiter still runs on it");
    let e =
        f.p.release(&lease.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap();
    assert_eq!(e.destroy.len(), 1);
}

#[test]
fn a_start_failure_forgets_the_instance_and_its_waiters() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "f", 5, 128);
    let Acquired::Starting {
        create: Some(job), ..
    } = f.p.acquire(&s, f.now()).unwrap()
    else {
        panic!("expected a new instance");
    };
    f.p.acquire(&s, f.now()).unwrap();
    assert_eq!(f.p.lease_count(), 2);
    let d = f.p.instance_start_failed(&job.instance_id).unwrap();
    assert_eq!(d.instance_id, job.instance_id);
    assert_eq!(f.p.instance_count(), 0);
    assert_eq!(f.p.lease_count(), 0);
    assert_eq!(f.p.node(&job.node_id).unwrap().used_memory_mb, 0);
    // The next call starts afresh.
    assert!(matches!(
        f.p.acquire(&s, f.now()).unwrap(),
        Acquired::Starting {
            create: Some(_),
            ..
        }
    ));
}

#[test]
fn a_silent_node_is_written_off() {
    let mut f = Fixture::with(PlacementConfig::default());
    let n1 = f.node("n1", 8192);
    let s = spec("1", "f", 5, 128);
    let ready = f.acquire_started(&s);
    let other = spec("1", "g", 5, 128);
    let Acquired::Starting {
        create: Some(job), ..
    } = f.p.acquire(&other, f.now()).unwrap()
    else {
        panic!("expected a new instance");
    };
    f.clock.advance(Duration::from_millis(9_999));
    assert!(f.p.tick(f.now()).is_empty());
    f.clock.advance(Duration::from_millis(1));
    let e = f.p.tick(f.now());
    assert!(e.destroy.is_empty(), "a dead node is not called");
    assert_eq!(e.aborted_starts.len(), 1);
    assert_eq!(e.aborted_starts[0].0, job.instance_id);
    assert_eq!(e.aborted_starts[0].1.code, FcErrorCode::ServiceUnavailable);
    assert_eq!(f.p.node(&n1).unwrap().state, NodeState::Failed);
    assert_eq!(f.p.instance_count(), 0);
    // The call in flight learns on release, with a retryable error.
    let err =
        f.p.release(&ready.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
    assert!(err.code.is_retryable());
    // New calls: no healthy node.
    let err = f.p.acquire(&s, f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
    // Its heartbeat asks it to register again; it keeps its id and the
    // instances it still runs are to be destroyed.
    let hb =
        f.p.heartbeat(&n1, std::slice::from_ref(&ready.instance_id), f.now());
    assert!(hb.reregister);
    let mut r = registration(Some("n1"), 8192, Tenancy::Dedicated, None);
    r.instances = vec![ready.instance_id.clone()];
    let reg = f.p.register(&r, f.now()).unwrap();
    assert_eq!(reg.node_id, n1);
    assert_eq!(reg.destroy, vec![ready.instance_id.clone()]);
    assert!(f.acquire_started(&s).cold_start);
}

#[test]
fn heartbeats_keep_a_node_alive() {
    let mut f = Fixture::with(PlacementConfig::default());
    let n1 = f.node("n1", 8192);
    for _ in 0..5 {
        f.clock.advance(Duration::from_secs(5));
        let hb = f.p.heartbeat(&n1, &[], f.now());
        assert!(!hb.reregister);
        assert!(f.p.tick(f.now()).is_empty());
    }
    assert_eq!(f.p.node(&n1).unwrap().state, NodeState::Ready);
    let unknown: NodeId = "nope".parse().unwrap();
    assert!(f.p.heartbeat(&unknown, &[], f.now()).reregister);
}

#[test]
fn reconciliation_both_ways() {
    let mut f = Fixture::new();
    let n1 = f.node("n1", 8192);
    let s = spec("1", "f", 1, 128);
    let a = f.acquire_started(&s);
    let b = f.acquire_started(&s);
    let Acquired::Starting {
        create: Some(starting),
        ..
    } = f.p.acquire(&s, f.now()).unwrap()
    else {
        panic!("expected a new instance");
    };
    let stray = InstanceId::generate();
    // Just started: within the grace, a report without them removes nothing.
    let hb = f.p.heartbeat(&n1, std::slice::from_ref(&stray), f.now());
    assert_eq!(hb.destroy, vec![stray.clone()]);
    assert_eq!(f.p.instance_count(), 3);
    f.clock.advance(Duration::from_secs(6));
    // The agent reports `a` and a stray; `b` is gone, `starting` is still
    // being created and stays.
    let hb =
        f.p.heartbeat(&n1, &[a.instance_id.clone(), stray.clone()], f.now());
    assert_eq!(hb.destroy, vec![stray]);
    assert!(
        hb.effects.destroy.is_empty(),
        "the agent has no b to destroy"
    );
    assert!(f.p.instance(&a.instance_id).is_some());
    assert!(f.p.instance(&b.instance_id).is_none());
    assert!(f.p.instance(&starting.instance_id).is_some());
    let err =
        f.p.release(&b.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
}

#[test]
fn leases_never_released_are_taken_back() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "f", 1, 128);
    let l = f.acquire_started(&s);
    // timeout 3 s + 90 s grace, and the holder is told so.
    assert_eq!(l.expires_in_ms, 93_000);
    f.clock.advance(Duration::from_secs(92));
    f.p.tick(f.now());
    assert_eq!(f.p.instance(&l.instance_id).unwrap().in_flight, 1);
    assert_eq!(f.p.leases_written_off_count(), 0);
    f.clock.advance(Duration::from_secs(1));
    f.p.tick(f.now());
    assert_eq!(f.p.instance(&l.instance_id).unwrap().in_flight, 0);
    assert_eq!(f.p.lease_count(), 0);
    assert_eq!(f.p.leases_written_off_count(), 1, "counted for the metric");
}

#[test]
fn restore_rebuilds_state_without_leases() {
    let mut f = Fixture::new();
    f.node("n1", 8192);
    let s = spec("1", "f", 4, 512);
    let a = f.acquire_started(&s);
    let Acquired::Starting {
        create: Some(starting),
        ..
    } = f.p.acquire(&spec("1", "g", 1, 128), f.now()).unwrap()
    else {
        panic!("expected a new instance");
    };
    let nodes: Vec<NodeRecord> = f.p.nodes.values().map(Node::record).collect();
    let instances: Vec<InstanceRecord> = f.p.instances.values().map(Instance::record).collect();
    let (mut p, effects) =
        Placement::restore(PlacementConfig::default(), nodes, instances, f.now());
    assert!(effects.is_empty());
    assert_eq!(p.instance_count(), 1, "the starting instance is dropped");
    assert!(p.instance(&starting.instance_id).is_none());
    assert!(p
        .take_changes()
        .contains(&Change::DeleteInstance(starting.instance_id)));
    let i = p.instance(&a.instance_id).unwrap();
    assert_eq!(i.in_flight, 0);
    assert_eq!(p.node(&a.node_id).unwrap().used_memory_mb, 512);
    // The restored instance is warm.
    match p.acquire(&s, f.now()).unwrap() {
        Acquired::Ready(l) => assert_eq!(l.instance_id, a.instance_id),
        other => panic!("expected a warm instance, got {other:?}"),
    }
}

#[test]
fn fifty_thousand_instances_on_a_hundred_nodes() {
    let mut f = Fixture::with(PlacementConfig {
        default_limits: AccountLimits {
            burst_instances: 1_000,
            memory_quota_mb: u64::MAX / 4,
            vcpu_quota_milli: u64::MAX / 4,
            scale_out_instances_per_minute: 1_000_000,
            scale_out_vcpus_per_minute: 1_000_000,
            ..default_account_limits()
        },
        node_failure_after_ms: u64::MAX / 4,
        ..PlacementConfig::default()
    });
    for n in 0..100 {
        let now = f.now();
        let mut r = registration(
            Some(&format!("n{n:03}")),
            64 * 1024,
            Tenancy::MultiTenant,
            None,
        );
        r.capacity.max_instances = 600;
        f.p.register(&r, now).unwrap();
    }
    let specs: Vec<InstanceSpec> = (0..500)
        .flat_map(|a| (0..4).map(move |g| spec(&format!("{}", a + 1), &format!("f{g}"), 1, 128)))
        .collect();
    let mut leases = Vec::with_capacity(50_000);
    for i in 0..50_000 {
        leases.push(f.acquire_started(&specs[i % specs.len()]));
    }
    assert_eq!(f.p.instance_count(), 50_000);
    let nodes = f.p.nodes_info();
    // 64 GiB / 128 MiB = 512 per node; bin-packing fills nodes one by one,
    // so 97 nodes are full and the rest hold the remainder.
    let full = nodes
        .iter()
        .filter(|n| n.memory_used_mb == 64 * 1024)
        .count();
    assert_eq!(full, 97);
    assert!(nodes
        .iter()
        .all(|n| n.memory_used_mb <= n.capacity.memory_mb));
    // A bigger instance goes to the fullest node that still fits it, not
    // to an empty one.
    let big = f.acquire_started(&spec("9999", "x", 1, 4096));
    assert_eq!(big.node_id.as_str(), "n097");
    leases.push(big);
    for l in &leases {
        f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    }
    f.clock.advance(Duration::from_secs(301));
    assert_eq!(f.p.tick(f.now()).destroy.len(), 50_001);
    assert_eq!(f.p.instance_count(), 0);
    assert!(f
        .p
        .nodes_info()
        .iter()
        .all(|n| n.memory_used_mb == 0 && n.instances == 0));
    assert!(f.p.room.is_empty() && f.p.idle.is_empty() && f.p.by_function.is_empty());
    assert!(f.p.per_account.is_empty() && f.p.lease_expiry.is_empty());
}

// ---- quotas and throttles -----------------------------------------------

fn limits(f: impl FnOnce(&mut AccountLimits)) -> AccountLimits {
    let mut l = default_account_limits();
    f(&mut l);
    l
}

fn fn_limits(reserved: Option<u32>, max: Option<u32>) -> kiln_internal_api::FunctionLimits {
    kiln_internal_api::FunctionLimits {
        reserved_concurrency: reserved,
        max_concurrency: max,
    }
}

/// A multi-tenant node: any account may use it.
fn shared_node(f: &mut Fixture, id: &str, memory_mb: u64) {
    let now = f.now();
    f.p.register(
        &registration(Some(id), memory_mb, Tenancy::MultiTenant, None),
        now,
    )
    .unwrap();
}

fn throttled(f: &mut Fixture, s: &InstanceSpec, names: &str) {
    let now = f.now();
    let err = f.p.acquire(s, now).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ResourceThrottled, "{err:?}");
    assert_eq!(err.code.http_status(), 429);
    assert!(
        err.message.contains(names),
        "{names:?} not in {:?}",
        err.message
    );
}

fn account(s: &str) -> AccountId {
    s.parse().unwrap()
}

#[test]
fn the_burst_pool_throttles_new_instances_not_warm_calls() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    f.p.set_account_limits(&account("1"), Some(limits(|l| l.burst_instances = 3)))
        .unwrap();
    for i in 0..3 {
        f.acquire_started(&spec("1", &format!("f{i}"), 2, 128));
    }
    throttled(
        &mut f,
        &spec("1", "f3", 2, 128),
        "burst pool of 3 instances",
    );
    // A warm slot on an existing instance is still granted.
    f.acquire_started(&spec("1", "f0", 2, 128));
    // Other accounts have their own pools.
    f.acquire_started(&spec("2", "f3", 2, 128));
}

#[test]
fn reserved_concurrency_sets_instances_aside_and_caps_the_function() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    let mut l = limits(|l| l.burst_instances = 4);
    l.functions
        .insert("vip".parse().unwrap(), fn_limits(Some(2), None));
    f.p.set_account_limits(&account("1"), Some(l)).unwrap();
    // The others share 4 - 2 = 2 instances.
    f.acquire_started(&spec("1", "a", 1, 128));
    f.acquire_started(&spec("1", "b", 1, 128));
    throttled(&mut f, &spec("1", "c", 1, 128), "2 of them reserved");
    // The reserved function still gets its two, and no more.
    f.acquire_started(&spec("1", "vip", 1, 128));
    f.acquire_started(&spec("1", "vip", 1, 128));
    throttled(
        &mut f,
        &spec("1", "vip", 1, 128),
        "reserved concurrency of 2",
    );
}

#[test]
fn max_concurrency_caps_calls_in_flight_even_with_room() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    let mut l = default_account_limits();
    l.functions
        .insert("f".parse().unwrap(), fn_limits(None, Some(2)));
    f.p.set_account_limits(&account("1"), Some(l)).unwrap();
    let s = spec("1", "f", 10, 128);
    let a = f.acquire_started(&s);
    f.acquire_started(&s);
    throttled(&mut f, &s, "maximum concurrency of 2");
    f.p.release(&a.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    f.acquire_started(&s);
    assert_eq!(f.p.instance_count(), 1);
    // A lost instance gives its calls back to the function's count.
    let inst = f.p.instances_info()[0].instance_id.clone();
    f.p.instance_start_failed(&inst);
    assert!(f.p.fn_in_flight.is_empty());
}

#[test]
fn memory_and_vcpu_quotas_throttle() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    f.p.set_account_limits(
        &account("1"),
        Some(limits(|l| {
            l.memory_quota_mb = 1024;
            l.vcpu_quota_milli = 100_000;
        })),
    )
    .unwrap();
    f.acquire_started(&spec("1", "a", 1, 512));
    f.acquire_started(&spec("1", "b", 1, 512));
    throttled(&mut f, &spec("1", "c", 1, 128), "memory quota of 1024 MB");
    assert_eq!(f.p.account_usage(&account("1")).memory_mb, 1024);

    f.p.set_account_limits(&account("2"), Some(limits(|l| l.vcpu_quota_milli = 600)))
        .unwrap();
    // spec() gives memory/2 millicores: 512 MB -> 256 m.
    f.acquire_started(&spec("2", "a", 1, 512));
    f.acquire_started(&spec("2", "b", 1, 512));
    throttled(&mut f, &spec("2", "c", 1, 512), "vCPU quota of 0.6 vCPUs");
}

#[test]
fn scale_out_instances_per_minute_refill_on_the_clock() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    f.p.set_account_limits(
        &account("1"),
        Some(limits(|l| l.scale_out_instances_per_minute = 6)),
    )
    .unwrap();
    for i in 0..6 {
        f.acquire_started(&spec("1", &format!("f{i}"), 1, 128));
    }
    throttled(
        &mut f,
        &spec("1", "x", 1, 128),
        "6 new instances per minute",
    );
    // One token every 10 s.
    f.clock.advance(Duration::from_millis(9_999));
    throttled(&mut f, &spec("1", "x", 1, 128), "per minute");
    f.clock.advance(Duration::from_millis(1));
    f.acquire_started(&spec("1", "x", 1, 128));
    throttled(&mut f, &spec("1", "y", 1, 128), "per minute");
    // A full minute refills the bucket, and no further.
    f.clock.advance(Duration::from_secs(600));
    for i in 0..6 {
        f.acquire_started(&spec("1", &format!("g{i}"), 1, 128));
    }
    throttled(&mut f, &spec("1", "z", 1, 128), "per minute");
}

#[test]
fn scale_out_vcpus_per_minute_refill_on_the_clock() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    f.p.set_account_limits(
        &account("1"),
        Some(limits(|l| l.scale_out_vcpus_per_minute = 2)),
    )
    .unwrap();
    // 1000 MB -> 500 m: four fit in 2 vCPUs.
    for i in 0..4 {
        f.acquire_started(&spec("1", &format!("f{i}"), 1, 1000));
    }
    throttled(
        &mut f,
        &spec("1", "x", 1, 1000),
        "2 vCPUs of new instances per minute",
    );
    // 500 m refill in 15 s.
    f.clock.advance(Duration::from_millis(14_999));
    throttled(&mut f, &spec("1", "x", 1, 1000), "vCPUs of new instances");
    f.clock.advance(Duration::from_millis(1));
    f.acquire_started(&spec("1", "x", 1, 1000));
}

#[test]
fn a_refused_placement_costs_no_tokens() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 1024);
    f.p.set_account_limits(
        &account("1"),
        Some(limits(|l| l.scale_out_instances_per_minute = 2)),
    )
    .unwrap();
    // No node has room for 4 GB: the throttle names the room, not the rate.
    for _ in 0..5 {
        throttled(
            &mut f,
            &spec("1", "big", 1, 4096),
            "no compute node has room",
        );
    }
    f.acquire_started(&spec("1", "a", 1, 128));
    f.acquire_started(&spec("1", "b", 1, 128));
    throttled(&mut f, &spec("1", "c", 1, 128), "per minute");
}

#[test]
fn limits_reset_to_the_defaults_and_are_journaled() {
    let mut f = Fixture::new();
    let a = account("1");
    f.p.take_changes();
    let l = limits(|l| l.burst_instances = 7);
    f.p.set_account_limits(&a, Some(l.clone())).unwrap();
    assert_eq!(f.p.account_limits(&a).burst_instances, 7);
    let bad = limits(|l| l.burst_instances = 0);
    assert_eq!(
        f.p.set_account_limits(&a, Some(bad)).unwrap_err().code,
        FcErrorCode::InvalidArgument
    );
    assert_eq!(f.p.account_limits(&a).burst_instances, 7);
    f.p.set_account_limits(&a, None).unwrap();
    assert_eq!(*f.p.account_limits(&a), default_account_limits());
    assert_eq!(
        f.p.take_changes(),
        vec![
            Change::UpsertAccountLimits(a.clone(), l),
            Change::DeleteAccountLimits(a)
        ]
    );
}

// ---- node and instance lifecycles ---------------------------------------

const HOUR: Duration = Duration::from_secs(3600);

/// Instances never go idle here unless a test asks for it.
fn long_lived() -> Fixture {
    Fixture::with(PlacementConfig {
        node_failure_after_ms: u64::MAX / 4,
        idle_timeout_ms: u64::MAX / 4,
        ..PlacementConfig::default()
    })
}

/// A function whose calls may run FC's longest timeout, 24 h.
fn long_call(function: &str) -> InstanceSpec {
    let mut s = spec("1", function, 1, 128);
    s.timeout_s = 86_400;
    s.seal()
}

fn node_state(f: &Fixture, id: &str) -> NodeState {
    f.p.node(&id.parse().unwrap()).unwrap().state
}

#[test]
fn a_cordoned_node_takes_no_new_instances_but_keeps_serving() {
    let mut f = Fixture::new();
    let n1 = f.node("n1", 4096);
    let s = spec("1", "f", 2, 128);
    let a = f.acquire_started(&s);
    assert_eq!(a.node_id, n1);
    f.p.cordon(&n1).unwrap();
    assert_eq!(node_state(&f, "n1"), NodeState::Cordoned);
    // The existing instance still takes calls.
    let b = f.acquire_started(&s);
    assert_eq!(b.instance_id, a.instance_id);
    // A new instance has nowhere to go.
    let err = f.p.acquire(&s, f.now()).unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
    // Another node takes it; uncordoning brings n1 back.
    f.node("n2", 4096);
    assert_eq!(f.acquire_started(&s).node_id.as_str(), "n2");
    f.p.uncordon(&n1).unwrap();
    assert_eq!(node_state(&f, "n1"), NodeState::Ready);
    assert_eq!(f.acquire_started(&spec("1", "g", 1, 128)).node_id, n1);
    // Operator actions on unknown or dead nodes say why.
    let e = f.p.cordon(&"n9".parse().unwrap()).unwrap_err();
    assert!(e.message.contains("not registered"), "{}", e.message);
}

#[test]
fn a_drained_node_lets_calls_finish_then_loses_its_instances() {
    let mut f = Fixture::new();
    let n1 = f.node("n1", 4096);
    let busy = f.acquire_started(&spec("1", "busy", 1, 128));
    let idle = f.acquire_started(&spec("1", "idle", 1, 128));
    f.p.release(&idle.lease_id, LeaseOutcome::Ok, f.now())
        .unwrap();
    f.node("n2", 4096);
    let effects = f.p.drain(&n1).unwrap();
    // The idle instance goes at once, the busy one once its call ends.
    assert_eq!(effects.destroy.len(), 1);
    assert_eq!(effects.destroy[0].instance_id, idle.instance_id);
    assert_eq!(node_state(&f, "n1"), NodeState::Draining);
    // New calls of the busy function start elsewhere.
    let next = f.acquire_started(&spec("1", "busy", 1, 128));
    assert_eq!(next.node_id.as_str(), "n2");
    let effects =
        f.p.release(&busy.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap();
    assert_eq!(effects.destroy.len(), 1);
    assert!(f.p.node(&n1).unwrap().instances.is_empty());
    // Draining survives the agent registering again (a restart).
    let now = f.now();
    f.p.register(
        &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
        now,
    )
    .unwrap();
    assert_eq!(node_state(&f, "n1"), NodeState::Draining);
}

#[test]
fn a_node_is_drained_before_its_validity_and_re_provisioned_with_a_new_validity() {
    let mut f = long_lived();
    let n1 = f.node("n1", 4096);
    f.clock.advance(119 * HOUR - Duration::from_secs(30));
    let held = f.acquire_started(&spec("1", "f", 1, 128));
    assert!(f.p.tick(f.now()).is_empty());
    assert_eq!(node_state(&f, "n1"), NodeState::Ready);
    // An hour before the 120 h: drained, but the call in flight goes on.
    f.clock.advance(Duration::from_secs(30));
    f.p.tick(f.now());
    assert_eq!(node_state(&f, "n1"), NodeState::Draining);
    let hb =
        f.p.heartbeat(&n1, std::slice::from_ref(&held.instance_id), f.now());
    assert!(!hb.reprovision && !hb.reregister);
    let effects =
        f.p.release(&held.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap();
    assert_eq!(effects.destroy.len(), 1);
    // Empty: retired at the next tick, and the agent is told.
    f.p.tick(f.now());
    assert_eq!(node_state(&f, "n1"), NodeState::Retired);
    let hb = f.p.heartbeat(&n1, &[], f.now());
    assert!(hb.reprovision && !hb.reregister);
    // The node's id is its certificate's: the re-provisioned agent comes
    // back under it, empty, and its new validity starts now.
    let now = f.now();
    let again =
        f.p.register(
            &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
            now,
        )
        .unwrap();
    assert_eq!(again.node_id, n1);
    assert_eq!(f.p.node(&again.node_id).unwrap().state, NodeState::Ready);
    assert!(!f.p.node(&n1).unwrap().reprovision);
    f.clock.advance(100 * HOUR);
    f.p.tick(f.now());
    assert_eq!(f.p.node(&again.node_id).unwrap().state, NodeState::Ready);
}

#[test]
fn a_node_still_busy_at_the_end_of_its_validity_is_retired_anyway() {
    let mut f = long_lived();
    let n1 = f.node("n1", 4096);
    f.clock.advance(118 * HOUR);
    let held = f.acquire_started(&long_call("f"));
    f.clock.advance(HOUR);
    f.p.tick(f.now());
    assert_eq!(node_state(&f, "n1"), NodeState::Draining);
    f.clock.advance(HOUR);
    f.p.tick(f.now());
    assert_eq!(node_state(&f, "n1"), NodeState::Retired);
    assert_eq!(f.p.instance_count(), 0);
    // The call that outlived the node gets a retryable error.
    let err =
        f.p.release(&held.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
    assert!(f.p.heartbeat(&n1, &[], f.now()).reprovision);
}

#[test]
fn an_uncordoned_node_past_its_drain_point_is_drained_again() {
    let mut f = long_lived();
    let n1 = f.node("n1", 4096);
    f.clock.advance(119 * HOUR + Duration::from_secs(60));
    f.p.tick(f.now());
    assert_eq!(node_state(&f, "n1"), NodeState::Draining);
    f.p.uncordon(&n1).unwrap();
    assert_eq!(node_state(&f, "n1"), NodeState::Ready);
    f.p.tick(f.now());
    assert_eq!(node_state(&f, "n1"), NodeState::Draining);
    // Empty: retired at the next tick.
    f.p.tick(f.now());
    assert_eq!(node_state(&f, "n1"), NodeState::Retired);
}

#[test]
fn an_instance_is_replaced_before_its_validity_without_dropping_calls() {
    let mut f = long_lived();
    f.node("n1", 4096);
    let s = spec("1", "f", 1, 128);
    let first = f.acquire_started(&s);
    f.p.release(&first.lease_id, LeaseOutcome::Ok, f.now())
        .unwrap();
    // 36 h minus the 10 min lead minus the 3 s timeout, less a second.
    f.clock
        .advance(36 * HOUR - Duration::from_secs(600 + 3 + 1));
    assert!(f.p.tick(f.now()).is_empty());
    // A call that starts now may run its full timeout...
    let late = f.acquire_started(&s);
    assert_eq!(late.instance_id, first.instance_id);
    f.clock.advance(Duration::from_secs(1));
    f.p.tick(f.now());
    // ...the instance takes no new calls: the next one starts a replacement.
    let next = f.acquire_started(&s);
    assert!(next.cold_start);
    assert_ne!(next.instance_id, first.instance_id);
    f.clock.advance(Duration::from_secs(2));
    // The late call ends normally, and its instance goes.
    let effects =
        f.p.release(&late.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap();
    assert_eq!(effects.destroy.len(), 1);
    assert_eq!(effects.destroy[0].instance_id, first.instance_id);
    assert_eq!(f.p.instance_count(), 1);
    assert!(f.p.drain_by_age.len() == 1 && f.p.expire_by_age.is_empty());
}

#[test]
fn an_instance_still_busy_at_its_validity_is_removed_retryably() {
    // Only a call that outlives its timeout by more than the drain lead
    // can still run at the end: leases are taken back sooner by default,
    // so this test stretches the grace and drops the lead.
    let mut f = Fixture::with(PlacementConfig {
        node_failure_after_ms: u64::MAX / 4,
        idle_timeout_ms: u64::MAX / 4,
        lease_grace_ms: 48 * 3_600_000,
        instance_drain_lead_ms: 0,
        ..PlacementConfig::default()
    });
    f.node("n1", 4096);
    let held = f.acquire_started(&spec("1", "f", 1, 128));
    f.clock.advance(36 * HOUR - Duration::from_secs(3));
    f.p.tick(f.now());
    assert_eq!(
        f.p.instance(&held.instance_id).unwrap().state,
        InstanceState::Draining
    );
    f.clock.advance(Duration::from_secs(3));
    let effects = f.p.tick(f.now());
    assert_eq!(effects.destroy.len(), 1);
    assert_eq!(f.p.instance_count(), 0);
    let err =
        f.p.release(&held.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
    assert!(f.p.drain_by_age.is_empty() && f.p.expire_by_age.is_empty());
}

#[test]
fn a_node_that_changes_tenancy_loses_its_instances() {
    let mut f = Fixture::new();
    let n1 = f.node("n1", 4096);
    let held = f.acquire_started(&spec("1", "f", 1, 128));
    let now = f.now();
    let r =
        f.p.register(
            &registration(Some("n1"), 4096, Tenancy::MultiTenant, None),
            now,
        )
        .unwrap();
    // It still reports nothing here, so nothing to destroy; the
    // instance is gone and its call retries.
    assert!(r.destroy.is_empty());
    assert!(f.p.node(&n1).unwrap().instances.is_empty());
    assert!(f.p.node(&n1).unwrap().bound_account.is_none());
    let err =
        f.p.release(&held.lease_id, LeaseOutcome::Ok, f.now())
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::ServiceUnavailable);
}

// ---- provisioned instances ----------------------------------------------

fn zoned_nodes(f: &mut Fixture) {
    for (n, zone) in [("za", "zone-a"), ("zb", "zone-b"), ("zc", "zone-c")] {
        let mut r = registration(Some(n), 16 * 1024, Tenancy::MultiTenant, None);
        r.labels.zone = zone.into();
        let now = f.now();
        f.p.register(&r, now).unwrap();
    }
}

fn provision(target: u32) -> ProvisionConfig {
    ProvisionConfig {
        target,
        always_allocate_cpu: false,
        scheduled_actions: vec![],
        target_tracking_policies: vec![],
    }
}

fn start_all(f: &mut Fixture, effects: &Effects) {
    let now = f.now();
    for job in &effects.create {
        assert!(f.p.instance_started(&job.instance_id, now).0);
    }
}

/// A function's LATEST and an alias each keep their own provisioned
/// instances, of the revision each names; moving the alias makes the old
/// version's instances on-demand and starts the new one's; a function
/// update pauses LATEST's only; deleting the function drops both.
#[test]
fn latest_and_an_alias_keep_their_own_provisioned_instances() {
    let mut f = Fixture::new();
    f.node("n1", 16 * 1024);
    let latest = spec("1", "p", 1, 128).seal();
    let version = |v: &str, memory: u32| {
        let mut s = spec("1", "p", 1, memory);
        s.version = Some(v.into());
        s.seal()
    };
    let (v1, v2) = (version("1", 256), version("2", 512));
    let now = f.now();
    let e =
        f.p.put_provision(&latest, kiln_internal_api::LATEST, provision(2), now)
            .unwrap();
    start_all(&mut f, &e);
    let e = f.p.put_provision(&v1, "prod", provision(1), now).unwrap();
    assert_eq!(e.create.len(), 1);
    assert_eq!(
        e.create[0].spec.revision, v1.revision,
        "the alias's version starts"
    );
    start_all(&mut f, &e);
    let by_q = |f: &Fixture| -> Vec<(String, u32)> {
        f.p.provisions_info()
            .into_iter()
            .map(|s| (s.qualifier, s.current))
            .collect()
    };
    assert_eq!(by_q(&f), vec![("LATEST".into(), 2), ("prod".into(), 1)]);

    // The alias moves to version 2.
    let e =
        f.p.put_provision(&v2, "prod", provision(1), f.now())
            .unwrap();
    assert_eq!(e.create.len(), 1);
    assert_eq!(e.create[0].spec.revision, v2.revision);
    start_all(&mut f, &e);
    let v1_instance =
        f.p.instances_info()
            .into_iter()
            .find(|i| i.revision == v1.revision)
            .expect("version 1's instance is still there, on-demand");
    assert!(!f.p.instance(&v1_instance.instance_id).unwrap().provisioned);
    assert_eq!(by_q(&f), vec![("LATEST".into(), 2), ("prod".into(), 1)]);

    // The function changed: LATEST's pauses, the alias's version stays.
    f.p.retire(
        &latest.account_id,
        &latest.function_name,
        Some("a-new-revision"),
        std::slice::from_ref(&v2.revision),
    );
    assert_eq!(by_q(&f), vec![("LATEST".into(), 0), ("prod".into(), 1)]);

    // Deleted: neither remains.
    f.p.retire(&latest.account_id, &latest.function_name, None, &[]);
    assert!(f.p.provisions_info().is_empty());
}

#[test]
fn provisioned_instances_spread_across_zones_and_never_idle_out() {
    let mut f = Fixture::new();
    zoned_nodes(&mut f);
    let s = spec("1", "p", 1, 128);
    let now = f.now();
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, provision(3), now)
            .unwrap();
    assert_eq!(e.create.len(), 3);
    let zones: HashSet<String> = e
        .create
        .iter()
        .map(|j| f.p.node(&j.node_id).unwrap().labels.zone.clone())
        .collect();
    assert_eq!(zones.len(), 3, "one per zone");
    start_all(&mut f, &e);
    // Warm from the first call.
    let l = f.acquire_started(&s);
    assert!(!l.cold_start);
    f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    // Hours past the idle timeout: still there; nothing more to start.
    f.clock.advance(3 * HOUR);
    let e = f.p.tick(f.now());
    assert!(e.destroy.is_empty() && e.create.is_empty(), "{e:?}");
    assert_eq!(f.p.instance_count(), 3);
    let status = &f.p.provisions_info()[0];
    assert_eq!((status.target, status.desired, status.current), (3, 3, 3));
    assert_eq!(
        status.zones.values().copied().collect::<Vec<_>>(),
        vec![1, 1, 1]
    );

    // A lower target drains the extras; removing the configuration makes
    // the rest on-demand: they go after the idle timeout.
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, provision(1), f.now())
            .unwrap();
    assert_eq!(e.destroy.len(), 2);
    assert_eq!(f.p.instance_count(), 1);
    assert!(f.p.delete_provision(
        &"1".parse().unwrap(),
        &"p".parse().unwrap(),
        kiln_internal_api::LATEST
    ));
    assert!(!f.p.delete_provision(
        &"1".parse().unwrap(),
        &"p".parse().unwrap(),
        kiln_internal_api::LATEST
    ));
    f.clock.advance(Duration::from_secs(301));
    assert_eq!(f.p.tick(f.now()).destroy.len(), 1);
    assert_eq!(f.p.instance_count(), 0);
}

/// Every instance the agents are told to keep unfrozen, over all nodes.
fn always_allocated(f: &Fixture) -> HashSet<InstanceId> {
    ["za", "zb", "zc"]
        .iter()
        .flat_map(|n| f.p.always_allocated_on(&n.parse().unwrap()))
        .collect()
}

#[test]
fn always_allocate_cpu_reaches_provisioned_instances_only_and_follows_the_config() {
    let mut f = Fixture::new();
    zoned_nodes(&mut f);
    let s = spec("1", "p", 1, 128);
    let mut c = provision(2);
    c.always_allocate_cpu = true;
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, c.clone(), f.now())
            .unwrap();
    assert_eq!(e.create.len(), 2);
    assert!(e.create.iter().all(|j| j.always_allocate_cpu), "{e:?}");
    start_all(&mut f, &e);
    let provisioned: HashSet<InstanceId> = e.create.iter().map(|j| j.instance_id.clone()).collect();
    assert_eq!(always_allocated(&f), provisioned);

    // Both provisioned instances busy: the third call of the same function
    // starts an on-demand instance, which is frozen between calls.
    let busy = [f.acquire_started(&s), f.acquire_started(&s)];
    assert!(busy.iter().all(|l| provisioned.contains(&l.instance_id)));
    let now = f.now();
    let Acquired::Starting {
        create: Some(job), ..
    } = f.p.acquire(&s, now).unwrap()
    else {
        panic!("expected a new on-demand instance");
    };
    assert!(!job.always_allocate_cpu);
    assert!(!always_allocated(&f).contains(&job.instance_id));
    // So is an instance of a function without a provision configuration.
    let Acquired::Starting {
        create: Some(other),
        ..
    } = f.p.acquire(&spec("1", "od", 1, 128), now).unwrap()
    else {
        panic!("expected a new instance");
    };
    assert!(!other.always_allocate_cpu);
    let info = f.p.instances_info();
    assert_eq!(
        info.iter()
            .filter(|i| i.always_allocate_cpu)
            .map(|i| i.instance_id.clone())
            .collect::<HashSet<_>>(),
        provisioned
    );

    // Turning it off keeps the same instances (no cold start, no churn)
    // and lets their agents freeze them; turning it on again holds them.
    c.always_allocate_cpu = false;
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, c.clone(), f.now())
            .unwrap();
    assert!(e.create.is_empty() && e.destroy.is_empty(), "{e:?}");
    assert!(always_allocated(&f).is_empty());
    c.always_allocate_cpu = true;
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, c, f.now())
            .unwrap();
    assert!(e.create.is_empty() && e.destroy.is_empty(), "{e:?}");
    assert_eq!(always_allocated(&f), provisioned);

    // Without the configuration they are on-demand instances.
    assert!(f.p.delete_provision(
        &"1".parse().unwrap(),
        &"p".parse().unwrap(),
        kiln_internal_api::LATEST
    ));
    assert!(always_allocated(&f).is_empty());
    assert!(f
        .p
        .always_allocated_on(&"nowhere".parse().unwrap())
        .is_empty());
}

#[test]
fn a_scheduled_action_raises_the_target_at_its_time_in_its_zone() {
    let mut f = Fixture::new();
    // 2026-11-23T03:00:00Z.
    f.clock.set(1_795_402_800_000);
    zoned_nodes(&mut f);
    let s = spec("1", "p", 1, 128);
    let mut c = provision(1);
    c.scheduled_actions = vec![kiln_internal_api::ScheduledAction {
        name: "noon".into(),
        // Noon in Shanghai on 23 November is 04:00 UTC.
        schedule_expression: "cron(0 0 12 23 11 ?)".into(),
        target: 4,
        time_zone: Some("Asia/Shanghai".into()),
        start_time: None,
        end_time: None,
    }];
    let now = f.now();
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, c, now)
            .unwrap();
    assert_eq!(e.create.len(), 1);
    start_all(&mut f, &e);
    f.clock.advance(Duration::from_secs(59 * 60));
    assert!(f.p.tick(f.now()).create.is_empty());
    f.clock.advance(Duration::from_secs(60));
    let e = f.p.tick(f.now());
    assert_eq!(e.create.len(), 3);
    assert_eq!(f.p.provisions_info()[0].desired, 4);
}

#[test]
fn target_tracking_follows_calls_in_flight_between_min_and_max() {
    let mut f = Fixture::new();
    zoned_nodes(&mut f);
    let s = spec("1", "p", 2, 128);
    let mut c = provision(0);
    c.target_tracking_policies = vec![kiln_internal_api::TargetTrackingPolicy {
        name: "t".into(),
        metric_type: "ProvisionedConcurrencyUtilization".into(),
        metric_target: 0.5,
        min_capacity: 1,
        max_capacity: 4,
        start_time: None,
        end_time: None,
        time_zone: None,
    }];
    let now = f.now();
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, c, now)
            .unwrap();
    assert_eq!(e.create.len(), 1, "the minimum");
    start_all(&mut f, &e);
    // Two slots per instance at 50 %: one instance per call in flight.
    let held: Vec<Lease> = (0..3).map(|_| f.acquire_started(&s)).collect();
    let e = f.p.tick(f.now());
    start_all(&mut f, &e);
    assert_eq!(f.p.provisions_info()[0].current, 3);
    for l in &held {
        f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    }
    let e = f.p.tick(f.now());
    assert_eq!(e.destroy.len(), 2, "back to the minimum once calls end");
}

#[test]
fn a_failed_provisioned_start_is_retried_after_a_pause() {
    let mut f = Fixture::new();
    zoned_nodes(&mut f);
    let s = spec("1", "p", 1, 128);
    let now = f.now();
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, provision(1), now)
            .unwrap();
    f.p.instance_start_failed(&e.create[0].instance_id);
    assert!(f.p.tick(f.now()).create.is_empty());
    f.clock.advance(Duration::from_secs(9));
    assert!(f.p.tick(f.now()).create.is_empty());
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(f.p.tick(f.now()).create.len(), 1);
}

#[test]
fn a_changed_function_pauses_its_provisioning_and_a_deleted_one_loses_it() {
    let mut f = Fixture::new();
    zoned_nodes(&mut f);
    let s = spec("1", "p", 1, 128);
    let now = f.now();
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, provision(2), now)
            .unwrap();
    start_all(&mut f, &e);
    let account: AccountId = "1".parse().unwrap();
    let function: FunctionName = "p".parse().unwrap();
    let e = f.p.retire(&account, &function, Some(&"ab".repeat(32)), &[]);
    assert_eq!(e.destroy.len(), 2, "old revision drained");
    assert!(
        f.p.tick(f.now()).create.is_empty(),
        "paused until a new spec"
    );
    assert_eq!(f.p.provisions_info()[0].current, 0);
    let e =
        f.p.put_provision(&s, kiln_internal_api::LATEST, provision(2), f.now())
            .unwrap();
    assert_eq!(e.create.len(), 2);
    f.p.retire(&account, &function, None, &[]);
    assert!(f.p.provisions_info().is_empty());
    // Bad configurations change nothing.
    let mut bad = provision(1);
    bad.scheduled_actions = vec![kiln_internal_api::ScheduledAction {
        name: "x".into(),
        schedule_expression: "every day".into(),
        target: 1,
        time_zone: None,
        start_time: None,
        end_time: None,
    }];
    let err =
        f.p.put_provision(&s, kiln_internal_api::LATEST, bad, f.now())
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::InvalidArgument);
    assert!(f.p.provisions_info().is_empty());
}

#[test]
fn one_functions_limits_change_alone_and_bad_ones_change_nothing() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    let a = account("1");
    let mut l = limits(|l| l.burst_instances = 10);
    l.functions
        .insert("other".parse().unwrap(), fn_limits(None, Some(7)));
    f.p.set_account_limits(&a, Some(l)).unwrap();
    let vip: FunctionName = "vip".parse().unwrap();
    let now =
        f.p.set_function_limits(&a, &vip, Some(fn_limits(Some(3), None)))
            .unwrap();
    assert_eq!(now.burst_instances, 10);
    assert_eq!(now.functions[&vip], fn_limits(Some(3), None));
    assert_eq!(
        now.functions[&"other".parse::<FunctionName>().unwrap()],
        fn_limits(None, Some(7))
    );
    // More reserved than the burst pool: refused, nothing changed.
    let err =
        f.p.set_function_limits(&a, &vip, Some(fn_limits(Some(11), None)))
            .unwrap_err();
    assert_eq!(err.code, FcErrorCode::InvalidArgument);
    assert_eq!(
        f.p.account_limits(&a).functions[&vip],
        fn_limits(Some(3), None)
    );
    // The limit is enforced.
    for _ in 0..3 {
        f.acquire_started(&spec("1", "vip", 1, 128));
    }
    throttled(
        &mut f,
        &spec("1", "vip", 1, 128),
        "reserved concurrency of 3",
    );
    // Removing the entry keeps the rest.
    let now = f.p.set_function_limits(&a, &vip, None).unwrap();
    assert!(!now.functions.contains_key(&vip));
    assert_eq!(now.functions.len(), 1);
    f.acquire_started(&spec("1", "vip", 1, 128));
    // An account with no limits of its own starts from the defaults.
    let b = account("2");
    let now =
        f.p.set_function_limits(&b, &vip, Some(fn_limits(None, Some(5))))
            .unwrap();
    assert_eq!(
        now.burst_instances,
        default_account_limits().burst_instances
    );
    assert_eq!(now.functions.len(), 1);
}

#[test]
fn provision_details_are_per_account_with_their_config() {
    let mut f = Fixture::new();
    shared_node(&mut f, "n1", 64 * 1024);
    let now = f.now();
    f.p.put_provision(
        &spec("1", "a", 1, 128),
        kiln_internal_api::LATEST,
        provision(2),
        now,
    )
    .unwrap();
    f.p.put_provision(
        &spec("2", "b", 1, 128),
        kiln_internal_api::LATEST,
        provision(1),
        now,
    )
    .unwrap();
    let d = f.p.provision_details(&account("1"));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].status.function_name.as_str(), "a");
    assert_eq!(d[0].config, provision(2));
    assert_eq!(d[0].status.target, 2);
    assert!(f.p.provision_details(&account("3")).is_empty());
}

// ---- rebalancing --------------------------------------------------------

fn rebalancing() -> Fixture {
    Fixture::with(PlacementConfig {
        node_failure_after_ms: u64::MAX / 4,
        rebalance: Some(RebalanceConfig {
            every_ticks: 2,
            high_pct: 80,
            low_pct: 30,
            max_moves: 10,
        }),
        ..PlacementConfig::default()
    })
}

/// Nine 100 MB instances of account 1 on a 1000 MB node (90 %), one
/// function each; the first (f0) is the least recently used.
fn hot_node(f: &mut Fixture) -> Vec<Lease> {
    shared_node(f, "n1", 1000);
    let mut leases = Vec::new();
    for i in 0..9 {
        f.clock.advance(Duration::from_millis(10));
        let l = f.acquire_started(&spec("1", &format!("f{i}"), 1, 100));
        assert_eq!(
            l.node_id.as_str(),
            "n1",
            "placement falls back to a hot node"
        );
        leases.push(l);
    }
    leases
}

fn node_of(f: &Fixture, function: &str) -> Vec<String> {
    f.p.instances_info()
        .into_iter()
        .filter(|i| i.function_name.as_str() == function)
        .map(|i| i.node_id.unwrap().to_string())
        .collect()
}

#[test]
fn rebalancing_drains_the_least_busy_instances_of_a_hot_node() {
    let mut f = rebalancing();
    let leases = hot_node(&mut f);
    // Every call but f0's ended, f1's first; f0 is still busy.
    for l in &leases[1..] {
        f.clock.advance(Duration::from_millis(10));
        f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    }
    // Before a cool node joins, nothing can move.
    f.p.tick(f.now());
    f.p.tick(f.now());
    assert_eq!(f.p.rebalanced_count(), 0);
    shared_node(&mut f, "n2", 1000);
    // Every second tick: this one does nothing.
    f.p.tick(f.now());
    assert_eq!(f.p.rebalanced_count(), 0);
    let e = f.p.tick(f.now());
    // 900 MB -> 800 MB (80 %, not above the watermark): one move, the
    // least busy and least recently used: f1 (f0 is busy).
    assert_eq!(f.p.rebalanced_count(), 1);
    assert_eq!(e.destroy.len(), 1, "an idle instance goes at once");
    assert!(node_of(&f, "f1").is_empty());
    assert_eq!(node_of(&f, "f0"), ["n1"]);
    // Its replacement lands on the cool node.
    let l = f.acquire_started(&spec("1", "f1", 1, 100));
    assert_eq!(l.node_id.as_str(), "n2");
    assert!(l.cold_start);
    // Balanced now: later rounds move nothing.
    for _ in 0..4 {
        f.p.tick(f.now());
    }
    assert_eq!(f.p.rebalanced_count(), 1);
}

#[test]
fn a_busy_drained_instance_finishes_its_calls_and_new_ones_start_elsewhere() {
    let mut f = rebalancing();
    let leases = hot_node(&mut f);
    // Every call still runs: the least recently used instance drains.
    shared_node(&mut f, "n2", 1000);
    f.p.tick(f.now());
    f.p.tick(f.now());
    assert_eq!(f.p.rebalanced_count(), 1);
    // f0 drains: it takes no new calls and goes once its call ends.
    let e =
        f.p.release(&leases[0].lease_id, LeaseOutcome::Ok, f.now())
            .unwrap();
    assert_eq!(e.destroy.len(), 1, "gone once its call ended");
    let l = f.acquire_started(&spec("1", "f0", 1, 100));
    assert_eq!(l.node_id.as_str(), "n2");
}

#[test]
fn rebalancing_never_moves_provisioned_instances_or_crosses_tenancy() {
    let mut f = rebalancing();
    shared_node(&mut f, "n1", 1000);
    let now = f.now();
    let e =
        f.p.put_provision(
            &spec("1", "p", 1, 100),
            kiln_internal_api::LATEST,
            provision(9),
            now,
        )
        .unwrap();
    start_all(&mut f, &e);
    assert_eq!(node_of(&f, "p").len(), 9);
    shared_node(&mut f, "n2", 1000);
    for _ in 0..4 {
        f.p.tick(f.now());
    }
    assert_eq!(f.p.rebalanced_count(), 0, "provisioned instances stay");

    // On-demand instances of account 1 on a hot node, and a cool node
    // dedicated to account 2 only: nothing moves.
    let mut f = rebalancing();
    let leases = hot_node(&mut f);
    for l in &leases {
        f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    }
    let now = f.now();
    f.p.register(
        &registration(Some("d2"), 1000, Tenancy::Dedicated, Some("2")),
        now,
    )
    .unwrap();
    for _ in 0..4 {
        f.p.tick(f.now());
    }
    assert_eq!(f.p.rebalanced_count(), 0);
    assert_eq!(f.p.instance_count(), 9);
}

#[test]
fn without_rebalancing_nothing_moves_and_placement_bin_packs() {
    let mut f = Fixture::new();
    let leases = hot_node(&mut f);
    for l in &leases {
        f.p.release(&l.lease_id, LeaseOutcome::Ok, f.now()).unwrap();
    }
    shared_node(&mut f, "n2", 1000);
    for _ in 0..4 {
        f.p.tick(f.now());
    }
    assert_eq!(f.p.rebalanced_count(), 0);
    // The fullest node that fits still gets the next instance.
    let l = f.acquire_started(&spec("1", "new", 1, 100));
    assert_eq!(l.node_id.as_str(), "n1");
}

fn offering(id: &str, memory_mb: u64, runtimes: Option<Vec<RuntimeName>>) -> RegisterNode {
    let mut r = registration(Some(id), memory_mb, Tenancy::Dedicated, None);
    r.labels.runtimes = runtimes;
    r
}

fn created_on(a: Acquired) -> NodeId {
    match a {
        Acquired::Starting {
            create: Some(job), ..
        } => job.node_id,
        _ => panic!("expected a new instance"),
    }
}

#[test]
fn instances_go_only_to_nodes_that_offer_their_runtime() {
    let mut f = Fixture::new();
    let now = f.now();
    // The best fit by memory offers only `custom`.
    f.p.register(
        &offering("small", 1024, Some(vec![RuntimeName::Custom])),
        now,
    )
    .unwrap();
    f.p.register(&offering("big", 8192, Some(RuntimeName::ALL.to_vec())), now)
        .unwrap();
    let custom = spec("1", "static", 1, 128);
    let mut debian = spec("1", "python", 1, 128);
    debian.runtime = RuntimeName::CustomDebian12;
    let debian = debian.seal();
    for _ in 0..3 {
        assert_eq!(
            created_on(f.p.acquire(&debian, now).unwrap()).as_str(),
            "big"
        );
    }
    assert_eq!(
        created_on(f.p.acquire(&custom, now).unwrap()).as_str(),
        "small"
    );
    // The node list shows what each node offers.
    let info = f.p.nodes_info();
    let small = info.iter().find(|n| n.node_id.as_str() == "small").unwrap();
    assert_eq!(small.labels.runtimes, Some(vec![RuntimeName::Custom]));
}

#[test]
fn a_runtime_no_node_offers_is_refused_with_its_name() {
    let mut f = Fixture::new();
    let now = f.now();
    f.p.register(&offering("n1", 8192, Some(vec![RuntimeName::Custom])), now)
        .unwrap();
    let mut debian = spec("1", "python", 1, 128);
    debian.runtime = RuntimeName::CustomDebian12;
    let debian = debian.seal();
    let e = f.p.acquire(&debian, now).unwrap_err();
    assert_eq!(e.code, FcErrorCode::ServiceUnavailable);
    assert!(e.message.contains("custom.debian12"), "{}", e.message);
    assert_eq!(f.p.instance_count(), 0);
    // A node registered by an older agent (no runtimes reported) is taken
    // to offer every runtime.
    f.p.register(&offering("old", 8192, None), now).unwrap();
    assert_eq!(
        created_on(f.p.acquire(&debian, now).unwrap()).as_str(),
        "old"
    );
}

#[test]
fn a_registration_offering_no_runtime_is_refused() {
    let mut f = Fixture::new();
    let now = f.now();
    let e =
        f.p.register(&offering("n1", 8192, Some(vec![])), now)
            .unwrap_err();
    assert_eq!(e.code, FcErrorCode::InvalidArgument);
    assert!(e.message.contains("runtimes"), "{}", e.message);
    assert!(f.p.nodes_info().is_empty());
}
