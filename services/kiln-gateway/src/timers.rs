//! Timer triggers fire: each tick of an enabled timer trigger becomes an
//! async invocation in the durable queue, exactly as a caller's async
//! `InvokeFunction` would (retries, destinations, async tasks listed and
//! stoppable), with FC's timer event as the payload:
//! `{"triggerTime": "2026-12-06T14:00:00Z", "triggerName": "...", "payload": "..."}`.
//!
//! A tick's async task id is `timer-<trigger id>-<tick in ms>`, unique in
//! the queue: a tick enqueued twice (a gateway restarted within it) is one
//! task. In a cluster every gateway looks at every timer, and each tick is
//! claimed in the shared database (`timer_ticks`, by account, function,
//! trigger name and tick) in the transaction that enqueues it: it fires
//! once in the cluster, and keeps firing while any gateway runs. Ticks that fell while no gateway
//! ran are not fired late; after several ticks passed between two looks
//! (a stalled gateway), only the latest fires. `@every` periods count from
//! the trigger's creation, so a restart keeps their phase.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use kiln_core::RequestId;

use crate::gateway::Gateway;
use crate::queue::{Enqueued, NewMessage};
use crate::triggers::{TimerTriggerConfig, TriggerRecord};

/// How often the gateway looks for due ticks.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// When a timer trigger fires.
#[derive(Debug)]
pub enum Schedule {
    /// `@every`: every `period_ms` from `anchor_ms`.
    Every { period_ms: u64, anchor_ms: u64 },
    /// Six cron fields, read in a time zone (`CRON_TZ=`, else UTC).
    Cron {
        cron: Box<croner::Cron>,
        tz: TimeZone,
    },
}

impl Schedule {
    /// The schedule of `expr` for a trigger created at `anchor_ms`:
    /// FC's timer `cronExpression` forms, `@every 1m` (a whole number of
    /// minutes or hours, at least one minute), or six cron fields
    /// (seconds minutes hours day-of-month month day-of-week, UTC)
    /// optionally prefixed with `CRON_TZ=<IANA zone> `. The one parser
    /// of timer schedules ([`crate::triggers::check_cron`] uses it).
    pub fn of(expr: &str, anchor_ms: u64) -> Result<Self, String> {
        let e = expr.trim();
        if let Some(every) = e.strip_prefix("@every") {
            let secs = crate::triggers::parse_every(every.trim())
                .filter(|s| *s >= 60)
                .ok_or_else(|| {
                    format!("cronExpression {expr:?}: @every takes a duration of at least one minute such as 1m, 90m or 2h")
                })?;
            return Ok(Self::Every {
                period_ms: secs * 1000,
                anchor_ms,
            });
        }
        let (tz, fields) = match e.strip_prefix("CRON_TZ=") {
            Some(rest) => {
                let (tz, fields) = rest.split_once(char::is_whitespace).ok_or_else(|| {
                    format!(
                        "cronExpression {expr:?}: CRON_TZ=<zone> must be followed by the cron fields"
                    )
                })?;
                let zone = TimeZone::get(tz)
                    .map_err(|_| format!("cronExpression {expr:?}: time zone {tz:?} is unknown"))?;
                (zone, fields.trim())
            }
            None => (TimeZone::UTC, e),
        };
        if fields.split_whitespace().count() != 6 {
            return Err(format!(
                "cronExpression {expr:?} must be @every <duration> or six fields: seconds minutes hours day-of-month month day-of-week"
            ));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(fields)
            .map_err(|err| format!("cronExpression {expr:?} is not valid: {err}"))?;
        Ok(Self::Cron {
            cron: Box::new(cron),
            tz,
        })
    }

    /// The latest tick in `(after_ms, until_ms]`, if any.
    pub fn latest_in(&self, after_ms: u64, until_ms: u64) -> Option<u64> {
        if until_ms <= after_ms {
            return None;
        }
        match self {
            Self::Every {
                period_ms,
                anchor_ms,
            } => {
                if until_ms < *anchor_ms + period_ms {
                    return None;
                }
                let k = (until_ms - anchor_ms) / period_ms;
                let tick = anchor_ms + k * period_ms;
                (tick > after_ms).then_some(tick)
            }
            Self::Cron { cron, tz } => {
                let mut from = Timestamp::from_millisecond(after_ms as i64)
                    .ok()?
                    .to_zoned(tz.clone());
                let mut latest = None;
                // A stalled gateway may find many ticks due: only the
                // latest fires, and the search is bounded.
                for _ in 0..10_000 {
                    let next = cron.find_next_occurrence(&from, false).ok()?;
                    let ms = next.timestamp().as_millisecond();
                    if ms < 0 || ms as u64 > until_ms {
                        break;
                    }
                    latest = Some(ms as u64);
                    from = next;
                }
                latest
            }
        }
    }
}

/// FC's timer event for a tick at `tick_ms`.
pub fn event(trigger_name: &str, payload: &str, tick_ms: u64) -> Vec<u8> {
    let time = Timestamp::from_millisecond(tick_ms as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    serde_json::json!({
        "triggerTime": time,
        "triggerName": trigger_name,
        "payload": payload,
    })
    .to_string()
    .into_bytes()
}

/// Look for due ticks every [`LOOK_EVERY`] until `stop`.
pub async fn run(gw: Arc<Gateway>, stop: impl std::future::Future<Output = ()>) {
    let mut last = gw.clock.now_ms();
    let mut schedules: HashMap<String, (u64, Result<Schedule, String>)> = HashMap::new();
    let mut every = tokio::time::interval(LOOK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = every.tick() => {}
        }
        let now = gw.clock.now_ms();
        let triggers = gw.catalog.timer_triggers();
        // Parsed once per version of each trigger, not on every look.
        schedules.retain(|id, _| triggers.iter().any(|t| &t.trigger_id == id));
        for t in triggers {
            let crate::triggers::TriggerConfig::Timer(cfg) = &t.config else {
                continue;
            };
            if !cfg.enable {
                continue;
            }
            let entry = schedules
                .entry(t.trigger_id.clone())
                .or_insert_with(|| (u64::MAX, Err(String::new())));
            if entry.0 != t.modified_ms {
                let parsed = Schedule::of(&cfg.cron_expression, t.created_ms);
                if let Err(e) = &parsed {
                    tracing::warn!(trigger = %t.trigger_name, function = %t.function_name, error = %e, "timer trigger has an unusable schedule");
                }
                *entry = (t.modified_ms, parsed);
            }
            if let Ok(s) = &entry.1 {
                if let Some(tick) = s.latest_in(last, now) {
                    fire(&gw, &t, cfg, tick).await;
                }
            }
        }
        last = now;
    }
}

/// Enqueue one tick of `t`; a tick of a function whose invocations are
/// disabled is skipped (as an async call to it would be refused), not
/// queued to fail.
async fn fire(gw: &Arc<Gateway>, t: &TriggerRecord, cfg: &TimerTriggerConfig, tick_ms: u64) {
    if let Some(reason) = gw
        .catalog
        .function(&t.account_id, &t.function_name)
        .as_ref()
        .and_then(|f| f.record.config.invocation_disabled())
    {
        tracing::info!(trigger = %t.trigger_name, function = %t.function_name, account = %t.account_id, tick_ms, reason, "timer tick skipped: the function's invocations are disabled");
        return;
    }
    let d = &gw.dispatcher;
    let queue = d
        .configs()
        .queue_of(t.account_id.as_str(), t.function_name.as_str());
    let task_id = format!("timer-{}-{tick_ms}", t.trigger_id);
    let mut headers = Vec::new();
    if !t.qualifier().is_latest() {
        headers.push((
            crate::queue::QUALIFIER_HEADER.to_owned(),
            t.qualifier.clone(),
        ));
    }
    let m = NewMessage {
        account: t.account_id.clone(),
        function: t.function_name.clone(),
        queue: queue.clone(),
        task_id: task_id.clone(),
        request_id: RequestId::generate().as_str().to_owned(),
        payload: event(&t.trigger_name, &cfg.payload, tick_ms),
        headers,
        now_ms: gw.clock.now_ms(),
        depth_limit: Some(gw.catalog.bounds().of(&t.account_id).async_queue_depth),
    };
    let tick = crate::queue::postgres::TickKey {
        account: t.account_id.as_str().to_owned(),
        function: t.function_name.as_str().to_owned(),
        trigger: t.trigger_name.clone(),
        tick_ms,
    };
    match d.queue().enqueue_tick(m, tick).await {
        Ok(None) => {
            tracing::debug!(task_id, "timer tick fired by another gateway")
        }
        Ok(Some(Enqueued::New)) => {
            d.enqueued(&queue);
            tracing::info!(trigger = %t.trigger_name, function = %t.function_name, account = %t.account_id, task_id, "timer trigger fired");
        }
        Ok(Some(Enqueued::Duplicate { .. })) => {
            tracing::debug!(task_id, "timer tick already enqueued")
        }
        Ok(Some(Enqueued::Full { depth, limit })) => {
            tracing::warn!(trigger = %t.trigger_name, function = %t.function_name, account = %t.account_id, depth, limit, "timer tick dropped: the account's async queue is full")
        }
        Err(e) => {
            tracing::error!(trigger = %t.trigger_name, function = %t.function_name, error = %kiln_core::error_chain(&e), "cannot enqueue a timer tick")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counts_from_the_trigger_and_fires_the_latest_tick_only() {
        let s = Schedule::of("@every 1m", 10_000).unwrap();
        assert_eq!(s.latest_in(10_000, 69_999), None, "not before one period");
        assert_eq!(s.latest_in(10_000, 70_000), Some(70_000));
        assert_eq!(s.latest_in(70_000, 129_999), None, "each tick once");
        assert_eq!(s.latest_in(70_000, 130_000), Some(130_000));
        // Five ticks passed unseen: only the latest fires.
        assert_eq!(s.latest_in(130_000, 430_500), Some(430_000));
    }

    #[test]
    fn cron_fields_and_time_zones() {
        // Every second.
        let s = Schedule::of("*/1 * * * * *", 0).unwrap();
        assert_eq!(s.latest_in(1_000, 1_999), None);
        assert_eq!(s.latest_in(1_000, 2_000), Some(2_000));
        assert_eq!(s.latest_in(1_500, 4_200), Some(4_000));
        // 09:00 in Shanghai is 01:00 UTC.
        let day = 86_400_000u64 * 20_000;
        let s = Schedule::of("CRON_TZ=Asia/Shanghai 0 0 9 * * *", 0).unwrap();
        assert_eq!(s.latest_in(day, day + 2 * 3_600_000), Some(day + 3_600_000));
        assert!(Schedule::of("0 0 9 * *", 0).is_err());
    }

    #[test]
    fn the_event_is_fcs_timer_event() {
        let e: serde_json::Value =
            serde_json::from_slice(&event("nightly", "hello", 1_765_029_600_000)).unwrap();
        assert_eq!(
            e,
            serde_json::json!({
                "triggerTime": "2025-12-06T14:00:00Z",
                "triggerName": "nightly",
                "payload": "hello",
            })
        );
    }
}
