//! Function logs: every instance's stdout and stderr, collected with the
//! request id of the call each line belongs to, kept per function with a
//! bounded retention, and served to the gateway (`GET /v1/logs`).
//!
//! Capture: the sandbox writes its console to `Sandbox::log_path` (a file
//! for containers; whatever the backend relays for microVMs). The agent
//! reads it from where it left off: before each call starts, before each
//! call ends, every [`POLL_EVERY`] in the background and when the instance
//! goes. Reading before a call ends means every line the function wrote
//! before answering is read while the call is still in flight.
//!
//! Attribution ([`attribute`]): a line that contains the request id of a
//! call in flight on the instance belongs to that call (FC's runtimes
//! prefix their log lines with it); otherwise, with exactly one call in
//! flight, to that call; otherwise the line is the instance's own.
//!
//! Where logs live: here, on the node that produced them, kept per
//! function after the instance has gone; the gateway asks every node and
//! merges. Lines never cross the network unless someone reads them, and
//! there is no second copy to keep consistent; a node that is lost takes
//! its functions' recent logs with it.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::{AccountId, Clock, FunctionName, InstanceId};
use kiln_internal_api::LogRecord;

/// How often the background reader looks at every instance's console.
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// FC's Tail: the last 4 KB of the call's log.
pub const TAIL_BYTES: usize = 4096;
/// A line longer than this is cut (a function that never writes a newline
/// must not hold memory without bound).
const LINE_MAX: usize = 16 * 1024;
/// The most of the console read at once.
const READ_CHUNK: usize = 1 << 20;

/// How much each function keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Bytes of messages per function; the oldest lines go first.
    pub max_bytes: usize,
    /// Lines older than this go.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 20,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a reader asks for.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub request_id: Option<String>,
    /// Only lines at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    pub limit: Option<usize>,
}

/// FC's framing lines, kept as what they are and written out only when
/// someone reads them: a warm call frames itself twice, and building those
/// lines (and a [`LogRecord`] each) per call was most of the agent's
/// allocations on the warm path.
const START: &str = "FC Invoke Start RequestId: ";
const END: &str = "FC Invoke End RequestId: ";

/// A kept line's text.
enum Message {
    Line(String),
    /// `FC Invoke Start RequestId: {request_id}`
    Start,
    /// `FC Invoke End RequestId: {request_id}`
    End,
}

/// One kept line. The record id (`{nonce}-{seq}`) and the message are
/// rendered when the line is read ([`Entry::record`]).
struct Entry {
    seq: u64,
    timestamp_ms: u64,
    instance: Arc<InstanceId>,
    request_id: Option<Arc<str>>,
    message: Message,
}

impl Entry {
    /// The message's length in bytes (what retention counts).
    fn len(&self) -> usize {
        let id = || self.request_id.as_deref().map_or(0, str::len);
        match &self.message {
            Message::Line(l) => l.len(),
            Message::Start => START.len() + id(),
            Message::End => END.len() + id(),
        }
    }

    fn text(&self) -> String {
        let id = self.request_id.as_deref().unwrap_or("");
        match &self.message {
            Message::Line(l) => l.clone(),
            Message::Start => format!("{START}{id}"),
            Message::End => format!("{END}{id}"),
        }
    }

    fn record(&self, nonce: &str) -> LogRecord {
        LogRecord {
            id: format!("{nonce}-{}", self.seq),
            timestamp_ms: self.timestamp_ms,
            instance_id: (*self.instance).clone(),
            request_id: self.request_id.as_deref().map(str::to_owned),
            message: self.text(),
        }
    }
}

/// One function's kept lines, oldest first. Each instance of the
/// function holds it ([`InstanceLog`]), so keeping a line takes this
/// function's lock only, not the store's.
#[derive(Default)]
struct FunctionLog {
    inner: Mutex<FunctionLines>,
}

#[derive(Default)]
struct FunctionLines {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl FunctionLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, FunctionLines> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The node's logs, per function.
pub struct LogStore {
    retention: Retention,
    clock: Arc<dyn Clock>,
    /// Distinguishes this agent process's record ids from another's.
    nonce: String,
    next_seq: AtomicU64,
    functions: Mutex<HashMap<(AccountId, FunctionName), Arc<FunctionLog>>>,
}

impl LogStore {
    pub fn new(retention: Retention, clock: Arc<dyn Clock>) -> Self {
        let nonce = format!("{:08x}", clock.now_ms() as u32 ^ std::process::id());
        Self {
            retention,
            clock,
            nonce,
            next_seq: AtomicU64::new(0),
            functions: Mutex::default(),
        }
    }

    /// The function's lines, made on first use; `None` when there are none
    /// and `create` is false.
    fn function(
        &self,
        account: &AccountId,
        function: &FunctionName,
        create: bool,
    ) -> Option<Arc<FunctionLog>> {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        let key = (account.clone(), function.clone());
        if let Some(log) = functions.get(&key) {
            return Some(log.clone());
        }
        create.then(|| functions.entry(key).or_default().clone())
    }

    /// Keep one line.
    pub fn append(
        &self,
        account: &AccountId,
        function: &FunctionName,
        instance: &InstanceId,
        request_id: Option<&str>,
        message: String,
    ) {
        let log = self
            .function(account, function, true)
            .expect("made when missing");
        self.keep(
            &log,
            Arc::new(instance.clone()),
            request_id.map(Arc::from),
            Message::Line(message),
        );
    }

    /// Keep one line in `log`.
    fn keep(
        &self,
        log: &FunctionLog,
        instance: Arc<InstanceId>,
        request_id: Option<Arc<str>>,
        message: Message,
    ) {
        let now = self.clock.now_ms();
        let mut lines = log.lock();
        // Numbered under the function's lock: its lines stay in id order.
        let entry = Entry {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed) + 1,
            timestamp_ms: now,
            instance,
            request_id,
            message,
        };
        lines.bytes += entry.len();
        lines.entries.push_back(entry);
        self.trim(&mut lines, now);
    }

    fn trim(&self, lines: &mut FunctionLines, now: u64) {
        let max_age = self.retention.max_age.as_millis() as u64;
        while let Some(first) = lines.entries.front() {
            let too_old = now.saturating_sub(first.timestamp_ms) > max_age;
            if !too_old && lines.bytes <= self.retention.max_bytes {
                break;
            }
            lines.bytes -= first.len();
            lines.entries.pop_front();
        }
    }

    /// The function's lines that match, oldest first; with a limit, the
    /// first `limit` of them.
    pub fn query(
        &self,
        account: &AccountId,
        function: &FunctionName,
        q: &LogQuery,
    ) -> Vec<LogRecord> {
        let now = self.clock.now_ms();
        let Some(log) = self.function(account, function, false) else {
            return Vec::new();
        };
        let mut lines = log.lock();
        self.trim(&mut lines, now);
        let limit = q.limit.unwrap_or(usize::MAX);
        lines
            .entries
            .iter()
            .filter(|e| q.since_ms.is_none_or(|s| e.timestamp_ms >= s))
            .filter(|e| {
                q.request_id
                    .as_deref()
                    .is_none_or(|id| e.request_id.as_deref() == Some(id))
            })
            .take(limit)
            .map(|e| e.record(&self.nonce))
            .collect()
    }
}

/// `GET /v1/logs`'s query: `accountId`, `functionName` (required),
/// `requestId`, `since` (ms), `limit`.
pub fn parse_query(
    query: Option<&str>,
) -> Result<(AccountId, FunctionName, LogQuery), kiln_core::FcError> {
    use kiln_core::FcError;
    let mut account = None;
    let mut function = None;
    let mut q = LogQuery::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        let number = |what: &str| {
            v.parse::<u64>()
                .map_err(|_| FcError::invalid_argument(format!("{what} must be a number")))
        };
        match k {
            "accountId" => {
                account = Some(
                    v.parse::<AccountId>()
                        .map_err(|e| FcError::invalid_argument(format!("accountId: {e}")))?,
                )
            }
            "functionName" => {
                function = Some(v.parse::<FunctionName>().map_err(|e| {
                    FcError::invalid_argument(format!("functionName: {}", e.reason))
                })?)
            }
            "requestId" if !v.is_empty() => q.request_id = Some(v.clone()),
            "since" => q.since_ms = Some(number("since")?),
            "limit" => q.limit = Some(number("limit")? as usize),
            _ => {}
        }
    }
    match (account, function) {
        (Some(a), Some(f)) => Ok((a, f, q)),
        _ => Err(FcError::invalid_argument(
            "accountId and functionName are required",
        )),
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Which call a line belongs to: one whose request id it contains, else
/// the only call in flight, else none (the instance's own line).
pub fn attribute<'a, S: AsRef<str>>(line: &str, in_flight: &'a [S]) -> Option<&'a str> {
    attribute_index(line, in_flight, |s| s.as_ref()).map(|i| in_flight[i].as_ref())
}

/// [`attribute`] over anything with a request id: the index of the owner.
fn attribute_index<T>(line: &str, in_flight: &[T], id: impl Fn(&T) -> &str) -> Option<usize> {
    if let Some(i) = in_flight
        .iter()
        .position(|c| !id(c).is_empty() && line.contains(id(c)))
    {
        return Some(i);
    }
    (in_flight.len() == 1).then_some(0)
}

/// One call in flight: its request id and, when the caller asked for
/// FC's Tail, its own last lines.
struct Call {
    request_id: Arc<str>,
    tail: Option<Tail>,
}

#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: String) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        // Drop a first line only while the rest still fills the tail.
        while let Some(first) = self.lines.front() {
            if self.bytes - (first.len() + 1) < TAIL_BYTES {
                break;
            }
            self.bytes -= first.len() + 1;
            self.lines.pop_front();
        }
    }

    /// The last [`TAIL_BYTES`] bytes, each line ending in a newline.
    fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        for l in &self.lines {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        if out.len() > TAIL_BYTES {
            out.drain(..out.len() - TAIL_BYTES);
        }
        out
    }
}

struct Capture {
    path: Option<PathBuf>,
    /// The console, opened once (it is never replaced while the instance
    /// lives): every call reads it at its start and end, and opening it by
    /// path each time was a measurable share of a warm call.
    file: Option<std::fs::File>,
    offset: u64,
    partial: Vec<u8>,
    calls: Vec<Call>,
}

/// Reads `buf.len()` bytes at `offset`, fewer at the end of the file or
/// on an error; how many were read.
fn read_at_most(f: &std::fs::File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    done
}

/// One instance's console, read incrementally and attributed to calls.
pub struct InstanceLog {
    instance: Arc<InstanceId>,
    store: Arc<LogStore>,
    /// The function's lines in `store`, held so that keeping a line needs
    /// neither the store's lock nor its key.
    lines: Arc<FunctionLog>,
    capture: Mutex<Capture>,
}

impl InstanceLog {
    /// `path`: the sandbox's console; `None` when the backend has none.
    /// An adopted instance (agent restart) starts at the file's end.
    pub fn new(
        store: Arc<LogStore>,
        account: AccountId,
        function: FunctionName,
        instance: InstanceId,
        path: Option<PathBuf>,
        from_end: bool,
    ) -> Self {
        let offset = match (&path, from_end) {
            (Some(p), true) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            _ => 0,
        };
        let lines = store
            .function(&account, &function, true)
            .expect("made when missing");
        Self {
            instance: Arc::new(instance),
            store,
            lines,
            capture: Mutex::new(Capture {
                path,
                file: None,
                offset,
                partial: Vec::new(),
                calls: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        self.capture.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read what the instance wrote since the last read.
    pub fn drain(&self) {
        let mut cap = self.lock();
        self.drain_locked(&mut cap, false);
    }

    fn drain_locked(&self, cap: &mut Capture, flush_partial: bool) {
        if cap.file.is_none() {
            cap.file = cap.path.as_ref().and_then(|p| std::fs::File::open(p).ok());
        }
        // In chunks: a function that wrote hundreds of MB since the last
        // read must not make the agent hold them all at once.
        loop {
            let mut more = false;
            if let Some(f) = &cap.file {
                // One fstat when nothing new was written (the common case).
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < cap.offset {
                    // Truncated: start over.
                    cap.offset = 0;
                }
                if len > cap.offset {
                    let want = ((len - cap.offset) as usize).min(READ_CHUNK);
                    let mut buf = vec![0; want];
                    let n = read_at_most(f, &mut buf, cap.offset);
                    cap.offset += n as u64;
                    cap.partial.extend_from_slice(&buf[..n]);
                    more = n == want && len > cap.offset;
                }
            }
            self.split_locked(cap, flush_partial && !more);
            if !more {
                break;
            }
        }
    }

    /// Record the complete lines of `cap.partial` (and the rest too when
    /// `flush_partial`).
    fn split_locked(&self, cap: &mut Capture, flush_partial: bool) {
        if cap.partial.is_empty() {
            return;
        }
        let mut start = 0;
        let mut lines = Vec::new();
        while let Some(pos) = cap.partial[start..].iter().position(|b| *b == b'\n') {
            lines.push(cap.partial[start..start + pos].to_vec());
            start += pos + 1;
        }
        cap.partial.drain(..start);
        while cap.partial.len() > LINE_MAX {
            let rest = cap.partial.split_off(LINE_MAX);
            lines.push(std::mem::replace(&mut cap.partial, rest));
        }
        if flush_partial && !cap.partial.is_empty() {
            lines.push(std::mem::take(&mut cap.partial));
        }
        for raw in lines {
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches('\r');
            self.record_output(cap, line);
        }
    }

    /// Keep a line of the function's output, attributed by [`attribute`].
    fn record_output(&self, cap: &mut Capture, line: &str) {
        let owner = attribute_index(line, &cap.calls, |c| &c.request_id).map(|i| &mut cap.calls[i]);
        let request_id = owner.as_ref().map(|c| c.request_id.clone());
        if let Some(tail) = owner.and_then(|c| c.tail.as_mut()) {
            tail.push(line.to_owned());
        }
        self.keep(request_id, Message::Line(line.to_owned()));
    }

    /// Keep a line of the call `call` (its framing, or its error).
    fn record_call(&self, call: &mut Call, message: Message) {
        if let Some(tail) = call.tail.as_mut() {
            let text = match &message {
                Message::Line(l) => l.clone(),
                Message::Start => format!("{START}{}", call.request_id),
                Message::End => format!("{END}{}", call.request_id),
            };
            tail.push(text);
        }
        self.keep(Some(call.request_id.clone()), message);
    }

    fn keep(&self, request_id: Option<Arc<str>>, message: Message) {
        self.store
            .keep(&self.lines, self.instance.clone(), request_id, message);
    }

    /// A call starts: FC's `FC Invoke Start RequestId:` line.
    pub fn begin(&self, request_id: &Arc<str>, want_tail: bool) {
        let mut cap = self.lock();
        // What came before belongs to the calls before.
        self.drain_locked(&mut cap, false);
        let mut call = Call {
            request_id: request_id.clone(),
            tail: want_tail.then(Tail::default),
        };
        self.record_call(&mut call, Message::Start);
        cap.calls.push(call);
    }

    /// A call ends, with the cause when the function failed without
    /// answering: FC's `FC Invoke End RequestId:` line. Answers the call's
    /// Tail when one was asked for.
    pub fn end(&self, request_id: &str, error: Option<&str>) -> Option<Vec<u8>> {
        let mut cap = self.lock();
        self.drain_locked(&mut cap, false);
        let mut call = match cap.calls.iter().position(|c| &*c.request_id == request_id) {
            Some(pos) => cap.calls.remove(pos),
            None => Call {
                request_id: Arc::from(request_id),
                tail: None,
            },
        };
        if let Some(cause) = error {
            self.record_call(&mut call, Message::Line(format!("Error: {cause}")));
        }
        self.record_call(&mut call, Message::End);
        call.tail.map(|t| t.render())
    }

    /// A line of the instance's own (not a call's): failures, exec audit.
    pub fn event(&self, message: &str) {
        let mut cap = self.lock();
        self.drain_locked(&mut cap, false);
        self.keep(None, Message::Line(message.to_owned()));
    }

    /// The console being read, while the instance lives.
    pub fn path(&self) -> Option<PathBuf> {
        self.lock().path.clone()
    }

    /// The instance is going: read the rest, an unterminated last line too.
    pub fn finish(&self) {
        let mut cap = self.lock();
        self.drain_locked(&mut cap, true);
        cap.path = None;
        cap.file = None;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use kiln_core::ManualClock;

    use super::*;

    fn store(max_bytes: usize, clock: Arc<ManualClock>) -> Arc<LogStore> {
        Arc::new(LogStore::new(
            Retention {
                max_bytes,
                max_age: Duration::from_secs(60),
            },
            clock,
        ))
    }

    fn ids() -> (AccountId, FunctionName, InstanceId) {
        (
            "1234".parse().unwrap(),
            "f".parse().unwrap(),
            InstanceId::generate(),
        )
    }

    fn messages(records: &[LogRecord]) -> Vec<(Option<String>, String)> {
        records
            .iter()
            .map(|r| (r.request_id.clone(), r.message.clone()))
            .collect()
    }

    #[test]
    fn attribution_prefers_the_id_in_the_line_then_the_only_call() {
        let calls = vec!["r-1".to_owned(), "r-2".to_owned()];
        assert_eq!(attribute("r-2 working", &calls), Some("r-2"));
        assert_eq!(attribute("no id here", &calls), None);
        assert_eq!(attribute("no id here", &calls[..1]), Some("r-1"));
        assert_eq!(attribute::<String>("anything", &[]), None);
    }

    #[test]
    fn concurrent_calls_get_their_own_lines_and_tails() {
        let clock = Arc::new(ManualClock::new(1_000));
        let store = store(1 << 20, clock.clone());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut console = std::fs::File::create(&path).unwrap();
        let (a, f, i) = ids();
        let log = InstanceLog::new(store.clone(), a.clone(), f.clone(), i, Some(path), false);
        writeln!(console, "listening on 9000").unwrap();
        log.begin(&"req-a".into(), true);
        writeln!(console, "req-a: only call so far").unwrap();
        log.drain();
        log.begin(&"req-b".into(), true);
        writeln!(console, "req-b: step 1").unwrap();
        writeln!(console, "req-a: step 1").unwrap();
        writeln!(console, "whose line is this").unwrap();
        write!(console, "req-b: half a ").unwrap();
        log.drain();
        writeln!(console, "line").unwrap();
        let tail_a = log.end("req-a", None).unwrap();
        writeln!(console, "after a ended").unwrap();
        let tail_b = log
            .end("req-b", Some("Function timed out after 3 seconds"))
            .unwrap();

        let all = store.query(&a, &f, &LogQuery::default());
        let owner_of = |m: &str| {
            all.iter()
                .find(|r| r.message == m)
                .unwrap_or_else(|| panic!("{m} missing"))
                .request_id
                .clone()
        };
        assert_eq!(owner_of("listening on 9000"), None);
        assert_eq!(
            owner_of("req-a: only call so far").as_deref(),
            Some("req-a")
        );
        assert_eq!(owner_of("req-b: step 1").as_deref(), Some("req-b"));
        assert_eq!(owner_of("req-a: step 1").as_deref(), Some("req-a"));
        assert_eq!(owner_of("whose line is this"), None);
        assert_eq!(owner_of("req-b: half a line").as_deref(), Some("req-b"));
        assert_eq!(owner_of("after a ended").as_deref(), Some("req-b"));

        assert_eq!(
            String::from_utf8(tail_a).unwrap(),
            "FC Invoke Start RequestId: req-a\nreq-a: only call so far\nreq-a: step 1\n\
             FC Invoke End RequestId: req-a\n"
        );
        assert_eq!(
            String::from_utf8(tail_b).unwrap(),
            "FC Invoke Start RequestId: req-b\nreq-b: step 1\nreq-b: half a line\n\
             after a ended\nError: Function timed out after 3 seconds\n\
             FC Invoke End RequestId: req-b\n"
        );
        let only_b = store.query(
            &a,
            &f,
            &LogQuery {
                request_id: Some("req-b".into()),
                ..Default::default()
            },
        );
        assert_eq!(only_b.len(), 6, "{:?}", messages(&only_b));
        assert!(only_b
            .iter()
            .all(|r| r.request_id.as_deref() == Some("req-b")));
    }

    #[test]
    fn tail_is_the_last_4_kb_of_the_call() {
        let clock = Arc::new(ManualClock::new(1_000));
        let store = store(1 << 20, clock);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut console = std::fs::File::create(&path).unwrap();
        let (a, f, i) = ids();
        let log = InstanceLog::new(store, a, f, i, Some(path), false);
        log.begin(&"r".into(), true);
        for n in 0..500 {
            writeln!(console, "line {n:04}").unwrap();
        }
        let tail = log.end("r", None).unwrap();
        assert_eq!(tail.len(), TAIL_BYTES);
        let text = String::from_utf8(tail).unwrap();
        assert!(
            text.ends_with("line 0499\nFC Invoke End RequestId: r\n"),
            "{text}"
        );
        assert!(!text.contains("Invoke Start"));
        // A call without Tail gets none.
        log.begin(&"s".into(), false);
        assert_eq!(log.end("s", None), None);
    }

    #[test]
    fn retention_drops_the_oldest_by_size_and_by_age() {
        let clock = Arc::new(ManualClock::new(1_000));
        let store = store(100, clock.clone());
        let (a, f, i) = ids();
        for n in 0..20 {
            store.append(&a, &f, &i, None, format!("message {n:02}"));
        }
        let kept = store.query(&a, &f, &LogQuery::default());
        let total: usize = kept.iter().map(|r| r.message.len()).sum();
        assert!(total <= 100, "{total}");
        assert_eq!(kept.last().unwrap().message, "message 19");
        assert_eq!(
            kept.first().unwrap().message,
            format!("message {:02}", 20 - kept.len())
        );
        // Another function's lines are kept apart.
        let other: FunctionName = "g".parse().unwrap();
        store.append(&a, &other, &i, None, "g's".into());
        assert_eq!(store.query(&a, &other, &LogQuery::default()).len(), 1);
        // Older than a minute: gone.
        clock.advance(Duration::from_secs(61));
        store.append(&a, &f, &i, None, "fresh".into());
        assert_eq!(
            messages(&store.query(&a, &f, &LogQuery::default())),
            vec![(None, "fresh".to_owned())]
        );
        assert!(store.query(&a, &other, &LogQuery::default()).is_empty());
        // since and limit.
        store.append(&a, &f, &i, None, "fresher".into());
        let q = LogQuery {
            since_ms: Some(clock.now_ms()),
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(store.query(&a, &f, &q).len(), 1);
    }

    #[test]
    fn framing_lines_read_as_written_and_count_at_their_length() {
        // One call's Start and End take exactly this many bytes, so the
        // store keeps the last call's framing and nothing older.
        let one_call =
            "FC Invoke Start RequestId: r-1".len() + "FC Invoke End RequestId: r-1".len();
        let clock = Arc::new(ManualClock::new(1_000));
        let store = store(one_call, clock);
        let (a, f, i) = ids();
        let log = InstanceLog::new(store.clone(), a.clone(), f.clone(), i.clone(), None, false);
        for n in 1..=2 {
            let id: Arc<str> = format!("r-{n}").into();
            log.begin(&id, false);
            assert_eq!(log.end(&id, None), None);
        }
        let kept = store.query(&a, &f, &LogQuery::default());
        assert_eq!(
            messages(&kept),
            [
                (
                    Some("r-2".to_owned()),
                    "FC Invoke Start RequestId: r-2".to_owned()
                ),
                (
                    Some("r-2".to_owned()),
                    "FC Invoke End RequestId: r-2".to_owned()
                ),
            ]
        );
        assert!(kept.iter().all(|r| r.instance_id == i));
        assert_ne!(kept[0].id, kept[1].id);
        assert_eq!(kept[0].id.split_once('-').map(|(n, _)| n.len()), Some(8));
        // An End without its Start (never expected) is still written.
        assert_eq!(log.end("r-9", Some("gone")), None);
        let last = store.query(&a, &f, &LogQuery::default());
        assert_eq!(last.last().unwrap().message, "FC Invoke End RequestId: r-9");
    }

    #[test]
    fn finish_keeps_an_unterminated_last_line() {
        let clock = Arc::new(ManualClock::new(1_000));
        let store = store(1 << 20, clock);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "Traceback: boom").unwrap();
        let (a, f, i) = ids();
        let log = InstanceLog::new(store.clone(), a.clone(), f.clone(), i, Some(path), false);
        log.drain();
        assert!(store.query(&a, &f, &LogQuery::default()).is_empty());
        log.finish();
        let all = store.query(&a, &f, &LogQuery::default());
        assert_eq!(all[0].message, "Traceback: boom");
    }

    #[test]
    fn the_console_is_followed_through_appends_and_a_truncation() {
        let clock = Arc::new(ManualClock::new(1_000));
        let store = store(1 << 20, clock);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (a, f, i) = ids();
        // Created after the log: opened on the first read that finds it.
        let log = InstanceLog::new(
            store.clone(),
            a.clone(),
            f.clone(),
            i,
            Some(path.clone()),
            false,
        );
        log.drain();
        std::fs::write(&path, "one\n").unwrap();
        log.drain();
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        out.write_all(b"two\nthr").unwrap();
        log.drain();
        out.write_all(b"ee\n").unwrap();
        log.drain();
        // Truncated and rewritten shorter: read again from the start.
        std::fs::write(&path, "4\n").unwrap();
        log.drain();
        let lines: Vec<String> = store
            .query(&a, &f, &LogQuery::default())
            .into_iter()
            .map(|r| r.message)
            .collect();
        assert_eq!(lines, ["one", "two", "three", "4"]);
    }
}
