//! CPU time per call, per service, read from `/proc`.
//!
//! `kiln bench` runs the services in its own process, each on a runtime of
//! its own whose threads carry the service's name (see
//! `crate::service_runtime`); a service's CPU time is the sum over its
//! threads in `/proc/self/task`, the load generator's threads excluded.
//! The nginx peer is separate processes: its master and workers are
//! summed. Each task's time is its scheduler run time
//! (`schedstat`, nanoseconds), or `utime + stime` from `stat` (clock
//! ticks) on kernels without schedstat.
//!
//! Context switches (voluntary and not, from each task's `status`) are
//! read beside it: on a machine where the load generator, both hops and
//! the function share few cores, about half of a hop's CPU is the kernel's,
//! much of it switching between them, and the count per call says how
//! often a hop sleeps and is woken where the CPU figure cannot.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::commands::dev::{AGENT_THREADS, GATEWAY_THREADS, SCHEDULER_THREADS};

/// The services whose CPU per call `kiln bench` reports, in print order.
pub const SERVICES: [&str; 3] = ["gateway", "agent", "scheduler"];

/// The service a thread of this process works for, by the thread's name
/// (the services' own helper threads included).
pub fn service_of(thread_name: &str) -> Option<&'static str> {
    match thread_name {
        GATEWAY_THREADS => Some("gateway"),
        // The async queue's writer and checkpointer (names cut to 15 bytes).
        n if n.starts_with("kiln-queue-") => Some("gateway"),
        AGENT_THREADS | "kiln-disk-pool" => Some("agent"),
        SCHEDULER_THREADS => Some("scheduler"),
        _ => None,
    }
}

/// `utime + stime` of a `/proc/PID/stat` line, in clock ticks. The
/// command name (field 2) may hold spaces and parentheses: fields are
/// counted from the last `)`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The parent PID of a `/proc/PID/stat` line.
pub fn stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Time on a CPU from a `/proc/.../schedstat` line, in nanoseconds.
pub fn schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// Linux reports `stat` times in USER_HZ, which is 100 on every
/// architecture Kiln runs on.
const USER_HZ: u64 = 100;

/// What a task (or a sum of tasks) has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu: Duration,
    /// Context switches, voluntary (it slept) and involuntary (it was
    /// preempted).
    pub switches: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        self.cpu += other.cpu;
        self.switches += other.switches;
    }
}

impl std::iter::Sum for Usage {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        let mut total = Self::default();
        for u in iter {
            total += u;
        }
        total
    }
}

/// Voluntary plus involuntary context switches of a `/proc/.../status`.
pub fn status_switches(status: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some(field("voluntary_ctxt_switches")? + field("nonvoluntary_ctxt_switches")?)
}

/// The CPU time of one task (`/proc/PID/task/TID`).
fn task_cpu(task: &Path) -> Option<Duration> {
    if let Some(ns) = std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| schedstat_ns(&s))
    {
        return Some(Duration::from_nanos(ns));
    }
    let ticks = stat_ticks(&std::fs::read_to_string(task.join("stat")).ok()?)?;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / USER_HZ))
}

/// What one task has used so far.
fn task_usage(task: &Path) -> Option<Usage> {
    Some(Usage {
        cpu: task_cpu(task)?,
        switches: status_switches(&std::fs::read_to_string(task.join("status")).ok()?)?,
    })
}

/// Each task of process `pid`: its name and what it has used so far.
fn tasks(pid: &str) -> Vec<(String, Usage)> {
    let dir = Path::new("/proc").join(pid).join("task");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            Some((name.trim_end().to_owned(), task_usage(&path)?))
        })
        .collect()
}

/// Usage so far of this process's threads, summed per service.
pub fn services_now() -> BTreeMap<&'static str, Usage> {
    sum_by_service(tasks("self"))
}

/// Per-thread times summed per [`service_of`]; other threads are left out.
pub fn sum_by_service(
    threads: impl IntoIterator<Item = (String, Usage)>,
) -> BTreeMap<&'static str, Usage> {
    let mut out = BTreeMap::new();
    for (name, cpu) in threads {
        if let Some(service) = service_of(&name) {
            *out.entry(service).or_default() += cpu;
        }
    }
    out
}

/// Usage so far of process `pid` and its children (nginx's master and
/// workers), every thread of each.
pub fn process_tree_now(pid: u32) -> Usage {
    let mut pids = vec![pid.to_string()];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        pids.extend(entries.flatten().filter_map(|e| {
            let child = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            (stat_ppid(&stat)? == pid).then(|| child.to_string())
        }));
    }
    pids.iter()
        .flat_map(|p| tasks(p))
        .map(|(_, usage)| usage)
        .sum()
}

/// Microseconds of CPU per call between two readings over `calls` calls.
pub fn per_call_us(before: Duration, after: Duration, calls: usize) -> f64 {
    if calls == 0 {
        return 0.0;
    }
    after.saturating_sub(before).as_secs_f64() * 1e6 / calls as f64
}

/// Context switches per call between two readings over `calls` calls.
pub fn switches_per_call(before: u64, after: u64, calls: usize) -> f64 {
    if calls == 0 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / calls as f64
}

/// Per-service microseconds of CPU and context switches per call between
/// two [`services_now`] readings; every service of [`SERVICES`] is
/// present in both.
pub fn services_per_call(
    before: &BTreeMap<&'static str, Usage>,
    after: &BTreeMap<&'static str, Usage>,
    calls: usize,
) -> (BTreeMap<&'static str, f64>, BTreeMap<&'static str, f64>) {
    let at = |m: &BTreeMap<&'static str, Usage>, s: &str| m.get(s).copied().unwrap_or_default();
    SERVICES
        .iter()
        .map(|s| {
            let (b, a) = (at(before, s), at(after, s));
            (
                (*s, per_call_us(b.cpu, a.cpu, calls)),
                (*s, switches_per_call(b.switches, a.switches, calls)),
            )
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_attributed_to_their_service() {
        assert_eq!(service_of("kiln-gateway"), Some("gateway"));
        assert_eq!(service_of("kiln-queue-writ"), Some("gateway"));
        assert_eq!(service_of("kiln-agent"), Some("agent"));
        assert_eq!(service_of("kiln-disk-pool"), Some("agent"));
        assert_eq!(service_of("kiln-scheduler"), Some("scheduler"));
        assert_eq!(service_of("kiln-loadgen"), None);
        assert_eq!(service_of("kiln"), None);
        assert_eq!(service_of("kiln-gateway-x"), None);
    }

    #[test]
    fn stat_times_are_read_after_the_last_parenthesis() {
        // A name with a space and a ')' in it: `(a) b)`.
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 9 0 1000 \
                    1000000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_ticks(stat), Some(1234 + 567));
        assert_eq!(stat_ppid(stat), Some(1));
        assert_eq!(stat_ticks("garbage"), None);
        assert_eq!(stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn switches_are_both_kinds_summed() {
        let status = "Name:\tkiln-agent\nState:\tS (sleeping)\n\
                      voluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_switches(status), Some(127));
        assert_eq!(status_switches("voluntary_ctxt_switches:\t1\n"), None);
        assert_eq!(status_switches(""), None);
    }

    #[test]
    fn schedstat_gives_nanoseconds_on_cpu() {
        assert_eq!(schedstat_ns("123456789 5000 42\n"), Some(123_456_789));
        assert_eq!(schedstat_ns(""), None);
    }

    #[test]
    fn per_service_sums_leave_other_threads_out() {
        let u = |ms: u64, switches: u64| Usage {
            cpu: Duration::from_millis(ms),
            switches,
        };
        let sums = sum_by_service([
            ("kiln-gateway".to_owned(), u(10, 3)),
            ("kiln-gateway".to_owned(), u(5, 4)),
            ("kiln-queue-writ".to_owned(), u(1, 1)),
            ("kiln-agent".to_owned(), u(7, 2)),
            ("kiln-loadgen".to_owned(), u(100, 50)),
        ]);
        assert_eq!(sums.get("gateway"), Some(&u(16, 8)));
        assert_eq!(sums.get("agent"), Some(&u(7, 2)));
        assert_eq!(sums.get("scheduler"), None);
    }

    #[test]
    fn per_call_is_the_difference_over_the_calls() {
        let ms = Duration::from_millis;
        assert_eq!(per_call_us(ms(100), ms(900), 10_000), 80.0);
        assert_eq!(per_call_us(ms(100), ms(900), 0), 0.0);
        // A reading that went backwards (a thread ended) is not negative.
        assert_eq!(per_call_us(ms(900), ms(100), 10), 0.0);
        let u = |ms: u64, switches: u64| Usage {
            cpu: Duration::from_millis(ms),
            switches,
        };
        let before = BTreeMap::from([("gateway", u(10, 100))]);
        let after = BTreeMap::from([("gateway", u(30, 1100)), ("agent", u(20, 500))]);
        let (cpu, switches) = services_per_call(&before, &after, 1000);
        assert_eq!(cpu["gateway"], 20.0);
        assert_eq!(cpu["agent"], 20.0);
        assert_eq!(cpu["scheduler"], 0.0);
        assert_eq!(switches["gateway"], 1.0);
        assert_eq!(switches["agent"], 0.5);
        assert_eq!(switches["scheduler"], 0.0);
        assert_eq!(switches_per_call(10, 5, 10), 0.0);
        assert_eq!(switches_per_call(10, 20, 0), 0.0);
    }

    #[test]
    fn this_process_reads_its_own_threads() {
        let before = process_tree_now(std::process::id());
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_tree_now(std::process::id()).cpu > before.cpu);
        let named = std::thread::Builder::new()
            .name("kiln-agent".into())
            .spawn(|| {
                let mut x = 0u64;
                for i in 0..5_000_000u64 {
                    x = x.wrapping_mul(31).wrapping_add(i);
                }
                std::hint::black_box(x);
                // Each sleep is a voluntary context switch.
                for _ in 0..3 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                services_now()
            })
            .unwrap()
            .join()
            .unwrap();
        let agent = named.get("agent").copied().unwrap_or_default();
        assert!(!agent.cpu.is_zero(), "{agent:?}");
        assert!(agent.switches >= 3, "{agent:?}");
    }
}
