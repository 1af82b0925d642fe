//! One test suite for both metadata backends: each function takes a store
//! (or a way to open the same one again) and each backend's tests call
//! all of them (SQLite in `sqlite_suite`, PostgreSQL in `postgres_suite`).

use std::sync::Arc;

use kiln_core::AccountId;

use super::tests::{record, sealer};
use super::{AccessKey, LayerVersionRecord, MetaStore, MetaStoreError};
use crate::domains::{DomainRecord, DomainStore};
use crate::model::CodeRef;
use crate::ram::policy::Policy;
use crate::ram::{RoleRecord, RoleStore};
use crate::secrets::Sealer;
use crate::triggers::{TimerTriggerConfig, TriggerConfig, TriggerRecord};
use crate::versions::{AliasRecord, VersionRecord};

fn account(a: &str) -> AccountId {
    a.parse().unwrap()
}

/// Functions and keys survive reopening; names are unique per account; a
/// key never moves to another account; an update names the same function
/// id.
pub(super) fn functions_and_keys_persist<S: MetaStore>(open: impl Fn() -> S) {
    let s = open();
    let a = account("1");
    s.check().unwrap();
    s.ensure_account(&a, 1).unwrap();
    s.ensure_account(&a, 2).unwrap();
    let key = AccessKey {
        access_key_id: "AK1".into(),
        account_id: a.clone(),
        secret: "s".repeat(20),
    };
    s.put_access_key(&key, 1).unwrap();
    let f = record("1", "f", &"a".repeat(64));
    s.insert_function(&f).unwrap();
    assert!(matches!(
        s.insert_function(&f),
        Err(MetaStoreError::FunctionExists(_))
    ));
    drop(s);
    let s = open();
    assert_eq!(s.functions().unwrap(), vec![f.clone()]);
    assert_eq!(s.function(&a, &f.name).unwrap(), Some(f.clone()));
    assert_eq!(s.function(&a, &"g".parse().unwrap()).unwrap(), None);
    let stored = s.access_keys().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].key, key);
    assert!(stored[0].enabled);
    s.ensure_account(&account("2"), 1).unwrap();
    let stolen = AccessKey {
        account_id: account("2"),
        ..key.clone()
    };
    assert!(matches!(
        s.put_access_key(&stolen, 1),
        Err(MetaStoreError::KeyOwnedElsewhere(_))
    ));
    // Rotating the secret keeps the key.
    let rotated = AccessKey {
        secret: "t".repeat(20),
        ..key.clone()
    };
    s.put_access_key(&rotated, 5).unwrap();
    assert!(s.set_access_key_enabled("AK1", false).unwrap());
    assert!(!s.set_access_key_enabled("nope", false).unwrap());
    let stored = s.access_keys().unwrap();
    assert_eq!(
        (&stored[0].key, stored[0].enabled, stored[0].created_ms),
        (&rotated, false, 1)
    );
    assert!(s.delete_access_key("AK1").unwrap());
    assert!(!s.delete_access_key("AK1").unwrap());
    assert!(s.access_keys().unwrap().is_empty());
    // Another function id under the same name is not this row.
    let mut other = record("1", "f", &"b".repeat(64));
    other.modified_ms = 2000;
    assert!(matches!(
        s.update_function(&other, f.modified_ms),
        Err(MetaStoreError::FunctionMissing(_))
    ));
    other.function_id = f.function_id.clone();
    s.update_function(&other, f.modified_ms).unwrap();
    assert_eq!(s.function(&a, &f.name).unwrap(), Some(other.clone()));
    // An update computed from the copy before that one (another gateway
    // wrote since) is refused and changes nothing.
    let mut stale = other.clone();
    stale.modified_ms = 3000;
    stale.config.code.sha256 = "c".repeat(64);
    assert!(matches!(
        s.update_function(&stale, f.modified_ms),
        Err(MetaStoreError::FunctionChanged(_))
    ));
    assert_eq!(s.function(&a, &f.name).unwrap(), Some(other));
}

/// Code rows are shared, released only when nothing references them.
pub(super) fn code_rows_are_shared_and_released<S: MetaStore>(s: &S) {
    s.ensure_account(&account("1"), 1).unwrap();
    let d = "b".repeat(64);
    s.insert_function(&record("1", "f", &d)).unwrap();
    let first = record("1", "g", &d);
    s.insert_function(&first).unwrap();
    assert_eq!(s.code_digests().unwrap(), vec![d.clone()]);
    assert_eq!(s.code_blob(&d).unwrap().unwrap().size, 3);
    s.delete_function(&account("1"), &"f".parse().unwrap())
        .unwrap();
    assert!(!s.release_code(&d).unwrap(), "g still uses it");
    let mut g = record("1", "g", &"c".repeat(64));
    g.function_id = first.function_id;
    s.update_function(&g, 1000).unwrap();
    assert!(s.release_code(&d).unwrap());
    assert!(s.code_blob(&d).unwrap().is_none());
    assert_eq!(s.code_digests().unwrap(), vec!["c".repeat(64)]);
    assert!(matches!(
        s.delete_function(&account("1"), &"f".parse().unwrap()),
        Err(MetaStoreError::FunctionMissing(_))
    ));
}

fn version(f: &crate::model::FunctionRecord, id: u32) -> VersionRecord {
    VersionRecord {
        account_id: f.account_id.clone(),
        name: f.name.clone(),
        function_id: f.function_id.clone(),
        version: id,
        description: format!("v{id}"),
        created_ms: 7,
        config: f.config.version_snapshot(),
    }
}

fn layer_version(name: &str, id: u32) -> LayerVersionRecord {
    LayerVersionRecord {
        account_id: account("1"),
        name: name.into(),
        version: id,
        code: CodeRef {
            sha256: "d".repeat(64),
            size: 3,
            checksum: "7".into(),
        },
        description: String::new(),
        compatible_runtime: vec!["python3.10".into()],
        license: String::new(),
        created_ms: 1,
    }
}

/// A version or layer version id asked for by a gateway whose view is
/// behind (another gateway took it) is never reused: the store hands out
/// the next free one. Deleted ids are not reused either.
pub(super) fn version_ids_are_never_reused<S: MetaStore>(s: &S) {
    s.ensure_account(&account("1"), 1).unwrap();
    let mut f = record("1", "f", &"a".repeat(64));
    f.config
        .environment
        .insert("TOKEN".into(), "version-secret".into());
    s.insert_function(&f).unwrap();
    assert_eq!(s.insert_version(&version(&f, 1)).unwrap(), 1);
    // A second gateway still believes the last id is 0.
    assert_eq!(s.insert_version(&version(&f, 1)).unwrap(), 2);
    assert!(s.delete_version(&f.account_id, &f.name, 2).unwrap());
    assert!(!s.delete_version(&f.account_id, &f.name, 2).unwrap());
    assert_eq!(s.insert_version(&version(&f, 2)).unwrap(), 3);
    let stored = s.function_versions().unwrap();
    let ids: Vec<u32> = stored.versions.iter().map(|v| v.version).collect();
    assert_eq!(ids, vec![1, 3]);
    assert_eq!(
        stored.last_ids,
        vec![(
            f.account_id.clone(),
            f.name.clone(),
            f.function_id.clone(),
            3
        )]
    );
    // The environment opens with the id actually stored.
    assert_eq!(
        stored.versions[1].config.environment.get("TOKEN").unwrap(),
        "version-secret"
    );
    assert_eq!(stored.versions[1].description, "v2");
    // A version of a function id that is gone is refused.
    let mut stale = version(&f, 4);
    stale.function_id = "another".into();
    assert!(matches!(
        s.insert_version(&stale),
        Err(MetaStoreError::FunctionMissing(_))
    ));

    assert_eq!(s.insert_layer_version(&layer_version("l", 1)).unwrap(), 1);
    assert_eq!(s.insert_layer_version(&layer_version("l", 1)).unwrap(), 2);
    let versions = s.layer_versions().unwrap();
    let mut ids: Vec<u32> = versions.iter().map(|v| v.version).collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2], "the document carries the stored number");
    assert!(s.delete_layer_version(&account("1"), "l", 2).unwrap());
    assert!(!s.delete_layer_version(&account("1"), "l", 2).unwrap());
    assert_eq!(s.insert_layer_version(&layer_version("l", 2)).unwrap(), 3);
    assert!(s.set_layer_public(&account("1"), "l", true).unwrap());
    assert!(!s.set_layer_public(&account("1"), "nope", true).unwrap());
    let layers = s.layers().unwrap();
    assert_eq!(
        (layers.len(), layers[0].public, layers[0].last_version),
        (1, true, 3)
    );
}

fn trigger(function: &str, name: &str, label: Option<&str>) -> TriggerRecord {
    TriggerRecord {
        account_id: account("1"),
        function_name: function.parse().unwrap(),
        trigger_name: name.into(),
        trigger_id: uuid::Uuid::new_v4().to_string(),
        config_raw: "{}".into(),
        config: TriggerConfig::Timer(TimerTriggerConfig {
            cron_expression: "@every 1m".into(),
            payload: String::new(),
            enable: true,
        }),
        qualifier: "LATEST".into(),
        invocation_role: String::new(),
        source_arn: String::new(),
        description: String::new(),
        host_label: label.map(str::to_owned),
        created_ms: 1,
        modified_ms: 1,
    }
}

/// Aliases and triggers: a function with either cannot be deleted; a
/// trigger name is unique per function and a host label across accounts.
pub(super) fn aliases_triggers_and_deletion_rules<S: MetaStore>(s: &S) {
    let a = account("1");
    s.ensure_account(&a, 1).unwrap();
    let f = record("1", "f", &"a".repeat(64));
    s.insert_function(&f).unwrap();
    let alias = AliasRecord {
        account_id: a.clone(),
        name: f.name.clone(),
        alias: "prod".into(),
        version: 1,
        additional: Default::default(),
        description: String::new(),
        created_ms: 1,
        modified_ms: 1,
    };
    s.put_alias(&alias).unwrap();
    let mut moved = alias.clone();
    moved.version = 2;
    s.put_alias(&moved).unwrap();
    assert_eq!(s.aliases().unwrap(), vec![moved]);
    assert!(matches!(
        s.delete_function(&a, &f.name),
        Err(MetaStoreError::FunctionHasVersions(_))
    ));
    assert!(s.delete_alias(&a, &f.name, "prod").unwrap());
    assert!(!s.delete_alias(&a, &f.name, "prod").unwrap());

    let t = trigger("f", "t", Some("f-abc"));
    s.insert_trigger(&t).unwrap();
    assert!(matches!(
        s.insert_trigger(&t),
        Err(MetaStoreError::TriggerExists { .. })
    ));
    assert!(
        s.insert_trigger(&trigger("f", "u", Some("f-abc"))).is_err(),
        "a host label is unique"
    );
    assert!(matches!(
        s.insert_trigger(&trigger("g", "t", None)),
        Err(MetaStoreError::FunctionMissing(_))
    ));
    let mut changed = t.clone();
    changed.description = "changed".into();
    s.update_trigger(&changed).unwrap();
    assert_eq!(s.triggers().unwrap(), vec![changed]);
    assert!(matches!(
        s.delete_function(&a, &f.name),
        Err(MetaStoreError::FunctionHasTriggers(_))
    ));
    assert!(s.delete_trigger(&a, &f.name, "t").unwrap());
    assert!(!s.delete_trigger(&a, &f.name, "t").unwrap());
    s.delete_function(&a, &f.name).unwrap();
    assert!(s.functions().unwrap().is_empty());
}

fn domain(account_id: &str) -> DomainRecord {
    DomainRecord {
        account_id: account(account_id),
        domain_name: "shop.example.com".into(),
        protocol: "HTTPS".into(),
        cert_name: "c".into(),
        certificate: "CERT".into(),
        tls: Default::default(),
        routes: vec![],
        created_ms: 1,
        modified_ms: 1,
    }
}

/// Roles round-trip; custom domain names are unique across accounts.
pub(super) fn roles_and_domains<S: RoleStore + DomainStore>(s: &S, sealer: &Sealer) {
    let policy = Policy::parse(&serde_json::json!({"Version": "1", "Statement": [
        {"Effect": "Allow", "Action": "fc:GetFunction", "Resource": "*"}]}))
    .unwrap();
    let role = RoleRecord {
        account_id: account("1"),
        name: "reader".into(),
        description: "reads".into(),
        policy,
        created_ms: 5,
        modified_ms: 6,
    };
    s.put_role(&role).unwrap();
    let mut changed = role.clone();
    changed.description = "still reads".into();
    changed.modified_ms = 9;
    s.put_role(&changed).unwrap();
    let got = s.roles().unwrap();
    assert_eq!(
        (got.len(), got[0].description.as_str(), got[0].created_ms),
        (1, "still reads", 5)
    );
    assert!(s.delete_role(&role.account_id, "reader").unwrap());
    assert!(!s.delete_role(&role.account_id, "reader").unwrap());

    let r = domain("1");
    assert!(s.insert_domain(sealer, &r, "THE-KEY").unwrap());
    assert!(!s.insert_domain(sealer, &domain("2"), "K2").unwrap());
    let mut updated = r.clone();
    updated.certificate = "CERT2".into();
    s.update_domain(sealer, &updated, "KEY2").unwrap();
    assert_eq!(
        s.load_domains(sealer).unwrap(),
        vec![(updated, "KEY2".to_owned())]
    );
    s.delete_domain("shop.example.com").unwrap();
    assert!(s.load_domains(sealer).unwrap().is_empty());
}

/// Secrets are sealed at rest (`raw` dumps the stored rows as text) and
/// open on load.
pub(super) fn secrets_are_sealed_at_rest<S: MetaStore + DomainStore>(
    s: &S,
    sealer: &Sealer,
    raw: impl Fn() -> String,
) {
    s.ensure_account(&account("1"), 1).unwrap();
    s.put_access_key(
        &AccessKey {
            access_key_id: "AK1".into(),
            account_id: account("1"),
            secret: "key-secret-0xF00D".into(),
        },
        1,
    )
    .unwrap();
    let mut f = record("1", "f", &"a".repeat(64));
    f.config
        .environment
        .insert("DB_PASSWORD".into(), "env-secret-0xBEEF".into());
    s.insert_function(&f).unwrap();
    s.insert_version(&version(&f, 1)).unwrap();
    assert!(s.insert_domain(sealer, &domain("1"), "PEM-0xCAFE").unwrap());
    let dump = raw();
    for secret in [
        "key-secret-0xF00D",
        "env-secret-0xBEEF",
        "DB_PASSWORD",
        "PEM-0xCAFE",
    ] {
        assert!(!dump.contains(secret), "{secret} in {dump}");
    }
    assert_eq!(s.access_keys().unwrap()[0].key.secret, "key-secret-0xF00D");
    assert_eq!(s.functions().unwrap(), vec![f]);
    assert_eq!(s.load_domains(sealer).unwrap()[0].1, "PEM-0xCAFE");
}

/// The sealer every suite store uses.
pub(super) fn suite_sealer() -> Arc<Sealer> {
    sealer()
}

mod sqlite_suite {
    use super::*;
    use crate::store::SqliteStore;

    fn fresh() -> SqliteStore {
        SqliteStore::open_in_memory(sealer()).unwrap()
    }

    #[test]
    fn functions_and_keys_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        super::functions_and_keys_persist(|| SqliteStore::open(&path, sealer()).unwrap());
    }

    #[test]
    fn code_rows_are_shared_and_released() {
        super::code_rows_are_shared_and_released(&fresh());
    }

    #[test]
    fn version_ids_are_never_reused() {
        super::version_ids_are_never_reused(&fresh());
    }

    #[test]
    fn aliases_triggers_and_deletion_rules() {
        super::aliases_triggers_and_deletion_rules(&fresh());
    }

    #[test]
    fn roles_and_domains() {
        super::roles_and_domains(&fresh(), &suite_sealer());
    }

    #[test]
    fn secrets_are_sealed_at_rest() {
        let s = fresh();
        let raw = || {
            s.with(|c| {
                let mut out = String::new();
                for sql in [
                    "SELECT secret || coalesce(secret_sealed, '') FROM access_keys",
                    "SELECT doc || coalesce(env_sealed, '') FROM functions",
                    "SELECT doc || env_sealed FROM function_versions",
                    "SELECT doc || key_sealed FROM custom_domains",
                ] {
                    let mut st = c.prepare(sql)?;
                    for r in st.query_map([], |r| r.get::<_, String>(0))? {
                        out.push_str(&r?);
                        out.push('\n');
                    }
                }
                Ok(out)
            })
            .unwrap()
        };
        super::secrets_are_sealed_at_rest(&s, &suite_sealer(), raw);
    }
}

mod postgres_suite {
    use kiln_test_support::postgres::PgServer;

    use super::*;
    use crate::store::postgres::PgMetaStore;
    use crate::store::CodeSource;

    /// A fresh database on a throwaway server, and a way to open it.
    fn database(pg: &PgServer, name: &str) -> impl Fn() -> PgMetaStore {
        let url = pg.create_database(name);
        move || PgMetaStore::open(&url, None, 4, sealer()).unwrap()
    }

    #[test]
    fn functions_and_keys_persist() {
        let Some(pg) = PgServer::start() else { return };
        super::functions_and_keys_persist(database(&pg, "functions"));
    }

    #[test]
    fn code_rows_are_shared_and_released() {
        let Some(pg) = PgServer::start() else { return };
        super::code_rows_are_shared_and_released(&database(&pg, "code")());
    }

    #[test]
    fn version_ids_are_never_reused() {
        let Some(pg) = PgServer::start() else { return };
        super::version_ids_are_never_reused(&database(&pg, "versions")());
    }

    #[test]
    fn aliases_triggers_and_deletion_rules() {
        let Some(pg) = PgServer::start() else { return };
        super::aliases_triggers_and_deletion_rules(&database(&pg, "triggers")());
    }

    #[test]
    fn roles_and_domains() {
        let Some(pg) = PgServer::start() else { return };
        super::roles_and_domains(&database(&pg, "roles")(), &suite_sealer());
    }

    #[test]
    fn secrets_are_sealed_at_rest() {
        let Some(pg) = PgServer::start() else { return };
        let s = database(&pg, "sealed")();
        let dump = s.clone();
        let raw = move || dump.dump_text();
        super::secrets_are_sealed_at_rest(&s, &suite_sealer(), raw);
    }

    /// A write handed a bound is checked against what the database holds,
    /// counted as the catalog counts it: functions, their packages, each
    /// package only a function's versions still hold (once), and every
    /// layer version's package.
    #[test]
    fn bounds_are_checked_against_the_database() {
        use crate::bounds::{Bound, Change, Limits};
        let Some(pg) = PgServer::start() else { return };
        let s = database(&pg, "bounds")();
        let a = account("1");
        s.ensure_account(&a, 1).unwrap();
        let (da, db) = ("a".repeat(64), "b".repeat(64));
        // f: version 1 holds package a, then f moves to b (version 2 holds
        // b too); g uses a. Every package is 3 bytes.
        let f = record("1", "f", &da);
        s.insert_function(&f).unwrap();
        s.insert_version(&version(&f, 1)).unwrap();
        let mut f2 = record("1", "f", &db);
        f2.function_id = f.function_id.clone();
        f2.modified_ms = 2000;
        s.update_function(&f2, 1000).unwrap();
        s.insert_version(&version(&f2, 2)).unwrap();
        s.insert_function(&record("1", "g", &da)).unwrap();
        s.insert_layer_version(&layer_version("l", 1)).unwrap();
        s.insert_layer_version(&layer_version("l", 2)).unwrap();
        // 2 functions; 3 (f: b) + 3 (g: a) + 3 (a, held by f's version 1
        // only) + 2 x 3 (layer versions) = 15 bytes; 2 layer versions.
        let limits = Limits {
            functions: 2,
            code_bytes: 15,
            layer_versions: 2,
            async_queue_depth: 1,
        };
        let bound = |limits, change| Bound { limits, change };
        fn refused<T>(r: Result<T, MetaStoreError>) -> String {
            match r {
                Err(MetaStoreError::OverBound(e)) => e.message,
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("admitted over its bound"),
            }
        }
        let one_function = Change {
            functions: 1,
            ..Default::default()
        };
        let why =
            refused(s.insert_function_within(&record("1", "h", &da), bound(limits, one_function)));
        assert!(why.contains("has 2 functions"), "{why}");
        let one_layer = Change {
            layer_versions: 1,
            added_bytes: 3,
            ..Default::default()
        };
        let why = refused(
            s.insert_layer_version_within(&layer_version("l", 3), bound(limits, one_layer)),
        );
        assert!(why.contains("has 2 layer versions"), "{why}");
        let more_versions = Limits {
            layer_versions: 3,
            code_bytes: 17,
            ..limits
        };
        let why = refused(
            s.insert_layer_version_within(&layer_version("l", 3), bound(more_versions, one_layer)),
        );
        assert!(why.contains("stores 15 bytes"), "{why}");
        // f moving from b to a new 3-byte package frees nothing: its
        // version 2 holds b (whatever the gateway's view thought).
        let mut f3 = record("1", "f", &"c".repeat(64));
        f3.function_id = f.function_id.clone();
        f3.modified_ms = 3000;
        let replace = Change {
            added_bytes: 3,
            freed_bytes: 3,
            ..Default::default()
        };
        let why = refused(s.update_function_within(&f3, 2000, bound(limits, replace)));
        assert!(why.contains("stores 15 bytes"), "{why}");
        // Refused writes wrote nothing; within its bounds a write goes in.
        let room = Limits {
            code_bytes: 18,
            ..more_versions
        };
        assert_eq!(
            s.insert_layer_version_within(&layer_version("l", 3), bound(room, one_layer))
                .unwrap(),
            3
        );
        assert_eq!(s.layer_versions().unwrap().len(), 3);
        assert_eq!(s.functions().unwrap().len(), 2);
    }

    /// Every write appends one change row naming what it changed; failed
    /// writes append nothing.
    #[test]
    fn writes_append_changes() {
        use crate::store::changes::Kind;
        let Some(pg) = PgServer::start() else { return };
        let s = database(&pg, "changes")();
        assert_eq!(s.last_change().unwrap(), 0);
        s.ensure_account(&account("1"), 1).unwrap();
        let f = record("1", "f", &"a".repeat(64));
        s.insert_function(&f).unwrap();
        assert!(s.insert_function(&f).is_err());
        s.put_access_key(
            &AccessKey {
                access_key_id: "AK1".into(),
                account_id: account("1"),
                secret: "x".repeat(20),
            },
            1,
        )
        .unwrap();
        assert!(!s.set_access_key_enabled("nope", false).unwrap());
        s.insert_version(&version(&f, 1)).unwrap();
        let (rows, oldest) = s.changes_since(0, 100).unwrap();
        let got: Vec<(Kind, &str, &str)> = rows
            .iter()
            .map(|r| (r.kind, r.account_id.as_str(), r.name.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Kind::Function, "1", "f"),
                (Kind::Key, "1", "AK1"),
                (Kind::Version, "1", "f"),
            ]
        );
        assert_eq!(oldest, Some(rows[0].seq));
        assert_eq!(s.last_change().unwrap(), rows[2].seq);
        let (after, _) = s.changes_since(rows[0].seq, 100).unwrap();
        assert_eq!(after.len(), 2);
        // Purging keeps the newest row (a starting gateway reads it).
        assert_eq!(s.purge_changes(-60_000).unwrap(), 2);
        assert_eq!(s.last_change().unwrap(), rows[2].seq);
    }

    /// Zips live in the database; one nothing references is collected,
    /// one a function or layer version names is kept.
    #[test]
    fn code_zips_are_stored_and_collected_when_unreferenced() {
        let Some(pg) = PgServer::start() else { return };
        let s = database(&pg, "zips")();
        s.ensure_account(&account("1"), 1).unwrap();
        let (used, layer, loose) = ("a".repeat(64), "d".repeat(64), "e".repeat(64));
        for d in [&used, &layer, &loose] {
            s.put_zip(d, d.as_bytes()).unwrap();
        }
        s.put_zip(&used, b"ignored: already stored").unwrap();
        assert_eq!(s.zip(&used).unwrap().unwrap(), used.as_bytes());
        assert_eq!(s.zip(&"f".repeat(64)).unwrap(), None);
        s.insert_function(&record("1", "f", &used)).unwrap();
        s.insert_layer_version(&layer_version("l", 1)).unwrap();
        // Recent zips are spared (their row may be on its way).
        assert_eq!(s.collect_zips(60_000).unwrap(), 0);
        assert_eq!(s.collect_zips(-60_000).unwrap(), 1);
        assert_eq!(s.zip_digests().unwrap(), vec![used.clone(), layer]);
    }
}
