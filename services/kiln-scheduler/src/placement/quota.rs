//! Per-account quotas and throttles: the burst pool of instances, memory
//! and vCPU quotas, scale-out token buckets on the injected clock, and
//! per-function reserved and maximum concurrency.

use kiln_core::{AccountId, FcError, FunctionName};
use kiln_internal_api::AccountLimits;

/// At most this many per-function entries in one account's limits.
pub const MAX_FUNCTION_LIMITS: usize = 10_000;
const MAX_BURST_INSTANCES: u32 = 1_000_000;

/// FC's defaults: a burst pool of 300 instances, and scale-out of 300
/// instances and 360 vCPUs per minute. The quotas default to what 300
/// instances of 2 vCPUs and 4 GB need.
pub fn default_account_limits() -> AccountLimits {
    AccountLimits {
        burst_instances: 300,
        memory_quota_mb: 300 * 4096,
        vcpu_quota_milli: 300 * 2000,
        scale_out_instances_per_minute: 300,
        scale_out_vcpus_per_minute: 360,
        functions: Default::default(),
    }
}

/// Refuse limits that cannot be meant, naming the field.
pub fn validate_limits(l: &AccountLimits) -> Result<(), FcError> {
    let bad = |m: String| Err(FcError::invalid_argument(m));
    if !(1..=MAX_BURST_INSTANCES).contains(&l.burst_instances) {
        return bad(format!(
            "burst_instances must be between 1 and {MAX_BURST_INSTANCES}"
        ));
    }
    if l.memory_quota_mb < 128 {
        return bad("memory_quota_mb must be at least 128".into());
    }
    if l.vcpu_quota_milli < 50 {
        return bad("vcpu_quota_milli must be at least 50 (0.05 vCPU)".into());
    }
    if l.scale_out_instances_per_minute == 0 || l.scale_out_vcpus_per_minute == 0 {
        return bad(
            "scale_out_instances_per_minute and scale_out_vcpus_per_minute must be at least 1"
                .into(),
        );
    }
    if l.functions.len() > MAX_FUNCTION_LIMITS {
        return bad(format!(
            "functions may hold at most {MAX_FUNCTION_LIMITS} entries"
        ));
    }
    let mut reserved: u64 = 0;
    for (name, f) in &l.functions {
        if f.max_concurrency == Some(0) {
            return bad(format!(
                "functions.{name}.max_concurrency must be at least 1"
            ));
        }
        reserved += u64::from(f.reserved_concurrency.unwrap_or(0));
    }
    if reserved > u64::from(l.burst_instances) {
        return bad(format!(
            "the functions' reserved_concurrency add up to {reserved}, more than burst_instances {}",
            l.burst_instances
        ));
    }
    Ok(())
}

/// What an account holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountUsage {
    pub instances: u32,
    pub memory_mb: u64,
    pub cpu_milli: u64,
}

/// A token bucket of `per_minute` tokens refilling over a minute, kept in
/// 1/60000ths of a token so a millisecond adds exactly `per_minute`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: u64,
    at_ms: u64,
}

const UNITS: u64 = 60_000;

impl Bucket {
    fn full(per_minute: u64, now: u64) -> Self {
        Self {
            level: per_minute * UNITS,
            at_ms: now,
        }
    }

    fn refill(&mut self, per_minute: u64, now: u64) {
        let dt = now.saturating_sub(self.at_ms);
        self.level = self
            .level
            .saturating_add(dt.saturating_mul(per_minute))
            .min(per_minute * UNITS);
        self.at_ms = self.at_ms.max(now);
    }

    fn has(&self, tokens: u64) -> bool {
        self.level >= tokens * UNITS
    }

    fn take(&mut self, tokens: u64) {
        self.level = self.level.saturating_sub(tokens * UNITS);
    }

    fn is_full(&self, per_minute: u64) -> bool {
        self.level >= per_minute * UNITS
    }
}

/// An account's scale-out buckets: instances, and vCPU thousandths.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScaleOut {
    instances: Bucket,
    cpu_milli: Bucket,
}

impl ScaleOut {
    pub(crate) fn new(l: &AccountLimits, now: u64) -> Self {
        Self {
            instances: Bucket::full(u64::from(l.scale_out_instances_per_minute), now),
            cpu_milli: Bucket::full(u64::from(l.scale_out_vcpus_per_minute) * 1000, now),
        }
    }

    /// Whether one more instance of `cpu_milli` may start now; refills
    /// first. The error names the limit.
    pub(crate) fn check(
        &mut self,
        l: &AccountLimits,
        account: &AccountId,
        cpu_milli: u64,
        now: u64,
    ) -> Result<(), FcError> {
        let per_min_inst = u64::from(l.scale_out_instances_per_minute);
        let per_min_cpu = u64::from(l.scale_out_vcpus_per_minute) * 1000;
        self.instances.refill(per_min_inst, now);
        self.cpu_milli.refill(per_min_cpu, now);
        if !self.instances.has(1) {
            return Err(FcError::throttled(format!(
                "account {account} is scaling out faster than its limit of {} new instances \
                 per minute; retry shortly",
                l.scale_out_instances_per_minute
            )));
        }
        if !self.cpu_milli.has(cpu_milli) {
            return Err(FcError::throttled(format!(
                "account {account} is scaling out faster than its limit of {} vCPUs of new \
                 instances per minute; retry shortly",
                l.scale_out_vcpus_per_minute
            )));
        }
        Ok(())
    }

    pub(crate) fn take(&mut self, cpu_milli: u64) {
        self.instances.take(1);
        self.cpu_milli.take(cpu_milli);
    }

    /// Full buckets carry no state worth keeping.
    pub(crate) fn is_full(&mut self, l: &AccountLimits, now: u64) -> bool {
        let per_min_inst = u64::from(l.scale_out_instances_per_minute);
        let per_min_cpu = u64::from(l.scale_out_vcpus_per_minute) * 1000;
        self.instances.refill(per_min_inst, now);
        self.cpu_milli.refill(per_min_cpu, now);
        self.instances.is_full(per_min_inst) && self.cpu_milli.is_full(per_min_cpu)
    }
}

pub(crate) fn max_concurrency_error(
    account: &AccountId,
    function: &FunctionName,
    max: u32,
) -> FcError {
    FcError::throttled(format!(
        "function {function} of account {account} reached its maximum concurrency of {max} \
         concurrent calls"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_internal_api::FunctionLimits;

    #[test]
    fn buckets_refill_over_a_minute_and_cap_at_their_size() {
        let mut b = Bucket::full(300, 0);
        for _ in 0..300 {
            assert!(b.has(1));
            b.take(1);
        }
        assert!(!b.has(1));
        b.refill(300, 199);
        assert!(!b.has(1), "a token takes 200 ms at 300 per minute");
        b.refill(300, 200);
        assert!(b.has(1));
        b.refill(300, 10 * 60_000);
        assert!(b.is_full(300));
        assert_eq!(b.level, 300 * UNITS);
        // A clock that steps back never drains the bucket.
        b.take(10);
        let before = b.level;
        b.refill(300, 5);
        assert_eq!(b.level, before);
    }

    #[test]
    fn defaults_are_fcs_and_valid() {
        let d = default_account_limits();
        assert_eq!(d.burst_instances, 300);
        assert_eq!(d.scale_out_instances_per_minute, 300);
        assert_eq!(d.scale_out_vcpus_per_minute, 360);
        validate_limits(&d).unwrap();
    }

    #[test]
    fn nonsense_limits_are_refused_naming_the_field() {
        type Mutation = Box<dyn Fn(&mut AccountLimits)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("burst_instances", Box::new(|l| l.burst_instances = 0)),
            ("memory_quota_mb", Box::new(|l| l.memory_quota_mb = 1)),
            ("vcpu_quota_milli", Box::new(|l| l.vcpu_quota_milli = 0)),
            (
                "scale_out_instances_per_minute",
                Box::new(|l| l.scale_out_instances_per_minute = 0),
            ),
            (
                "max_concurrency",
                Box::new(|l| {
                    l.functions.insert(
                        "f".parse().unwrap(),
                        FunctionLimits {
                            reserved_concurrency: None,
                            max_concurrency: Some(0),
                        },
                    );
                }),
            ),
            (
                "reserved_concurrency add up to 301",
                Box::new(|l| {
                    for (n, r) in [("a", 200), ("b", 101)] {
                        l.functions.insert(
                            n.parse().unwrap(),
                            FunctionLimits {
                                reserved_concurrency: Some(r),
                                max_concurrency: None,
                            },
                        );
                    }
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut l = default_account_limits();
            mutate(&mut l);
            let e = validate_limits(&l).unwrap_err();
            assert_eq!(e.code, kiln_core::FcErrorCode::InvalidArgument);
            assert!(e.message.contains(field), "{field}: {}", e.message);
        }
    }
}
