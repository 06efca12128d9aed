//! PostgreSQL restarts (fast shutdown, then start, as an operator's `systemctl restart` does)
//! while writes and find calls stream in. Requests during the outage get a prompt 503 that says
//! the database is unavailable (not a 500, not the driver's words, not a hang); the service
//! recovers by itself once the database is back; every write it acknowledged is there; and no
//! connection the restart broke stays open.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use ferry_core::Secret;
use ferry_testkit::postgres::RestartablePostgres;
use serde_json::json;

use super::{Env, V1, config};
use crate::DatabaseConfig;

/// A request that takes longer than this is a hang (the pool's connect timeout is 10 s).
const HANG: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Seen {
    acknowledged: Vec<String>,
    unavailable: usize,
    other: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_is_503_then_recovers_without_losing_acknowledged_writes() {
    let pg = Arc::new(tokio::task::spawn_blocking(RestartablePostgres::start).await.unwrap());
    let url = pg.database("restart");
    let env = Arc::new(Env::with_config(config(DatabaseConfig::Postgres { url: Secret::new(url) }, [7; 32])).await);
    let t = env.token("zone-restart", "client-restart");
    env.create(&t, "subaccount", json!({"Name": "stable", "Type": "HTTP", "URL": "https://stable.example", "Authentication": "NoAuthentication", "ProxyType": "Internet"}))
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (env, t, stop) = (env.clone(), t.clone(), stop.clone());
        workers.spawn(async move {
            let mut seen = Seen::default();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("w{w}-{i}");
                let body = json!({"Name": name, "Type": "HTTP", "URL": "https://w.example", "Authentication": "NoAuthentication", "ProxyType": "Internet"});
                let uri = format!("{V1}/subaccountDestinations");
                let write = env.call(Method::POST, &uri, Some(&t), Some(body));
                let r = tokio::time::timeout(HANG, write).await.unwrap_or_else(|_| panic!("write {name} hung"));
                match r.status {
                    StatusCode::CREATED => seen.acknowledged.push(name),
                    StatusCode::SERVICE_UNAVAILABLE => {
                        seen.unavailable += 1;
                        let msg = r.error().to_owned();
                        if !msg.contains("database is unavailable") || msg.contains("db error") {
                            seen.other.push(format!("503 with {msg}"));
                        }
                    }
                    s => seen.other.push(format!("write: {s} {}", r.text)),
                }
                let find = tokio::time::timeout(HANG, env.find(&t, "stable", &[]))
                    .await
                    .unwrap_or_else(|_| panic!("find hung"));
                match find.status {
                    StatusCode::OK => assert_eq!(find.json["destinationConfiguration"]["Name"], "stable"),
                    StatusCode::SERVICE_UNAVAILABLE => seen.unavailable += 1,
                    s => seen.other.push(format!("find: {s} {}", find.text)),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop_fast()).await.unwrap();
    // Down for a while: every request in this time must be answered, with 503.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.start_again()).await.unwrap();

    // The same service, not restarted, serves again.
    let mut recovered = false;
    for _ in 0..300 {
        if env.find(&t, "stable", &[]).await.status == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the service did not recover after the database came back");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut all = Seen::default();
    while let Some(seen) = workers.join_next().await {
        let seen = seen.unwrap();
        all.acknowledged.extend(seen.acknowledged);
        all.unavailable += seen.unavailable;
        all.other.extend(seen.other);
    }
    assert!(all.other.is_empty(), "answers other than 201/200/503 with a clear message: {:?}", all.other);
    assert!(all.unavailable > 0, "no request saw the outage");

    // No acknowledged write lost.
    let list = env.call(Method::GET, &format!("{V1}/subaccountDestinations"), Some(&t), None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    let stored: std::collections::HashSet<&str> =
        list.json.as_array().unwrap().iter().filter_map(|d| d["Name"].as_str()).collect();
    let lost: Vec<&String> = all.acknowledged.iter().filter(|n| !stored.contains(n.as_str())).collect();
    assert!(lost.is_empty(), "acknowledged writes missing after the restart: {lost:?}");
    // Writes after the restart succeed too.
    env.create(&t, "subaccount", json!({"Name": "after", "Type": "HTTP", "URL": "https://after.example", "Authentication": "NoAuthentication", "ProxyType": "Internet"}))
        .await;
    // Nothing leaks: the connections the restart broke are closed, not kept (a socket the
    // server closed but we did not stays in CLOSE_WAIT), and the pool holds at most its size.
    // Only this test talks to this server, so every client socket to its port is ours.
    let mut open = client_sockets(pg.port);
    for _ in 0..300 {
        if open.close_wait == 0 && open.total <= crate::postgres::POOL_SIZE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = client_sockets(pg.port);
    }
    assert_eq!(open.close_wait, 0, "connections broken by the restart are still open: {open:?}");
    assert!(open.total <= crate::postgres::POOL_SIZE, "more database connections than the pool holds: {open:?}");
    eprintln!("{} writes acknowledged, {} answers were 503 during the outage", all.acknowledged.len(), all.unavailable);
}

#[derive(Debug)]
struct ClientSockets {
    /// Open TCP sockets to the port (every state but TIME_WAIT, which holds no descriptor).
    total: usize,
    /// Those the server closed and the process did not.
    close_wait: usize,
}

/// This host's TCP sockets whose remote end is 127.0.0.1:`port` (`/proc/net/tcp`).
fn client_sockets(port: u16) -> ClientSockets {
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    let remote = format!("0100007F:{port:04X}");
    let states: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(2) == Some(&remote.as_str())).then(|| cols[3].to_owned())
        })
        .filter(|st| st != "06")
        .collect();
    ClientSockets { total: states.len(), close_wait: states.iter().filter(|st| *st == "08").count() }
}
