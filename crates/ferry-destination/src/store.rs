//! Persistence of sealed destination rows.
//!
//! The store sees only row keys and opaque sealed bytes; encryption and the destination format
//! live above it, so another backend (PostgreSQL for replicated deployments) only has to
//! implement [`Store`] and cannot get encryption wrong. The methods return boxed futures
//! because a network database is naturally async, while SQLite runs its blocking calls on
//! tokio's blocking pool. [`PgStore`](crate::postgres::PgStore) is the PostgreSQL backend.
//!
//! Several service replicas may share one database, so nothing here caches rows, and every
//! write that depends on what it read is a compare-and-swap on the sealed bytes
//! ([`Store::update_if`]): the random nonce makes each write's bytes unique, so equal bytes
//! mean no write came in between.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

/// A failure of the storage backend. Messages never contain row contents (they are sealed and
/// only ever passed as bound parameters).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {message}")]
    Backend { context: String, message: String },
    /// The database cannot be reached or is restarting (connection refused or lost, server
    /// shutting down or starting): worth a retry, unlike [`StoreError::Backend`].
    #[error("{context}: the database is unavailable ({message})")]
    Unavailable { context: String, message: String },
    #[error(
        "the database has schema version {found}, newer than version {supported} this Ferry understands; upgrade Ferry"
    )]
    SchemaTooNew { found: i64, supported: i64 },
}

impl StoreError {
    pub(crate) fn backend(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Backend { context: context.into(), message: e.to_string() }
    }

    pub(crate) fn unavailable(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Unavailable { context: context.into(), message: e.to_string() }
    }
}

pub(crate) type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The two levels SAP keeps destinations on. A subscription level would be an instance level
/// within the subscriber's subaccount, which the (subaccount, level) pair already expresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Level {
    Subaccount,
    Instance(String),
}

/// What a row holds; each kind has its own table and name space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Destination,
    Fragment,
    Certificate,
    /// Labels of one destination, fragment or certificate (row name `<d|f|c>/<name>`).
    Label,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::Destination, Kind::Fragment, Kind::Certificate, Kind::Label];

    /// The table; a fixed string, never from input.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Kind::Destination => "destinations",
            Kind::Fragment => "fragments",
            Kind::Certificate => "certificates",
            Kind::Label => "labels",
        }
    }
}

/// One collection: what `/subaccountDestinations`, `/instanceDestinationFragments`, ...
/// addresses for a given caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Scope {
    pub subaccount: String,
    pub level: Level,
    pub kind: Kind,
}

impl Scope {
    pub(crate) fn instance_id(&self) -> Option<&str> {
        match &self.level {
            Level::Subaccount => None,
            Level::Instance(i) => Some(i),
        }
    }

    pub(crate) fn row(&self, name: &str) -> RowKey {
        RowKey { scope: self.clone(), name: name.to_owned() }
    }

    /// The row holding the labels of `key`'s object; `None` for a label row itself.
    pub(crate) fn labels_of(key: &RowKey) -> Option<RowKey> {
        let tag = match key.scope.kind {
            Kind::Destination => "d",
            Kind::Fragment => "f",
            Kind::Certificate => "c",
            Kind::Label => return None,
        };
        Some(key.scope.of(Kind::Label).row(&format!("{tag}/{}", key.name)))
    }

    /// The same subaccount and level, another kind of row.
    pub(crate) fn of(&self, kind: Kind) -> Scope {
        Scope { kind, ..self.clone() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RowKey {
    pub scope: Scope,
    pub name: String,
}

impl RowKey {
    /// An unambiguous encoding of the key (length-prefixed parts), used as AEAD associated
    /// data so that a sealed row only opens under its own key.
    pub(crate) fn associated_data(&self) -> Vec<u8> {
        let mut out = b"ferry-destination/v1".to_vec();
        let mut part = |tag: u8, s: &str| {
            out.push(tag);
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        part(b's', &self.scope.subaccount);
        match &self.scope.level {
            Level::Subaccount => part(b'S', ""),
            Level::Instance(i) => part(b'I', i),
        }
        part(b'n', &self.name);
        // Destinations keep the original encoding, so existing rows still open.
        match self.scope.kind {
            Kind::Destination => {}
            Kind::Fragment => part(b'k', "fragment"),
            Kind::Certificate => part(b'k', "certificate"),
            Kind::Label => part(b'k', "label"),
        }
        out
    }
}

pub(crate) trait Store: Send + Sync {
    fn get(&self, key: RowKey) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// The first of `keys` (all of one kind) that has a row, in one round trip: find looks at
    /// the instance level, then the subaccount level, on every call.
    fn get_first(&self, keys: Vec<RowKey>) -> StoreFuture<'_, Option<(RowKey, Vec<u8>)>>;
    /// `(name, sealed, modified_at)` of one collection, ordered by name; `modified_at` in unix
    /// seconds, for `$filter=modifiedwithin(...)` and `$includeMetadata=modification_time`.
    fn list(&self, scope: Scope) -> StoreFuture<'_, Vec<(String, Vec<u8>, i64)>>;
    /// `false` when a row with this key already exists (nothing is written then).
    fn insert(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, bool>;
    /// `false` when there is no such row.
    fn update(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, bool>;
    /// Replaces the row only if it still holds `expected`, in one statement; `false` when it
    /// does not (changed or deleted since it was read).
    fn update_if(&self, key: RowKey, expected: Vec<u8>, sealed: Vec<u8>) -> StoreFuture<'_, bool>;
    /// Every row of one kind in all levels of `subaccount`, or of all subaccounts for `None`
    /// (for re-sealing under a new key).
    fn scan(&self, kind: Kind, subaccount: Option<String>) -> StoreFuture<'_, Vec<(RowKey, Vec<u8>)>>;
    fn upsert(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, ()>;
    /// `false` when there was no such row.
    fn delete(&self, key: RowKey) -> StoreFuture<'_, bool>;
    fn meta(&self, key: &'static str) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Sets `key` to `value` only if it holds `expected` (`None`: only if absent); `false`
    /// when it does not.
    fn swap_meta(&self, key: &'static str, expected: Option<Vec<u8>>, value: Vec<u8>) -> StoreFuture<'_, bool>;
}

/// Schema migrations, applied in order; `schema_version` holds how many have run. Append
/// only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE destinations (
        subaccount  TEXT    NOT NULL,
        instance    TEXT    NOT NULL,  -- '' for subaccount level
        name        TEXT    NOT NULL,
        sealed      BLOB    NOT NULL,  -- AES-256-GCM over the destination JSON
        modified_at INTEGER NOT NULL,  -- unix seconds
        PRIMARY KEY (subaccount, instance, name)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
",
    "
    CREATE TABLE fragments (
        subaccount  TEXT    NOT NULL,
        instance    TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        sealed      BLOB    NOT NULL,
        modified_at INTEGER NOT NULL,
        PRIMARY KEY (subaccount, instance, name)
    ) WITHOUT ROWID;
    CREATE TABLE certificates (
        subaccount  TEXT    NOT NULL,
        instance    TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        sealed      BLOB    NOT NULL,
        modified_at INTEGER NOT NULL,
        PRIMARY KEY (subaccount, instance, name)
    ) WITHOUT ROWID;
",
    "
    CREATE TABLE labels (
        subaccount  TEXT    NOT NULL,
        instance    TEXT    NOT NULL,
        name        TEXT    NOT NULL,  -- '<d|f|c>/<object name>'
        sealed      BLOB    NOT NULL,
        modified_at INTEGER NOT NULL,
        PRIMARY KEY (subaccount, instance, name)
    ) WITHOUT ROWID;
",
];

pub(crate) struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// Read-only connections to a database file, so finds do not queue behind each other or
    /// behind a write (WAL lets readers run during a write). Empty for an in-memory database,
    /// which exists only on `conn`.
    readers: Vec<Arc<Mutex<Connection>>>,
    next_reader: std::sync::atomic::AtomicUsize,
}

/// Read connections per database file; the blocking pool runs at most this many reads at once.
const READERS: usize = 4;

pub(crate) fn instance_column(level: &Level) -> &str {
    match level {
        Level::Subaccount => "",
        Level::Instance(i) => i,
    }
}

/// The inverse of [`instance_column`].
pub(crate) fn level_of(instance: String) -> Level {
    if instance.is_empty() { Level::Subaccount } else { Level::Instance(instance) }
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, or an in-memory one for `None`, and
    /// brings its schema up to date.
    pub(crate) async fn open(path: Option<PathBuf>) -> Result<Self, StoreError> {
        let (conn, readers) = tokio::task::spawn_blocking(move || {
            let conn = Self::open_blocking(path.as_deref())?;
            let mut readers = Vec::new();
            if let Some(path) = &path {
                let ctx = || format!("cannot open the destination database {}", path.display());
                for _ in 0..READERS {
                    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
                    let r = Connection::open_with_flags(path, flags).map_err(|e| StoreError::backend(ctx(), e))?;
                    r.busy_timeout(std::time::Duration::ZERO).map_err(|e| StoreError::backend(ctx(), e))?;
                    readers.push(Arc::new(Mutex::new(r)));
                }
            }
            Ok::<_, StoreError>((conn, readers))
        })
        .await
        .map_err(|e| StoreError::backend("opening the database", e))??;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), readers, next_reader: Default::default() })
    }

    fn open_blocking(path: Option<&Path>) -> Result<Connection, StoreError> {
        let mut conn = match path {
            Some(path) => {
                let ctx = || format!("cannot open the destination database {}", path.display());
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::backend(ctx(), e))?;
                }
                create_private(path).map_err(|e| StoreError::backend(ctx(), e))?;
                let conn = Connection::open(path).map_err(|e| StoreError::backend(ctx(), e))?;
                // WAL lets readers proceed during a write; busy_timeout covers other processes.
                conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| StoreError::backend(ctx(), e))?;
                conn
            }
            None => {
                Connection::open_in_memory().map_err(|e| StoreError::backend("cannot open in-memory database", e))?
            }
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| StoreError::backend("configuring the database", e))?;
        migrate(&mut conn)?;
        Ok(conn)
    }

    /// Runs `f` on the blocking pool with the connection locked; SQLite calls block.
    fn call<T, F>(&self, context: &'static str, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.run_on(self.conn.clone(), context, f)
    }

    /// A point read by primary key (find's hot path), run right here on a free read-only
    /// connection: it takes microseconds, less than the hand-off to the blocking pool, and the
    /// readers never wait for a lock (`busy_timeout` 0). Only when SQLite answers busy (a
    /// checkpoint or recovery under way), or no reader is free, does the read go to the blocking
    /// pool, where the writer's connection waits for the lock as long as its timeout allows.
    fn read_point<T, F>(&self, context: &'static str, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + Sync + 'static,
    {
        for reader in &self.readers {
            let Ok(conn) = reader.try_lock() else { continue };
            match f(&conn) {
                Err(e) if is_busy(&e) => break,
                result => return Box::pin(std::future::ready(result.map_err(|e| StoreError::backend(context, e)))),
            }
        }
        self.call(context, f)
    }

    /// Like [`call`](Self::call) for a read: on one of the read-only connections, in turn, and
    /// on the writer's connection (which waits for locks) when SQLite answers busy.
    fn read<T, F>(&self, context: &'static str, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> rusqlite::Result<T> + Send + Sync + 'static,
    {
        if self.readers.is_empty() {
            return self.call(context, f);
        }
        let reader = self.readers
            [self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.readers.len()]
        .clone();
        let writer = self.conn.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let first = f(&reader.lock().unwrap_or_else(|p| p.into_inner()));
                match first {
                    Err(e) if is_busy(&e) => f(&writer.lock().unwrap_or_else(|p| p.into_inner())),
                    other => other,
                }
            })
            .await
            .map_err(|e| StoreError::backend(context, e))?
            .map_err(|e| StoreError::backend(context, e))
        })
    }

    fn run_on<T, F>(&self, conn: Arc<Mutex<Connection>>, context: &'static str, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                f(&conn)
            })
            .await
            .map_err(|e| StoreError::backend(context, e))?
            .map_err(|e| StoreError::backend(context, e))
        })
    }
}

/// Creates the database file readable by its owner only, if it does not exist yet. Rows are
/// sealed, but names and the row count are not, and SQLite gives its WAL and SHM files the
/// database file's permissions. An existing file keeps whatever its operator chose.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let err = |e: rusqlite::Error| StoreError::backend("migrating the database schema", e);
    let tx = conn.transaction().map_err(err)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").map_err(err)?;
    let current: Option<i64> =
        tx.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0)).optional().map_err(err)?.flatten();
    let current = current.unwrap_or(0);
    let supported = MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::SchemaTooNew { found: current, supported });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql).map_err(err)?;
        tracing::info!(version = i + 1, "applied destination database migration");
    }
    tx.execute("DELETE FROM schema_version", []).map_err(err)?;
    tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [supported]).map_err(err)?;
    tx.commit().map_err(err)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

fn get_row(c: &Connection, key: &RowKey) -> rusqlite::Result<Option<Vec<u8>>> {
    c.prepare_cached(&format!(
        "SELECT sealed FROM {} WHERE subaccount = ?1 AND instance = ?2 AND name = ?3",
        key.scope.kind.table()
    ))?
    .query_row(params![key.scope.subaccount, instance_column(&key.scope.level), key.name], |r| r.get(0))
    .optional()
}

impl Store for SqliteStore {
    fn get(&self, key: RowKey) -> StoreFuture<'_, Option<Vec<u8>>> {
        self.read_point("reading a destination", move |c| get_row(c, &key))
    }

    fn get_first(&self, keys: Vec<RowKey>) -> StoreFuture<'_, Option<(RowKey, Vec<u8>)>> {
        self.read_point("reading a destination", move |c| {
            for key in &keys {
                if let Some(sealed) = get_row(c, key)? {
                    return Ok(Some((key.clone(), sealed)));
                }
            }
            Ok(None)
        })
    }

    fn list(&self, scope: Scope) -> StoreFuture<'_, Vec<(String, Vec<u8>, i64)>> {
        self.read("listing destinations", move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT name, sealed, modified_at FROM {} WHERE subaccount = ?1 AND instance = ?2 ORDER BY name",
                scope.kind.table()
            ))?;
            let rows = stmt.query_map(params![scope.subaccount, instance_column(&scope.level)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect()
        })
    }

    fn insert(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, bool> {
        self.call("creating a destination", move |c| {
            let n = c.execute(
                &format!(
                    "INSERT INTO {} (subaccount, instance, name, sealed, modified_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT DO NOTHING",
                    key.scope.kind.table()
                ),
                params![key.scope.subaccount, instance_column(&key.scope.level), key.name, sealed, now_secs()],
            )?;
            Ok(n == 1)
        })
    }

    fn update(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, bool> {
        self.call("updating a destination", move |c| {
            let n = c.execute(
                &format!(
                    "UPDATE {} SET sealed = ?4, modified_at = ?5 WHERE subaccount = ?1 AND instance = ?2 AND name = ?3",
                    key.scope.kind.table()
                ),
                params![key.scope.subaccount, instance_column(&key.scope.level), key.name, sealed, now_secs()],
            )?;
            Ok(n == 1)
        })
    }

    fn update_if(&self, key: RowKey, expected: Vec<u8>, sealed: Vec<u8>) -> StoreFuture<'_, bool> {
        self.call("updating a destination", move |c| {
            let n = c.execute(
                &format!(
                    "UPDATE {} SET sealed = ?4, modified_at = ?5
                     WHERE subaccount = ?1 AND instance = ?2 AND name = ?3 AND sealed = ?6",
                    key.scope.kind.table()
                ),
                params![
                    key.scope.subaccount,
                    instance_column(&key.scope.level),
                    key.name,
                    sealed,
                    now_secs(),
                    expected
                ],
            )?;
            Ok(n == 1)
        })
    }

    fn scan(&self, kind: Kind, subaccount: Option<String>) -> StoreFuture<'_, Vec<(RowKey, Vec<u8>)>> {
        self.call("reading all rows", move |c| {
            // `?1 IS NULL`: every subaccount.
            let mut stmt = c.prepare(&format!(
                "SELECT subaccount, instance, name, sealed FROM {} WHERE ?1 IS NULL OR subaccount = ?1
                 ORDER BY subaccount, instance, name",
                kind.table()
            ))?;
            let rows = stmt.query_map([subaccount], |r| {
                let scope = Scope { subaccount: r.get(0)?, level: level_of(r.get(1)?), kind };
                Ok((RowKey { scope, name: r.get(2)? }, r.get(3)?))
            })?;
            rows.collect()
        })
    }

    fn upsert(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, ()> {
        self.call("storing a destination", move |c| {
            c.execute(
                &format!(
                    "INSERT INTO {} (subaccount, instance, name, sealed, modified_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (subaccount, instance, name) DO UPDATE SET sealed = ?4, modified_at = ?5",
                    key.scope.kind.table()
                ),
                params![key.scope.subaccount, instance_column(&key.scope.level), key.name, sealed, now_secs()],
            )
            .map(drop)
        })
    }

    fn delete(&self, key: RowKey) -> StoreFuture<'_, bool> {
        self.call("deleting a destination", move |c| {
            let n = c.execute(
                &format!(
                    "DELETE FROM {} WHERE subaccount = ?1 AND instance = ?2 AND name = ?3",
                    key.scope.kind.table()
                ),
                params![key.scope.subaccount, instance_column(&key.scope.level), key.name],
            )?;
            Ok(n == 1)
        })
    }

    fn meta(&self, key: &'static str) -> StoreFuture<'_, Option<Vec<u8>>> {
        self.call("reading database metadata", move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
        })
    }

    fn swap_meta(&self, key: &'static str, expected: Option<Vec<u8>>, value: Vec<u8>) -> StoreFuture<'_, bool> {
        self.call("writing database metadata", move |c| {
            let n = match expected {
                None => c.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![key, value],
                )?,
                Some(expected) => c.execute(
                    "UPDATE meta SET value = ?2 WHERE key = ?1 AND value = ?3",
                    params![key, value, expected],
                )?,
            };
            Ok(n == 1)
        })
    }
}
