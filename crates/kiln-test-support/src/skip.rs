//! Skipping a test, by reason, with a CI policy.
//!
//! A skipped test passes, so a green run can hide that a whole suite never
//! ran. Every skip therefore names its [`Category`]; under `CI=true` a skip
//! is a failure unless [`Category::allowed_in_ci`] (what CI machines cannot
//! do); and each skip is appended as one tab-separated line
//! (`category`, `test`, `reason`) to the file `$KILN_SKIP_LOG` names, which
//! `scripts/test.sh` summarises after the run.

use std::fmt;
use std::io::Write;

/// Why a test cannot run here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The test needs root (namespaces, mounts, cgroups, chown).
    Root,
    /// A host tool or package is missing (`scripts/install-deps.sh`
    /// installs it).
    Tool,
    /// The official FC SDK is not set up (`KILN_FC_SDK_PYTHON`;
    /// `scripts/test.sh` makes its virtualenv).
    Sdk,
    /// The kernel lacks a feature (AF_VSOCK, a cgroup controller).
    Kernel,
    /// A build product the test needs is missing (a helper binary, the
    /// guest image).
    Artifact,
    /// Booting a KVM guest: nested virtualisation makes no progress on
    /// these machines. `KILN_REQUIRE_KVM=1` makes it a failure anyway.
    Kvm,
    /// A real cloud-hypervisor binary: not in Debian's packages, and
    /// nothing built from its source is committed.
    CloudHypervisor,
}

impl Category {
    /// The name in messages and in the skip log.
    pub fn name(self) -> &'static str {
        match self {
            Category::Root => "root",
            Category::Tool => "tool",
            Category::Sdk => "sdk",
            Category::Kernel => "kernel",
            Category::Artifact => "artifact",
            Category::Kvm => "kvm",
            Category::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// What CI machines cannot provide, so a skip stays a skip there.
    pub fn allowed_in_ci(self) -> bool {
        matches!(self, Category::Kvm | Category::CloudHypervisor)
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the skip policy reads from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `CI=true` (or `1`): skips outside the allowed categories fail.
    pub ci: bool,
    /// `KILN_REQUIRE_KVM` set: a KVM skip fails too, CI or not.
    pub require_kvm: bool,
    /// `KILN_SKIP_LOG`: the file each skip is appended to.
    pub log: Option<std::path::PathBuf>,
}

impl Policy {
    pub fn from_env() -> Self {
        let ci = std::env::var("CI")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
        Self {
            ci,
            require_kvm: std::env::var_os("KILN_REQUIRE_KVM").is_some_and(|v| !v.is_empty()),
            log: std::env::var_os("KILN_SKIP_LOG")
                .filter(|v| !v.is_empty())
                .map(Into::into),
        }
    }

    /// Whether a skip of `category` must fail the test instead.
    pub fn refuses(&self, category: Category) -> bool {
        (category == Category::Kvm && self.require_kvm) || (self.ci && !category.allowed_in_ci())
    }
}

/// Skip the calling test because of `why` (the caller returns right
/// after): print it, log it, or panic when the policy refuses this skip.
/// The test's name is the test thread's name, as libtest and nextest set it.
#[track_caller]
pub fn skip(category: Category, why: impl fmt::Display) {
    skip_with(&Policy::from_env(), category, &why.to_string());
}

/// [`skip`] against an explicit policy.
#[track_caller]
pub fn skip_with(policy: &Policy, category: Category, why: &str) {
    let test = current_test();
    if policy.refuses(category) {
        panic!(
            "{test} cannot run here ({category}): {why}. A skip is a failure under CI=true \
             (only {} skips are allowed there) and for KVM under KILN_REQUIRE_KVM",
            allowed_names()
        );
    }
    eprintln!("SKIPPED {test} [{category}]: {why}");
    if let Some(path) = &policy.log {
        // One write per line with O_APPEND: tests running in parallel
        // processes do not interleave inside a line.
        let line = log_line(category, &test, why);
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("cannot append the skip to {}: {e}", path.display());
        }
    }
}

/// One skip-log line: category, test and reason, tab-separated (tabs and
/// newlines in the reason become spaces).
pub fn log_line(category: Category, test: &str, why: &str) -> String {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    format!("{category}\t{}\t{}\n", clean(test), clean(why))
}

fn current_test() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_owned)
        .unwrap_or_else(|| {
            // Tests run on the main thread (--test-threads=1 under some
            // harnesses): the executable names the suite at least.
            std::env::args()
                .next()
                .and_then(|a| {
                    std::path::Path::new(&a)
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| "unknown test".into())
        })
}

fn allowed_names() -> String {
    ALL.iter()
        .filter(|c| c.allowed_in_ci())
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(" and ")
}

const ALL: [Category; 7] = [
    Category::Root,
    Category::Tool,
    Category::Sdk,
    Category::Kernel,
    Category::Artifact,
    Category::Kvm,
    Category::CloudHypervisor,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn ci() -> Policy {
        Policy {
            ci: true,
            ..Policy::default()
        }
    }

    #[test]
    fn under_ci_a_skip_panics_unless_its_category_is_allowed() {
        for category in ALL {
            let outcome = std::panic::catch_unwind(|| skip_with(&ci(), category, "because"));
            assert_eq!(
                outcome.is_err(),
                !matches!(category, Category::Kvm | Category::CloudHypervisor),
                "{category}"
            );
        }
    }

    #[test]
    fn outside_ci_every_category_skips() {
        for category in ALL {
            skip_with(&Policy::default(), category, "because");
        }
    }

    #[test]
    fn require_kvm_refuses_a_kvm_skip_even_outside_ci() {
        let policy = Policy {
            require_kvm: true,
            ..Policy::default()
        };
        assert!(policy.refuses(Category::Kvm));
        assert!(!policy.refuses(Category::CloudHypervisor));
        assert!(!policy.refuses(Category::Root));
        let both = Policy {
            require_kvm: true,
            ..ci()
        };
        assert!(both.refuses(Category::Kvm));
        assert!(!both.refuses(Category::CloudHypervisor));
    }

    #[test]
    fn a_skip_appends_one_clean_line_to_the_log() {
        let dir = std::env::temp_dir().join(format!("kiln-skip-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        let policy = Policy {
            log: Some(log.clone()),
            ..Policy::default()
        };
        skip_with(&policy, Category::Tool, "`nft` is not installed");
        skip_with(&policy, Category::Kvm, "nested\tguests\nhang");
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let test = std::thread::current().name().unwrap().to_owned();
        assert_eq!(
            text,
            format!("tool\t{test}\t`nft` is not installed\nkvm\t{test}\tnested guests hang\n")
        );
        // A refused skip panics before it is logged.
        assert!(std::panic::catch_unwind(|| skip_with(&ci(), Category::Root, "x")).is_err());
    }

    #[test]
    fn names_are_stable_for_the_summary() {
        let names: Vec<_> = ALL.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "root",
                "tool",
                "sdk",
                "kernel",
                "artifact",
                "kvm",
                "cloud-hypervisor"
            ]
        );
        assert_eq!(allowed_names(), "kvm and cloud-hypervisor");
    }
}
