//! Leader election with fencing through a real PostgreSQL server: one
//! leader at a time; a standby takes over when the leader stops renewing;
//! a paused old leader's writes are refused after it lost the lease, and
//! a takeover waits for a write in flight to finish.

use std::time::Duration;

use kiln_store::pg::leader::{Election, Leadership};
use kiln_store::pg::{PgDatabase, PgStoreError};
use kiln_test_support::postgres::PgServer;

const LEASE: Duration = Duration::from_millis(1500);

async fn candidate(url: &str, name: &str) -> Leadership {
    let db = PgDatabase::open(url, 2, "scheduler", &[]).await.unwrap();
    Leadership::new(db, "scheduler", name, LEASE).await.unwrap()
}

/// A fenced write of one row.
async fn write(c: &Leadership, token: i64, value: &str) -> Result<(), PgStoreError> {
    let value = value.to_owned();
    c.fenced(token, move |tx| {
        Box::pin(async move {
            tx.execute("INSERT INTO placements (value) VALUES ($1)", &[&value])
                .await?;
            Ok(())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_a_standby_takes_over_and_a_paused_leader_cannot_write() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_database("kiln_leader");
    PgDatabase::open(&url, 1, "scheduler", &[])
        .await
        .unwrap()
        .conn()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE placements (value TEXT NOT NULL)")
        .await
        .unwrap();
    let (a, b) = (
        candidate(&url, "sched-a:9443").await,
        candidate(&url, "sched-b:9443").await,
    );

    // Both campaign at once: exactly one wins.
    let (ra, rb) = tokio::join!(a.campaign(), b.campaign());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let (leader, standby, token) = match (&ra, &rb) {
        (Election::Leader { token }, Election::Follower { leader }) => {
            assert_eq!(leader, "sched-a:9443");
            (&a, &b, *token)
        }
        (Election::Follower { leader }, Election::Leader { token }) => {
            assert_eq!(leader, "sched-b:9443");
            (&b, &a, *token)
        }
        other => panic!("not exactly one leader: {other:?}"),
    };
    // Renewing keeps the token; the standby stays a follower.
    assert_eq!(leader.campaign().await.unwrap(), Election::Leader { token });
    assert!(matches!(
        standby.campaign().await.unwrap(),
        Election::Follower { .. }
    ));
    write(leader, token, "by the leader").await.unwrap();
    let err = write(standby, token, "by the standby").await.unwrap_err();
    assert!(matches!(err, PgStoreError::NotLeader { .. }), "{err}");

    // The leader pauses past its lease: the standby takes over with a
    // newer token, and the old leader's late write is refused.
    tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    let Election::Leader { token: newer } = standby.campaign().await.unwrap() else {
        panic!("the standby did not take over an expired lease");
    };
    assert!(newer > token, "a takeover bumps the fencing token");
    let err = write(leader, token, "late, by the old leader")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PgStoreError::NotLeader { .. }), "{text}");
    assert!(text.contains("nothing was written"), "{text}");
    write(standby, newer, "by the new leader").await.unwrap();
    // Even with the lease expired again, the old token stays refused once
    // the old holder campaigns back: it gets yet another token.
    tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    let Election::Leader { token: third } = leader.campaign().await.unwrap() else {
        panic!("the first candidate did not take the expired lease back");
    };
    assert!(third > newer);
    assert!(write(leader, token, "stale token").await.is_err());

    let rows: Vec<String> = PgDatabase::open(&url, 1, "scheduler", &[])
        .await
        .unwrap()
        .conn()
        .await
        .unwrap()
        .query("SELECT value FROM placements ORDER BY value", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec!["by the leader", "by the new leader"]);

    // Resigning frees the lease at once.
    leader.resign(third).await.unwrap();
    assert!(matches!(
        standby.campaign().await.unwrap(),
        Election::Leader { .. }
    ));
}

/// A write in flight holds the lease row: a candidate cannot take over
/// until it commits, so nothing lands after a takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waits_for_the_write_in_flight() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_database("kiln_leader_inflight");
    let (a, b) = (candidate(&url, "a").await, candidate(&url, "b").await);
    let Election::Leader { token } = a.campaign().await.unwrap() else {
        panic!("a did not lead an empty table");
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = async {
        a.fenced(token, move |_tx| {
            Box::pin(async move {
                let _ = started_tx.send(());
                // Past the lease, inside the fenced transaction.
                tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
                Ok(std::time::Instant::now())
            })
        })
        .await
    };
    let takeover = async {
        started_rx.await.unwrap();
        tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
        let r = b.campaign().await;
        (r, std::time::Instant::now())
    };
    let (committed, (election, took_over_at)) = tokio::join!(slow, takeover);
    let committed_at = committed.expect("the write in flight commits: it began while a led");
    assert!(matches!(election.unwrap(), Election::Leader { .. }));
    assert!(
        took_over_at >= committed_at,
        "the takeover waited for the fenced write to commit"
    );
}
