//! PostgreSQL migrations against a real server the test starts itself
//! (`kiln_test_support::postgres`): applied once, also when services
//! start together; all or nothing; a newer schema refused.

use kiln_store::pg::{PgDatabase, PgStoreError};
use kiln_store::Migration;
use kiln_test_support::postgres::PgServer;

const V1: Migration = Migration {
    name: "functions",
    // Fails if run twice: no IF NOT EXISTS on purpose.
    sql: "CREATE TABLE functions (name TEXT PRIMARY KEY, doc TEXT NOT NULL);",
};
const V2: Migration = Migration {
    name: "function owners",
    sql: "ALTER TABLE functions ADD COLUMN account TEXT NOT NULL DEFAULT '';",
};
const BROKEN: Migration = Migration {
    name: "half good",
    sql: "CREATE TABLE layers (name TEXT); SELECT no_such_function();",
};

async fn version(db: &PgDatabase, component: &str) -> i32 {
    db.conn()
        .await
        .unwrap()
        .query_one(
            "SELECT version FROM kiln_schema WHERE component = $1",
            &[&component],
        )
        .await
        .unwrap()
        .get(0)
}

async fn table_exists(db: &PgDatabase, table: &str) -> bool {
    db.conn()
        .await
        .unwrap()
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_all_or_nothing_and_never_backwards() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_database("kiln_migrations");

    // Four services of one version starting at once: each migration runs
    // exactly once (V1 would fail a second time), and all of them open.
    let opens = futures_util::future::join_all(
        (0..4).map(|_| PgDatabase::open(&url, 2, "gateway", &[V1, V2])),
    )
    .await;
    for o in &opens {
        assert!(o.is_ok(), "{o:?}\n{}", pg.log());
    }
    let db = opens.into_iter().next().unwrap().unwrap();
    assert_eq!(version(&db, "gateway").await, 2);
    db.conn()
        .await
        .unwrap()
        .execute(
            "INSERT INTO functions (name, doc, account) VALUES ('f', '{}', 'a')",
            &[],
        )
        .await
        .unwrap();

    // Components are independent.
    let sched = PgDatabase::open(&url, 1, "scheduler", &[]).await.unwrap();
    assert!(
        sched
            .conn()
            .await
            .unwrap()
            .query_opt(
                "SELECT version FROM kiln_schema WHERE component = 'scheduler'",
                &[]
            )
            .await
            .unwrap()
            .is_none(),
        "an empty list records nothing"
    );

    // A failing migration leaves nothing of itself, and nothing after it.
    let err = PgDatabase::open(&url, 1, "gateway", &[V1, V2, BROKEN])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PgStoreError::Migration {
                version: 3,
                name: "half good",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        !table_exists(&db, "layers").await,
        "the failed migration's table is gone"
    );
    assert_eq!(version(&db, "gateway").await, 2);

    // An older binary meets a newer schema: refused, nothing changed.
    let err = PgDatabase::open(&url, 1, "gateway", &[V1])
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            PgStoreError::TooNew {
                found: 2,
                known: 1,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("newer than this binary"), "{text}");
    assert_eq!(version(&db, "gateway").await, 2);
    let rows: i64 = db
        .conn()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM functions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the data survived every refusal");
}

#[tokio::test]
async fn an_unreachable_database_says_where_it_looked() {
    let Some(pg) = PgServer::start() else { return };
    let url = format!(
        "host={} user=kiln dbname=no_such_db",
        pg.socket_dir().display()
    );
    let err = PgDatabase::open(&url, 1, "gateway", &[V1])
        .await
        .unwrap_err();
    let text = format!("{err}");
    assert!(matches!(err, PgStoreError::Connect { .. }), "{text}");
    assert!(text.contains("no_such_db"), "{text}");
}

#[tokio::test]
async fn the_password_comes_from_its_file_and_a_missing_file_is_named() {
    let Some(pg) = PgServer::start() else { return };
    pg.require_password("app", "s3cret-from-a-credential");
    let url = format!("host={} user=app dbname=app", pg.socket_dir().display());
    let dir = tempfile::tempdir().unwrap();

    let err = PgDatabase::open(&url, 1, "gateway", &[]).await.unwrap_err();
    assert!(
        matches!(err, PgStoreError::Connect { .. }),
        "no password: {err}"
    );

    let missing = dir.path().join("missing");
    let err = PgDatabase::open_with(&url, Some(&missing), 1, "gateway", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PgStoreError::PasswordFile { path, .. } if path == &missing),
        "{err}"
    );

    let file = dir.path().join("password");
    std::fs::write(&file, "s3cret-from-a-credential\n").unwrap();
    let db = PgDatabase::open_with(&url, Some(&file), 1, "gateway", &[])
        .await
        .expect("the password file's password logs in");
    let who: String = db
        .conn()
        .await
        .unwrap()
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app");
}
