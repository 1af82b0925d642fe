//! Provisioned instances (FC's PutProvisionConfig): a target kept started
//! and never released for idleness, scheduled actions (cron in a time
//! zone) that change the target, and target tracking on the provisioned
//! slots' utilisation between a minimum and a maximum.

use std::sync::Arc;

use jiff::tz::TimeZone;
use kiln_core::{FcError, InstanceSpec};
use kiln_internal_api::ProvisionConfig;

use super::cron::{time_zone, Cron};

const MAX_TARGET: u32 = 10_000;
const MAX_ACTIONS: usize = 100;
const MAX_POLICIES: usize = 10;
/// How far back a new configuration looks for the scheduled action in force.
pub(crate) const LOOKBACK_MS: u64 = 8 * 24 * 3_600_000;
/// After a provisioned instance failed to start, wait this long.
pub(crate) const RETRY_AFTER_MS: u64 = 10_000;
const MINUTE: u64 = 60_000;

/// From and until when (inclusive), in ms since the epoch.
pub(crate) type Window = (Option<u64>, Option<u64>);

fn in_window(w: &Window, t: u64) -> bool {
    w.0.is_none_or(|s| t >= s) && w.1.is_none_or(|e| t <= e)
}

/// A scheduled action, parsed.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    cron: Cron,
    tz: TimeZone,
    target: u32,
    window: Window,
}

/// FC's startTime/endTime: RFC 3339, or a local date-time in `tz`.
fn parse_time(s: &str, tz: &TimeZone) -> Result<u64, String> {
    let ts = match s.parse::<jiff::Timestamp>() {
        Ok(ts) => ts,
        Err(_) => s
            .parse::<jiff::civil::DateTime>()
            .and_then(|dt| dt.to_zoned(tz.clone()))
            .map(|z| z.timestamp())
            .map_err(|_| format!("{s:?} is not a date-time (2026-11-23T08:00:00[Z])"))?,
    };
    u64::try_from(ts.as_millisecond()).map_err(|_| format!("{s:?} is before 1970"))
}

fn window(
    start: Option<&str>,
    end: Option<&str>,
    tz: &TimeZone,
    what: &str,
) -> Result<Window, FcError> {
    let parse = |s: Option<&str>| {
        s.map(|s| parse_time(s, tz))
            .transpose()
            .map_err(|e| FcError::invalid_argument(format!("{what}: {e}")))
    };
    let w = (parse(start)?, parse(end)?);
    if let (Some(s), Some(e)) = w {
        if s > e {
            return Err(FcError::invalid_argument(format!(
                "{what}: start_time is after end_time"
            )));
        }
    }
    Ok(w)
}

/// One function's provisioning.
#[derive(Debug, Clone)]
pub(crate) struct Provision {
    /// The current revision's spec; `None` once the function changed,
    /// until the next PutProvision.
    pub spec: Option<Arc<InstanceSpec>>,
    pub config: ProvisionConfig,
    crons: Vec<Schedule>,
    /// When each target tracking policy applies.
    policy_windows: Vec<Window>,
    /// The latest time seen (by `advance`).
    now_ms: u64,
    /// The latest scheduled action that fired: when, and its target.
    scheduled: Option<(u64, u32)>,
    /// Minutes up to here (exclusive) are evaluated.
    evaluated_to_ms: u64,
    pub start_failed: bool,
    pub next_attempt_ms: u64,
}

/// Check a configuration, naming what is wrong; parse its schedules.
pub(crate) fn parse_config(c: &ProvisionConfig) -> Result<(Vec<Schedule>, Vec<Window>), FcError> {
    let bad = |m: String| Err(FcError::invalid_argument(m));
    if c.target > MAX_TARGET {
        return bad(format!("target must be at most {MAX_TARGET}"));
    }
    if c.scheduled_actions.len() > MAX_ACTIONS {
        return bad(format!("at most {MAX_ACTIONS} scheduledActions"));
    }
    if c.target_tracking_policies.len() > MAX_POLICIES {
        return bad(format!("at most {MAX_POLICIES} targetTrackingPolicies"));
    }
    let mut crons = Vec::new();
    for a in &c.scheduled_actions {
        if a.target > MAX_TARGET {
            return bad(format!(
                "scheduled action {:?}: target must be at most {MAX_TARGET}",
                a.name
            ));
        }
        let cron = Cron::parse(&a.schedule_expression).map_err(|e| {
            FcError::invalid_argument(format!("scheduled action {:?}: {e}", a.name))
        })?;
        let tz = time_zone(a.time_zone.as_deref()).map_err(|e| {
            FcError::invalid_argument(format!("scheduled action {:?}: {e}", a.name))
        })?;
        let what = format!("scheduled action {:?}", a.name);
        let window = window(a.start_time.as_deref(), a.end_time.as_deref(), &tz, &what)?;
        crons.push(Schedule {
            cron,
            tz,
            target: a.target,
            window,
        });
    }
    let mut windows = Vec::new();
    for p in &c.target_tracking_policies {
        if p.metric_type != "ProvisionedConcurrencyUtilization" {
            return bad(format!(
                "target tracking policy {:?}: metric_type must be ProvisionedConcurrencyUtilization",
                p.name
            ));
        }
        if !(p.metric_target > 0.0 && p.metric_target <= 1.0) {
            return bad(format!(
                "target tracking policy {:?}: metric_target must be in (0, 1]",
                p.name
            ));
        }
        if p.min_capacity > p.max_capacity || p.max_capacity > MAX_TARGET {
            return bad(format!(
                "target tracking policy {:?}: need min_capacity <= max_capacity <= {MAX_TARGET}",
                p.name
            ));
        }
        let what = format!("target tracking policy {:?}", p.name);
        let tz = time_zone(p.time_zone.as_deref())
            .map_err(|e| FcError::invalid_argument(format!("{what}: {e}")))?;
        windows.push(window(
            p.start_time.as_deref(),
            p.end_time.as_deref(),
            &tz,
            &what,
        )?);
    }
    Ok((crons, windows))
}

impl Provision {
    pub fn new(
        spec: Option<Arc<InstanceSpec>>,
        config: ProvisionConfig,
        now: u64,
    ) -> Result<Self, FcError> {
        let (crons, policy_windows) = parse_config(&config)?;
        let mut p = Self {
            spec,
            config,
            crons,
            policy_windows,
            now_ms: now,
            scheduled: None,
            evaluated_to_ms: now.saturating_sub(LOOKBACK_MS) / MINUTE * MINUTE,
            start_failed: false,
            next_attempt_ms: 0,
        };
        p.advance(now);
        Ok(p)
    }

    /// Evaluate the schedules up to `now`, minute by minute.
    pub fn advance(&mut self, now: u64) {
        self.now_ms = self.now_ms.max(now);
        if self.crons.is_empty() {
            return;
        }
        let from = self
            .evaluated_to_ms
            .max(now.saturating_sub(LOOKBACK_MS) / MINUTE * MINUTE);
        let mut m = from;
        while m <= now {
            for s in &self.crons {
                if in_window(&s.window, m) && s.cron.fires_in_minute(m, &s.tz) {
                    self.scheduled = Some((m, s.target));
                }
            }
            m += MINUTE;
        }
        self.evaluated_to_ms = m;
    }

    /// The instances wanted now, given the function's calls in flight:
    /// the first target tracking policy in force decides, else the latest
    /// scheduled action, else the target.
    pub fn desired(&self, in_flight: u32) -> u32 {
        let base = self.scheduled.map_or(self.config.target, |(_, t)| t);
        let policy = self
            .config
            .target_tracking_policies
            .iter()
            .zip(&self.policy_windows)
            .find(|(_, w)| in_window(w, self.now_ms))
            .map(|(p, _)| p);
        let (Some(p), Some(spec)) = (policy, &self.spec) else {
            return base;
        };
        let slots = f64::from(spec.concurrency) * p.metric_target;
        let need = (f64::from(in_flight) / slots).ceil() as u32;
        need.clamp(p.min_capacity, p.max_capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_internal_api::{ScheduledAction, TargetTrackingPolicy};

    fn config(target: u32) -> ProvisionConfig {
        ProvisionConfig {
            target,
            always_allocate_cpu: false,
            scheduled_actions: vec![],
            target_tracking_policies: vec![],
        }
    }

    fn at(s: &str) -> u64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64
    }

    #[test]
    fn scheduled_actions_set_the_target_from_when_they_fire() {
        let mut c = config(2);
        c.scheduled_actions = vec![
            ScheduledAction {
                name: "day".into(),
                schedule_expression: "cron(0 0 8 * * *)".into(),
                target: 10,
                time_zone: Some("Asia/Shanghai".into()),
                start_time: None,
                end_time: None,
            },
            ScheduledAction {
                name: "night".into(),
                schedule_expression: "cron(0 0 20 * * *)".into(),
                target: 1,
                time_zone: Some("Asia/Shanghai".into()),
                start_time: None,
                end_time: None,
            },
        ];
        // 2026-11-23 03:00 UTC is 11:00 in Shanghai: "day" fired at 00:00 UTC.
        let mut p = Provision::new(None, c, at("2026-11-23T03:00:00Z")).unwrap();
        assert_eq!(p.desired(0), 10);
        // 20:00 Shanghai is 12:00 UTC.
        p.advance(at("2026-11-23T11:59:00Z"));
        assert_eq!(p.desired(0), 10);
        p.advance(at("2026-11-23T12:00:30Z"));
        assert_eq!(p.desired(0), 1);
        // With no schedule yet in force, the plain target applies.
        let p = Provision::new(None, config(3), at("2026-11-23T03:00:00Z")).unwrap();
        assert_eq!(p.desired(50), 3);
    }

    #[test]
    fn target_tracking_follows_concurrency_between_min_and_max() {
        let mut c = config(0);
        c.target_tracking_policies = vec![TargetTrackingPolicy {
            name: "t".into(),
            metric_type: "ProvisionedConcurrencyUtilization".into(),
            metric_target: 0.5,
            min_capacity: 2,
            max_capacity: 8,
            start_time: None,
            end_time: None,
            time_zone: None,
        }];
        let spec = crate::placement::tests::spec("1", "f", 10, 128);
        let p = Provision::new(Some(Arc::new(spec)), c, 0).unwrap();
        // 10 slots per instance at 50 %: 5 calls per instance.
        assert_eq!(p.desired(0), 2);
        assert_eq!(p.desired(26), 6);
        assert_eq!(p.desired(1_000), 8);
    }

    #[test]
    fn windows_bound_actions_and_policies() {
        let mut c = config(2);
        c.scheduled_actions = vec![ScheduledAction {
            name: "hourly".into(),
            schedule_expression: "cron(0 0 * * * *)".into(),
            target: 7,
            time_zone: Some("Asia/Shanghai".into()),
            // Local times in Shanghai: 08:00 UTC to 10:00 UTC.
            start_time: Some("2026-11-23T16:00:00".into()),
            end_time: Some("2026-11-23T18:00:00".into()),
        }];
        let mut p = Provision::new(None, c.clone(), at("2026-11-23T07:30:00Z")).unwrap();
        assert_eq!(p.desired(0), 2, "not yet in its window");
        p.advance(at("2026-11-23T08:00:00Z"));
        assert_eq!(p.desired(0), 7);
        c.target_tracking_policies = vec![TargetTrackingPolicy {
            name: "t".into(),
            metric_type: "ProvisionedConcurrencyUtilization".into(),
            metric_target: 1.0,
            min_capacity: 3,
            max_capacity: 3,
            start_time: Some("2026-11-24T00:00:00Z".into()),
            end_time: None,
            time_zone: None,
        }];
        let spec = crate::placement::tests::spec("1", "f", 1, 128);
        let mut p =
            Provision::new(Some(Arc::new(spec)), c.clone(), at("2026-11-23T12:00:00Z")).unwrap();
        assert_eq!(p.desired(0), 7, "the policy is not in force yet");
        p.advance(at("2026-11-24T00:00:00Z"));
        assert_eq!(p.desired(0), 3);
        c.scheduled_actions[0].end_time = Some("yesterday".into());
        assert!(parse_config(&c)
            .unwrap_err()
            .message
            .contains("not a date-time"));
        c.scheduled_actions[0].end_time = Some("2026-11-23T15:00:00".into());
        assert!(parse_config(&c)
            .unwrap_err()
            .message
            .contains("after end_time"));
    }

    #[test]
    fn bad_configurations_are_refused_naming_the_field() {
        let mut c = config(1);
        c.scheduled_actions = vec![ScheduledAction {
            name: "x".into(),
            schedule_expression: "cron(0 0 25 * * *)".into(),
            target: 1,
            time_zone: None,
            start_time: None,
            end_time: None,
        }];
        assert!(parse_config(&c).unwrap_err().message.contains("hours"));
        c.scheduled_actions[0].schedule_expression = "cron(0 0 1 * * *)".into();
        c.scheduled_actions[0].time_zone = Some("Nowhere/Land".into());
        assert!(parse_config(&c).unwrap_err().message.contains("time zone"));
        let mut c = config(1);
        c.target_tracking_policies = vec![TargetTrackingPolicy {
            name: "t".into(),
            metric_type: "ProvisionedConcurrencyUtilization".into(),
            metric_target: 1.5,
            min_capacity: 1,
            max_capacity: 2,
            start_time: None,
            end_time: None,
            time_zone: None,
        }];
        assert!(parse_config(&c)
            .unwrap_err()
            .message
            .contains("metric_target"));
        assert!(parse_config(&config(MAX_TARGET + 1)).is_err());
    }
}
