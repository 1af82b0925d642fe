//! A real PostgreSQL server for a test: Debian's `postgresql` package
//! (`initdb` and `pg_ctl` from `/usr/lib/postgresql/<version>/bin`), a
//! fresh cluster in a temporary directory, listening on a unix socket
//! only (no TCP port, nothing another test or host can reach), run as the
//! `postgres` user (PostgreSQL refuses to run as root), and stopped and
//! removed when the handle drops, even when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::skip::{skip, Category};

/// A running throwaway PostgreSQL cluster.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl PgServer {
    /// Start one, or skip the calling test (returning `None`) when this
    /// machine cannot: not root (the server runs as `postgres`), or no
    /// PostgreSQL installed (`scripts/install-deps.sh` installs it).
    pub fn start() -> Option<PgServer> {
        Self::start_with(false)
    }

    /// [`Self::start`] with the durability of production (fsync and
    /// synchronous commit on) and its data under /var/tmp (a disk, not a
    /// tmpfs): for benchmarks whose figures depend on commit costs. It
    /// loads `pg_stat_statements` when installed, for a benchmark to say
    /// where the server's time went.
    pub fn start_durable() -> Option<PgServer> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Option<PgServer> {
        if !crate::is_root() {
            skip(
                Category::Root,
                "needs root to run PostgreSQL as the postgres user",
            );
            return None;
        }
        let Some(bin) = server_bin() else {
            skip(
                Category::Tool,
                "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb); scripts/install-deps.sh installs it",
            );
            return None;
        };
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("kiln-pg-");
            b
        };
        let dir = if durable {
            builder.tempdir_in("/var/tmp")
        } else {
            builder.tempdir()
        }
        .expect("temporary directory");
        // The postgres user must reach its data and socket directories.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let server = PgServer { dir, bin };
        std::fs::create_dir(server.socket_dir()).expect("socket directory");
        chown_postgres(server.dir.path());
        chown_postgres(&server.socket_dir());
        server.as_postgres(
            "initdb",
            &[
                "-D",
                server.data_dir().to_str().unwrap(),
                "-U",
                "kiln",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let mut options = format!(
            "-k {} -c listen_addresses='' -c fsync={on} -c synchronous_commit={on} -c max_connections=200",
            server.socket_dir().display(),
            on = if durable { "on" } else { "off" },
        );
        // A benchmark's server counts what each statement cost, when the
        // package ships the module (Debian's does).
        if durable && server.bin.join("../lib/pg_stat_statements.so").exists() {
            options.push_str(" -c shared_preload_libraries=pg_stat_statements");
        }
        server.as_postgres(
            "pg_ctl",
            &[
                "-D",
                server.data_dir().to_str().unwrap(),
                "-l",
                server.dir.path().join("server.log").to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        Some(server)
    }

    /// The unix socket's directory (the `host` of a connection).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The cluster's data directory (postmaster.pid names its server).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A connection string for `database` as the `kiln` superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host={} user=kiln dbname={database}",
            self.socket_dir().display()
        )
    }

    /// Create an empty database (each test takes its own).
    pub fn create_database(&self, name: &str) -> String {
        let status = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                self.socket_dir().to_str().unwrap(),
                "-U",
                "kiln",
                name,
            ])
            .status()
            .expect("run createdb");
        assert!(status.success(), "createdb {name} failed");
        self.url(name)
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Make `user` (a new role, owning a new database of the same name)
    /// log in with `password` only (SCRAM-SHA-256), the superuser `kiln`
    /// keeping trust; for tests of password handling.
    pub fn require_password(&self, user: &str, password: &str) {
        let psql = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                self.socket_dir().to_str().unwrap(),
                "-U",
                "kiln",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!(
                "SET password_encryption = 'scram-sha-256'; \
                 CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'"
            ))
            .output()
            .expect("run psql");
        assert!(
            psql.status.success(),
            "{}",
            String::from_utf8_lossy(&psql.stderr)
        );
        let created = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                self.socket_dir().to_str().unwrap(),
                "-U",
                "kiln",
                "-O",
                user,
                user,
            ])
            .status()
            .expect("run createdb");
        assert!(created.success(), "createdb {user} failed");
        let hba = self.data_dir().join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        std::fs::write(&hba, format!("local all {user} scram-sha-256\n{rules}"))
            .expect("write pg_hba.conf");
        self.as_postgres(
            "pg_ctl",
            &["-D", self.data_dir().to_str().unwrap(), "reload"],
        );
        // The reload is asynchronous: wait until the rule bites.
        for _ in 0..50 {
            let probe = Command::new(self.bin.join("psql"))
                .args([
                    "-h",
                    self.socket_dir().to_str().unwrap(),
                    "-U",
                    user,
                    "-d",
                    "postgres",
                    "-w",
                    "-c",
                    "SELECT 1",
                ])
                .env_remove("PGPASSWORD")
                .output()
                .expect("run psql");
            if !probe.status.success() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("pg_hba.conf reload never took effect");
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate: a test's data is thrown away anyway.
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The newest installed server's bin directory.
fn server_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown postgres {}", path.display());
}
