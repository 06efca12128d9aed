//! The audit log: who reached (or was refused) which system, as SAP's Cloud Connector keeps it.
//!
//! Levels follow SAP's product: `SECURITY` (the default) records every denied request, `ALL`
//! records allowed ones too, `OFF` records nothing. Records are JSON lines in
//! `<dir>/<subaccount>/audit-log.jsonl`, and go to the `ferry::audit` tracing target too. When
//! the file would pass `max_file_bytes`, or its first record is older than `max_file_age` when the
//! next one comes, it is renamed to `audit-log_<UTC time>.jsonl` and a new one begins; beyond
//! `max_files` rotated files the oldest is deleted. The UI and its download
//! show them as CSV, as SAP's viewer does.
//!
//! Tamper evidence: each record ends with `"chain":"<sha256(previous hash ‖ the record without
//! its chain)>"`; a file's header line names the hash its first record chains from: 64 zeros
//! for the very first file, else the last hash of the file rotated before it. Removing,
//! reordering or editing a record breaks every later hash, and a missing or changed file breaks
//! the link between files. [`verify_file`] checks a file, [`verify_set`] a rotated set.
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
    /// Subject of the propagated user's certificate (e.g. `CN=alice`), empty without one.
    pub user: String,
    /// Bytes from the app to the backend (HTTP body or TCP stream).
    pub bytes_in: u64,
    /// Bytes from the backend back to the app.
    pub bytes_out: u64,
    /// From the decision to the end of both directions (for a denial: the decision alone).
    pub duration: std::time::Duration,
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
/// The fields of a record, in the order of the CSV download's columns.
const COLUMNS: [&str; 15] = [
    "timestamp",
    "event",
    "subaccount",
    "location",
    "requestId",
    "client",
    "system",
    "protocol",
    "method",
    "path",
    "reason",
    "user",
    "bytesIn",
    "bytesOut",
    "durationMs",
];
/// The CSV download's header (SAP's viewer offers CSV); `chain` is the record's hash.
pub const CSV_HEADER: &str = "timestamp,event,subaccount,location,request_id,client,system,protocol,method,path,reason,\
     user,bytes_in,bytes_out,duration_ms,chain";
/// The active file of a folder; rotated files are `audit-log_<UTC time>.jsonl`.
pub const ACTIVE_FILE: &str = "audit-log.jsonl";
const HEADER_START: &str = "{\"ferryAuditLog\":1,\"prev\":\"";
const CHAIN_KEY: &str = ",\"chain\":\"";

/// Where and how much to audit.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub level: AuditLevel,
    /// Folder for the log files; `None` logs to tracing only.
    pub dir: Option<PathBuf>,
    /// Size at which the active file is rotated.
    pub max_file_bytes: u64,
    /// Rotated files kept per folder (the oldest go first); 0 keeps all.
    pub max_files: usize,
    /// Age of its first record at which the active file is rotated (checked when a record is
    /// written, so an idle log is not rotated into empty files); `None` rotates by size only.
    pub max_file_age: Option<std::time::Duration>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { level: AuditLevel::default(), dir: None, max_file_bytes: 10 << 20, max_files: 10, max_file_age: None }
    }
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
                let mut writer = Writer {
                    folder,
                    file: None,
                    size: 0,
                    records: 0,
                    first_at: None,
                    prev: ZERO_HASH.to_owned(),
                    max_bytes: config.max_file_bytes.max(1),
                    max_files: config.max_files,
                    max_age: config.max_file_age,
                };
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
        if let Some(event) = self.note(event) {
            self.write(event).await;
        }
    }

    /// Counts and traces `event`; returns it if the current level wants it in the log file, so a
    /// caller outside async code spawns a task for [`AuditLog::write`] only when there is a line
    /// to write (at level `SECURITY`, not for every allowed request).
    pub(crate) fn note(&self, event: AuditEvent) -> Option<AuditEvent> {
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
                client = %event.client, system = %event.system, method = %event.method, path = %event.path,
                user = %event.user, bytes_in = event.bytes_in, bytes_out = event.bytes_out,
                duration_ms = event.duration.as_millis() as u64, "Access Allowed")
            }
        }
        wanted.then_some(event)
    }

    /// Writes an access line that [`AuditLog::note`] returned.
    pub(crate) async fn write(&self, event: AuditEvent) {
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

fn chain(prev: &str, body: &str) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev.as_bytes());
    ctx.update(body.as_bytes());
    hex::encode(ctx.finish().as_ref())
}

fn timestamp(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

/// The first line of every file: the hash the file's first record chains from (the last hash
/// of the file before it, so the chain runs on across rotations).
pub(crate) fn header_line(prev: &str) -> String {
    format!("{HEADER_START}{prev}\"}}")
}

fn header_prev(line: &str) -> Option<&str> {
    let prev = line.strip_prefix(HEADER_START)?.strip_suffix("\"}")?;
    (prev.len() == 64 && prev.bytes().all(|b| b.is_ascii_hexdigit()) && header_line(prev) == line).then_some(prev)
}

/// A record as one JSON line and its chain hash: `hash = sha256(prev ‖ the record's JSON
/// without the chain)`, and the line is that JSON with `"chain":"<hash>"` as its last member.
/// Missing fields are empty.
pub(crate) fn record(prev: &str, fields: &[&str]) -> (String, String) {
    let mut obj = String::from("{");
    for (i, key) in COLUMNS.iter().enumerate() {
        if i > 0 {
            obj.push(',');
        }
        let value = fields.get(i).copied().unwrap_or("");
        // Strings always serialise.
        obj.push_str(&format!("\"{key}\":{}", serde_json::Value::String(value.to_owned())));
    }
    obj.push('}');
    let hash = chain(prev, &obj);
    let line = format!("{}{CHAIN_KEY}{hash}\"}}", &obj[..obj.len() - 1]);
    (line, hash)
}

/// Splits a record line into (the JSON the hash covers, the hash).
fn split_record(line: &str) -> Option<(String, &str)> {
    let rest = line.strip_suffix("\"}")?;
    let cut = rest.len().checked_sub(64)?;
    let (head, hash) = (rest.get(..cut)?, rest.get(cut..)?);
    let body = head.strip_suffix(CHAIN_KEY)?;
    Some((format!("{body}}}"), hash))
}

/// A record line as a CSV line (the download's format; `chain` last), `None` for a header or a
/// line that is not a record.
pub fn csv_line(line: &str) -> Option<String> {
    let (body, hash) = split_record(line)?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&body).ok()?;
    let mut cols: Vec<String> =
        COLUMNS.iter().map(|k| csv_field(v.get(*k).and_then(serde_json::Value::as_str).unwrap_or(""))).collect();
    cols.push(hash.to_owned());
    Some(cols.join(","))
}

fn rotated_name(t: SystemTime) -> String {
    let ts: String = timestamp(t).chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("audit-log_{ts}.jsonl")
}

fn is_log_file(name: &str) -> bool {
    name == ACTIVE_FILE || (name.starts_with("audit-log_") && name.ends_with(".jsonl"))
}

/// The log files of a folder, oldest first (rotated by name, which is their rotation time, then
/// the active file).
pub fn log_files(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| is_log_file(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    sort_files(&mut files);
    files
}

fn sort_files(files: &mut [PathBuf]) {
    files.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (name == ACTIVE_FILE, name)
    });
}

struct Writer {
    folder: PathBuf,
    file: Option<BufWriter<std::fs::File>>,
    /// Bytes in the active file.
    size: u64,
    /// Records in the active file.
    records: u64,
    /// Time of the active file's first record (read back from the file after a restart).
    first_at: Option<SystemTime>,
    prev: String,
    max_bytes: u64,
    max_files: usize,
    max_age: Option<std::time::Duration>,
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

    /// Opens the active file, continuing its chain (a restart), or starts one chained to the
    /// newest rotated file.
    fn open(&mut self) -> std::io::Result<()> {
        let path = self.folder.join(ACTIVE_FILE);
        match tail(&path)? {
            Some((last, records)) => {
                self.prev = last;
                self.records = records;
                self.first_at = first_record_time(&path)?;
            }
            None => {
                let newest = log_files(&self.folder).into_iter().rev().find(|p| !p.ends_with(ACTIVE_FILE));
                self.prev = match newest {
                    Some(p) => tail(&p)?.map(|(h, _)| h).unwrap_or_else(|| ZERO_HASH.to_owned()),
                    None => ZERO_HASH.to_owned(),
                };
                self.records = 0;
                self.first_at = None;
                let mut f = std::fs::OpenOptions::new().create_new(true).write(true).open(&path)?;
                writeln!(f, "{}", header_line(&self.prev))?;
                f.sync_all()?;
            }
        }
        let f = std::fs::OpenOptions::new().append(true).open(&path)?;
        self.size = f.metadata()?.len();
        self.file = Some(BufWriter::new(f));
        Ok(())
    }

    /// Renames the active file to its rotated name, starts a new one and drops the oldest
    /// rotated files beyond `max_files`.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
            f.get_ref().sync_all()?;
        }
        // Names must be unique and sort after every rotated file still there, also one named a
        // step ahead of the clock by an earlier rotation (while an older one with the current
        // time may have been deleted already): step on by a millisecond.
        let newest = log_files(&self.folder)
            .into_iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .rfind(|n| n != ACTIVE_FILE);
        let mut t = SystemTime::now();
        let mut name = rotated_name(t);
        while self.folder.join(&name).exists() || newest.as_ref().is_some_and(|n| name <= *n) {
            t += std::time::Duration::from_millis(1);
            name = rotated_name(t);
        }
        let target = self.folder.join(name);
        std::fs::rename(self.folder.join(ACTIVE_FILE), &target)?;
        self.open()?;
        if self.max_files > 0 {
            let rotated: Vec<PathBuf> =
                log_files(&self.folder).into_iter().filter(|p| !p.ends_with(ACTIVE_FILE)).collect();
            for old in rotated.iter().take(rotated.len().saturating_sub(self.max_files)) {
                std::fs::remove_file(old)?;
            }
        }
        Ok(())
    }

    fn write(&mut self, t: SystemTime, e: &Entry, subaccount: &str, location: &str) -> std::io::Result<()> {
        if self.file.is_none() {
            self.open()?;
        }
        let ts = timestamp(t);
        let (bytes_in, bytes_out, ms) = match e {
            Entry::Access(e) => (e.bytes_in.to_string(), e.bytes_out.to_string(), e.duration.as_millis().to_string()),
            Entry::Change(_) => Default::default(),
        };
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
                    &e.user,
                    &bytes_in,
                    &bytes_out,
                    &ms,
                ]
            }
            // Same columns: the user in `client`, the changed object in `system`, the action
            // in `method`, the detail in `reason`.
            Entry::Change(c) => {
                let sub = if c.subaccount.is_empty() { subaccount } else { &c.subaccount };
                [
                    ts.as_str(),
                    c.category,
                    sub,
                    location,
                    "",
                    &c.user,
                    &c.object,
                    "",
                    c.action,
                    "",
                    &c.detail,
                    "",
                    "",
                    "",
                    "",
                ]
            }
        };
        let (line, hash) = record(&self.prev, &fields);
        let len = line.len() as u64 + 1;
        // A clock stepped back never counts as age: only a first record at least `max_age`
        // before this one does.
        let too_old = self.max_age.is_some_and(|age| {
            self.first_at.is_some_and(|first| t.duration_since(first).is_ok_and(|elapsed| elapsed >= age))
        });
        if self.records > 0 && (self.size + len > self.max_bytes || too_old) {
            self.rotate()?;
        }
        if self.records == 0 {
            self.first_at = Some(t);
        }
        if let Some(f) = &mut self.file {
            writeln!(f, "{line}")?;
        }
        // The chain moves on only once the line is written.
        self.prev = hash;
        self.size += len;
        self.records += 1;
        Ok(())
    }
}

/// The last hash of a file (its header's when it has no records) and its record count; `None`
/// when the file does not exist or has no valid header.
fn tail(path: &Path) -> std::io::Result<Option<(String, u64)>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut lines = std::io::BufReader::new(f).lines();
    let Some(first) = lines.next().transpose()? else { return Ok(None) };
    let Some(prev) = header_prev(&first) else { return Ok(None) };
    let mut last = prev.to_owned();
    let mut n = 0;
    for line in lines {
        if let Some((_, h)) = split_record(&line?) {
            last = h.to_owned();
            n += 1;
        }
    }
    Ok(Some((last, n)))
}

/// The timestamp of a file's first record; `None` when it has none (or it does not parse, which
/// then only delays an age rotation to the file's next first record).
fn first_record_time(path: &Path) -> std::io::Result<Option<SystemTime>> {
    let f = std::fs::File::open(path)?;
    let Some(line) = std::io::BufReader::new(f).lines().nth(1).transpose()? else { return Ok(None) };
    let Some((body, _)) = split_record(&line) else { return Ok(None) };
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
    let ts = v.get("timestamp").and_then(serde_json::Value::as_str).unwrap_or("");
    Ok(parse_timestamp(ts))
}

/// Reads back what [`timestamp`] writes (`2026-01-02T03:04:05.678Z`).
fn parse_timestamp(ts: &str) -> Option<SystemTime> {
    let b = ts.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<u16>().ok();
    let month = time::Month::try_from(u8::try_from(num(5..7)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(i32::from(num(0..4)?), month, u8::try_from(num(8..10)?).ok()?).ok()?;
    let clock = time::Time::from_hms_milli(
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(14..16)?).ok()?,
        u8::try_from(num(17..19)?).ok()?,
        num(20..23)?,
    )
    .ok()?;
    Some(SystemTime::from(time::PrimitiveDateTime::new(date, clock).assume_utc()))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("cannot read the audit log: {0}")]
    Read(String),
    #[error("the audit log has no header line")]
    NoHeader,
    #[error("line {0} does not match its hash: the log was changed at or before this line")]
    Broken(usize),
    #[error("the file does not continue the chain of the file before it (a file is missing or was changed)")]
    Gap,
}

/// Checks one file's hash chain (from the hash its header names); returns the number of records.
pub fn verify_file(path: &Path) -> Result<usize, ChainError> {
    let text = std::fs::read_to_string(path).map_err(|e| ChainError::Read(e.to_string()))?;
    verify_text(&text).map(|(n, _, _)| n)
}

/// Checks a file's content; returns the number of records, the hash the header names and the
/// last hash.
pub fn verify_text(text: &str) -> Result<(usize, String, String), ChainError> {
    let mut lines = text.lines();
    let first = lines.next().and_then(header_prev).ok_or(ChainError::NoHeader)?;
    let mut prev = first.to_owned();
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        let Some((body, hash)) = split_record(line) else { return Err(ChainError::Broken(i + 2)) };
        if chain(&prev, &body) != hash {
            return Err(ChainError::Broken(i + 2));
        }
        prev = hash.to_owned();
        n += 1;
    }
    Ok((n, first.to_owned(), prev))
}

/// Checks a set of files of one folder (rotated and active, in any order) as one chain: each
/// file must verify and start from the last hash of the file before it. The oldest file's own
/// starting hash is taken as given (older files may have been dropped by rotation). Returns the
/// record count per file, oldest first, or the first file that fails.
pub fn verify_set(files: &[PathBuf]) -> Result<Vec<(PathBuf, usize)>, (PathBuf, ChainError)> {
    let mut files = files.to_vec();
    sort_files(&mut files);
    let mut out = Vec::new();
    let mut last: Option<String> = None;
    for f in files {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => return Err((f, ChainError::Read(e.to_string()))),
        };
        let (n, start, end) = match verify_text(&text) {
            Ok(v) => v,
            Err(e) => return Err((f, e)),
        };
        if last.as_ref().is_some_and(|l| *l != start) {
            return Err((f, ChainError::Gap));
        }
        last = Some(end);
        out.push((f, n));
    }
    Ok(out)
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
            user: String::new(),
            bytes_in: 0,
            bytes_out: 0,
            duration: std::time::Duration::ZERO,
        }
    }

    async fn written(level: AuditLevel, events: Vec<AuditEvent>, expect: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(
            &AuditConfig { level, dir: Some(dir.path().to_owned()), ..Default::default() },
            "sub/1",
            "loc",
        )
        .unwrap();
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
        assert!(text.contains(r#""path":"/x,\"y\"""#), "JSON escaping: {text}");
        let csv: Vec<String> = text.lines().filter_map(csv_line).collect();
        assert!(csv[1].contains("\"/x,\"\"y\"\"\""), "CSV quoting: {csv:?}");
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
        let (line, hash) = record(ZERO_HASH, &["t", "sb-app\nfake,line", "cr\rhere", "tab\tx", "\"}"]);
        assert!(!line.contains('\n') && line.ends_with(&format!("\"chain\":\"{hash}\"}}")), "{line}");
        let text = format!("{}\n{line}\n", header_line(ZERO_HASH));
        assert_eq!(verify_text(&text), Ok((1, ZERO_HASH.to_owned(), hash.clone())));
        let csv = csv_line(&line).unwrap();
        assert!(csv.starts_with(r#"t,"sb-app\nfake,line",cr\rhere,tab\tx,"""}""#), "{csv}");
        assert!(csv.ends_with(&hash));
    }

    /// Writes `n` allowed requests with 700-byte files, and waits until the writer wrote them.
    async fn write_events(dir: &Path, tag: &str, n: usize, max_files: usize) {
        let cfg = AuditConfig {
            max_file_bytes: 700,
            max_files,
            ..AuditConfig { level: AuditLevel::All, dir: Some(dir.to_owned()), ..Default::default() }
        };
        let log = AuditLog::start(&cfg, "sub", "loc").unwrap();
        for i in 0..n {
            log.record(event(Outcome::Allowed, &format!("/{tag}{i}"))).await;
        }
        // The writer ends when every sender is gone; its last record then is on disk.
        drop(log);
        let active = dir.join("sub").join(ACTIVE_FILE);
        let last = format!("\"/{tag}{}\"", n - 1);
        for _ in 0..500 {
            if std::fs::read_to_string(&active).is_ok_and(|t| t.contains(&last)) {
                // One more round for the flush after the last line.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn rotation_keeps_the_chain_across_files_and_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        write_events(dir.path(), "a", 12, 0).await;
        // A restart continues the active file's chain.
        write_events(dir.path(), "b", 12, 0).await;
        let folder = dir.path().join("sub");
        let files = log_files(&folder);
        assert!(files.len() > 3, "{files:?}");
        let counted = verify_set(&files).unwrap();
        assert_eq!(counted.iter().map(|(_, n)| n).sum::<usize>(), 24, "no entry lost: {counted:?}");
        assert!(counted.last().unwrap().0.ends_with(ACTIVE_FILE));
        for (f, n) in &counted {
            assert_eq!(verify_file(f), Ok(*n));
            assert!(std::fs::metadata(f).unwrap().len() <= 700, "{f:?} is above the size");
        }
        // A missing file in the middle, or a changed one, is detected.
        let mut gap = files.clone();
        gap.remove(1);
        assert_eq!(verify_set(&gap).unwrap_err().1, ChainError::Gap);
        let text = std::fs::read_to_string(&files[1]).unwrap();
        let first = text.lines().nth(1).unwrap().to_owned();
        std::fs::write(&files[1], text.replacen(&first, &first.replace("/a", "/m"), 1)).unwrap();
        assert_eq!(verify_set(&files).unwrap_err(), (files[1].clone(), ChainError::Broken(2)));

        // With max_files, the oldest rotated files go; the rest still verify as a set.
        let dir = tempfile::tempdir().unwrap();
        write_events(dir.path(), "c", 30, 2).await;
        let files = log_files(&dir.path().join("sub"));
        assert_eq!(files.len(), 3, "two rotated files and the active one: {files:?}");
        assert!(verify_set(&files).is_ok());
    }

    #[test]
    fn timestamps_read_back() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        assert_eq!(parse_timestamp(&timestamp(t)), Some(t));
        for bad in ["", "2026-13-01T00:00:00.000Z", "2026-01-01 00:00:00.000Z", "2026-01-01T00:00:00.000"] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    /// With `max_file_age`, a record arriving after the active file's first record got that old
    /// starts a new file; every record stays in the chain, also across a restart.
    #[tokio::test]
    async fn rotation_by_age_keeps_every_entry() {
        let dir = tempfile::tempdir().unwrap();
        let age = std::time::Duration::from_millis(200);
        let cfg = AuditConfig {
            level: AuditLevel::All,
            dir: Some(dir.path().to_owned()),
            max_file_age: Some(age),
            ..Default::default()
        };
        let folder = dir.path().join("sub");
        for round in 0..2 {
            let log = AuditLog::start(&cfg, "sub", "loc").unwrap();
            for batch in 0..3 {
                for i in 0..2 {
                    log.record(event(Outcome::Allowed, &format!("/r{round}b{batch}i{i}"))).await;
                }
                // Past the age: the next batch's first record finds the file too old.
                tokio::time::sleep(age + std::time::Duration::from_millis(50)).await;
            }
            drop(log);
            let last = format!("\"/r{round}b2i1\"");
            for _ in 0..500 {
                if std::fs::read_to_string(folder.join(ACTIVE_FILE)).is_ok_and(|t| t.contains(&last)) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let files = log_files(&folder);
        let counted = verify_set(&files).unwrap();
        assert_eq!(counted.iter().map(|(_, n)| n).sum::<usize>(), 12, "no entry lost: {counted:?}");
        // No file holds records of two batches (a busy machine may split a batch, never join
        // two), also across the restart: it read the active file's age back from its first record.
        assert!(counted.len() >= 6, "{counted:?}");
        for (f, _) in &counted {
            let text = std::fs::read_to_string(f).unwrap();
            let mut batches: Vec<&str> = text.split("\"path\":\"/").skip(1).map(|r| &r[..4]).collect();
            batches.dedup();
            assert!(batches.len() <= 1, "{f:?} holds records of several batches: {batches:?}");
        }
    }

    #[test]
    fn formula_injection_is_neutralised() {
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("plain"), "plain");
    }
}
