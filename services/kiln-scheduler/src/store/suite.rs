//! One test suite for every backend: each function takes a way to open
//! (and reopen) the same store, and each backend's tests call all of them.

use std::sync::Arc;

use kiln_core::NodeId;
use kiln_internal_api::Tenancy;

use super::{Redeemed, SchedulerStore, TrustStore, Writer};
use crate::placement::tests::{registration, spec};
use crate::placement::{Acquired, Change, Placement, PlacementConfig, ProvisionRecord};

/// A spec with a secret in its environment, placed, started and
/// provisioned: what the store writes for it.
pub(super) fn secret_state() -> (Vec<Change>, kiln_core::InstanceSpec) {
    let mut p = Placement::new(PlacementConfig::default());
    p.register(
        &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
        10,
    )
    .unwrap();
    let mut s = spec("1", "f", 2, 512);
    s.environment
        .insert("DB_PASSWORD".into(), "hunter2-sealed-0xC0FFEE".into());
    // A custom-container function's registry password is sealed with it.
    s.runtime = kiln_core::RuntimeName::CustomContainer;
    s.image = Some(kiln_core::ImageSpec {
        reference: "registry.example:5000/app:v1".into(),
        entrypoint: Vec::new(),
        command: Vec::new(),
        registry_username: Some("deploy".into()),
        registry_password: Some("registry-pw-0xBEEF".into()),
    });
    let s = s.seal();
    let Acquired::Starting {
        create: Some(job), ..
    } = p.acquire(&s, 10).unwrap()
    else {
        panic!("expected a new instance");
    };
    p.instance_started(&job.instance_id, 11);
    let mut changes = p.take_changes();
    // LATEST's provision and an alias's, each sealed to its own row.
    for qualifier in [kiln_internal_api::LATEST, "prod"] {
        changes.push(Change::UpsertProvision(ProvisionRecord {
            account_id: s.account_id.clone(),
            function_name: s.function_name.clone(),
            qualifier: qualifier.to_owned(),
            spec: Some(s.clone()),
            config: kiln_internal_api::ProvisionConfig {
                target: 1,
                always_allocate_cpu: true,
                scheduled_actions: Vec::new(),
                target_tracking_policies: Vec::new(),
            },
        }));
    }
    (changes, s)
}

/// The environment is sealed at rest (`stored` dumps every stored row as
/// text) and opens on load.
pub(super) fn environments_are_sealed_and_open_on_load<S: SchedulerStore>(
    store: &S,
    stored: impl Fn() -> String,
) {
    let (changes, s) = secret_state();
    store.apply(&changes).unwrap();
    let raw = stored();
    assert!(!raw.contains("hunter2-sealed-0xC0FFEE"), "{raw}");
    assert!(!raw.contains("DB_PASSWORD"), "{raw}");
    assert!(!raw.contains("registry-pw-0xBEEF"), "{raw}");
    let (_, instances) = store.load().unwrap();
    assert_eq!(instances[0].spec, s);
    let provisions = store.load_provisions().unwrap();
    let qualifiers: Vec<&str> = provisions.iter().map(|p| p.qualifier.as_str()).collect();
    assert_eq!(qualifiers, vec![kiln_internal_api::LATEST, "prod"]);
    assert!(provisions.iter().all(|p| p.spec.as_ref() == Some(&s)));
    // Deleting the alias's keeps LATEST's.
    store
        .apply(&[Change::DeleteProvision(
            s.account_id.clone(),
            s.function_name.clone(),
            "prod".into(),
        )])
        .unwrap();
    let left = store.load_provisions().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].qualifier, kiln_internal_api::LATEST);
}

pub(super) fn state_survives_reopening<S: SchedulerStore>(open: impl Fn() -> S) {
    let store = open();
    let mut p = Placement::new(PlacementConfig::default());
    p.register(
        &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
        10,
    )
    .unwrap();
    let s = spec("1", "f", 2, 512);
    let Acquired::Starting {
        create: Some(job), ..
    } = p.acquire(&s, 10).unwrap()
    else {
        panic!("expected a new instance");
    };
    p.instance_started(&job.instance_id, 11);
    let Acquired::Starting {
        create: Some(gone), ..
    } = p.acquire(&spec("1", "g", 1, 128), 12).unwrap()
    else {
        panic!("expected a new instance");
    };
    p.instance_start_failed(&gone.instance_id);
    store.apply(&p.take_changes()).unwrap();
    store
        .apply(&[Change::UpsertAccountLimits(
            "1".parse().unwrap(),
            kiln_internal_api::AccountLimits {
                burst_instances: 7,
                ..crate::placement::default_account_limits()
            },
        )])
        .unwrap();
    drop(store);

    let store = open();
    let (nodes, instances) = store.load().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].bound_account.as_ref().unwrap().as_str(), "1");
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].instance_id, job.instance_id);
    assert_eq!(instances[0].spec, s);
    let limits = store.load_account_limits().unwrap();
    assert_eq!(limits.len(), 1);
    assert_eq!(limits[0].1.burst_instances, 7);
    let (p2, _) = Placement::restore(PlacementConfig::default(), nodes, instances, 1_000);
    assert_eq!(p2.instance_count(), 1);
    assert_eq!(p2.node(&job.node_id).unwrap().used_memory_mb, 512);

    store
        .apply(&[
            Change::DeleteInstance(job.instance_id.clone()),
            Change::DeleteAccountLimits("1".parse().unwrap()),
        ])
        .unwrap();
    assert!(store.load().unwrap().1.is_empty());
    assert!(store.load_account_limits().unwrap().is_empty());
}

pub(super) fn revocations_persist_and_tokens_are_single_use_and_expire<S: TrustStore>(
    open: impl Fn() -> S,
) {
    let store = open();
    let a: NodeId = "n-a".parse().unwrap();
    assert_eq!(store.revoke_node(&a, 100).unwrap(), 100);
    assert_eq!(store.revoke_node(&a, 200).unwrap(), 100);
    store.add_bootstrap_token("h1", &a, 10, 1_000).unwrap();
    store.add_bootstrap_token("h2", &a, 10, 1_000).unwrap();
    drop(store);

    let store = open();
    assert_eq!(store.revoked_nodes().unwrap(), vec![(a.clone(), 100)]);
    assert_eq!(
        store.redeem_bootstrap_token("h1", 500).unwrap(),
        Redeemed::Node(a.clone())
    );
    assert_eq!(
        store.redeem_bootstrap_token("h1", 501).unwrap(),
        Redeemed::Used {
            node_id: a.clone(),
            used_at_ms: 500
        }
    );
    assert_eq!(
        store.redeem_bootstrap_token("h2", 1_000).unwrap(),
        Redeemed::Expired {
            node_id: a.clone(),
            expires_at_ms: 1_000
        }
    );
    // An expired token stays unusable; an unknown one is unknown.
    assert!(matches!(
        store.redeem_bootstrap_token("h2", 2_000).unwrap(),
        Redeemed::Expired { .. }
    ));
    assert_eq!(
        store.redeem_bootstrap_token("nope", 10).unwrap(),
        Redeemed::Unknown
    );
}

pub(super) fn node_holders_follow_the_last_registration<S: TrustStore>(open: impl Fn() -> S) {
    let store = open();
    let (a, b): (NodeId, NodeId) = ("n-a".parse().unwrap(), "n-b".parse().unwrap());
    store.set_node_holder(&a, &[1; 32]).unwrap();
    store.set_node_holder(&b, &[2; 32]).unwrap();
    store.set_node_holder(&a, &[3; 32]).unwrap();
    drop(store);
    let store = open();
    assert_eq!(
        store.node_holders().unwrap(),
        vec![(a, [3; 32]), (b, [2; 32])]
    );
}

pub(super) async fn the_writer_batches_and_flushes<S: SchedulerStore>(store: Arc<S>) {
    let (writer, _task) = Writer::spawn(store.clone());
    let mut p = Placement::new(PlacementConfig::default());
    p.register(
        &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
        10,
    )
    .unwrap();
    writer.send(p.take_changes());
    for i in 0..50 {
        p.acquire(&spec("1", &format!("f{i}"), 1, 64), 10).unwrap();
        writer.send(p.take_changes());
    }
    writer.flush().await.unwrap();
    let (_, instances) = store.load().unwrap();
    assert_eq!(instances.len(), 50);
}
