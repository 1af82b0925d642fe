//! Several gateways' queues on one real PostgreSQL database: each message
//! delivered once, a dead claimer's messages redelivered after its lease,
//! stops across gateways, group commit, shared depth bounds, timer ticks
//! and nonces.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Clock, ManualClock, SystemClock};

use super::cluster::{open_cluster, purge_expired, Cluster};
use super::dispatch::{BoxFuture, Configs, DeliveryOutcome, DispatchSettings, Dispatcher, Invoker};
use super::postgres::TickKey;
use super::test_backends::TestPg;
use super::*;
use crate::config::GatewayCluster;

fn msg(task: &str, now_ms: u64) -> NewMessage {
    NewMessage {
        account: "1".parse().unwrap(),
        function: "f".parse().unwrap(),
        queue: "1".into(),
        task_id: task.to_owned(),
        request_id: format!("req-{task}"),
        payload: b"{}".to_vec(),
        headers: vec![],
        now_ms,
        depth_limit: None,
    }
}

/// Counts deliveries per task; a delay per call; optionally records
/// which gateway ran it.
struct Counting {
    delay: Duration,
    calls: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
}

impl Counting {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            calls: Mutex::default(),
            total: AtomicUsize::new(0),
        })
    }
}

impl Invoker for Counting {
    fn invoke(&self, m: &Claimed) -> BoxFuture<DeliveryOutcome> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(m.task_id.clone())
            .or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            DeliveryOutcome::Success {
                status: 200,
                body: b"ok".to_vec(),
            }
        })
    }

    fn webhook(&self, _url: &str, _record: &serde_json::Value) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

fn settings(lease_ms: u64) -> DispatchSettings {
    DispatchSettings {
        max_in_flight: 8,
        per_queue: 8,
        lease_ms,
        backoff_cap: Duration::from_secs(1),
        idle_poll: Duration::from_millis(20),
        destination_attempts: 2,
        retention_ms: 3_600_000,
        renew_every: Some(Duration::from_millis(lease_ms / 3)),
    }
}

async fn gateway(pg: &TestPg, owner: &str) -> Cluster {
    open_cluster(
        &GatewayCluster {
            postgres_url: pg.url.clone(),
            postgres_password_file: None,
            max_connections: 8,
        },
        owner,
    )
    .await
    .unwrap()
}

/// A running dispatcher and listener of one gateway.
struct Running {
    d: Arc<Dispatcher>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            break;
        }
    }
}

fn run(
    c: &Cluster,
    invoker: Arc<dyn Invoker>,
    clock: Arc<dyn Clock>,
    settings: DispatchSettings,
) -> Running {
    let d = Dispatcher::new(
        c.queue.clone(),
        invoker,
        Arc::new(Configs::default()),
        clock.clone(),
        settings,
        "r".into(),
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut tasks = c.spawn(|| stopped(rx.clone()), clock);
    tasks.push(tokio::spawn(d.clone().run(stopped(rx.clone()))));
    Running { d, stop: tx, tasks }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn wait_status(q: &Queue, task: &str, want: &str) {
    for _ in 0..1000 {
        if q.status_row(task).await.0 == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{task} never {want}: {:?}", q.status_row(task).await);
}

/// Two gateways' dispatchers on one queue: every message delivered exactly
/// once, none failed, and both took part. B learns of A's messages only
/// from the database (notifications, resync), never from A's memory.
#[tokio::test]
async fn two_gateways_deliver_each_message_exactly_once() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (gateway(&pg, "gw-a").await, gateway(&pg, "gw-b").await);
    let (ia, ib) = (
        Counting::new(Duration::from_millis(5)),
        Counting::new(Duration::from_millis(5)),
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ra = run(&a, ia.clone(), clock.clone(), settings(60_000));
    let rb = run(&b, ib.clone(), clock.clone(), settings(60_000));
    const N: usize = 400;
    let mut sends = Vec::new();
    for i in 0..N {
        let q = if i % 2 == 0 { &a.queue } else { &b.queue }.clone();
        let m = msg(&format!("t{i}"), clock.now_ms());
        sends.push(tokio::spawn(async move { q.enqueue(m).await.unwrap() }));
    }
    for s in sends {
        assert_eq!(s.await.unwrap(), Enqueued::New);
    }
    let started = Instant::now();
    while ia.total.load(Ordering::SeqCst) + ib.total.load(Ordering::SeqCst) < N
        && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..N {
        wait_status(&a.queue, &format!("t{i}"), "Succeeded").await;
    }
    let (ca, cb) = (
        ia.calls.lock().unwrap().clone(),
        ib.calls.lock().unwrap().clone(),
    );
    for i in 0..N {
        let t = format!("t{i}");
        let n = ca.get(&t).copied().unwrap_or(0) + cb.get(&t).copied().unwrap_or(0);
        assert_eq!(n, 1, "{t} delivered {n} times");
    }
    assert!(
        !ca.is_empty() && !cb.is_empty(),
        "one gateway did all the work: A {} B {}",
        ca.len(),
        cb.len()
    );
    use super::metrics::Event;
    for q in [&a.queue, &b.queue] {
        assert_eq!(q.metrics().get(Event::Failed), 0);
        assert_eq!(q.metrics().get(Event::Redelivered), 0);
    }
    ra.stop().await;
    rb.stop().await;
}

/// A gateway that claims and dies: another gateway's restart does not
/// touch its live lease, the message is redelivered by the other gateway
/// once the lease runs out, and the dead delivery's late answer changes
/// nothing. A restart of the dead gateway itself frees its own leases.
#[tokio::test]
async fn a_dead_claimers_message_is_redelivered_by_another_after_its_lease() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (pg.queue("gw-a"), pg.queue("gw-b"));
    a.enqueue(msg("t", 1_000)).await.unwrap();
    a.enqueue(msg("u", 1_000)).await.unwrap();
    let dead = a.claim(1_000, 5_000, vec![("1".into(), 1)]).await.unwrap();
    assert_eq!(dead.len(), 1);
    // B starting releases nothing of A's (its lease is live).
    assert_eq!(b.recover(2_000).await.unwrap(), 0);
    let other = b.claim(2_000, 5_000, vec![("1".into(), 10)]).await.unwrap();
    assert_eq!(other.len(), 1, "only the unclaimed message");
    assert_ne!(other[0].seq, dead[0].seq);
    assert!(b
        .claim(5_999, 5_000, vec![("1".into(), 10)])
        .await
        .unwrap()
        .is_empty());

    // B's dispatcher takes the dead claim over once its lease ran out.
    let clock = Arc::new(ManualClock::new(6_000));
    let invoker = Counting::new(Duration::ZERO);
    let d = Dispatcher::new(
        b.clone(),
        invoker.clone(),
        Arc::new(Configs::default()),
        clock.clone(),
        settings(5_000),
        "r".into(),
    );
    d.enqueued("1");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_status(&b, &dead[0].task_id, "Succeeded").await;
    assert_eq!(invoker.calls.lock().unwrap()[&dead[0].task_id], 1);
    let done = Completion::Final {
        status: TaskStatus::Failed,
        error: None,
        return_payload: None,
    };
    assert_eq!(
        a.complete(dead[0].seq, dead[0].delivery, 7_000, done)
            .await
            .unwrap(),
        None,
        "the dead delivery's answer is fenced off"
    );
    let _ = tx.send(());
    running.await.unwrap();

    // The restart of a gateway frees its own leases at once.
    a.enqueue(msg("v", 10_000)).await.unwrap();
    let held = a
        .claim(10_000, 600_000, vec![("1".into(), 10)])
        .await
        .unwrap();
    let held: Vec<&str> = held.iter().map(|c| c.task_id.as_str()).collect();
    assert!(held.contains(&"v"), "{held:?}");
    assert_eq!(b.recover(11_000).await.unwrap(), 0, "not B's to free");
    let restarted = pg.queue("gw-a");
    assert!(restarted.recover(11_000).await.unwrap() >= 1);
    assert!(!b
        .claim(11_000, 5_000, vec![("1".into(), 10)])
        .await
        .unwrap()
        .is_empty());
}

/// A task accepted and running on A is listed and stopped through B: the
/// stop reaches A's dispatcher through the database, which aborts the
/// call.
#[tokio::test]
async fn a_stop_through_b_aborts_the_call_running_on_a() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (gateway(&pg, "gw-a").await, gateway(&pg, "gw-b").await);
    let slow = Counting::new(Duration::from_secs(60));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ra = run(&a, slow.clone(), clock.clone(), settings(600_000));
    a.queue.enqueue(msg("job", clock.now_ms())).await.unwrap();
    ra.d.enqueued("1");
    wait_status(&a.queue, "job", "Running").await;
    while slow.total.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listed = b
        .queue
        .tasks(
            "r",
            "1",
            "f",
            tasks::TaskQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .0;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].json["status"], "Running");
    let started = Instant::now();
    let out = b
        .queue
        .stop(
            &"1".parse().unwrap(),
            &"f".parse().unwrap(),
            "job",
            clock.now_ms(),
        )
        .await
        .unwrap();
    assert!(matches!(out, StopOutcome::Stopping { .. }), "{out:?}");
    wait_status(&b.queue, "job", "Stopped").await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the 60 s call was not aborted"
    );
    ra.stop().await;
}

/// A live gateway's short lease is renewed for as long as its call runs:
/// the other gateway, polling all along, never delivers it again.
#[tokio::test]
async fn a_live_gateways_lease_is_renewed_while_its_call_runs() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (gateway(&pg, "gw-a").await, gateway(&pg, "gw-b").await);
    let (ia, ib) = (
        Counting::new(Duration::from_secs(3)),
        Counting::new(Duration::from_secs(3)),
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // A 600 ms lease under a 3 s call.
    let ra = run(&a, ia.clone(), clock.clone(), settings(600));
    a.queue.enqueue(msg("long", clock.now_ms())).await.unwrap();
    ra.d.enqueued("1");
    wait_status(&a.queue, "long", "Running").await;
    let rb = run(&b, ib.clone(), clock.clone(), settings(600));
    rb.d.enqueued("1");
    wait_status(&a.queue, "long", "Succeeded").await;
    assert_eq!(ia.total.load(Ordering::SeqCst), 1);
    assert_eq!(ib.total.load(Ordering::SeqCst), 0, "B took a live lease");
    ra.stop().await;
    rb.stop().await;
}

/// Concurrent enqueues on PostgreSQL share transactions.
#[tokio::test]
async fn concurrent_enqueues_share_transactions_on_postgres() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let q = pg.queue("gw-a");
    let before = q.batches();
    let mut tasks = Vec::new();
    for i in 0..2000 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue(msg(&format!("t{i}"), 1)).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Enqueued::New);
    }
    let batches = q.batches() - before;
    assert!(batches < 1000, "2000 enqueues took {batches} transactions");
    assert_eq!(q.count_rows("messages").await, 2000);
}

/// An account's bound holds across gateways: a gateway counts the
/// others' messages (read again after [`postgres::DEPTH_CACHE`]).
#[tokio::test]
async fn a_depth_bound_holds_across_gateways() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (pg.queue("gw-a"), pg.queue("gw-b"));
    let bounded = |task: &str| NewMessage {
        depth_limit: Some(10),
        ..msg(task, 1)
    };
    for i in 0..6 {
        assert_eq!(
            a.enqueue(bounded(&format!("a{i}"))).await.unwrap(),
            Enqueued::New
        );
    }
    let mut b_new = 0;
    for i in 0..6 {
        if b.enqueue(bounded(&format!("b{i}"))).await.unwrap() == Enqueued::New {
            b_new += 1;
        }
    }
    assert_eq!(b_new, 4, "B counts A's six");
    tokio::time::sleep(postgres::DEPTH_CACHE + Duration::from_millis(100)).await;
    assert_eq!(
        a.enqueue(bounded("a-late")).await.unwrap(),
        Enqueued::Full {
            depth: 10,
            limit: 10
        },
        "A counts B's four"
    );
}

/// A timer tick enqueued by two gateways (each with its own trigger id,
/// so different task ids) is one message.
#[tokio::test]
async fn a_timer_tick_is_claimed_once_across_gateways() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (pg.queue("gw-a"), pg.queue("gw-b"));
    let tick = |ms| TickKey {
        account: "1".into(),
        function: "f".into(),
        trigger: "nightly".into(),
        tick_ms: ms,
    };
    assert_eq!(
        a.enqueue_tick(msg("timer-id1-60000", 60_000), tick(60_000))
            .await
            .unwrap(),
        Some(Enqueued::New)
    );
    assert_eq!(
        b.enqueue_tick(msg("timer-id2-60000", 60_000), tick(60_000))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        b.enqueue_tick(msg("timer-id2-120000", 120_000), tick(120_000))
            .await
            .unwrap(),
        Some(Enqueued::New)
    );
    assert_eq!(a.count_rows("messages").await, 2);
}

/// A nonce is used once across gateways until it expires; expired ones
/// are purged (by any gateway, concurrently).
#[tokio::test]
async fn nonces_are_shared_until_they_expire() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (gateway(&pg, "gw-a").await, gateway(&pg, "gw-b").await);
    let (na, nb) = (a.shared_nonces(), b.shared_nonces());
    assert!(na.claim("AK1", "n-1", 10_000, 1_000).await.unwrap());
    assert!(!nb.claim("AK1", "n-1", 10_000, 2_000).await.unwrap());
    assert!(!na.claim("AK1", "n-1", 10_000, 2_000).await.unwrap());
    // Another key's nonce of the same text is another nonce.
    assert!(nb.claim("AK2", "n-1", 10_000, 2_000).await.unwrap());
    // Past its expiry the record no longer refuses (and is renewed).
    assert!(nb.claim("AK1", "n-1", 30_000, 10_001).await.unwrap());
    assert!(!na.claim("AK1", "n-1", 30_000, 10_002).await.unwrap());
    let db = a.queue.shared().unwrap().db().clone();
    let (x, y) = tokio::join!(purge_expired(&db, 20_000), purge_expired(&db, 20_000));
    assert_eq!(x.unwrap().0 + y.unwrap().0, 1, "AK2's expired nonce, once");
    assert!(!na.claim("AK1", "n-1", 30_000, 20_000).await.unwrap());
}

/// Claims that overlap are recorded together (one statement), and still
/// each nonce once: 64 callers on two gateways racing for 16 nonces get
/// exactly one yes per nonce, however the claims fall into batches; the
/// fresh ones in a batch of replays are still new.
#[tokio::test]
async fn overlapping_nonce_claims_are_batched_and_each_nonce_wins_once() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (gateway(&pg, "gw-a").await, gateway(&pg, "gw-b").await);
    let (na, nb) = (a.shared_nonces(), b.shared_nonces());
    let claims = (0..64).map(|i| {
        // Each nonce twice on each gateway.
        let n = if (i / 16) % 2 == 0 { &na } else { &nb };
        n.claim("AK1", &format!("race-{}", i % 16), 10_000, 1_000)
    });
    let answers = futures_util::future::join_all(claims).await;
    let mut won = [0; 16];
    for (i, a) in answers.into_iter().enumerate() {
        if a.unwrap() {
            won[i % 16] += 1;
        }
    }
    assert_eq!(won, [1; 16], "each nonce exactly once");
    // A batch of replays and new nonces: only the new ones pass.
    let mixed = (0..32).map(|i| na.claim("AK1", &format!("race-{i}"), 10_000, 2_000));
    let answers: Vec<bool> = futures_util::future::join_all(mixed)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(answers, (0..32).map(|i| i >= 16).collect::<Vec<_>>());
    assert!(
        a.nonces.claims_per_batch() > 1.0,
        "overlapping claims share a statement: {}",
        a.nonces.claims_per_batch()
    );
}

/// With the database gone, every waiting nonce claim gets an error,
/// promptly (the request is refused, never let through unchecked).
#[tokio::test]
async fn nonce_claims_fail_when_the_database_is_gone() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let a = gateway(&pg, "gw-a").await;
    let n = a.shared_nonces();
    assert!(n.claim("AK1", "before", 10_000, 1_000).await.unwrap());
    // Stops the server and removes its socket.
    drop(pg);
    let claims = (0..8).map(|i| n.claim("AK1", &format!("after-{i}"), 10_000, 1_000));
    let answers = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(claims),
    )
    .await
    .expect("every claim answered, none left waiting");
    assert!(answers.iter().all(|a| a.is_err()), "{answers:?}");
}

async fn next_signal(
    signals: &mut tokio::sync::mpsc::UnboundedReceiver<postgres::Signal>,
) -> postgres::Signal {
    tokio::time::timeout(Duration::from_secs(10), signals.recv())
        .await
        .expect("a notification within 10 s")
        .unwrap()
}

/// What one gateway writes reaches the others' listeners as
/// notifications: new messages (by queue), stops (by message) and config
/// changes.
#[tokio::test]
async fn changes_are_notified_to_the_other_gateways() {
    let Some(pg) = TestPg::start().await else {
        return;
    };
    let (a, b) = (gateway(&pg, "gw-a").await, gateway(&pg, "gw-b").await);
    let mut signals = b.queue.shared().unwrap().take_signals().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let tasks = b.spawn(|| stopped(rx.clone()), Arc::new(SystemClock));
    // The listener is up once a notification of our own arrives.
    let mut seen = Vec::new();
    for i in 0..50 {
        a.queue.enqueue(msg(&format!("t{i}"), 1)).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(200), signals.recv()).await {
            Ok(Some(s)) => {
                seen.push(s);
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(seen, [postgres::Signal::Enqueued("1".into())]);
    while tokio::time::timeout(Duration::from_millis(300), signals.recv())
        .await
        .is_ok()
    {}
    let c = a
        .queue
        .claim(2, 60_000, vec![("1".into(), 1)])
        .await
        .unwrap();
    let out = a
        .queue
        .stop(
            &"1".parse().unwrap(),
            &"f".parse().unwrap(),
            &c[0].task_id,
            3,
        )
        .await
        .unwrap();
    assert_eq!(out, StopOutcome::Stopping { seq: c[0].seq });
    assert_eq!(
        next_signal(&mut signals).await,
        postgres::Signal::Stop(c[0].seq)
    );
    a.queue
        .put_config(
            &"1".parse().unwrap(),
            &"f".parse().unwrap(),
            "LATEST",
            &AsyncConfig::default(),
        )
        .await
        .unwrap();
    assert_eq!(next_signal(&mut signals).await, postgres::Signal::Configs);
    let _ = tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
}
