//! The audit log: who reached (or was refused) which system, as SAP's Cloud Connector keeps it.
//!
//! Levels follow SAP's product: `SECURITY` (the default) records every denied request, `ALL`
//! records allowed ones too, `OFF` records nothing. Lines go to `<dir>/<subaccount>/audit-log_<date>.csv`,
//! one file per UTC day, and to the `ferry::audit` tracing target.
//!
//! Tamper evidence: each line ends with `sha256(previous line's hash ‖ this line without its
//! hash)` in hex, the first line of a file chaining from 64 zeros, so removing, reordering or
//! editing a line breaks every later hash. [`verify_file`] checks a file.
//!
//! Writing happens on a blocking thread fed by a bounded channel: a slow disk applies
//! backpressure to requests rather than dropping audit lines.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[repr(u8)]
pub enum AuditLevel {
    Off,
    /// Denied requests only (SAP's default).
    #[default]
    Security,
    /// Every request, allowed or denied.
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
}

/// One audited request.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub outcome: Outcome,
    pub request_id: String,
    /// OAuth client id of the app, as the proxy saw it.
    pub client: String,
    /// Virtual `host:port`.
    pub system: String,
    /// `HTTP` or `TCP`.
    pub protocol: &'static str,
    pub method: String,
    pub path: String,
    pub reason: String,
}

impl AuditLevel {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => AuditLevel::Off,
            2 => AuditLevel::All,
            _ => AuditLevel::Security,
        }
    }
}

/// One configuration change (SAP's categories such as `BackendMapping`, `AllowedResource`,
/// `Account`, `SCCPassword`, `AuditLogLevel`, `PrincipalPropagationConfiguration`). Recorded at
/// levels `SECURITY` and `ALL`.
#[derive(Clone, Debug)]
pub struct ChangeEvent {
    pub category: &'static str,
    /// The administrator who made the change.
    pub user: String,
    /// `created`, `changed`, `deleted`, ...
    pub action: &'static str,
    /// Subaccount the change belongs to ("" for connector-wide settings).
    pub subaccount: String,
    /// What was changed, e.g. `erp.virtual:443` or `erp.virtual:443/sap/opu`.
    pub object: String,
    /// Free text, never a secret.
    pub detail: String,
}

enum Entry {
    Access(AuditEvent),
    Change(ChangeEvent),
}

pub(crate) const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub(crate) const HEADER: &str =
    "timestamp,event,subaccount,location,request_id,client,system,protocol,method,path,reason,chain";

/// Where and how much to audit.
#[derive(Clone, Debug, Default)]
pub struct AuditConfig {
    pub level: AuditLevel,
    /// Folder for the CSV files; `None` logs to tracing only.
    pub dir: Option<PathBuf>,
}

/// A handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    /// Shared by the clones, so a level change applies to every holder at once.
    level: std::sync::Arc<std::sync::atomic::AtomicU8>,
    subaccount: String,
    location: String,
    tx: Option<mpsc::Sender<(SystemTime, Entry)>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("level", &self.level()).field("to_file", &self.tx.is_some()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot create the audit log folder {0}: {1}")]
    Folder(PathBuf, std::io::Error),
}

impl AuditLog {
    /// Starts the writer (if `config.dir` is set; also at level `OFF`, since the level can be
    /// raised at run time). Must be called inside a Tokio runtime.
    pub fn start(config: &AuditConfig, subaccount: &str, location: &str) -> Result<Self, AuditError> {
        let tx = match &config.dir {
            Some(dir) => {
                let folder = dir.join(sanitize(subaccount));
                std::fs::create_dir_all(&folder).map_err(|e| AuditError::Folder(folder.clone(), e))?;
                let (tx, rx) = mpsc::channel(4096);
                let mut writer = Writer { folder, day: String::new(), file: None, prev: ZERO_HASH.to_owned() };
                let (sub, loc) = (subaccount.to_owned(), location.to_owned());
                tokio::task::spawn_blocking(move || writer.run(rx, &sub, &loc));
                Some(tx)
            }
            None => None,
        };
        let level = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(config.level as u8));
        Ok(Self { level, subaccount: subaccount.to_owned(), location: location.to_owned(), tx })
    }

    /// Tracing only, at `level`.
    pub fn tracing_only(level: AuditLevel) -> Self {
        let level = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(level as u8));
        Self { level, subaccount: String::new(), location: String::new(), tx: None }
    }

    pub fn level(&self) -> AuditLevel {
        AuditLevel::from_u8(self.level.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Changes the level for this log and every clone of it, from the next entry on.
    pub fn set_level(&self, level: AuditLevel) {
        self.level.store(level as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a configuration change (at levels `SECURITY` and `ALL`).
    pub async fn record_change(&self, change: ChangeEvent) {
        tracing::info!(target: "ferry::audit", category = change.category, user = %change.user, action = change.action,
            subaccount = %change.subaccount, object = %change.object, detail = %change.detail, "configuration change");
        if self.level() == AuditLevel::Off {
            return;
        }
        self.send(Entry::Change(change)).await;
    }

    async fn send(&self, entry: Entry) {
        if let Some(tx) = &self.tx
            && tx.send((SystemTime::now(), entry)).await.is_err()
        {
            tracing::error!("audit log writer has stopped; audit lines are no longer written to disk");
        }
    }

    pub async fn record(&self, event: AuditEvent) {
        let decision = if event.outcome == Outcome::Allowed { "allowed" } else { "denied" };
        ferry_core::metrics::global()
            .counter(
                "ferry_connector_requests_total",
                "Requests the Cloud Connector decided on, by protocol and decision.",
                &[("protocol", event.protocol), ("decision", decision)],
            )
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let level = self.level();
        let wanted = match event.outcome {
            Outcome::Denied => level >= AuditLevel::Security,
            Outcome::Allowed => level >= AuditLevel::All,
        };
        match event.outcome {
            Outcome::Denied => {
                tracing::warn!(target: "ferry::audit", subaccount = %self.subaccount, location = %self.location, request_id = %event.request_id,
                client = %event.client, system = %event.system, method = %event.method, path = %event.path,
                reason = %event.reason, "Access Denied")
            }
            Outcome::Allowed => {
                tracing::info!(target: "ferry::audit", subaccount = %self.subaccount, location = %self.location, request_id = %event.request_id,
                client = %event.client, system = %event.system, method = %event.method, path = %event.path, "Access Allowed")
            }
        }
        if !wanted {
            return;
        }
        self.send(Entry::Access(event)).await;
    }
}

/// Keeps a subaccount id usable as a folder name whatever it contains.
fn sanitize(s: &str) -> String {
    let clean: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if clean.is_empty() { "default".into() } else { clean }
}

/// RFC 4180 field: quoted when it contains a comma, quote or line break; a leading `=`, `+`,
/// `-` or `@` is prefixed with `'` so spreadsheet programs do not run it as a formula.
/// Control characters (line breaks above all) are written as Rust escapes: the log is read line by
/// line, by `verify_file` and when the chain resumes after a restart, so a record must stay on one.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_owned() };
    let s = if s.contains(char::is_control) {
        s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

fn chain(prev: &str, line: &str) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev.as_bytes());
    ctx.update(line.as_bytes());
    hex::encode(ctx.finish().as_ref())
}

fn timestamp(t: SystemTime) -> (String, String) {
    let dt = time::OffsetDateTime::from(t);
    let day = format!("{:04}-{:02}-{:02}", dt.year(), u8::from(dt.month()), dt.day());
    let ts = format!("{day}T{:02}:{:02}:{:02}.{:03}Z", dt.hour(), dt.minute(), dt.second(), dt.millisecond());
    (day, ts)
}

struct Writer {
    folder: PathBuf,
    day: String,
    file: Option<BufWriter<std::fs::File>>,
    prev: String,
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<(SystemTime, Entry)>, subaccount: &str, location: &str) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            for (t, e) in batch {
                if let Err(err) = self.write(t, &e, subaccount, location) {
                    tracing::error!(error = %err, "cannot write the audit log");
                }
            }
            if let Some(f) = &mut self.file
                && let Err(err) = f.flush()
            {
                tracing::error!(error = %err, "cannot flush the audit log");
            }
        }
    }

    fn open(&mut self, day: &str) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        let path = self.folder.join(format!("audit-log_{day}.csv"));
        // Continue an existing file's chain (a restart on the same day).
        self.prev = match last_hash(&path)? {
            Some(h) => h,
            None => ZERO_HASH.to_owned(),
        };
        let existed = path.exists();
        let mut f = BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(&path)?);
        if !existed {
            writeln!(f, "{HEADER}")?;
        }
        self.file = Some(f);
        self.day = day.to_owned();
        Ok(())
    }

    fn write(&mut self, t: SystemTime, e: &Entry, subaccount: &str, location: &str) -> std::io::Result<()> {
        let (day, ts) = timestamp(t);
        if self.file.is_none() || day != self.day {
            self.open(&day)?;
        }
        let fields = match e {
            Entry::Access(e) => {
                let event = match e.outcome {
                    Outcome::Allowed => "Access Allowed",
                    Outcome::Denied => "Access Denied",
                };
                [
                    ts.as_str(),
                    event,
                    subaccount,
                    location,
                    &e.request_id,
                    &e.client,
                    &e.system,
                    e.protocol,
                    &e.method,
                    &e.path,
                    &e.reason,
                ]
            }
            // Same columns: the user in `client`, the changed object in `system`, the action
            // in `method`, the detail in `reason`.
            Entry::Change(c) => {
                let sub = if c.subaccount.is_empty() { subaccount } else { &c.subaccount };
                [ts.as_str(), c.category, sub, location, "", &c.user, &c.object, "", c.action, "", &c.detail]
            }
        };
        let (line, hash) = record(&self.prev, &fields);
        if let Some(f) = &mut self.file {
            writeln!(f, "{line},{hash}")?;
        }
        self.prev = hash;
        Ok(())
    }
}

/// A record's CSV line and its chain hash (the line as written ends with `,<hash>`).
pub(crate) fn record(prev: &str, fields: &[&str]) -> (String, String) {
    let line = fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(",");
    let hash = chain(prev, &line);
    (line, hash)
}

fn last_hash(path: &Path) -> std::io::Result<Option<String>> {
    let Ok(f) = std::fs::File::open(path) else { return Ok(None) };
    let mut last = None;
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line != HEADER
            && let Some((_, h)) = line.rsplit_once(',')
        {
            last = Some(h.to_owned());
        }
    }
    Ok(last)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("cannot read the audit log: {0}")]
    Read(String),
    #[error("the audit log has no header line")]
    NoHeader,
    #[error("line {0} does not match its hash: the log was changed at or before this line")]
    Broken(usize),
}

/// Checks a day file's hash chain; returns the number of entries.
pub fn verify_file(path: &Path) -> Result<usize, ChainError> {
    let text = std::fs::read_to_string(path).map_err(|e| ChainError::Read(e.to_string()))?;
    verify_text(&text)
}

/// Checks the hash chain of a day file's content; returns the number of entries.
pub fn verify_text(text: &str) -> Result<usize, ChainError> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(ChainError::NoHeader);
    }
    let mut prev = ZERO_HASH.to_owned();
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        let Some((body, hash)) = line.rsplit_once(',') else { return Err(ChainError::Broken(i + 2)) };
        if chain(&prev, body) != hash {
            return Err(ChainError::Broken(i + 2));
        }
        prev = hash.to_owned();
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(outcome: Outcome, path: &str) -> AuditEvent {
        AuditEvent {
            outcome,
            request_id: "r1".into(),
            client: "sb-app!b1".into(),
            system: "erp.virtual:80".into(),
            protocol: "HTTP",
            method: "GET".into(),
            path: path.into(),
            reason: String::new(),
        }
    }

    async fn written(level: AuditLevel, events: Vec<AuditEvent>, expect: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(&AuditConfig { level, dir: Some(dir.path().to_owned()) }, "sub/1", "loc").unwrap();
        for e in events {
            log.record(e).await;
        }
        drop(log);
        let folder = dir.path().join("sub_1");
        let mut file = None;
        for _ in 0..500 {
            if let Ok(mut rd) = std::fs::read_dir(&folder)
                && let Some(Ok(e)) = rd.next()
            {
                file = Some(e.path());
                // The writer ends when every sender is gone; wait for its last flush.
                if std::fs::read_to_string(e.path()).unwrap_or_default().lines().count() > expect {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        (dir, file.unwrap_or_else(|| folder.join("none")))
    }

    #[tokio::test]
    async fn security_level_keeps_denials_and_the_chain_verifies() {
        let (_d, f) = written(
            AuditLevel::Security,
            vec![event(Outcome::Allowed, "/ok"), event(Outcome::Denied, "/secret"), event(Outcome::Denied, "/x,\"y\"")],
            2,
        )
        .await;
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("/ok"), "allowed requests are not kept at SECURITY level");
        assert!(text.contains("Access Denied") && text.contains("/secret"));
        assert!(text.contains("\"/x,\"\"y\"\"\""), "CSV quoting: {text}");
        assert_eq!(verify_file(&f), Ok(2));
    }

    #[tokio::test]
    async fn all_level_keeps_everything_and_tampering_is_detected() {
        let (_d, f) = written(
            AuditLevel::All,
            vec![event(Outcome::Allowed, "/a"), event(Outcome::Denied, "/b"), event(Outcome::Allowed, "/c")],
            3,
        )
        .await;
        assert_eq!(verify_file(&f), Ok(3));
        let text = std::fs::read_to_string(&f).unwrap();
        std::fs::write(&f, text.replace("/b", "/z")).unwrap();
        assert_eq!(verify_file(&f), Err(ChainError::Broken(3)));
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&f, [lines[0], lines[1], lines[3]].join("\n")).unwrap();
        assert_eq!(verify_file(&f), Err(ChainError::Broken(3)), "a removed line breaks the chain");
    }

    /// A client id or reason with a line break (a JWT claim can hold one) used to be written as a
    /// quoted multi-line CSV field, which the line-based chain check then reported as tampering.
    #[test]
    fn line_breaks_in_fields_keep_the_chain_verifiable() {
        let (line, hash) = record(ZERO_HASH, &["sb-app\nfake,line", "cr\rhere", "tab\tx"]);
        assert_eq!(line, r#""sb-app\nfake,line",cr\rhere,tab\tx"#);
        assert_eq!(verify_text(&format!("{HEADER}\n{line},{hash}\n")), Ok(1));
    }

    #[test]
    fn formula_injection_is_neutralised() {
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("plain"), "plain");
    }
}
