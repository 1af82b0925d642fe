//! The dispatcher: leases messages from the queue, fairly across queues,
//! invokes them through an [`Invoker`] and records the outcome (retry with
//! backoff, finish, destinations).
//!
//! Fairness: each round walks every queue with work (round robin, starting
//! one further each round) and asks for at most a fair share of the free
//! invocation slots per queue, never more than `per_queue` in flight for
//! one queue. An account with a deep backlog therefore holds at most
//! `per_queue` slots, and a newly busy account is served in the next round.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kiln_core::{AccountId, Clock};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tracing::Instrument;

use super::config::{parse_target, AsyncConfig, Target};
use super::{
    backoff, Claimed, Completion, NewMessage, Outbound, OutboxEntry, Queue, QueueError, TaskStatus,
};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How one delivery went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Success {
        status: u16,
        body: Vec<u8>,
    },
    /// The function ran and failed (unhandled error, crash, timeout).
    FunctionError {
        status: u16,
        body: Vec<u8>,
    },
    /// Throttled by the scheduler: back off and retry until the TTL.
    Throttled(String),
    /// A system error: back off and retry until the TTL.
    SystemError(String),
    /// The function no longer exists: the task is Invalid.
    FunctionGone(String),
}

/// Invokes a message's function; the real one goes through the sync
/// invoke path, tests use a fake.
pub trait Invoker: Send + Sync + 'static {
    fn invoke(&self, m: &Claimed) -> BoxFuture<DeliveryOutcome>;
    /// How long one call of this function may take, when that is known
    /// (the function's timeout plus the gateway's grace).
    fn call_budget_ms(&self, _m: &Claimed) -> Option<u64> {
        None
    }
    /// POST a destination record to an https webhook.
    fn webhook(&self, url: &str, record: &serde_json::Value) -> BoxFuture<Result<(), String>>;
}

/// The async invoke configs in memory (the queue database holds them),
/// by account, function and qualifier (`LATEST`, a version or an alias:
/// a call uses the config of the qualifier it was made with).
#[derive(Default)]
pub struct Configs {
    map: RwLock<HashMap<(String, String, String), AsyncConfig>>,
}

impl Configs {
    pub async fn load(queue: &Queue) -> Result<Self, QueueError> {
        let me = Self::default();
        me.reload(queue).await?;
        Ok(me)
    }

    /// Read every config again (another gateway of a cluster changed one).
    pub async fn reload(&self, queue: &Queue) -> Result<(), QueueError> {
        let map = queue
            .configs()
            .await?
            .into_iter()
            .map(|(a, f, q, c)| ((a, f, q), c))
            .collect();
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// The config of `qualifier` (as written: `LATEST`, a version id or
    /// an alias name).
    pub fn get(&self, account: &str, function: &str, qualifier: &str) -> Option<AsyncConfig> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.get(&(
            account.to_owned(),
            function.to_owned(),
            qualifier.to_owned(),
        ))
        .cloned()
    }

    pub fn set(&self, account: &str, function: &str, qualifier: &str, cfg: Option<AsyncConfig>) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        let k = (
            account.to_owned(),
            function.to_owned(),
            qualifier.to_owned(),
        );
        match cfg {
            Some(c) => m.insert(k, c),
            None => m.remove(&k),
        };
    }

    /// Every config of `account`, ordered by function name and qualifier.
    pub fn of_account(&self, account: &str) -> Vec<(String, String, AsyncConfig)> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m
            .iter()
            .filter(|((a, _, _), _)| a == account)
            .map(|((_, f, q), c)| (f.clone(), q.clone(), c.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    /// The function's configs, whatever their qualifier.
    fn of_function(&self, account: &str, function: &str) -> Vec<AsyncConfig> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|((a, f, _), _)| a == account && f == function)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Whether any of the function's configs makes its calls async tasks.
    pub fn task_mode(&self, account: &str, function: &str) -> bool {
        self.of_function(account, function)
            .iter()
            .any(|c| c.async_task == Some(true))
    }

    /// The queue a function's messages wait in (all its qualifiers share
    /// it): its own when any of its configs asks for a dedicated queue.
    pub fn queue_of(&self, account: &str, function: &str) -> String {
        if self
            .of_function(account, function)
            .iter()
            .any(|c| c.dedicated_queue == Some(true))
        {
            format!("{account}/{function}")
        } else {
            account.to_owned()
        }
    }
}

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Invocations in flight across all queues.
    pub max_in_flight: usize,
    /// Invocations in flight for one queue.
    pub per_queue: usize,
    /// How long a delivery's lease lasts before the message is redelivered.
    pub lease_ms: u64,
    /// The longest backoff after throttling or a system error.
    pub backoff_cap: Duration,
    /// How often an idle dispatcher looks for messages whose backoff ended.
    pub idle_poll: Duration,
    /// Attempts to deliver a destination record.
    pub destination_attempts: u32,
    /// How long a finished task stays readable (GetAsyncTask) before its
    /// row is purged.
    pub retention_ms: u64,
    /// In a cluster: renew the leases of the deliveries this dispatcher
    /// runs this often (each by `lease_ms` from then), so a short lease
    /// holds while the gateway lives and runs out soon after it dies.
    /// None: a lease lasts `lease_ms` (or the call's budget) as claimed.
    pub renew_every: Option<Duration>,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            per_queue: 16,
            lease_ms: 15 * 60 * 1000,
            backoff_cap: Duration::from_secs(60),
            idle_poll: Duration::from_millis(100),
            destination_attempts: 5,
            retention_ms: 7 * 24 * 3600 * 1000,
            renew_every: None,
        }
    }
}

/// How often finished tasks past their retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How often the queue depth gauges are refreshed (on the queue's reader
/// connection: it never waits for the writer, but counts every waiting
/// message).
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// The running dispatcher's shared state.
pub struct Dispatcher {
    queue: Queue,
    invoker: Arc<dyn Invoker>,
    configs: Arc<Configs>,
    clock: Arc<dyn Clock>,
    settings: DispatchSettings,
    region: String,
    wake: Notify,
    state: Mutex<State>,
    me: std::sync::Weak<Self>,
}

#[derive(Default)]
struct State {
    queues: BTreeSet<String>,
    in_flight: HashMap<String, usize>,
    total: usize,
    cursor: usize,
    running: HashMap<i64, AbortHandle>,
    /// Messages this dispatcher holds a lease on (claimed, not
    /// completed), with the delivery number of that lease.
    held: HashMap<i64, i64>,
    /// Stops that came while their message was claimed (already Running in
    /// the queue) but its call not yet started: honoured when it starts.
    /// Pruned after an hour (a stop racing a call's end leaves one behind).
    stop_requested: HashMap<i64, std::time::Instant>,
    outbox_busy: std::collections::HashSet<i64>,
}

impl Dispatcher {
    pub fn new(
        queue: Queue,
        invoker: Arc<dyn Invoker>,
        configs: Arc<Configs>,
        clock: Arc<dyn Clock>,
        settings: DispatchSettings,
        region: String,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            queue,
            invoker,
            configs,
            clock,
            settings,
            region,
            wake: Notify::new(),
            state: Mutex::new(State::default()),
        })
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn configs(&self) -> &Arc<Configs> {
        &self.configs
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message was enqueued into `queue`.
    pub fn enqueued(&self, queue: &str) {
        let mut s = self.state();
        if !s.queues.contains(queue) {
            s.queues.insert(queue.to_owned());
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Abort the running delivery of message `seq` (StopAsyncTask).
    pub fn abort(&self, seq: i64) {
        let mut s = self.state();
        if let Some(h) = s.running.remove(&seq) {
            h.abort();
            return;
        }
        let now = std::time::Instant::now();
        s.stop_requested
            .retain(|_, at| now.duration_since(*at) < std::time::Duration::from_secs(3600));
        s.stop_requested.insert(seq, now);
    }

    /// A stop of message `seq` reached this gateway (a cluster's
    /// notification or resync): abort it if this dispatcher runs it.
    pub fn abort_if_held(&self, seq: i64) {
        if self.state().held.contains_key(&seq) {
            self.abort(seq);
        }
    }

    /// In a cluster: follow the other gateways' changes (new messages,
    /// stops, configs) from the queue's notifications, and re-read them
    /// every [`super::postgres::RESYNC_EVERY`] in case one was missed.
    async fn follow_cluster(self: Arc<Self>) {
        let Some(pg) = self.queue.shared() else {
            return;
        };
        let Some(mut signals) = pg.take_signals() else {
            return;
        };
        let mut resync = tokio::time::interval(super::postgres::RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signal = tokio::select! {
                s = signals.recv() => match s {
                    Some(s) => s,
                    None => return,
                },
                _ = resync.tick() => super::postgres::Signal::Resync,
            };
            match signal {
                super::postgres::Signal::Enqueued(q) => self.enqueued(&q),
                super::postgres::Signal::Stop(seq) => self.abort_if_held(seq),
                super::postgres::Signal::Configs => {
                    if let Err(e) = self.configs.reload(&self.queue).await {
                        tracing::warn!(error = %e, "cannot reload async invoke configs");
                    }
                }
                super::postgres::Signal::Resync => self.resync().await,
            }
        }
    }

    async fn resync(&self) {
        match self.queue.active_queues().await {
            Ok(qs) => {
                let mut s = self.state();
                let new = qs.iter().any(|q| !s.queues.contains(q));
                s.queues.extend(qs);
                drop(s);
                if new {
                    self.wake.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %kiln_core::error_chain(&e), "cannot list the shared async queues")
            }
        }
        let held: Vec<i64> = self.state().held.keys().copied().collect();
        if let Some(pg) = self.queue.shared() {
            match pg.stopping_among(held).await {
                Ok(stops) => stops.into_iter().for_each(|seq| self.abort_if_held(seq)),
                Err(e) => {
                    tracing::warn!(error = %kiln_core::error_chain(&e), "cannot read stops of running async tasks")
                }
            }
        }
        if let Err(e) = self.configs.reload(&self.queue).await {
            tracing::warn!(error = %e, "cannot reload async invoke configs");
        }
    }

    /// Run until `stop` resolves; in-flight deliveries are left to their
    /// leases (redelivered after a restart).
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let follower = tokio::spawn(self.clone().follow_cluster());
        let renewer = tokio::spawn(self.clone().renew_leases());
        self.clone().run_loop(stop).await;
        follower.abort();
        renewer.abort();
    }

    /// Every `renew_every`, push the leases of the running deliveries
    /// `lease_ms` ahead (fenced by their delivery numbers).
    async fn renew_leases(self: Arc<Self>) {
        let (Some(every), Some(pg)) = (self.settings.renew_every, self.queue.shared()) else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let held: Vec<(i64, i64)> = self.state().held.iter().map(|(s, d)| (*s, *d)).collect();
            if held.is_empty() {
                continue;
            }
            let until = self.clock.now_ms() + self.settings.lease_ms;
            if let Err(e) = pg.renew(held, until).await {
                tracing::warn!(error = %kiln_core::error_chain(&e), "cannot renew the leases of running async deliveries; another gateway may deliver them again once they run out");
            }
        }
    }

    async fn run_loop(self: Arc<Self>, stop: impl Future<Output = ()>) {
        match self.queue.recover(self.clock.now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                messages = n,
                "redelivering messages leased by the previous process"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot recover leased messages; they wait for their leases")
            }
        }
        match self.queue.active_queues().await {
            Ok(qs) => self.state().queues.extend(qs),
            Err(e) => tracing::error!(error = %e, "cannot list queues; starting empty"),
        }
        tokio::pin!(stop);
        let mut next_purge = std::time::Instant::now();
        let mut next_pump = std::time::Instant::now();
        let mut next_depth = std::time::Instant::now();
        loop {
            if std::time::Instant::now() >= next_depth {
                next_depth = std::time::Instant::now() + DEPTH_EVERY;
                if let Err(e) = self.queue.refresh_depth(self.clock.now_ms()).await {
                    tracing::warn!(error = %e, "cannot read the async queue depth");
                }
            }
            if std::time::Instant::now() >= next_pump {
                next_pump = std::time::Instant::now() + self.settings.idle_poll;
                self.pump_outbox().await;
            }
            if std::time::Instant::now() >= next_purge {
                next_purge = std::time::Instant::now() + PURGE_EVERY;
                let cutoff = self
                    .clock
                    .now_ms()
                    .saturating_sub(self.settings.retention_ms);
                match self.queue.purge(cutoff, 10_000).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(tasks = n, "purged finished async tasks past retention")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot purge finished async tasks"),
                }
            }
            let wants = self.wants();
            let claimed = if wants.is_empty() {
                Vec::new()
            } else {
                match self
                    .queue
                    .claim(self.clock.now_ms(), self.settings.lease_ms, wants)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "claim failed");
                        Vec::new()
                    }
                }
            };
            if claimed.is_empty() {
                self.prune().await;
                tokio::select! {
                    _ = &mut stop => break,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.idle_poll) => {}
                }
                continue;
            }
            for c in claimed {
                {
                    let mut s = self.state();
                    *s.in_flight.entry(c.queue.clone()).or_default() += 1;
                    s.total += 1;
                    s.held.insert(c.seq, c.delivery);
                }
                let span = tracing::info_span!(
                    "async_invoke",
                    request_id = %c.request_id,
                    task_id = %c.task_id,
                    account = %c.account,
                    function = %c.function,
                    delivery = c.delivery,
                );
                let me = self.clone();
                tokio::spawn(async move { me.process(c).await }.instrument(span));
            }
            if let Some(()) = futures_util::FutureExt::now_or_never(&mut stop) {
                break;
            }
        }
    }

    /// This round's requests: a fair share of the free slots per queue.
    fn wants(&self) -> Vec<(String, usize)> {
        let mut s = self.state();
        let free = self.settings.max_in_flight.saturating_sub(s.total);
        if free == 0 || s.queues.is_empty() {
            return Vec::new();
        }
        let queues: Vec<String> = s.queues.iter().cloned().collect();
        let start = s.cursor % queues.len();
        s.cursor = s.cursor.wrapping_add(1);
        let share = free.div_ceil(queues.len()).max(1);
        let mut left = free;
        let mut wants = Vec::new();
        for i in 0..queues.len() {
            if left == 0 {
                break;
            }
            let q = &queues[(start + i) % queues.len()];
            let busy = s.in_flight.get(q).copied().unwrap_or(0);
            let n = self
                .settings
                .per_queue
                .saturating_sub(busy)
                .min(share)
                .min(left);
            if n > 0 {
                wants.push((q.clone(), n));
                left -= n;
            }
        }
        wants
    }

    /// Forget queues with nothing left and nothing in flight.
    async fn prune(&self) {
        let idle: Vec<String> = {
            let s = self.state();
            s.queues
                .iter()
                .filter(|q| s.in_flight.get(*q).copied().unwrap_or(0) == 0)
                .cloned()
                .collect()
        };
        for q in idle {
            if let Ok(false) = self.queue.has_pending(&q).await {
                let mut s = self.state();
                if s.in_flight.get(&q).copied().unwrap_or(0) == 0 {
                    s.queues.remove(&q);
                }
            }
        }
    }

    async fn process(self: Arc<Self>, c: Claimed) {
        let cfg = self
            .configs
            .get(
                &c.account,
                &c.function,
                &super::stored_qualifier_name(&c.headers),
            )
            .unwrap_or_default();
        let now = self.clock.now_ms();
        let (completion, outcome) = if now.saturating_sub(c.created_ms) >= cfg.max_age_ms() {
            (
                Completion::Final {
                    status: TaskStatus::Expired,
                    error: Some("the message is older than maxAsyncEventAgeInSeconds".into()),
                    return_payload: None,
                },
                None,
            )
        } else {
            // A call that may outlast the default lease keeps its message
            // for as long as it may run, so it is not redelivered meanwhile.
            // (Renewed leases need no extension.)
            if let Some(budget) = self
                .invoker
                .call_budget_ms(&c)
                .filter(|_| self.settings.renew_every.is_none())
            {
                if budget > self.settings.lease_ms {
                    let until = now + budget + 60_000;
                    if let Err(e) = self.queue.extend(c.seq, c.delivery, until).await {
                        tracing::warn!(error = %e, "cannot extend the lease");
                    }
                }
            }
            let fut = self.invoker.invoke(&c);
            let handle = tokio::spawn(fut);
            {
                let mut s = self.state();
                if s.stop_requested.remove(&c.seq).is_some() {
                    handle.abort();
                } else {
                    s.running.insert(c.seq, handle.abort_handle());
                }
            }
            let joined = handle.await;
            let mut s = self.state();
            s.running.remove(&c.seq);
            s.stop_requested.remove(&c.seq);
            drop(s);
            match joined {
                Ok(o) => (self.decide(&c, &cfg, &o), Some(o)),
                Err(_) => (
                    Completion::Final {
                        status: TaskStatus::Stopped,
                        error: Some("stopped by StopAsyncTask".into()),
                        return_payload: None,
                    },
                    None,
                ),
            }
        };
        let now = self.clock.now_ms();
        let outbound = match &completion {
            Completion::Final { status, .. } => {
                self.outbound(&c, &cfg, *status, outcome.as_ref(), now)
            }
            Completion::Retry { .. } => None,
        };
        let has_outbound = outbound.is_some();
        let applied = self
            .queue
            .complete_with(c.seq, c.delivery, now, completion, outbound)
            .await;
        match applied {
            Ok(Some(status)) => {
                tracing::debug!(
                    status = status.as_str(),
                    destination = has_outbound && status.is_final(),
                    "async delivery recorded"
                )
            }
            Ok(None) => tracing::info!("delivery's lease was lost; outcome dropped"),
            Err(e) => {
                tracing::error!(error = %e, "cannot record async outcome; the lease will expire and redeliver")
            }
        }
        {
            let mut s = self.state();
            if let Some(n) = s.in_flight.get_mut(&c.queue) {
                *n = n.saturating_sub(1);
            }
            s.total = s.total.saturating_sub(1);
            s.held.remove(&c.seq);
        }
        self.wake.notify_one();
    }

    fn decide(&self, c: &Claimed, cfg: &AsyncConfig, o: &DeliveryOutcome) -> Completion {
        let now = self.clock.now_ms();
        match o {
            DeliveryOutcome::Success { body, .. } => Completion::Final {
                status: TaskStatus::Succeeded,
                error: None,
                return_payload: Some(body.clone()),
            },
            DeliveryOutcome::FunctionError { body, .. } => {
                if c.retries < cfg.retries() {
                    Completion::Retry {
                        visible_ms: now,
                        retries: c.retries + 1,
                        throttles: c.throttles,
                        detail: format!(
                            "function error, retry {} of {}",
                            c.retries + 1,
                            cfg.retries()
                        ),
                    }
                } else {
                    Completion::Final {
                        status: TaskStatus::Failed,
                        error: Some(
                            String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned(),
                        ),
                        return_payload: Some(body.clone()),
                    }
                }
            }
            DeliveryOutcome::Throttled(m) | DeliveryOutcome::SystemError(m) => {
                let throttles = c.throttles + 1;
                let wait = backoff(throttles, self.settings.backoff_cap).as_millis() as u64;
                if (now + wait).saturating_sub(c.created_ms) >= cfg.max_age_ms() {
                    Completion::Final {
                        status: TaskStatus::Expired,
                        error: Some(format!(
                            "maxAsyncEventAgeInSeconds reached; last error: {m}"
                        )),
                        return_payload: None,
                    }
                } else {
                    Completion::Retry {
                        visible_ms: now + wait,
                        retries: c.retries,
                        throttles,
                        detail: m.clone(),
                    }
                }
            }
            DeliveryOutcome::FunctionGone(m) => Completion::Final {
                status: TaskStatus::Invalid,
                error: Some(m.clone()),
                return_payload: None,
            },
        }
    }

    /// The record for onSuccess / onFailure, if the config names one for
    /// this final status.
    fn outbound(
        &self,
        c: &Claimed,
        cfg: &AsyncConfig,
        status: TaskStatus,
        outcome: Option<&DeliveryOutcome>,
        now_ms: u64,
    ) -> Option<Outbound> {
        let dest = cfg.destination_config.as_ref()?;
        let target = match status {
            TaskStatus::Succeeded => dest.on_success.as_ref()?,
            TaskStatus::Failed | TaskStatus::Expired => dest.on_failure.as_ref()?,
            _ => return None,
        };
        Some(Outbound {
            account: c.account.clone(),
            request_id: c.request_id.clone(),
            target: target.destination.clone(),
            record: record(&self.region, c, status, outcome, now_ms).to_string(),
        })
    }

    /// Start deliveries of due outbox entries (each once at a time).
    async fn pump_outbox(&self) {
        let due = match self.queue.outbox_due(self.clock.now_ms(), 64).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the destination outbox");
                return;
            }
        };
        for e in due {
            if !self.state().outbox_busy.insert(e.id) {
                continue;
            }
            let Some(me) = self.me.upgrade() else { return };
            tokio::spawn(async move { me.deliver(e).await });
        }
    }

    /// One delivery attempt; retried with backoff from the outbox, given up
    /// after `destination_attempts`. Never holds a queue slot.
    async fn deliver(self: Arc<Self>, e: OutboxEntry) {
        let o = &e.outbound;
        let result = match parse_target(&o.target, &self.region, &o.account) {
            Err(m) => Err(m),
            Ok(Target::Webhook(url)) => match serde_json::from_str(&o.record) {
                Ok(v) => self.invoker.webhook(&url, &v).await,
                Err(err) => Err(format!("unreadable record: {err}")),
            },
            Ok(Target::Function(f)) => match o.account.parse::<AccountId>() {
                Err(err) => Err(err.to_string()),
                Ok(account) => {
                    let queue = self.configs.queue_of(&o.account, f.as_str());
                    let m = NewMessage {
                        account,
                        function: f,
                        queue: queue.clone(),
                        // Idempotent: a retry after a crash is the same task.
                        task_id: format!("dest-{}", o.request_id),
                        request_id: kiln_core::RequestId::generate().as_str().to_owned(),
                        payload: o.record.clone().into_bytes(),
                        headers: vec![("content-type".into(), "application/json".into())],
                        now_ms: self.clock.now_ms(),
                        // A destination record belongs to a message already
                        // accepted: never refused by the account's bound.
                        depth_limit: None,
                    };
                    let r = self
                        .queue
                        .enqueue(m)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    if r.is_ok() {
                        self.enqueued(&queue);
                    }
                    r
                }
            },
        };
        let attempts = e.attempts + 1;
        let done = match &result {
            Ok(()) => true,
            Err(err) if attempts >= self.settings.destination_attempts.max(1) => {
                tracing::error!(request_id = %o.request_id, target = %o.target, error = %err, attempts, "destination delivery abandoned");
                true
            }
            Err(err) => {
                tracing::warn!(request_id = %o.request_id, target = %o.target, error = %err, attempts, "destination delivery failed; will retry");
                false
            }
        };
        let r = if done {
            self.queue.outbox_remove(e.id).await
        } else {
            let next = self.clock.now_ms()
                + backoff(attempts, self.settings.backoff_cap).as_millis() as u64;
            self.queue.outbox_retry(e.id, attempts, next).await
        };
        if let Err(err) = r {
            tracing::warn!(error = %err, "cannot update the destination outbox");
        }
        self.state().outbox_busy.remove(&e.id);
    }
}

/// The destination record, shaped like FC's / Lambda's.
pub fn record(
    region: &str,
    c: &Claimed,
    status: TaskStatus,
    outcome: Option<&DeliveryOutcome>,
    now_ms: u64,
) -> serde_json::Value {
    let as_json = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()))
    };
    let condition = match (status, outcome) {
        (TaskStatus::Succeeded, _) => "Success",
        (TaskStatus::Expired, _) => "EventAgeExceeded",
        _ => "RetriesExhausted",
    };
    let (status_code, function_error, response) = match outcome {
        Some(DeliveryOutcome::Success { status, body }) => (*status, None, Some(as_json(body))),
        Some(DeliveryOutcome::FunctionError { status, body }) => (
            *status,
            Some("UnhandledInvocationError"),
            Some(as_json(body)),
        ),
        Some(DeliveryOutcome::Throttled(m))
        | Some(DeliveryOutcome::SystemError(m))
        | Some(DeliveryOutcome::FunctionGone(m)) => {
            (0, None, Some(serde_json::json!({ "errorMessage": m })))
        }
        None => (0, None, None),
    };
    let mut response_context = serde_json::json!({ "statusCode": status_code });
    if let Some(fe) = function_error {
        response_context["functionError"] = fe.into();
    }
    serde_json::json!({
        "version": "1.0",
        "timestamp": crate::model::fc_time(now_ms),
        "requestContext": {
            "requestId": c.request_id,
            "functionArn": format!("acs:fc:{region}:{}:functions/{}", c.account, c.function),
            "condition": condition,
            "approximateInvokeCount": c.delivery,
        },
        "requestPayload": as_json(&c.payload),
        "responseContext": response_context,
        "responsePayload": response,
    })
}
