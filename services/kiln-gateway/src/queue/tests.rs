use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Clock, ManualClock};

use super::dispatch::{BoxFuture, Configs, DeliveryOutcome, DispatchSettings, Dispatcher, Invoker};
use super::test_backends::on_both;
use super::*;

fn msg(account: &str, function: &str, task: &str, now_ms: u64) -> NewMessage {
    NewMessage {
        account: account.parse().unwrap(),
        function: function.parse().unwrap(),
        queue: account.to_owned(),
        task_id: task.to_owned(),
        request_id: format!("req-{task}"),
        payload: format!("{{\"task\":\"{task}\"}}").into_bytes(),
        headers: vec![("content-type".into(), "application/json".into())],
        now_ms,
        depth_limit: None,
    }
}

/// A config stored as the API stores it: in the queue's database (which
/// a cluster's dispatchers re-read) and in the dispatcher's memory.
async fn set_config(
    q: &Queue,
    configs: &Configs,
    account: &str,
    function: &str,
    qualifier: &str,
    cfg: Option<AsyncConfig>,
) {
    let (a, f) = (account.parse().unwrap(), function.parse().unwrap());
    match &cfg {
        Some(c) => q.put_config(&a, &f, qualifier, c).await.unwrap(),
        None => {
            q.delete_config(&a, &f, qualifier).await.unwrap();
        }
    }
    configs.set(account, function, qualifier, cfg);
}

fn count(q: &Queue, sql: &'static str) -> i64 {
    q.sqlite()
        .unwrap()
        .db()
        .with_conn(|c| Ok(c.query_row(sql, [], |r| r.get(0))?))
        .unwrap()
}

#[tokio::test]
async fn concurrent_enqueues_share_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&dir.path().join("queue.db")).unwrap();
    let before = q.batches();
    let mut tasks = Vec::new();
    for i in 0..2000 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue(msg("1", "f", &format!("t{i}"), 1)).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Enqueued::New);
    }
    let batches = q.batches() - before;
    assert!(batches < 1000, "2000 enqueues took {batches} transactions");
    assert_eq!(count(&q, "SELECT count(*) FROM messages"), 2000);
    // Durable: a fresh open sees every row.
    drop(q);
    let q = Queue::open(&dir.path().join("queue.db")).unwrap();
    assert_eq!(count(&q, "SELECT count(*) FROM messages"), 2000);
}

on_both!(
    the_same_task_id_is_one_task,
    the_same_task_id_is_one_task_on
);
async fn the_same_task_id_is_one_task_on(q: Queue) {
    assert_eq!(
        q.enqueue(msg("1", "f", "t", 1)).await.unwrap(),
        Enqueued::New
    );
    let mut again = msg("1", "f", "t", 2);
    again.request_id = "other".into();
    assert_eq!(
        q.enqueue(again).await.unwrap(),
        Enqueued::Duplicate {
            request_id: "req-t".into()
        }
    );
    // Another function or account may use the same id.
    assert_eq!(
        q.enqueue(msg("1", "g", "t", 1)).await.unwrap(),
        Enqueued::New
    );
    assert_eq!(
        q.enqueue(msg("2", "f", "t", 1)).await.unwrap(),
        Enqueued::New
    );
    assert_eq!(q.count_rows("messages").await, 3);
}

on_both!(
    an_expired_lease_is_redelivered_and_a_late_answer_ignored,
    an_expired_lease_is_redelivered_and_a_late_answer_ignored_on
);
async fn an_expired_lease_is_redelivered_and_a_late_answer_ignored_on(q: Queue) {
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    let first = q.claim(1_000, 5_000, vec![("1".into(), 10)]).await.unwrap();
    assert_eq!(first.len(), 1);
    // Leased: invisible until the lease expires.
    assert!(q
        .claim(5_999, 5_000, vec![("1".into(), 10)])
        .await
        .unwrap()
        .is_empty());
    let again = q.claim(6_000, 5_000, vec![("1".into(), 10)]).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].delivery, first[0].delivery + 1);
    let done = Completion::Final {
        status: TaskStatus::Succeeded,
        error: None,
        return_payload: Some(b"ok".to_vec()),
    };
    // The first (dead) delivery's answer changes nothing.
    assert_eq!(
        q.complete(first[0].seq, first[0].delivery, 6_100, done.clone())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        q.complete(again[0].seq, again[0].delivery, 6_200, done)
            .await
            .unwrap(),
        Some(TaskStatus::Succeeded)
    );
    assert!(q
        .claim(99_999, 5_000, vec![("1".into(), 10)])
        .await
        .unwrap()
        .is_empty());
    // The metrics counted each committed event once; the dead delivery's
    // answer is not a second success.
    use super::metrics::Event;
    let m = q.metrics();
    assert_eq!(m.get(Event::Enqueued), 1);
    assert_eq!(m.get(Event::Dispatched), 2);
    assert_eq!(m.get(Event::Redelivered), 1);
    assert_eq!(m.get(Event::Succeeded), 1);
    assert_eq!(m.get(Event::Retried), 0);
    let text = m.encode();
    // Waits: 0 ms (claimed when enqueued) and 0 ms (claimed when the lease ran out).
    assert!(
        text.contains("kiln_gateway_async_dispatch_wait_seconds_count 2"),
        "{text}"
    );
    assert!(
        text.contains("kiln_gateway_async_dispatch_wait_seconds_sum 0.0"),
        "{text}"
    );
    assert!(
        text.contains("kiln_gateway_async_commit_batch_ops_count"),
        "{text}"
    );
}

#[tokio::test]
async fn a_restart_releases_the_dead_processs_leases() {
    let q = Queue::open_in_memory().unwrap();
    q.enqueue(msg("1", "f", "a", 1_000)).await.unwrap();
    q.enqueue(msg("1", "f", "b", 1_000)).await.unwrap();
    let leased = q
        .claim(1_000, 600_000, vec![("1".into(), 1)])
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(q.recover(2_000).await.unwrap(), 1);
    let again = q
        .claim(2_000, 600_000, vec![("1".into(), 10)])
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(q.recover(3_000).await.unwrap(), 2);
}

on_both!(
    stop_removes_a_waiting_task_and_refuses_a_finished_one,
    stop_removes_a_waiting_task_and_refuses_a_finished_one_on
);
async fn stop_removes_a_waiting_task_and_refuses_a_finished_one_on(q: Queue) {
    q.enqueue(msg("1", "f", "a", 1)).await.unwrap();
    q.enqueue(msg("1", "f", "b", 1)).await.unwrap();
    let (acc, f) = ("1".parse().unwrap(), "f".parse().unwrap());
    assert_eq!(
        q.stop(&acc, &f, "a", 2).await.unwrap(),
        StopOutcome::Stopped
    );
    assert_eq!(
        q.stop(&acc, &f, "a", 3).await.unwrap(),
        StopOutcome::AlreadyFinished(TaskStatus::Stopped)
    );
    assert_eq!(
        q.stop(&acc, &f, "nope", 3).await.unwrap(),
        StopOutcome::NotFound
    );
    let c = q.claim(4, 1000, vec![("1".into(), 10)]).await.unwrap();
    assert_eq!(
        c.iter().map(|c| c.task_id.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    let StopOutcome::Stopping { seq } = q.stop(&acc, &f, "b", 5).await.unwrap() else {
        panic!("a running task is Stopping")
    };
    let ok = Completion::Final {
        status: TaskStatus::Succeeded,
        error: None,
        return_payload: None,
    };
    assert_eq!(
        q.complete(seq, c[0].delivery, 6, ok).await.unwrap(),
        Some(TaskStatus::Stopped)
    );
}

/// A fake invoker: per-function scripted outcomes, a delay, a log.
struct Fake {
    delay: Duration,
    script: Mutex<HashMap<String, Vec<DeliveryOutcome>>>,
    log: Mutex<Vec<(String, String, Instant)>>,
    hooks: Mutex<Vec<(String, serde_json::Value)>>,
    calls: AtomicUsize,
    budget: Mutex<Option<u64>>,
    /// Webhook calls that fail before they start succeeding.
    hook_failures: AtomicUsize,
}

impl Fake {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            script: Mutex::default(),
            log: Mutex::default(),
            hooks: Mutex::default(),
            calls: AtomicUsize::new(0),
            budget: Mutex::new(None),
            hook_failures: AtomicUsize::new(0),
        })
    }
    fn script(&self, function: &str, outcomes: Vec<DeliveryOutcome>) {
        self.script
            .lock()
            .unwrap()
            .insert(function.into(), outcomes);
    }
}

impl Invoker for Fake {
    fn invoke(&self, m: &Claimed) -> BoxFuture<DeliveryOutcome> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let outcome = {
            let mut s = self.script.lock().unwrap();
            match s.get_mut(&m.function) {
                Some(v) if !v.is_empty() => v.remove(0),
                _ => DeliveryOutcome::Success {
                    status: 200,
                    body: b"done".to_vec(),
                },
            }
        };
        let delay = self.delay;
        let entry = (m.account.clone(), m.task_id.clone());
        self.log
            .lock()
            .unwrap()
            .push((entry.0, entry.1, Instant::now()));
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            outcome
        })
    }

    fn call_budget_ms(&self, _m: &Claimed) -> Option<u64> {
        *self.budget.lock().unwrap()
    }

    fn webhook(&self, url: &str, record: &serde_json::Value) -> BoxFuture<Result<(), String>> {
        self.hooks
            .lock()
            .unwrap()
            .push((url.into(), record.clone()));
        let fail = self
            .hook_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if fail {
                Err("receiver down".to_owned())
            } else {
                Ok(())
            }
        })
    }
}

fn settings() -> DispatchSettings {
    DispatchSettings {
        max_in_flight: 8,
        per_queue: 4,
        lease_ms: 60_000,
        backoff_cap: Duration::from_secs(4),
        idle_poll: Duration::from_millis(5),
        destination_attempts: 2,
        retention_ms: 3_600_000,
        renew_every: None,
    }
}

async fn status_of(q: &Queue, task: &str) -> (String, i64, i64) {
    q.status_row(task).await
}

async fn wait_for(q: &Queue, task: &str, want: &str) -> (String, i64, i64) {
    for _ in 0..2000 {
        let s = status_of(q, task).await;
        if s.0 == want {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{task} never reached {want}: {:?}",
        status_of(q, task).await
    )
}

on_both!(
    one_accounts_backlog_does_not_delay_another,
    one_accounts_backlog_does_not_delay_another_on
);
async fn one_accounts_backlog_does_not_delay_another_on(q: Queue) {
    let fake = Fake::new(Duration::from_millis(20));
    let clock = Arc::new(ManualClock::new(1_000));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        Arc::new(Configs::default()),
        clock.clone(),
        settings(),
        "cn-hangzhou".into(),
    );
    let mut batch = Vec::new();
    for i in 0..10_000 {
        batch.push(q.enqueue(msg("100", "slow", &format!("a{i}"), 1_000)));
    }
    futures_util::future::join_all(batch).await;
    d.enqueued("100");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..10 {
        q.enqueue(msg("200", "quick", &format!("b{i}"), 1_000))
            .await
            .unwrap();
    }
    d.enqueued("200");
    for i in 0..10 {
        wait_for(&q, &format!("b{i}"), "Succeeded").await;
    }
    let a_done = q.finished_of("100").await;
    println!("B's 10 finished while A had finished {a_done} of 10000");
    assert!(a_done < 1_000, "B waited for {a_done} of A's messages");
    let _ = tx.send(());
    run.await.unwrap();
}

on_both!(
    function_errors_retry_then_fail_to_the_failure_destination,
    function_errors_retry_then_fail_to_the_failure_destination_on
);
async fn function_errors_retry_then_fail_to_the_failure_destination_on(q: Queue) {
    let fake = Fake::new(Duration::ZERO);
    let err = DeliveryOutcome::FunctionError {
        status: 500,
        body: br#"{"errorMessage":"boom"}"#.to_vec(),
    };
    fake.script("f", vec![err.clone(), err.clone(), err.clone()]);
    let configs = Arc::new(Configs::default());
    set_config(&q, &configs, "1",
        "f",
        "LATEST",
        Some(
            AsyncConfig::parse(
                br#"{"maxAsyncRetryAttempts":2,"destinationConfig":{"onFailure":{"destination":"https://hook.test/fail"}}}"#,
                "cn-hangzhou",
                "1",
            )
            .unwrap(),
        ),).await;
    let clock = Arc::new(ManualClock::new(1_000));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        configs,
        clock,
        settings(),
        "cn-hangzhou".into(),
    );
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    d.enqueued("1");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    let s = wait_for(&q, "t", "Failed").await;
    assert_eq!(s.1, 2, "two retries after the first attempt");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    for _ in 0..200 {
        if !fake.hooks.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let hooks = fake.hooks.lock().unwrap().clone();
    assert_eq!(hooks.len(), 1);
    let (url, rec) = &hooks[0];
    assert_eq!(url, "https://hook.test/fail");
    assert_eq!(rec["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(rec["requestContext"]["requestId"], "req-t");
    assert_eq!(rec["requestPayload"]["task"], "t");
    assert_eq!(
        rec["responseContext"]["functionError"],
        "UnhandledInvocationError"
    );
    assert_eq!(rec["responsePayload"]["errorMessage"], "boom");
    let _ = tx.send(());
    run.await.unwrap();
}

on_both!(
    throttling_backs_off_until_the_ttl_expires,
    throttling_backs_off_until_the_ttl_expires_on
);
async fn throttling_backs_off_until_the_ttl_expires_on(q: Queue) {
    let fake = Fake::new(Duration::ZERO);
    fake.script(
        "f",
        (0..100)
            .map(|_| DeliveryOutcome::Throttled("ResourceThrottled".into()))
            .collect(),
    );
    let configs = Arc::new(Configs::default());
    set_config(
        &q,
        &configs,
        "1",
        "f",
        "LATEST",
        Some(AsyncConfig::parse(br#"{"maxAsyncEventAgeInSeconds":10}"#, "r", "1").unwrap()),
    )
    .await;
    let clock = Arc::new(ManualClock::new(1_000));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        configs,
        clock.clone(),
        settings(),
        "r".into(),
    );
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    d.enqueued("1");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    let visible = |q: Queue| async move { q.visible_ms_of("t").await as u64 };
    // Each throttled delivery waits 0.5 s, 1 s, 2 s, 4 s, 4 s (cap) ... on the injected clock.
    let mut waits = Vec::new();
    for n in 1..=4 {
        let s = wait_for_throttles(&q, n).await;
        assert_eq!(s.0, "Retrying");
        let v = visible(q.clone()).await;
        waits.push(v - clock.now_ms());
        // Not redelivered before the backoff ends.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(status_of(&q, "t").await.2, n);
        clock.advance(Duration::from_millis(v - clock.now_ms()));
    }
    assert_eq!(waits, vec![500, 1000, 2000, 4000]);
    // 1 + 0.5 + 1 + 2 + 4 = 8.5 s; the next 4 s wait would pass the 10 s TTL.
    let s = wait_for(&q, "t", "Expired").await;
    assert_eq!(s.2, 4);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 5);
    let _ = tx.send(());
    run.await.unwrap();
}

async fn wait_for_throttles(q: &Queue, n: i64) -> (String, i64, i64) {
    for _ in 0..2000 {
        let s = status_of(q, "t").await;
        if s.2 >= n {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("never throttled {n} times")
}

on_both!(
    a_message_older_than_its_ttl_is_expired_without_invoking,
    a_message_older_than_its_ttl_is_expired_without_invoking_on
);
async fn a_message_older_than_its_ttl_is_expired_without_invoking_on(q: Queue) {
    let fake = Fake::new(Duration::ZERO);
    let clock = Arc::new(ManualClock::new(1_000));
    let configs = Arc::new(Configs::default());
    set_config(
        &q,
        &configs,
        "1",
        "f",
        "LATEST",
        Some(AsyncConfig::parse(br#"{"maxAsyncEventAgeInSeconds":5}"#, "r", "1").unwrap()),
    )
    .await;
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    clock.advance(Duration::from_secs(6));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        configs,
        clock.clone(),
        settings(),
        "r".into(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_for(&q, "t", "Expired").await;
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    assert!(clock.now_ms() > 0);
    let _ = tx.send(());
    run.await.unwrap();
}

// A call made with a qualifier is governed by that qualifier's config:
// the alias's 5 s TTL expires its message while LATEST's (1 h) would not.
on_both!(
    a_qualified_call_follows_its_qualifiers_config,
    a_qualified_call_follows_its_qualifiers_config_on
);
async fn a_qualified_call_follows_its_qualifiers_config_on(q: Queue) {
    let fake = Fake::new(Duration::ZERO);
    let clock = Arc::new(ManualClock::new(1_000));
    let configs = Arc::new(Configs::default());
    let ttl = |s: u32| {
        Some(
            AsyncConfig::parse(
                format!(r#"{{"maxAsyncEventAgeInSeconds":{s}}}"#).as_bytes(),
                "r",
                "1",
            )
            .unwrap(),
        )
    };
    set_config(&q, &configs, "1", "f", "LATEST", ttl(3600)).await;
    set_config(&q, &configs, "1", "f", "prod", ttl(5)).await;
    let mut prod = msg("1", "f", "to-prod", 1_000);
    prod.headers
        .push((crate::queue::QUALIFIER_HEADER.into(), "prod".into()));
    q.enqueue(prod).await.unwrap();
    q.enqueue(msg("1", "f", "to-latest", 1_000)).await.unwrap();
    clock.advance(Duration::from_secs(6));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        configs.clone(),
        clock.clone(),
        settings(),
        "r".into(),
    );
    d.enqueued("1");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_for(&q, "to-prod", "Expired").await;
    wait_for(&q, "to-latest", "Succeeded").await;
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        1,
        "only LATEST's call ran"
    );
    let _ = tx.send(());
    run.await.unwrap();
    // Configs are kept per qualifier, listed in order, and share a queue.
    let listed: Vec<(String, String)> = configs
        .of_account("1")
        .into_iter()
        .map(|(f, q, _)| (f, q))
        .collect();
    assert_eq!(
        listed,
        vec![("f".into(), "LATEST".into()), ("f".into(), "prod".into())]
    );
    assert_eq!(configs.queue_of("1", "f"), "1");
    set_config(
        &q,
        &configs,
        "1",
        "f",
        "prod",
        Some(AsyncConfig::parse(br#"{"dedicatedQueue":true}"#, "r", "1").unwrap()),
    )
    .await;
    assert_eq!(
        configs.queue_of("1", "f"),
        "1/f",
        "one queue for the function"
    );
    assert!(configs.get("1", "f", "staging").is_none());
}

on_both!(
    stopping_a_running_task_aborts_its_invocation,
    stopping_a_running_task_aborts_its_invocation_on
);
async fn stopping_a_running_task_aborts_its_invocation_on(q: Queue) {
    let fake = Fake::new(Duration::from_secs(30));
    let clock = Arc::new(ManualClock::new(1_000));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        Arc::new(Configs::default()),
        clock,
        settings(),
        "r".into(),
    );
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    d.enqueued("1");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_for(&q, "t", "Running").await;
    let started = Instant::now();
    let StopOutcome::Stopping { seq } = q
        .stop(&"1".parse().unwrap(), &"f".parse().unwrap(), "t", 2_000)
        .await
        .unwrap()
    else {
        panic!("a running task is Stopping first")
    };
    d.abort(seq);
    wait_for(&q, "t", "Stopped").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 30 s call was aborted"
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    let _ = tx.send(());
    run.await.unwrap();
}

// StopAsyncTask can find a message claimed (Running in the queue) before
// the dispatcher has started its call: the stop must still land.
on_both!(
    a_stop_that_comes_before_the_call_starts_is_not_lost,
    a_stop_that_comes_before_the_call_starts_is_not_lost_on
);
async fn a_stop_that_comes_before_the_call_starts_is_not_lost_on(q: Queue) {
    let fake = Fake::new(Duration::from_secs(30));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        Arc::new(Configs::default()),
        Arc::new(ManualClock::new(1_000)),
        settings(),
        "r".into(),
    );
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    let seq = q.task("r", "1", "f", "t").await.unwrap().unwrap().seq;
    d.abort(seq);
    d.enqueued("1");
    let started = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_for(&q, "t", "Stopped").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 30 s call was never started or was aborted at once"
    );
    let _ = tx.send(());
    run.await.unwrap();
}

on_both!(
    a_deleted_function_makes_the_task_invalid_and_a_dedicated_queue_is_its_own,
    a_deleted_function_on
);
async fn a_deleted_function_on(q: Queue) {
    let configs = Arc::new(Configs::default());
    assert_eq!(configs.queue_of("1", "f"), "1");
    set_config(
        &q,
        &configs,
        "1",
        "f",
        "LATEST",
        Some(AsyncConfig::parse(br#"{"dedicatedQueue":true}"#, "r", "1").unwrap()),
    )
    .await;
    assert_eq!(configs.queue_of("1", "f"), "1/f");
    assert_eq!(configs.queue_of("1", "g"), "1");

    let fake = Fake::new(Duration::ZERO);
    fake.script(
        "f",
        vec![DeliveryOutcome::FunctionGone("FunctionNotFound".into())],
    );
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        configs.clone(),
        Arc::new(ManualClock::new(1_000)),
        settings(),
        "r".into(),
    );
    let mut m = msg("1", "f", "t", 1_000);
    m.queue = configs.queue_of("1", "f");
    q.enqueue(m).await.unwrap();
    d.enqueued("1/f");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_for(&q, "t", "Invalid").await;
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    let _ = tx.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn a_call_longer_than_the_lease_keeps_its_message() {
    let q = Queue::open_in_memory().unwrap();
    let fake = Fake::new(Duration::from_millis(300));
    *fake.budget.lock().unwrap() = Some(600_000);
    let clock = Arc::new(ManualClock::new(1_000));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        Arc::new(Configs::default()),
        clock,
        settings(),
        "r".into(),
    );
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    d.enqueued("1");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_for(&q, "t", "Running").await;
    let mut visible = 0;
    for _ in 0..100 {
        visible = q
            .sqlite()
            .unwrap()
            .db()
            .run(|c| {
                Ok(c.query_row("SELECT visible_ms FROM messages", [], |r| {
                    r.get::<_, i64>(0)
                })?)
            })
            .await
            .unwrap();
        if visible > 61_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        visible >= 1_000 + 600_000,
        "lease extended past the call's budget: {visible}"
    );
    wait_for(&q, "t", "Succeeded").await;
    // A stale delivery cannot extend.
    assert!(!q.extend(1, 99, 5).await.unwrap());
    let _ = tx.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn finished_tasks_are_purged_after_retention_and_waiting_ones_never() {
    let q = Queue::open_in_memory().unwrap();
    for t in ["a", "b", "c"] {
        q.enqueue(msg("1", "f", t, 1_000)).await.unwrap();
    }
    let c = q.claim(1_000, 60_000, vec![("1".into(), 2)]).await.unwrap();
    let done = Completion::Final {
        status: TaskStatus::Succeeded,
        error: None,
        return_payload: None,
    };
    q.complete(c[0].seq, c[0].delivery, 2_000, done.clone())
        .await
        .unwrap();
    q.complete(c[1].seq, c[1].delivery, 9_000, done)
        .await
        .unwrap();
    assert_eq!(q.purge(5_000, 100).await.unwrap(), 1);
    assert_eq!(count(&q, "SELECT count(*) FROM messages"), 2);
    assert_eq!(
        count(
            &q,
            "SELECT count(*) FROM task_events WHERE seq NOT IN (SELECT seq FROM messages)"
        ),
        0
    );
    assert_eq!(q.purge(u64::MAX / 2, 100).await.unwrap(), 1);
    // The waiting one stays whatever its age.
    assert_eq!(count(&q, "SELECT count(*) FROM messages WHERE done = 0"), 1);
}

async fn wait_hooks(fake: &Fake, n: usize) {
    for _ in 0..1000 {
        if fake.hooks.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("never {n} webhook attempts")
}

async fn wait_outbox_empty(q: &Queue) {
    for _ in 0..500 {
        if q.count_rows("outbox").await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the outbox never emptied")
}

on_both!(
    destination_records_are_durable_and_retried_with_backoff,
    destination_records_are_durable_and_retried_with_backoff_on
);
async fn destination_records_are_durable_and_retried_with_backoff_on(q: Queue) {
    // Written with the final state while no dispatcher runs (as if the
    // process died right after): delivered by the next dispatcher.
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    let c = q.claim(1_000, 60_000, vec![("1".into(), 1)]).await.unwrap();
    let out = Outbound {
        account: "1".into(),
        request_id: "req-t".into(),
        target: "https://hook.test/ok".into(),
        record: r#"{"requestContext":{"condition":"Success"}}"#.into(),
    };
    let done = Completion::Final {
        status: TaskStatus::Succeeded,
        error: None,
        return_payload: None,
    };
    q.complete_with(c[0].seq, c[0].delivery, 1_500, done, Some(out))
        .await
        .unwrap();
    assert_eq!(q.count_rows("outbox").await, 1);

    let fake = Fake::new(Duration::ZERO);
    fake.hook_failures.store(2, Ordering::SeqCst);
    let clock = Arc::new(ManualClock::new(2_000));
    let mut s = settings();
    s.destination_attempts = 5;
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        Arc::new(Configs::default()),
        clock.clone(),
        s,
        "r".into(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_hooks(&fake, 1).await;
    // Failed: not retried before its backoff (0.5 s) has passed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.hooks.lock().unwrap().len(), 1);
    clock.advance(Duration::from_millis(500));
    wait_hooks(&fake, 2).await;
    clock.advance(Duration::from_millis(1_000));
    wait_hooks(&fake, 3).await;
    wait_outbox_empty(&q).await;
    let hooks = fake.hooks.lock().unwrap().clone();
    assert_eq!(hooks.len(), 3, "delivered on the third attempt");
    assert_eq!(hooks[2].1["requestContext"]["condition"], "Success");
    let _ = tx.send(());
    run.await.unwrap();
}

on_both!(
    an_unreachable_destination_is_given_up_after_its_attempts,
    an_unreachable_destination_is_given_up_after_its_attempts_on
);
async fn an_unreachable_destination_is_given_up_after_its_attempts_on(q: Queue) {
    let fake = Fake::new(Duration::ZERO);
    fake.hook_failures.store(1_000, Ordering::SeqCst);
    let configs = Arc::new(Configs::default());
    set_config(
        &q,
        &configs,
        "1",
        "f",
        "LATEST",
        Some(
            AsyncConfig::parse(
                br#"{"destinationConfig":{"onSuccess":{"destination":"https://down.test/"}}}"#,
                "r",
                "1",
            )
            .unwrap(),
        ),
    )
    .await;
    let clock = Arc::new(ManualClock::new(1_000));
    let d = Dispatcher::new(
        q.clone(),
        fake.clone(),
        configs,
        clock.clone(),
        settings(),
        "r".into(),
    );
    q.enqueue(msg("1", "f", "t", 1_000)).await.unwrap();
    d.enqueued("1");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(d.clone().run(async {
        let _ = rx.await;
    }));
    wait_for(&q, "t", "Succeeded").await;
    wait_hooks(&fake, 1).await;
    clock.advance(Duration::from_secs(1));
    wait_hooks(&fake, 2).await;
    wait_outbox_empty(&q).await;
    clock.advance(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        fake.hooks.lock().unwrap().len(),
        2,
        "settings() allow 2 attempts"
    );
    let _ = tx.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn an_account_over_its_depth_bound_is_refused_until_messages_finish() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    let q = Queue::open(&path).unwrap();
    let bounded = |account: &str, task: &str| NewMessage {
        depth_limit: Some(2),
        ..msg(account, "f", task, 1)
    };
    assert_eq!(q.enqueue(bounded("1", "a")).await.unwrap(), Enqueued::New);
    assert_eq!(q.enqueue(bounded("1", "b")).await.unwrap(), Enqueued::New);
    assert_eq!(
        q.enqueue(bounded("1", "c")).await.unwrap(),
        Enqueued::Full { depth: 2, limit: 2 }
    );
    // Other accounts, and what the service enqueues itself, pass.
    assert_eq!(q.enqueue(bounded("2", "a")).await.unwrap(), Enqueued::New);
    assert_eq!(
        q.enqueue(msg("1", "f", "dest", 1)).await.unwrap(),
        Enqueued::New
    );
    assert_eq!(
        count(&q, "SELECT count(*) FROM messages WHERE account_id = '1'"),
        3,
        "the refused message was not written"
    );
    // The counts survive a restart.
    drop(q);
    let q = Queue::open(&path).unwrap();
    assert_eq!(
        q.enqueue(bounded("1", "c")).await.unwrap(),
        Enqueued::Full { depth: 3, limit: 2 }
    );
    // Two finish (one run, one stopped): there is room for one again.
    let claimed = q.claim(2, 60_000, vec![("1".into(), 1)]).await.unwrap();
    let done = Completion::Final {
        status: TaskStatus::Succeeded,
        error: None,
        return_payload: None,
    };
    q.complete(claimed[0].seq, claimed[0].delivery, 3, done)
        .await
        .unwrap();
    let stop = q
        .stop(&"1".parse().unwrap(), &"f".parse().unwrap(), "dest", 4)
        .await
        .unwrap();
    assert_eq!(stop, StopOutcome::Stopped);
    assert_eq!(q.enqueue(bounded("1", "c")).await.unwrap(), Enqueued::New);
    assert_eq!(
        q.enqueue(bounded("1", "d")).await.unwrap(),
        Enqueued::Full { depth: 2, limit: 2 }
    );
}

/// A queue database written before configs were kept per qualifier
/// opens with each function's config as LATEST's.
#[tokio::test]
async fn configs_of_an_older_database_become_latests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.db");
    {
        let old = kiln_store::Database::open(&path, &super::MIGRATIONS[..2]).unwrap();
        old.with_conn(|c| {
            c.execute(
                "INSERT INTO async_configs (account_id, function_name, doc) VALUES ('1', 'f', ?1)",
                [r#"{"maxAsyncRetryAttempts":1}"#],
            )?;
            Ok(())
        })
        .unwrap();
    }
    let q = Queue::open(&path).unwrap();
    let got = q.configs().await.unwrap();
    assert_eq!(got.len(), 1);
    let (a, f, qualifier, cfg) = &got[0];
    assert_eq!(
        (a.as_str(), f.as_str(), qualifier.as_str()),
        ("1", "f", "LATEST")
    );
    assert_eq!(cfg.retries(), 1);
}
