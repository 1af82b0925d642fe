//! The metadata store with sealed secrets: round trips, what the raw file
//! holds, rows whose ciphertext was moved, the migration of a store an
//! older Kiln wrote in plaintext, and key rotation.

use std::path::Path;
use std::sync::Arc;

use rusqlite::params;

use super::{rows, SealError, Sealer};
use crate::store::tests::record;
use crate::store::{AccessKey, MetaStore, MetaStoreError, SqliteStore, MIGRATIONS};

const SECRET: &str = "Sup3rSecretAccessKeyValue-0001";
const ENV_VALUE: &str = "postgres://app:Pa55w0rd-env-value@db/app";

fn sealer(k: u8) -> Arc<Sealer> {
    Arc::new(Sealer::new(&[k; 32], &[]))
}

fn key(id: &str, account: &str, secret: &str) -> AccessKey {
    AccessKey {
        access_key_id: id.into(),
        account_id: account.parse().unwrap(),
        secret: secret.into(),
    }
}

fn function_with_env(name: &str) -> crate::model::FunctionRecord {
    let mut f = record("100", name, &"a".repeat(64));
    f.function_id = format!("id-of-{name}");
    f.config
        .environment
        .insert("DATABASE_URL".into(), ENV_VALUE.into());
    f
}

/// Every byte SQLite keeps for the database: the file, its WAL and shm.
fn raw_bytes(db: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(b) = std::fs::read(&p) {
            all.extend(b);
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn write_both(s: &SqliteStore) {
    s.ensure_account(&"100".parse().unwrap(), 1).unwrap();
    s.put_access_key(&key("AK1", "100", SECRET), 1).unwrap();
    s.insert_function(&function_with_env("f")).unwrap();
}

#[test]
fn secrets_and_environments_round_trip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    write_both(&s);
    let f = function_with_env("f");
    drop(s);
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    let keys = s.access_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key.secret, SECRET);
    let fs = s.functions().unwrap();
    assert_eq!(fs[0].config.environment, f.config.environment);
    assert_eq!(fs[0], f);
}

#[test]
fn the_raw_database_holds_neither_a_secret_nor_an_environment_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    write_both(&s);
    // Replace both, so the old values would linger if overwrites did.
    s.put_access_key(&key("AK1", "100", "AnotherSecretValue-0002"), 2)
        .unwrap();
    let mut f = function_with_env("f");
    f.config
        .environment
        .insert("TOKEN".into(), "tok-Value-0003".into());
    s.update_function(&f, 1000).unwrap();
    let bytes = raw_bytes(&path);
    // The search works (it finds what is stored in the clear), and the
    // environment's names are sealed with their values.
    assert!(contains(&bytes, "AK1") && contains(&bytes, "id-of-f"));
    assert!(!contains(&bytes, "DATABASE_URL"));
    for needle in [
        SECRET,
        "AnotherSecretValue-0002",
        ENV_VALUE,
        "Pa55w0rd",
        "tok-Value-0003",
    ] {
        assert!(
            !contains(&bytes, needle),
            "{needle} is in the database file"
        );
    }
    assert!(contains(
        &bytes,
        &format!("kiln1:{}:", sealer(1).current_key_id())
    ));
    drop(s);
    let bytes = raw_bytes(&path);
    for needle in [
        SECRET,
        "AnotherSecretValue-0002",
        ENV_VALUE,
        "tok-Value-0003",
    ] {
        assert!(
            !contains(&bytes, needle),
            "{needle} is in the closed database"
        );
    }
}

#[test]
fn a_ciphertext_moved_to_another_row_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    write_both(&s);
    s.ensure_account(&"200".parse().unwrap(), 1).unwrap();
    s.put_access_key(&key("AK2", "200", "OtherAccountSecret-0004"), 1)
        .unwrap();
    let mut g = record("100", "g", &"a".repeat(64));
    g.config.environment.insert("X".into(), "y".into());
    s.insert_function(&g).unwrap();
    drop(s);

    // An attacker with write access to the file gives AK2 the secret of
    // AK1 (to sign as account 200 with a secret they learnt elsewhere)...
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE access_keys SET secret_sealed =
         (SELECT secret_sealed FROM access_keys WHERE access_key_id = 'AK1')
         WHERE access_key_id = 'AK2'",
        [],
    )
    .unwrap();
    drop(conn);
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    match s.access_keys() {
        Err(MetaStoreError::Sealed { what, source }) => {
            assert_eq!(source, SealError::Forged);
            assert!(what.contains("AK2"), "{what}");
        }
        other => panic!("moved secret opened: {other:?}"),
    }
    drop(s);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("DELETE FROM access_keys WHERE access_key_id = 'AK2'", [])
        .unwrap();
    // ...or gives function g the environment of f.
    conn.execute(
        "UPDATE functions SET env_sealed =
         (SELECT env_sealed FROM functions WHERE name = 'f') WHERE name = 'g'",
        [],
    )
    .unwrap();
    drop(conn);
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    assert_eq!(s.access_keys().unwrap().len(), 1);
    match s.functions() {
        Err(MetaStoreError::Sealed { what, source }) => {
            assert_eq!(source, SealError::Forged);
            assert!(what.contains("100/g"), "{what}");
        }
        other => panic!("moved environment opened: {other:?}"),
    }
}

/// A gateway.db as the previous release wrote it (schema version 3,
/// secrets and environments in plaintext).
fn old_store(path: &Path) -> crate::model::FunctionRecord {
    let db = kiln_store::Database::open(path, &MIGRATIONS[..3]).unwrap();
    let f = function_with_env("f");
    db.with_conn(|c| {
        c.execute("INSERT INTO accounts VALUES ('100', 1)", [])?;
        c.execute(
            "INSERT INTO access_keys (access_key_id, account_id, secret, created_ms)
             VALUES ('AK1', '100', ?1, 5)",
            [SECRET],
        )?;
        c.execute(
            "INSERT INTO code_blobs VALUES (?1, 3, '7')",
            [&f.config.code.sha256],
        )?;
        c.execute(
            "INSERT INTO functions VALUES ('100', 'f', ?1, ?2, ?3, 1000, 1000)",
            params![
                f.function_id,
                f.config.code.sha256,
                serde_json::to_string(&f.config).unwrap()
            ],
        )?;
        Ok(())
    })
    .unwrap();
    drop(db);
    assert!(
        contains(&raw_bytes(path), SECRET),
        "the old store is plaintext"
    );
    assert!(contains(&raw_bytes(path), ENV_VALUE));
    f
}

#[test]
fn a_store_of_the_old_schema_is_sealed_once_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let f = old_store(&path);

    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    let keys = s.access_keys().unwrap();
    assert_eq!(keys[0].key, key("AK1", "100", SECRET));
    assert!(keys[0].enabled);
    assert_eq!(keys[0].created_ms, 5);
    assert_eq!(s.functions().unwrap(), vec![f.clone()]);
    let bytes = raw_bytes(&path);
    assert!(
        !contains(&bytes, SECRET),
        "plaintext secret left in the file"
    );
    assert!(
        !contains(&bytes, ENV_VALUE),
        "plaintext environment left in the file"
    );

    // Idempotent: a second pass (and a second open) seals nothing more.
    let again = s
        .with(|c| Ok(rows::seal_all(c, &sealer(1)).unwrap()))
        .unwrap();
    assert_eq!(again, 0);
    drop(s);
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    assert_eq!(s.functions().unwrap(), vec![f]);
    assert_eq!(s.access_keys().unwrap()[0].key.secret, SECRET);
}

#[test]
fn rotation_reseals_under_the_new_key_and_an_unknown_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let s = SqliteStore::open(&path, sealer(1)).unwrap();
    write_both(&s);
    drop(s);

    // Without the old key the store does not open, and says which key.
    let err = SqliteStore::open(&path, sealer(2)).err().unwrap();
    let mut msg = err.to_string();
    let mut e: &dyn std::error::Error = &err;
    while let Some(next) = e.source() {
        msg = format!("{msg}: {next}");
        e = next;
    }
    assert!(
        msg.contains(sealer(1).current_key_id()) && msg.contains("previous_key_files"),
        "{msg}"
    );

    // With it as a previous key: opened and resealed under the new one.
    let rotated = Arc::new(Sealer::new(&[2; 32], &[[1; 32]]));
    let s = SqliteStore::open(&path, rotated).unwrap();
    assert_eq!(s.access_keys().unwrap()[0].key.secret, SECRET);
    drop(s);
    let bytes = raw_bytes(&path);
    assert!(!contains(
        &bytes,
        &format!("kiln1:{}:", sealer(1).current_key_id())
    ));
    let s = SqliteStore::open(&path, sealer(2)).unwrap();
    assert_eq!(s.access_keys().unwrap()[0].key.secret, SECRET);
    assert_eq!(s.functions().unwrap(), vec![function_with_env("f")]);
}
