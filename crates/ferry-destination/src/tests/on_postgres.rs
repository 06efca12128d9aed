//! The test modules again, on PostgreSQL: `Env` and `config` give a fresh database of the
//! PostgreSQL server this test binary shares instead of in-memory SQLite.

pub(crate) use super::*;
pub(crate) type Env = super::EnvOn<true>;

/// In-memory SQLite becomes a fresh PostgreSQL database.
pub(crate) fn config(database: DatabaseConfig, key: [u8; 32]) -> Config {
    let database = match database {
        DatabaseConfig::SqliteMemory => postgres_database(),
        other => other,
    };
    super::config(database, key)
}

/// A database that outlives one service and can be shared by several (`_dir` is unused).
pub(crate) fn persistent_database(_dir: &std::path::Path) -> DatabaseConfig {
    postgres_database()
}

#[path = "api.rs"]
mod api;
#[path = "cert_generation.rs"]
mod cert_generation;
#[path = "certificates.rs"]
mod certificates;
#[path = "chain.rs"]
mod chain;
#[path = "concurrency.rs"]
mod concurrency;
#[path = "consume.rs"]
mod consume;
#[path = "corporate_idp.rs"]
mod corporate_idp;
#[path = "fragments.rs"]
mod fragments;
#[path = "labels.rs"]
mod labels;
#[path = "lists.rs"]
mod lists;
#[path = "oauth.rs"]
mod oauth;
#[path = "postgres_storage.rs"]
mod postgres_storage;
#[path = "user_flows.rs"]
mod user_flows;
