//! `kiln-init`: PID 1 of a pre-made container sandbox (see
//! `kiln_sandbox::container::premade`).
//!
//! Started by runc with the runtime's root filesystem, namespaces, cgroup,
//! seccomp filter and capabilities already in place, it blocks opening the
//! assignment FIFO that the agent binds at `/dev/.kiln/assign` until the
//! sandbox is claimed, reads ONE assignment to end of file, and execs the
//! function's command in its own place: the function is PID 1 with this
//! process's pid, stdout and stderr, exactly as when runc starts it.
//!
//! Std only and linked statically (the `custom` runtime's root filesystem
//! has no C library): `build.rs` compiles it and the driver embeds it.
//!
//! Assignment format (`v1`): NUL-terminated strings, `kiln-assign-v1`, the
//! working directory, the argument count in decimal, the arguments, the
//! environment count, the environment entries (`NAME=value`).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{exit, Command};

const FIFO: &str = "/dev/.kiln/assign";
const MAGIC: &str = "kiln-assign-v1";
/// Far above FC's limits on environment and command size.
const MAX_BYTES: u64 = 4 << 20;

pub(crate) struct Assignment {
    pub(crate) cwd: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
}

pub(crate) fn parse(bytes: &[u8]) -> Result<Assignment, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "assignment is not UTF-8".to_owned())?;
    let mut fields = text.split_terminator('\0');
    let mut next = |what: &str| {
        fields
            .next()
            .ok_or_else(|| format!("assignment ends before {what}"))
    };
    if next("its header")? != MAGIC {
        return Err("assignment has an unknown header".into());
    }
    let cwd = next("the working directory")?.to_owned();
    let count = |s: &str| s.parse::<usize>().map_err(|_| format!("bad count {s:?}"));
    let argc = count(next("the argument count")?)?;
    let mut args = Vec::with_capacity(argc.min(4096));
    for _ in 0..argc {
        args.push(next("an argument")?.to_owned());
    }
    let envc = count(next("the environment count")?)?;
    let mut env = Vec::with_capacity(envc.min(4096));
    for _ in 0..envc {
        let entry = next("an environment entry")?;
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| format!("environment entry without '=': {entry:?}"))?;
        env.push((k.to_owned(), v.to_owned()));
    }
    if args.is_empty() {
        return Err("assignment has no command".into());
    }
    Ok(Assignment { cwd, args, env })
}

fn main() {
    // Blocks until the agent opens the FIFO to write the assignment.
    let mut bytes = Vec::new();
    let read = std::fs::File::open(FIFO).and_then(|f| f.take(MAX_BYTES).read_to_end(&mut bytes));
    if let Err(e) = read {
        eprintln!("kiln-init: cannot read the assignment from {FIFO}: {e}");
        exit(126);
    }
    let a = match parse(&bytes) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kiln-init: {e}");
            exit(126);
        }
    };
    // `exec` resolves a bare command name on the new PATH, sets the
    // working directory and replaces this process; it returns only on
    // failure.
    let err = Command::new(&a.args[0])
        .args(&a.args[1..])
        .env_clear()
        .envs(a.env)
        .current_dir(&a.cwd)
        .exec();
    eprintln!("kiln-init: cannot execute {:?}: {err}", a.args[0]);
    exit(127);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_parse_and_bad_ones_are_refused() {
        let a = parse(b"kiln-assign-v1\0/code\x002\0/code/server\0-x\x001\0A=b=c\0").unwrap();
        assert_eq!(a.cwd, "/code");
        assert_eq!(a.args, ["/code/server", "-x"]);
        assert_eq!(a.env, [("A".to_owned(), "b=c".to_owned())]);
        assert!(parse(b"kiln-assign-v0\0/\x001\0x\x000\0").is_err());
        assert!(parse(b"kiln-assign-v1\0/\x002\0x\0").is_err());
        assert!(parse(b"kiln-assign-v1\0/\x000\x000\0").is_err());
        assert!(parse(b"kiln-assign-v1\0/\x001\0x\x001\0NOEQUALS\0").is_err());
    }
}
