//! The Destination Service: SAP-compatible destination management and find-by-name.
//!
//! Wire behaviour follows `CLIENT-CONTRACT.md` §3 (what the SAP Cloud SDK and approuter send
//! and expect) and `SPEC.md` §1–2. The caller's bearer token decides everything about scope:
//! its `zid` is the subaccount, its service instance id (or, failing that, its client id) the
//! instance level, so there are no tenant ids in URLs to forge.
//!
//! What is served (base `/destination-configuration`): `v1/{subaccount,instance}Destinations`
//! (CRUD, bulk POST/PUT with 207, bulk DELETE by `$filter=Name in (...)`, list modes `$filter`,
//! `$select=Name`, `$page`/`$pageSize`/`$pageCount`/`$entityCount`),
//! `v1/{subaccount,instance}DestinationFragments`, `v1/{subaccount,instance}Certificates` (uploads,
//! or generated from `Attributes` and renewed with `AutomaticRenew`: `certgen`; `.../publicKeys`), labels
//! of all three (`.../{name}/labels`, GET/PUT/PATCH),
//! find-by-name `v1/destinations/{name}` (instance level, then subaccount level; `X-fragment-name`
//! merging) and the consume API `v2/destinations/{name}[@level]` (no fallback, default
//! `instance`; `provider_subaccount`/`provider_instance` for a subscriber's token, whose client's
//! home subaccount [`DestinationService::set_client_zones`] tells). Lists also take
//! `modifiedwithin`, label filters and `$includeMetadata=modification_time;etag`. Token flows on find: Basic, OAuth2ClientCredentials, OAuth2Password,
//! OAuth2UserTokenExchange and OAuth2JWTBearer (both as RFC 7523 jwt-bearer with the user's JWT,
//! from `X-user-token` or a user token in `Authorization`, verified by the service's verifier;
//! their tokens are cached per user), OAuth2RefreshToken (`X-refresh-token`),
//! OAuth2AuthorizationCode (`X-code`, `X-redirect-uri`, `X-code-verifier`; its tokens are never
//! cached, as a code is single-use, and neither are those of a caller's `X-client-assertion`) and
//! OAuth2TechnicalUserPropagation (client credentials; the token goes in
//! `SAP-Connectivity-Technical-Authentication`) and OAuth2TokenExchange (RFC 8693 with
//! `X-subject-token(-type)` and optional `X-actor-token(-type)`; `issued_token_type` returned).
//! `X-client-assertion` with `X-client-assertion-type` replaces the client secret in any of them;
//! `tokenService.KeyStoreLocation` (an entry of the certificate store: PEM with certificate and
//! key, or P12/PFX or JKS opened with `tokenService.KeyStorePassword`) authenticates the client by
//! mTLS instead (SPEC §2.4), and `X-client-assertion-destination-name`
//! (or the property `clientAssertion.destinationName`) names an OAuth2ClientCredentials provider
//! destination with `clientAssertion.type` whose access token becomes the client assertion (§2.5);
//! such a provider is not deleted while a destination uses it (400 naming the user).
//! Destinations and fragments written through the API (POST/PUT, single or bulk) must pass
//! `ferry_model`'s rules (`Destination::check`: required keys per `Type` and `Authentication`,
//! enumerations, booleans, numbers, URL forms, length limits); a refusal is a 400 (or a 207 item)
//! whose `ErrorMessage` names the property and the rule. Stored rows are not re-checked on read.
//! SAML flows (`saml`): SAMLAssertion returns a signed SAML 2.0 assertion for the user
//! (`SAML2.0` token, cached per user) and OAuth2SAMLBearerAssertion exchanges one with RFC 7522;
//! both sign with the subaccount's key (`v1/saml2Metadata/certificate`) or a `KeyStoreLocation`
//! (PEM, or P12/JKS with `KeyStorePassword`). SAPAssertionSSO, deprecated by SAP, answers a failed token.
//!
//! Deviations from SAP's service, on purpose or not yet built: lists never contain secrets (and
//! certificate lists no `Content`); a missing `X-refresh-token` or `X-code` is a 400 rather than a
//! failed token, and so are missing `X-subject-token` headers; a user JWT that this service cannot verify (non-XSUAA issuers with
//! `x_user_token.jwks`) fails the token; `saml2Metadata` IdP metadata and passive certificates
//! are not supported yet.
//!
//! PrincipalPropagation: an IAS user token with `forward_corp_idp_token` on an OnPremise
//! destination is exchanged at its issuer for the corporate IdP's token (SPEC §2.6).
//! Destination chaining (SPEC §1.11, `X-chain-name` on find): the two predefined chains run
//! the first destination's flow and feed its token into the found destination's flow (as the
//! client-provided SAML assertion, or as the user token).
//!
//! Layers, top to bottom: `api` (HTTP shapes and status codes), [`DestinationService`]
//! (sealing, lookups, token retrieval), `tokens` (remote OAuth calls and their cache) and
//! `store` (sealed rows in SQLite, or in PostgreSQL for replicas: `postgres`), sealed under the
//! keys of `keys` (current and previous, for rotation).
//!
//! Replicas: the service keeps no rows or ETags in memory, so several processes can share one
//! PostgreSQL database and each sees the others' writes at once; conditional writes (`PUT`
//! with `If-Match`, which SAP's API does not have, answering 412 when stale; label PATCH) are
//! compare-and-swaps in the database.

// Tests state their expectations with unwrap; a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod api;
mod certgen;
mod keys;
mod labels;
mod pg_tls;
mod postgres;
mod query;
mod saml;
mod store;
mod tokens;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_auth::Verifier;
use ferry_core::serve::{AcceptOptions, serve_router};
use ferry_core::{Secret, Shutdown};
use ferry_model::Destination;

use crate::keys::Keyring;
pub use crate::keys::{KeyError, KeySource};
use crate::postgres::PgStore;
pub use crate::store::StoreError;
use crate::store::{Kind, Level, RowKey, Scope, SqliteStore, Store};
use crate::tokens::{Clock, SystemClock, TokenFetcher};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// SPEC §2.3: token requests time out after 10 s unless the destination says otherwise.
pub const DEFAULT_TOKEN_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub enum DatabaseConfig {
    /// A SQLite file, created with its parent directories if missing.
    Sqlite { path: PathBuf },
    /// Nothing survives a restart; for tests and throw-away `ferry up` runs.
    SqliteMemory,
    /// A PostgreSQL database (`postgres://user[:password]@host[:port]/db`), which several
    /// service replicas may share.
    Postgres { url: Secret<String> },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database: DatabaseConfig,
    /// Seals every stored destination. Losing it loses every stored secret; changing it makes
    /// an existing database refuse to open unless the old key is passed as a previous key
    /// ([`DestinationService::open_rotating`]).
    pub master_key: Secret<[u8; 32]>,
    /// Default time limit for a call to a destination's token service.
    pub token_fetch_timeout: Duration,
    /// Trust for token services besides the system's roots, for the mTLS connections of
    /// `tokenService.KeyStoreLocation` (the other calls use the `http` client given to `open`).
    pub token_service_ca_pem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("destination store: {0}")]
    Store(#[from] StoreError),
    #[error(
        "the master key does not match the key this destination database was written with; start with the \
         original key, or with it among the previous keys when rotating (without it the stored destinations \
         cannot be read)"
    )]
    WrongMasterKey,
    #[error("stored destination '{name}' cannot be decrypted; the master key may have changed or the row was altered")]
    Undecryptable { name: String },
    #[error("stored destination '{name}' is unreadable: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("encrypting a destination failed")]
    Encrypt,
    /// A read-modify-write lost the race against other writers too often.
    #[error("'{name}' is being changed by too many requests at once; try again")]
    Contended { name: String },
}

/// Marker sealed under the master key at creation, so a wrong key is reported when the
/// service starts instead of as a 500 on the first read.
const KEY_CHECK_META: &str = "key_check";
const KEY_CHECK_AAD: &[u8] = b"ferry-destination/key-check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"ferry destination master key check";

pub struct DestinationService {
    store: Box<dyn Store>,
    keys: Keyring,
    /// Callers send the same token with every request: verified signatures are remembered.
    verifier: ferry_auth::TokenCache,
    tokens: TokenFetcher,
    saml: saml::SamlState,
    client_zones: std::sync::OnceLock<ClientZones>,
}

impl std::fmt::Debug for DestinationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationService").finish_non_exhaustive()
    }
}

/// A destination (or fragment, certificate) as read from the store, with the ETag of its
/// stored form.
pub(crate) struct Stored<T = Destination> {
    pub destination: T,
    pub etag: String,
}

/// One row of a list: its name, value and ETag, and when it was last written (unix seconds).
pub(crate) struct Listed<T> {
    pub name: String,
    pub stored: Stored<T>,
    pub modified_at: i64,
}

/// Maps an OAuth client id to the subaccount (zone) it belongs to; see
/// [`DestinationService::set_client_zones`].
pub type ClientZones = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What a conditional write did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Conditional {
    Done,
    Missing,
    /// The stored object no longer has the ETag the caller named.
    Changed,
}

/// Retries of a read-modify-write that lost a race; each round at least one writer wins.
const MAX_ATTEMPTS: usize = 64;

/// How many rows [`DestinationService::reseal`] sealed again, and how many it could not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    pub resealed: usize,
    /// Rows that do not open under any configured key, or changed while being re-sealed; while
    /// this is not 0 the previous keys must stay.
    pub left: usize,
}

impl DestinationService {
    /// Opens the database (migrating it), checks the master key against it and returns the
    /// service. `http` is used for calls to destinations' token services.
    pub async fn open(config: Config, verifier: Arc<Verifier>, http: reqwest::Client) -> Result<Arc<Self>, Error> {
        Self::open_rotating(config, Vec::new(), verifier, http).await
    }

    /// `open` during a key rotation: `previous_keys` open rows but never seal, and every row
    /// under one of them is sealed again under `config.master_key` at start-up.
    pub async fn open_rotating(
        config: Config,
        previous_keys: Vec<Secret<[u8; 32]>>,
        verifier: Arc<Verifier>,
        http: reqwest::Client,
    ) -> Result<Arc<Self>, Error> {
        Self::open_with_clock(config, &previous_keys, verifier, http, Arc::new(SystemClock)).await
    }

    /// `open` with the token cache's time source replaced, so tests can expire tokens.
    pub(crate) async fn open_with_clock(
        config: Config,
        previous_keys: &[Secret<[u8; 32]>],
        verifier: Arc<Verifier>,
        http: reqwest::Client,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, Error> {
        let store: Box<dyn Store> = match &config.database {
            DatabaseConfig::Sqlite { path } => Box::new(SqliteStore::open(Some(path.clone())).await?),
            DatabaseConfig::SqliteMemory => Box::new(SqliteStore::open(None).await?),
            DatabaseConfig::Postgres { url } => Box::new(PgStore::open(url.expose()).await?),
        };
        let keys = Keyring::new(&config.master_key, previous_keys).map_err(|_| Error::Encrypt)?;
        let rotated = check_key(store.as_ref(), &keys).await?;
        let tokens = TokenFetcher::new(http, config.token_service_ca_pem.clone(), config.token_fetch_timeout, clock);
        let service = Arc::new(Self {
            store,
            keys,
            verifier: ferry_auth::TokenCache::new(verifier),
            tokens,
            saml: saml::SamlState::default(),
            client_zones: std::sync::OnceLock::new(),
        });
        if rotated || service.keys.has_previous() {
            let r = service.reseal().await?;
            tracing::info!(
                resealed = r.resealed,
                left = r.left,
                "destination rows sealed again under the current key; previous keys may go once none are left"
            );
        }
        Ok(service)
    }

    /// Seals every row that is not under the current key again under it: after a key rotation
    /// (and once for databases from before key ids). Safe while other replicas write: each row
    /// is replaced only if it is still what was read.
    pub async fn reseal(&self) -> Result<Resealed, Error> {
        let mut out = Resealed::default();
        for kind in Kind::ALL {
            for (key, sealed) in self.store.scan(kind, None).await? {
                let aad = key.associated_data();
                let plain = match self.keys.open(&aad, &sealed) {
                    Ok((_, false)) => continue,
                    Ok((plain, true)) => plain,
                    Err(e) => {
                        tracing::warn!(subaccount = %key.scope.subaccount, level = ?key.scope.level, kind = ?kind,
                            name = %key.name, error = %e, "row does not open under any configured key; left as it is");
                        out.left += 1;
                        continue;
                    }
                };
                let again = self.keys.seal(&aad, &plain).map_err(|_| Error::Encrypt)?;
                if self.store.update_if(key, sealed, again).await? {
                    out.resealed += 1;
                } else {
                    out.left += 1;
                }
            }
        }
        Ok(out)
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(self.clone())
    }

    /// Creates or replaces a destination; `instance: None` means subaccount level. For loading
    /// destinations from configuration, where "already exists" is not an error.
    pub async fn upsert(
        &self,
        subaccount: &str,
        instance: Option<&str>,
        destination: Destination,
    ) -> Result<(), Error> {
        let level = instance.map_or(Level::Subaccount, |i| Level::Instance(i.to_owned()));
        let key = Scope { subaccount: subaccount.to_owned(), level, kind: Kind::Destination }.row(destination.name());
        let sealed = self.seal(&key, &destination)?;
        self.store.upsert(key, sealed).await?;
        Ok(())
    }

    /// The subaccount's SAML signing certificate (PEM), generated now if there is none: what a
    /// token service must trust for this subaccount's OAuth2SAMLBearerAssertion destinations.
    pub async fn saml_certificate_pem(&self, subaccount: &str) -> Result<String, Error> {
        let signer = self.subaccount_signer(subaccount, true).await?.ok_or(Error::Encrypt)?;
        Ok(signer.certificate_pem())
    }

    fn seal<T: Serialize>(&self, key: &RowKey, destination: &T) -> Result<Vec<u8>, Error> {
        let plain = serde_json::to_vec(destination).map_err(|_| Error::Encrypt)?;
        self.keys.seal(&key.associated_data(), &plain).map_err(|_| Error::Encrypt)
    }

    fn unseal<T: DeserializeOwned>(&self, key: &RowKey, sealed: &[u8]) -> Result<Stored<T>, Error> {
        let (plain, _) = self.keys.open(&key.associated_data(), sealed).map_err(|e| {
            // Names and ids only: the content is exactly what must not reach a log.
            tracing::error!(subaccount = %key.scope.subaccount, level = ?key.scope.level, name = %key.name, error = %e,
                "stored destination cannot be decrypted");
            Error::Undecryptable { name: key.name.clone() }
        })?;
        let destination = serde_json::from_slice(&plain).map_err(|e| {
            tracing::error!(subaccount = %key.scope.subaccount, name = %key.name, "stored destination is invalid");
            Error::Corrupt { name: key.name.clone(), reason: e.to_string() }
        })?;
        Ok(Stored { destination, etag: etag_of_bytes(&plain) })
    }

    pub(crate) async fn load<T: DeserializeOwned>(&self, key: &RowKey) -> Result<Option<Stored<T>>, Error> {
        match self.store.get(key.clone()).await? {
            Some(sealed) => self.unseal(key, &sealed).map(Some),
            None => Ok(None),
        }
    }

    /// The first of `keys` that exists, read in one round trip to the store.
    pub(crate) async fn load_first<T: DeserializeOwned>(
        &self,
        keys: Vec<RowKey>,
    ) -> Result<Option<(RowKey, Stored<T>)>, Error> {
        match self.store.get_first(keys).await? {
            Some((key, sealed)) => self.unseal(&key, &sealed).map(|s| Some((key, s))),
            None => Ok(None),
        }
    }

    /// The objects of one collection with their ETags and modification times, ordered by name.
    pub(crate) async fn list_stored<T: DeserializeOwned>(&self, scope: &Scope) -> Result<Vec<Listed<T>>, Error> {
        let rows = self.store.list(scope.clone()).await?;
        rows.into_iter()
            .map(|(name, sealed, modified_at)| {
                self.unseal(&scope.row(&name), &sealed).map(|stored| Listed { name, stored, modified_at })
            })
            .collect()
    }

    /// The destinations that would take `key` (a destination) as their client assertion
    /// provider (`clientAssertion.destinationName`, looked up like a find: the consumer's level,
    /// then the subaccount's), leaving out those named in `ignore` on `key`'s level. Reads every
    /// destination of the subaccount: deletes are rare, and no index of the property exists.
    pub(crate) async fn assertion_consumers(&self, key: &RowKey, ignore: &[String]) -> Result<Vec<String>, Error> {
        let mut consumers = Vec::new();
        let rows = match key.scope.level {
            Level::Subaccount => self.store.scan(Kind::Destination, Some(key.scope.subaccount.clone())).await?,
            Level::Instance(_) => {
                let scope = key.scope.clone();
                let rows = self.store.list(scope.clone()).await?;
                rows.into_iter().map(|(name, sealed, _)| (scope.row(&name), sealed)).collect()
            }
        };
        for (row, sealed) in rows {
            let reaches = row.scope.level == key.scope.level || key.scope.level == Level::Subaccount;
            if row.scope.subaccount != key.scope.subaccount || !reaches || row == *key {
                continue;
            }
            if row.scope.level == key.scope.level && ignore.contains(&row.name) {
                continue;
            }
            let consumer: Destination = self.unseal(&row, &sealed)?.destination;
            if consumer.get("clientAssertion.destinationName") != Some(key.name.as_str()) {
                continue;
            }
            // An instance-level consumer uses its own level's provider when there is one.
            if row.scope.level != key.scope.level && self.exists(&row.scope.row(&key.name)).await? {
                continue;
            }
            consumers.push(row.name);
        }
        Ok(consumers)
    }

    /// Tells the service which subaccount each OAuth client lives in, so that a token a client
    /// got in another subaccount (a subscriber's) can reach its provider's destinations with the
    /// consume API's `provider_subaccount` and `provider_instance` levels. Set once, at start;
    /// without it those levels answer 400.
    pub fn set_client_zones(&self, zones: ClientZones) {
        if self.client_zones.set(zones).is_err() {
            tracing::warn!("the client zones of the Destination Service were set twice; the first setting stays");
        }
    }

    /// The provider subaccount of `client_id`, if known.
    pub(crate) fn client_zone(&self, client_id: &str) -> Option<String> {
        self.client_zones.get().and_then(|zones| zones(client_id))
    }

    /// `false` if the name is taken.
    pub(crate) async fn create<T: Serialize>(&self, key: &RowKey, destination: &T) -> Result<bool, Error> {
        let sealed = self.seal(key, destination)?;
        Ok(self.store.insert(key.clone(), sealed).await?)
    }

    /// `false` if there is no such destination.
    pub(crate) async fn replace<T: Serialize>(&self, key: &RowKey, destination: &T) -> Result<bool, Error> {
        let sealed = self.seal(key, destination)?;
        Ok(self.store.update(key.clone(), sealed).await?)
    }

    /// Replaces an object only if its stored form still has the ETag `if_match` names (a
    /// list, or `*` for any); the check and the write are one compare-and-swap in the store.
    pub(crate) async fn replace_if_match<T: Serialize + DeserializeOwned>(
        &self,
        key: &RowKey,
        value: &T,
        if_match: &str,
    ) -> Result<Conditional, Error> {
        let Some(current) = self.store.get(key.clone()).await? else { return Ok(Conditional::Missing) };
        let stored = self.unseal::<T>(key, &current)?;
        if !etag_listed(if_match, &stored.etag) {
            return Ok(Conditional::Changed);
        }
        let sealed = self.seal(key, value)?;
        Ok(if self.store.update_if(key.clone(), current, sealed).await? {
            Conditional::Done
        } else {
            Conditional::Changed
        })
    }

    /// Read-modify-write of one row that loses no concurrent write: `change` gets the current
    /// value (`None` without a row) and returns the new one; when another write got in
    /// between, it runs again on the newer value.
    pub(crate) async fn modify<T, E>(
        &self,
        key: &RowKey,
        mut change: impl FnMut(Option<T>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.store.get(key.clone()).await.map_err(Error::from)?;
            let value = match &current {
                Some(sealed) => change(Some(self.unseal::<T>(key, sealed)?.destination))?,
                None => change(None)?,
            };
            let sealed = self.seal(key, &value)?;
            let written = match current {
                Some(old) => self.store.update_if(key.clone(), old, sealed).await,
                None => self.store.insert(key.clone(), sealed).await,
            };
            if written.map_err(Error::from)? {
                return Ok(value);
            }
        }
        Err(Error::Contended { name: key.name.clone() }.into())
    }

    /// Whether a row exists (its content is not opened).
    pub(crate) async fn exists(&self, key: &RowKey) -> Result<bool, Error> {
        Ok(self.store.get(key.clone()).await?.is_some())
    }

    /// Creates or replaces a row.
    pub(crate) async fn put<T: Serialize>(&self, key: &RowKey, value: &T) -> Result<(), Error> {
        let sealed = self.seal(key, value)?;
        Ok(self.store.upsert(key.clone(), sealed).await?)
    }

    /// `false` if there is no such destination.
    pub(crate) async fn remove(&self, key: &RowKey) -> Result<bool, Error> {
        let removed = self.store.delete(key.clone()).await?;
        // Labels go with their object, so a new object of the same name starts without any.
        if let Some(labels) = Scope::labels_of(key) {
            self.store.delete(labels).await?;
        }
        Ok(removed)
    }
}

/// Checks the key against the key-check marker (written on first start); `true` when the
/// marker is not under the current key, i.e. the key was rotated since the last start.
async fn check_key(store: &dyn Store, keys: &Keyring) -> Result<bool, Error> {
    let fresh = || keys.seal(KEY_CHECK_AAD, KEY_CHECK_PLAINTEXT).map_err(|_| Error::Encrypt);
    // Replicas starting together on a new database race to write the marker; one wins and the
    // others check against it.
    for _ in 0..MAX_ATTEMPTS {
        let Some(sealed) = store.meta(KEY_CHECK_META).await? else {
            if store.swap_meta(KEY_CHECK_META, None, fresh()?).await? {
                return Ok(false);
            }
            continue;
        };
        return match keys.open(KEY_CHECK_AAD, &sealed) {
            Ok((plain, stale)) if plain == KEY_CHECK_PLAINTEXT => {
                if stale {
                    store.swap_meta(KEY_CHECK_META, Some(sealed), fresh()?).await?;
                }
                Ok(stale)
            }
            _ => Err(Error::WrongMasterKey),
        };
    }
    Err(Error::Contended { name: KEY_CHECK_META.into() })
}

/// Whether an `If-Match`-style list (`"a", W/"b"` or `*`) names `etag`.
pub(crate) fn etag_listed(list: &str, etag: &str) -> bool {
    list.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

/// The ETag of a stored object: the SHA-256 of its stored JSON, quoted.
fn etag_of_bytes(plain: &[u8]) -> String {
    // aws-lc's SHA-256 uses the CPU's SHA extensions; every read of a row computes one.
    format!("\"{}\"", hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, plain)))
}

/// The ETag `value` gets when stored (as a GET of it reports it).
pub(crate) fn etag_of<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_vec(value).ok().map(|plain| etag_of_bytes(&plain))
}

/// Serves the Destination Service API on `listener` until `shutdown` fires.
/// Serves the Destination Service API on `listener` until `shutdown` fires, renewing
/// `AutomaticRenew` certificates every hour meanwhile.
pub async fn run(service: Arc<DestinationService>, listener: tokio::net::TcpListener, shutdown: Shutdown) {
    let renewer = service.clone();
    let stop = shutdown.clone();
    let renewals = tokio::spawn(async move {
        let mut every = tokio::time::interval(certgen::RENEW_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {
                    if let Err(e) = renewer.renew_certificates(std::time::SystemTime::now()).await {
                        tracing::warn!(error = %e, "certificate renewal failed; trying again in an hour");
                    }
                }
            }
        }
    });
    serve_router(listener, service.router(), None, AcceptOptions::named("destination-service"), shutdown).await;
    renewals.abort();
}
