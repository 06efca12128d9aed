//! The PostgreSQL backend of [`Store`], for several service replicas sharing one database.
//!
//! Every method is one statement, so each write is its own transaction and the
//! compare-and-swap of [`Store::update_if`] is atomic in the database, whichever replica runs
//! it. Schema migrations run in one transaction under an advisory lock, so replicas starting
//! together migrate once. Connections come from a bounded pool (`deadpool-postgres`); broken
//! ones are dropped and replaced. `tokio-postgres` sets `TCP_NODELAY` on its TCP sockets.
//!
//! Connections are TCP, with TLS as libpq's `sslmode` and friends in the URL say
//! ([`crate::pg_tls`]), or a unix socket (`host=/run/postgresql` in the URL).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::store::{Kind, RowKey, Scope, Store, StoreError, StoreFuture, instance_column, level_of, now_secs};

/// Connections per service process; PostgreSQL's default limit (100) leaves room for a few
/// replicas.
pub(crate) const POOL_SIZE: usize = 16;
/// How long a request waits for a connection before failing with a clear error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Any fixed number works; all replicas must agree on it.
const MIGRATION_LOCK: i64 = 0x6665_7272_7964_6573; // "ferrydes"

/// Append only, like the SQLite list; the same tables, in PostgreSQL's types.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE destinations (
        subaccount  TEXT   NOT NULL,
        instance    TEXT   NOT NULL,  -- '' for subaccount level
        name        TEXT   NOT NULL,
        sealed      BYTEA  NOT NULL,  -- AES-256-GCM over the JSON
        modified_at BIGINT NOT NULL,  -- unix seconds
        PRIMARY KEY (subaccount, instance, name)
    );
    CREATE TABLE fragments (LIKE destinations INCLUDING ALL);
    CREATE TABLE certificates (LIKE destinations INCLUDING ALL);
    CREATE TABLE labels (LIKE destinations INCLUDING ALL);  -- name is '<d|f|c>/<object name>'
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
"];

pub(crate) struct PgStore {
    pool: Pool,
}

fn err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    // `Display` of a tokio-postgres error is terse ("db error"); the source says what failed.
    move |e| {
        let detail = causes(&e);
        if connection_lost(&e) {
            StoreError::unavailable(context, format!("{e}{detail}"))
        } else {
            StoreError::backend(context, format!("{e}{detail}"))
        }
    }
}

/// `e`'s sources, each after ": ": what a TLS failure was is two levels down (pool error →
/// tokio-postgres' "error performing TLS handshake" → rustls' "invalid peer certificate: …").
/// Some errors already print their source (deadpool's do): a source whose text is already
/// there is skipped.
fn causes(e: &dyn std::error::Error) -> String {
    let mut seen = e.to_string();
    let mut out = String::new();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !seen.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
            seen.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// Whether `e` says the server is gone or going rather than that the statement failed: the
/// connection closed or broke (an I/O error), SQLSTATE class 08 (connection exception) or 57P
/// (operator intervention: admin/crash shutdown, cannot connect now). A restart of the database
/// shows up as these; the next request gets a fresh connection from the pool.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let state = e.code().map(|c| c.code()).unwrap_or_default();
    e.is_closed() || io || state.starts_with("08") || state.starts_with("57P")
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database`, or the key=value
    /// form) and brings the schema up to date.
    pub(crate) async fn open(url: &str) -> Result<Self, StoreError> {
        let context = "cannot use the destination database";
        let prepared = crate::pg_tls::prepare(url).map_err(|e| StoreError::backend(context, e))?;
        let mut config: tokio_postgres::Config = prepared.url.parse().map_err(|e| {
            StoreError::backend(
                context,
                format!("the PostgreSQL URL is not valid ({e}); use postgres://user@host:port/db"),
            )
        })?;
        config.ssl_mode(prepared.ssl_mode);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("ferry-destination");
        let manager =
            Manager::from_config(config, prepared.tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::backend(context, e))?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self, context: &'static str) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| {
            let detail = causes(&e);
            StoreError::unavailable(context, format!("no database connection ({e}{detail})"))
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let context = "migrating the database schema";
        let e = err(context);
        let mut client = self.client(context).await?;
        let tx = client.transaction().await.map_err(&e)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(&e)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)").await.map_err(&e)?;
        let current: Option<i64> =
            tx.query_one("SELECT max(version) FROM schema_version", &[]).await.map_err(&e)?.get(0);
        let current = current.unwrap_or(0);
        let supported = MIGRATIONS.len() as i64;
        if current > supported {
            return Err(StoreError::SchemaTooNew { found: current, supported });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await.map_err(&e)?;
            tracing::info!(version = i + 1, "applied destination database migration (PostgreSQL)");
        }
        tx.execute("DELETE FROM schema_version", &[]).await.map_err(&e)?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&supported]).await.map_err(&e)?;
        tx.commit().await.map_err(&e)
    }

    /// Runs one statement that changes rows; the number of rows it changed.
    fn execute<'a>(
        &'a self,
        context: &'static str,
        sql: String,
        params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let client = self.client(context).await?;
            let stmt = client.prepare_cached(&sql).await.map_err(err(context))?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
            client.execute(&stmt, &refs).await.map_err(err(context))
        })
    }
}

type Params = Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>;

/// `(subaccount, instance, name)` of a row as statement parameters `$1..$3`.
fn key_params(key: &RowKey) -> Params {
    vec![
        Box::new(key.scope.subaccount.clone()),
        Box::new(instance_column(&key.scope.level).to_owned()),
        Box::new(key.name.clone()),
    ]
}

impl Store for PgStore {
    fn get(&self, key: RowKey) -> StoreFuture<'_, Option<Vec<u8>>> {
        let context = "reading a destination";
        Box::pin(async move {
            let client = self.client(context).await?;
            let sql = format!(
                "SELECT sealed FROM {} WHERE subaccount = $1 AND instance = $2 AND name = $3",
                key.scope.kind.table()
            );
            let stmt = client.prepare_cached(&sql).await.map_err(err(context))?;
            let row = client
                .query_opt(&stmt, &[&key.scope.subaccount, &instance_column(&key.scope.level), &key.name])
                .await
                .map_err(err(context))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn get_first(&self, keys: Vec<RowKey>) -> StoreFuture<'_, Option<(RowKey, Vec<u8>)>> {
        let context = "reading a destination";
        Box::pin(async move {
            let Some(first) = keys.first() else { return Ok(None) };
            let table = first.scope.kind.table();
            // One statement, one round trip: a branch per key, the earliest key that has a row wins.
            let sql = (0..keys.len())
                .map(|i| {
                    let p = 3 * i;
                    format!(
                        "SELECT {i}::int4 AS i, sealed FROM {table} WHERE subaccount = ${} AND instance = ${} AND name = ${}",
                        p + 1,
                        p + 2,
                        p + 3
                    )
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
                + " ORDER BY i LIMIT 1";
            let instances: Vec<&str> = keys.iter().map(|k| instance_column(&k.scope.level)).collect();
            type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
            let mut params: Vec<Param<'_>> = Vec::with_capacity(3 * keys.len());
            for (key, instance) in keys.iter().zip(&instances) {
                params.push(&key.scope.subaccount);
                params.push(instance);
                params.push(&key.name);
            }
            let client = self.client(context).await?;
            let stmt = client.prepare_cached(&sql).await.map_err(err(context))?;
            let row = client.query_opt(&stmt, &params).await.map_err(err(context))?;
            Ok(row.and_then(|r| {
                let i: i32 = r.get(0);
                let sealed: Vec<u8> = r.get(1);
                keys.into_iter().nth(i as usize).map(|k| (k, sealed))
            }))
        })
    }

    fn list(&self, scope: Scope) -> StoreFuture<'_, Vec<(String, Vec<u8>, i64)>> {
        let context = "listing destinations";
        Box::pin(async move {
            let client = self.client(context).await?;
            // COLLATE "C": the byte order SQLite uses, whatever the database's locale.
            let sql = format!(
                "SELECT name, sealed, modified_at FROM {} WHERE subaccount = $1 AND instance = $2 \
                 ORDER BY name COLLATE \"C\"",
                scope.kind.table()
            );
            let stmt = client.prepare_cached(&sql).await.map_err(err(context))?;
            let rows = client
                .query(&stmt, &[&scope.subaccount, &instance_column(&scope.level)])
                .await
                .map_err(err(context))?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    fn insert(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, bool> {
        let sql = format!(
            "INSERT INTO {} (subaccount, instance, name, sealed, modified_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
            key.scope.kind.table()
        );
        let mut params = key_params(&key);
        params.push(Box::new(sealed));
        params.push(Box::new(now_secs()));
        Box::pin(async move { Ok(self.execute("creating a destination", sql, params).await? == 1) })
    }

    fn update(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, bool> {
        let sql = format!(
            "UPDATE {} SET sealed = $4, modified_at = $5 WHERE subaccount = $1 AND instance = $2 AND name = $3",
            key.scope.kind.table()
        );
        let mut params = key_params(&key);
        params.push(Box::new(sealed));
        params.push(Box::new(now_secs()));
        Box::pin(async move { Ok(self.execute("updating a destination", sql, params).await? == 1) })
    }

    fn update_if(&self, key: RowKey, expected: Vec<u8>, sealed: Vec<u8>) -> StoreFuture<'_, bool> {
        let sql = format!(
            "UPDATE {} SET sealed = $4, modified_at = $5
             WHERE subaccount = $1 AND instance = $2 AND name = $3 AND sealed = $6",
            key.scope.kind.table()
        );
        let mut params = key_params(&key);
        params.push(Box::new(sealed));
        params.push(Box::new(now_secs()));
        params.push(Box::new(expected));
        Box::pin(async move { Ok(self.execute("updating a destination", sql, params).await? == 1) })
    }

    fn scan(&self, kind: Kind, subaccount: Option<String>) -> StoreFuture<'_, Vec<(RowKey, Vec<u8>)>> {
        let context = "reading all rows";
        Box::pin(async move {
            let client = self.client(context).await?;
            // `$1 IS NULL`: every subaccount.
            let sql = format!(
                "SELECT subaccount, instance, name, sealed FROM {} WHERE $1::TEXT IS NULL OR subaccount = $1",
                kind.table()
            );
            let rows = client.query(&sql, &[&subaccount]).await.map_err(err(context))?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let scope = Scope { subaccount: r.get(0), level: level_of(r.get(1)), kind };
                    (RowKey { scope, name: r.get(2) }, r.get(3))
                })
                .collect())
        })
    }

    fn upsert(&self, key: RowKey, sealed: Vec<u8>) -> StoreFuture<'_, ()> {
        let sql = format!(
            "INSERT INTO {} (subaccount, instance, name, sealed, modified_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (subaccount, instance, name) DO UPDATE SET sealed = $4, modified_at = $5",
            key.scope.kind.table()
        );
        let mut params = key_params(&key);
        params.push(Box::new(sealed));
        params.push(Box::new(now_secs()));
        Box::pin(async move { self.execute("storing a destination", sql, params).await.map(drop) })
    }

    fn delete(&self, key: RowKey) -> StoreFuture<'_, bool> {
        let sql =
            format!("DELETE FROM {} WHERE subaccount = $1 AND instance = $2 AND name = $3", key.scope.kind.table());
        let params = key_params(&key);
        Box::pin(async move { Ok(self.execute("deleting a destination", sql, params).await? == 1) })
    }

    fn meta(&self, key: &'static str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let context = "reading database metadata";
        Box::pin(async move {
            let client = self.client(context).await?;
            let row = client.query_opt("SELECT value FROM meta WHERE key = $1", &[&key]).await.map_err(err(context))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn swap_meta(&self, key: &'static str, expected: Option<Vec<u8>>, value: Vec<u8>) -> StoreFuture<'_, bool> {
        let (sql, params): (&str, Params) = match expected {
            None => (
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                vec![Box::new(key), Box::new(value)],
            ),
            Some(expected) => (
                "UPDATE meta SET value = $2 WHERE key = $1 AND value = $3",
                vec![Box::new(key), Box::new(value), Box::new(expected)],
            ),
        };
        Box::pin(async move { Ok(self.execute("writing database metadata", sql.to_owned(), params).await? == 1) })
    }
}
