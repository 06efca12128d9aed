#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The reconcile logic against kube's mock API service (`tower_test::mock::pair`): there is no
//! cluster on the test machine, so each test plays the API server, checking every request the
//! controller makes (method, path, body) and answering it, in order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_k8s::controller::{FINALIZER, backend_name, backoff, success_message};
use ferry_k8s::{Config, Context, Error, Protocol, Resolver, error_policy, reconcile};
use ferry_transparent_proxy::resource::Destination;
use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const CONFIG: &str = r#"
proxy_namespace = "ferry"
resync_secs = 180
[http]
target_port = "http"
selector = { "app.kubernetes.io/name" = "tp", "app.kubernetes.io/component" = "http" }
[tcp]
target_port = "tcp"
selector = { "app.kubernetes.io/name" = "tp", "app.kubernetes.io/component" = "tcp" }
"#;

/// Answers from a queue, as the Destination Service would: the protocol, or why it failed.
struct Answers(Mutex<VecDeque<Result<Protocol, String>>>);

impl Resolver for Answers {
    fn protocol<'a>(&'a self, _: &'a Destination) -> BoxFuture<'a, Result<Protocol, String>> {
        let next = self.0.lock().unwrap().pop_front().expect("the test queued an answer for this lookup");
        Box::pin(async move { next })
    }
}

fn setup(config: &str, answers: Vec<Result<Protocol, String>>) -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let config = Config::parse("test.toml", config).unwrap();
    (Context::new(client, config, Arc::new(Answers(Mutex::new(answers.into())))), handle)
}

fn destination(extra: Value) -> Destination {
    let mut d = json!({
        "apiVersion": "destination.connectivity.api.sap/v1",
        "kind": "Destination",
        "metadata": { "name": "erp", "namespace": "apps", "uid": "6d1f0c1e-0000-4000-8000-000000000001",
                      "finalizers": [FINALIZER] },
        "spec": { "destinationRef": { "name": "erp-system" } }
    });
    merge(&mut d, extra);
    serde_json::from_value(d).unwrap()
}

/// What the API server answers to a write of the resource: the resource.
fn as_json(extra: Value) -> Value {
    serde_json::to_value(destination(extra)).unwrap()
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// Takes the next request, checks it and answers `status` with `reply`; returns the request's
/// query and JSON body.
async fn expect(handle: &mut Handle, method: &str, path: &str, status: StatusCode, reply: Value) -> (String, Value) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
        .expect("the client is gone; expected another request");
    assert_eq!((request.method().as_str(), request.uri().path()), (method, path));
    let query = request.uri().query().unwrap_or_default().to_owned();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    send.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
    );
    (query, body)
}

async fn ok(handle: &mut Handle, method: &str, path: &str, reply: Value) -> (String, Value) {
    expect(handle, method, path, StatusCode::OK, reply).await
}

fn run(d: Destination, ctx: &Arc<Context>) -> tokio::task::JoinHandle<Result<Action, Error>> {
    tokio::spawn(reconcile(Arc::new(d), ctx.clone()))
}

async fn done(task: tokio::task::JoinHandle<Result<Action, Error>>) -> Result<Action, Error> {
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("reconcile finished").unwrap()
}

const DESTINATIONS: &str = "/apis/destination.connectivity.api.sap/v1/namespaces/apps/destinations";

/// Where the NetworkPolicy of resource `apps/<name>` lives: the proxy namespace.
fn policy_path(name: &str) -> String {
    format!("/apis/networking.k8s.io/v1/namespaces/ferry/networkpolicies/{}", backend_name("apps", name))
}

/// Takes the server-side apply of the NetworkPolicy of `apps/<name>`; returns its body.
async fn policy(handle: &mut Handle, name: &str) -> Value {
    let (query, body) = ok(handle, "PATCH", &policy_path(name), json!({"kind": "NetworkPolicy"})).await;
    assert!(query.contains("fieldManager=ferry-transparent-proxy") && query.contains("force=true"), "{query}");
    body
}

/// The `from` of a policy's only ingress rule, checking there is one rule and one peer.
fn admitted(policy: &Value) -> &Value {
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1, "{policy}");
    let from = ingress[0]["from"].as_array().unwrap();
    assert_eq!(from.len(), 1, "{policy}");
    &from[0]
}

#[tokio::test]
async fn create_adds_the_finalizer_then_services_status_and_event() {
    let (ctx, mut api) = setup(CONFIG, vec![Ok(Protocol::Http)]);
    let backend = backend_name("apps", "erp");

    // A new resource first gets the finalizer, and nothing else until that change comes back.
    let fresh = destination(json!({}));
    let mut fresh_json = serde_json::to_value(&fresh).unwrap();
    fresh_json["metadata"].as_object_mut().unwrap().remove("finalizers");
    let task = run(serde_json::from_value(fresh_json.clone()).unwrap(), &ctx);
    let (_, patch) = ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp"), serde_json::to_value(&fresh).unwrap()).await;
    assert_eq!(patch[1], json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}));
    assert_eq!(done(task).await.unwrap(), Action::await_change());

    // With it: the backend Service in the proxy namespace, the app's Service, status, event.
    let task = run(fresh, &ctx);
    let (query, svc) =
        ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"}))
            .await;
    assert!(query.contains("fieldManager=ferry-transparent-proxy") && query.contains("force=true"), "{query}");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/component"], "http");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(svc["metadata"]["labels"]["destination.connectivity.api.sap/namespace"], "apps");
    assert!(svc["metadata"].get("ownerReferences").is_none(), "owner references cannot cross namespaces");

    let (_, svc) = ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp", json!({"kind": "Service"})).await;
    assert_eq!(svc["spec"]["type"], "ExternalName");
    assert_eq!(svc["spec"]["externalName"], format!("{backend}.ferry.svc.cluster.local"));
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    let owner = &svc["metadata"]["ownerReferences"][0];
    assert_eq!((owner["kind"].as_str(), owner["name"].as_str()), (Some("Destination"), Some("erp")));
    assert_eq!(owner["uid"], "6d1f0c1e-0000-4000-8000-000000000001");
    assert_eq!(owner["controller"], true);

    // Without `accessControl` the default scope, namespaced: only pods of `apps` reach the HTTP
    // pods' port, the one the backend Service targets.
    let np = policy(&mut api, "erp").await;
    assert_eq!(np["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(np["kind"], "NetworkPolicy");
    assert_eq!(np["metadata"]["namespace"], "ferry");
    assert_eq!(np["metadata"]["labels"]["destination.connectivity.api.sap/name"], "erp");
    assert!(np["metadata"].get("ownerReferences").is_none(), "owner references cannot cross namespaces");
    assert_eq!(
        np["spec"]["podSelector"],
        json!({"matchLabels": {"app.kubernetes.io/name": "tp", "app.kubernetes.io/component": "http"}})
    );
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(admitted(&np), &json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}));
    assert_eq!(np["spec"]["ingress"][0]["ports"], json!([{"port": "http", "protocol": "TCP"}]));

    let (_, status) = ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp/status"), fresh_json.clone()).await;
    let condition = &status["status"]["conditions"][0];
    assert_eq!(condition["type"], "Available");
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "ConfigurationSuccessful");
    assert_eq!(
        condition["message"],
        "Transparent Proxy is configured and Kubernetes service with name \"erp\" is created."
    );
    assert!(condition["lastUpdateTime"].as_str().unwrap().ends_with('Z'));

    let (_, event) = ok(&mut api, "POST", "/apis/events.k8s.io/v1/namespaces/apps/events", json!({})).await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Normal"), Some("ConfigurationSuccessful")));
    assert_eq!(event["regarding"]["name"], "erp");

    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));
}

#[tokio::test]
async fn update_moves_the_services_and_leaves_an_unchanged_status_alone() {
    let (ctx, mut api) = setup(CONFIG, vec![Ok(Protocol::Tcp), Ok(Protocol::Tcp)]);
    let backend = backend_name("apps", "erp");
    let available = json!({"status": {"conditions": [{
        "type": "Available", "status": "True", "reason": "ConfigurationSuccessful",
        "message": success_message("erp"), "lastUpdateTime": "2022-09-28T07:26:46Z"}]}});

    // A TCP destination: the TCP pods, port 20004 unless the resource names one.
    let task = run(destination(available.clone()), &ctx);
    let (_, svc) =
        ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"}))
            .await;
    assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/component"], "tcp");
    assert_eq!(svc["spec"]["ports"][0]["port"], 20004);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "tcp");
    ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp", json!({"kind": "Service"})).await;
    let np = policy(&mut api, "erp").await;
    assert_eq!(np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "tcp");
    assert_eq!(np["spec"]["ingress"][0]["ports"], json!([{"port": "tcp", "protocol": "TCP"}]));
    // The condition already says this: no status write and no event; the reconcile ends here.
    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));

    // spec.service.port changed: both Services follow.
    let mut changed = available.clone();
    merge(&mut changed, json!({"spec": {"service": {"port": 5432}}}));
    let task = run(destination(changed), &ctx);
    let (_, svc) =
        ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"}))
            .await;
    assert_eq!(svc["spec"]["ports"][0]["port"], 5432);
    let (_, svc) = ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp", json!({"kind": "Service"})).await;
    assert_eq!(svc["spec"]["ports"][0]["port"], 5432);
    // The policy names the pods' port, not the Service's: it did not change.
    let np = policy(&mut api, "erp").await;
    assert_eq!(np["spec"]["ingress"][0]["ports"], json!([{"port": "tcp", "protocol": "TCP"}]));
    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));
}

#[tokio::test]
async fn delete_removes_the_backend_then_the_finalizer() {
    let (ctx, mut api) = setup(CONFIG, vec![]);
    let backend = backend_name("apps", "erp");
    let deleting = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});

    let task = run(destination(deleting.clone()), &ctx);
    ok(&mut api, "DELETE", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"})).await;
    ok(&mut api, "DELETE", &policy_path("erp"), json!({"kind": "NetworkPolicy"})).await;
    let (_, patch) = ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp"), as_json(json!({}))).await;
    assert_eq!(patch[0], json!({"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER}));
    assert_eq!(patch[1], json!({"op": "remove", "path": "/metadata/finalizers/0"}));
    assert_eq!(done(task).await.unwrap(), Action::await_change());

    // Deleted already (an earlier attempt got that far): the finalizer still goes.
    let task = run(destination(deleting.clone()), &ctx);
    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                      "message": "services not found", "code": 404});
    expect(
        &mut api,
        "DELETE",
        &format!("/api/v1/namespaces/ferry/services/{backend}"),
        StatusCode::NOT_FOUND,
        gone.clone(),
    )
    .await;
    expect(&mut api, "DELETE", &policy_path("erp"), StatusCode::NOT_FOUND, gone).await;
    ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp"), as_json(json!({}))).await;
    assert_eq!(done(task).await.unwrap(), Action::await_change());

    // Any other failure keeps the finalizer, so the backend cannot be leaked.
    let task = run(destination(deleting), &ctx);
    let boom = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError",
                      "message": "etcd is down", "code": 500});
    expect(
        &mut api,
        "DELETE",
        &format!("/api/v1/namespaces/ferry/services/{backend}"),
        StatusCode::INTERNAL_SERVER_ERROR,
        boom,
    )
    .await;
    let err = done(task).await.unwrap_err();
    assert!(err.to_string().contains("failed to clean up"), "{err}");
}

#[tokio::test]
async fn errors_back_off_exponentially_and_success_resets() {
    let down = || Err("connection refused".to_owned());
    let (ctx, mut api) = setup(CONFIG, vec![down(), down(), down(), Ok(Protocol::Http), down()]);
    let d = Arc::new(destination(json!({})));

    let mut delays = Vec::new();
    for _ in 0..3 {
        let err = done(run((*d).clone(), &ctx)).await.unwrap_err();
        assert!(err.to_string().contains("connection refused"), "{err}");
        delays.push(error_policy(d.clone(), &err, ctx.clone()));
    }
    let secs = |s| Action::requeue(Duration::from_secs(s));
    assert_eq!(delays, vec![secs(1), secs(2), secs(4)]);
    assert_eq!(ctx.failures("apps", "erp"), 3);

    // The Destination Service answers again: the reconcile succeeds and the count resets.
    let task = run((*d).clone(), &ctx);
    let backend = backend_name("apps", "erp");
    ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"})).await;
    ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp", json!({"kind": "Service"})).await;
    policy(&mut api, "erp").await;
    ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp/status"), serde_json::to_value(&*d).unwrap()).await;
    ok(&mut api, "POST", "/apis/events.k8s.io/v1/namespaces/apps/events", json!({})).await;
    done(task).await.unwrap();
    assert_eq!(ctx.failures("apps", "erp"), 0);
    let err = done(run((*d).clone(), &ctx)).await.unwrap_err();
    assert_eq!(error_policy(d.clone(), &err, ctx.clone()), secs(1));

    // The cap: never more than five minutes.
    assert_eq!(backoff(9), Duration::from_secs(256));
    assert_eq!(backoff(10), Duration::from_secs(300));
    assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
}

#[tokio::test]
async fn api_server_errors_back_off_too() {
    let (ctx, mut api) = setup(CONFIG, vec![Ok(Protocol::Http)]);
    let d = Arc::new(destination(json!({})));
    let task = run((*d).clone(), &ctx);
    let backend = backend_name("apps", "erp");
    let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                           "message": "services is forbidden", "code": 403});
    expect(
        &mut api,
        "PATCH",
        &format!("/api/v1/namespaces/ferry/services/{backend}"),
        StatusCode::FORBIDDEN,
        forbidden,
    )
    .await;
    let err = done(task).await.unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    assert_eq!(error_policy(d, &err, ctx.clone()), Action::requeue(Duration::from_secs(1)));
}

#[tokio::test]
async fn an_invalid_resource_says_why_and_waits_for_a_change() {
    let (ctx, mut api) = setup(CONFIG, vec![]);
    // A gateway may not name a fragment statically (SPEC §5.1).
    let bad = destination(json!({"spec": {"destinationRef": {"name": "*"}, "fragmentRef": {"name": "f"}}}));
    let task = run(bad, &ctx);
    let (_, status) = ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp/status"), as_json(json!({}))).await;
    let condition = &status["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some("InvalidConfiguration"))
    );
    assert!(condition["message"].as_str().unwrap().contains("fragmentRef"), "{condition}");
    let (_, event) = ok(&mut api, "POST", "/apis/events.k8s.io/v1/namespaces/apps/events", json!({})).await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(done(task).await.unwrap(), Action::await_change());
}

#[tokio::test]
async fn resources_in_unmanaged_namespaces_are_left_alone() {
    let config = format!("namespace_selector = \"transparent-proxy.connectivity.api.sap/namespace=ferry\"\n{CONFIG}");
    let (ctx, mut api) = setup(&config, vec![]);
    let task = run(destination(json!({})), &ctx);
    ok(
        &mut api,
        "GET",
        "/api/v1/namespaces/apps",
        json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "apps", "labels": {"team": "a"}}}),
    )
    .await;
    // No finalizer, Service or status: the namespace is someone else's.
    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));
}

#[test]
fn backend_names_are_valid_and_distinct() {
    assert_ne!(backend_name("c", "a-b"), backend_name("b-c", "a"));
    let long = backend_name(&"n".repeat(63), &"d".repeat(63));
    assert!(long.len() <= 63, "{long}");
    assert!(long.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{long}");
    assert_eq!(backend_name("apps", "erp"), backend_name("apps", "erp"));
}

#[tokio::test]
async fn tcp_services_target_the_port_the_proxy_listens_on_for_the_resource() {
    // The chart's shape: no `[tcp] target_port`, so each TCP resource has a port of its own.
    let config = CONFIG.replace("target_port = \"tcp\"\n", "");
    assert_ne!(config, CONFIG, "the test removed the TCP target_port");
    let (ctx, mut api) = setup(&config, vec![Ok(Protocol::Tcp)]);
    let backend = backend_name("apps", "erp");
    let available = json!({"status": {"conditions": [{
        "type": "Available", "status": "True", "reason": "ConfigurationSuccessful",
        "message": success_message("erp"), "lastUpdateTime": "2022-09-28T07:26:46Z"}]}});
    let task = run(destination(available), &ctx);
    let (query, _) = ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(vec![])).await;
    assert!(query.contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dferry-transparent-proxy"), "{query}");
    let (_, svc) =
        ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"}))
            .await;
    let port = ferry_transparent_proxy::cluster::tcp_port("apps", "erp");
    assert_eq!(svc["spec"]["ports"][0]["port"], 20004);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], i64::from(port));
    ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp", json!({"kind": "Service"})).await;
    // The resource's own port: other TCP resources' callers are not admitted by this policy.
    let np = policy(&mut api, "erp").await;
    assert_eq!(np["spec"]["ingress"][0]["ports"], json!([{"port": port, "protocol": "TCP"}]));
    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));

    // An HTTP target port stays required: without it the Services would lead nowhere.
    let e = Config::parse("c.toml", &CONFIG.replace("target_port = \"http\"\n", "")).unwrap_err().to_string();
    assert!(e.contains("http.target_port"), "{e}");
}

/// A ServiceList answer.
fn services(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {}, "items": items})
}

/// A backend Service as the controller labels it, targeting `port`.
fn backend_of(namespace: &str, name: &str, tenant: Option<&str>, port: u16) -> Value {
    let mut labels = json!({"app.kubernetes.io/managed-by": "ferry-transparent-proxy",
        "destination.connectivity.api.sap/namespace": namespace, "destination.connectivity.api.sap/name": name});
    if let Some(t) = tenant {
        labels["destination.connectivity.api.sap/tenant-subdomain"] = json!(t);
    }
    json!({"metadata": {"name": backend_name(namespace, name), "namespace": "ferry", "labels": labels},
           "spec": {"ports": [{"port": 20004, "targetPort": port}]}})
}

#[tokio::test]
async fn shared_mode_gives_each_tenant_of_a_tcp_resource_its_own_services() {
    use ferry_transparent_proxy::cluster::tcp_port;
    let config = format!("tenant_mode = \"shared\"\n{}", CONFIG.replace("target_port = \"tcp\"\n", ""));
    let (ctx, mut api) = setup(&config, vec![Ok(Protocol::Tcp)]);
    let annotated = json!({"metadata": {"annotations": {
        "transparent-proxy.connectivity.api.sap/tenant-subdomains": "[\"t1\",\"t2\"]"}}});
    let task = run(destination(annotated.clone()), &ctx);
    // The resource's own earlier Service on a tenant's port is no conflict.
    let mine = backend_of("apps", "erp", Some("t1"), tcp_port("apps", "erp-t1"));
    ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(vec![mine])).await;
    for t in ["t1", "t2"] {
        let unit = format!("erp-{t}");
        let backend = backend_name("apps", &unit);
        let (_, svc) =
            ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"}))
                .await;
        assert_eq!(svc["spec"]["ports"][0]["port"], 20004);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], i64::from(tcp_port("apps", &unit)));
        assert_eq!(svc["metadata"]["labels"]["destination.connectivity.api.sap/tenant-subdomain"], t);
        assert_eq!(svc["metadata"]["labels"]["destination.connectivity.api.sap/name"], "erp");
        let (_, svc) =
            ok(&mut api, "PATCH", &format!("/api/v1/namespaces/apps/services/{unit}"), json!({"kind": "Service"}))
                .await;
        assert_eq!(svc["spec"]["externalName"], format!("{backend}.ferry.svc.cluster.local"));
        assert_eq!(svc["metadata"]["ownerReferences"][0]["name"], "erp");
    }
    // One policy for the resource, on each tenant's port.
    let np = policy(&mut api, "erp").await;
    assert_eq!(
        np["spec"]["ingress"][0]["ports"],
        json!([{"port": tcp_port("apps", "erp-t1"), "protocol": "TCP"}, {"port": tcp_port("apps", "erp-t2"), "protocol": "TCP"}])
    );
    // Nothing stale: the resource's Services are the wanted ones.
    let selector = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dferry-transparent-proxy%2C\
        destination.connectivity.api.sap%2Fnamespace%3Dapps%2Cdestination.connectivity.api.sap%2Fname%3Derp";
    let (query, _) = ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(vec![])).await;
    assert!(query.contains(selector), "{query}");
    let (query, _) = ok(&mut api, "GET", "/api/v1/namespaces/apps/services", services(vec![])).await;
    assert!(query.contains(selector), "{query}");
    let (_, status) = ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp/status"), as_json(json!({}))).await;
    let message = status["status"]["conditions"][0]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("\"erp-t1\"") && message.contains("\"erp-t2\""), "{message}");
    ok(&mut api, "POST", "/apis/events.k8s.io/v1/namespaces/apps/events", json!({})).await;
    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));

    // Deleted: the backends of the resource and of each tenant go, then the finalizer.
    let mut deleting = annotated;
    merge(&mut deleting, json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}));
    let task = run(destination(deleting), &ctx);
    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                      "message": "services not found", "code": 404});
    let plain = backend_name("apps", "erp");
    expect(&mut api, "DELETE", &format!("/api/v1/namespaces/ferry/services/{plain}"), StatusCode::NOT_FOUND, gone)
        .await;
    for unit in ["erp-t1", "erp-t2"] {
        let backend = backend_name("apps", unit);
        ok(&mut api, "DELETE", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"}))
            .await;
    }
    ok(&mut api, "DELETE", &policy_path("erp"), json!({"kind": "NetworkPolicy"})).await;
    ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp"), as_json(json!({}))).await;
    assert_eq!(done(task).await.unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_tcp_port_another_resource_holds_is_a_condition_not_a_shared_listener() {
    let config = CONFIG.replace("target_port = \"tcp\"\n", "");
    let (ctx, mut api) = setup(&config, vec![Ok(Protocol::Tcp)]);
    let port = ferry_transparent_proxy::cluster::tcp_port("apps", "erp");
    let task = run(destination(json!({})), &ctx);
    let other = backend_of("other", "db", None, port);
    ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(vec![other])).await;
    // No Service is written: the resource's traffic would reach the other one's listener.
    let (_, status) = ok(&mut api, "PATCH", &format!("{DESTINATIONS}/erp/status"), as_json(json!({}))).await;
    let condition = &status["status"]["conditions"][0];
    assert_eq!((condition["status"].as_str(), condition["reason"].as_str()), (Some("False"), Some("PortConflict")));
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains(&port.to_string()) && message.contains("other/db"), "{message}");
    let (_, event) = ok(&mut api, "POST", "/apis/events.k8s.io/v1/namespaces/apps/events", json!({})).await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("PortConflict")));
    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));
}

/// The app-facing Service of `apps/<unit>` as the controller labels it.
fn app_service(unit: &str, tenant: Option<&str>) -> Value {
    let mut labels = json!({"app.kubernetes.io/managed-by": "ferry-transparent-proxy",
        "destination.connectivity.api.sap/namespace": "apps", "destination.connectivity.api.sap/name": "erp"});
    if let Some(t) = tenant {
        labels["destination.connectivity.api.sap/tenant-subdomain"] = json!(t);
    }
    json!({"metadata": {"name": unit, "namespace": "apps", "labels": labels}, "spec": {"type": "ExternalName"}})
}

#[tokio::test]
async fn access_control_scopes_the_policy() {
    let available = json!({"status": {"conditions": [{
        "type": "Available", "status": "True", "reason": "ConfigurationSuccessful",
        "message": success_message("erp"), "lastUpdateTime": "2022-09-28T07:26:46Z"}]}});
    let reconciled = |scope: Option<&str>| {
        let mut d = available.clone();
        if let Some(s) = scope {
            merge(&mut d, json!({"spec": {"accessControl": {"scope": s}}}));
        }
        destination(d)
    };
    let apps = json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}});
    // Every pod in every namespace: an empty namespace selector, not an absent `from` (any address).
    let everyone = json!({"namespaceSelector": {}});

    // The default scope comes from the configuration; the resource's own overrides it.
    for (config_scope, resource_scope, expected) in [
        (None, Some("clusterWide"), &everyone),
        (None, Some("namespaced"), &apps),
        (Some("clusterWide"), None, &everyone),
        (Some("clusterWide"), Some("namespaced"), &apps),
        (Some("namespaced"), None, &apps),
    ] {
        let config = match config_scope {
            Some(s) => format!("default_scope = \"{s}\"\n{CONFIG}"),
            None => CONFIG.to_owned(),
        };
        let (ctx, mut api) = setup(&config, vec![Ok(Protocol::Http)]);
        let task = run(reconciled(resource_scope), &ctx);
        let backend = backend_name("apps", "erp");
        ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{backend}"), json!({"kind": "Service"}))
            .await;
        ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp", json!({"kind": "Service"})).await;
        let np = policy(&mut api, "erp").await;
        assert_eq!(admitted(&np), expected, "config {config_scope:?}, resource {resource_scope:?}");
        assert_eq!(np["spec"]["ingress"][0]["ports"], json!([{"port": "http", "protocol": "TCP"}]));
        assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));
    }
}

#[tokio::test]
async fn shared_mode_removes_the_services_of_tenants_that_left_the_annotation() {
    use ferry_transparent_proxy::cluster::tcp_port;
    let config = format!("tenant_mode = \"shared\"\n{}", CONFIG.replace("target_port = \"tcp\"\n", ""));
    let (ctx, mut api) = setup(&config, vec![Ok(Protocol::Tcp), Ok(Protocol::Tcp)]);
    // t1 left the annotation; t2 stays.
    let annotated = |tenants: &str| {
        destination(json!({"metadata": {"annotations": {
            "transparent-proxy.connectivity.api.sap/tenant-subdomains": tenants}},
            "status": {"conditions": [{"type": "Available", "status": "True", "reason": "ConfigurationSuccessful",
            "message": success_message("erp-t2"), "lastUpdateTime": "2022-09-28T07:26:46Z"}]}}))
    };
    let tenant_backend = |t: &str| {
        let mut svc = backend_of("apps", "erp", Some(t), tcp_port("apps", &format!("erp-{t}")));
        svc["metadata"]["name"] = json!(backend_name("apps", &format!("erp-{t}")));
        svc
    };
    let task = run(annotated("[\"t2\"]"), &ctx);
    // Before the annotation the resource had a plain Service; then tenants t1 and t2.
    let earlier = vec![backend_of("apps", "erp", None, 20004), tenant_backend("t1"), tenant_backend("t2")];
    ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(earlier.clone())).await;
    let t2 = backend_name("apps", "erp-t2");
    ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{t2}"), json!({"kind": "Service"})).await;
    ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp-t2", json!({"kind": "Service"})).await;
    let np = policy(&mut api, "erp").await;
    assert_eq!(np["spec"]["ingress"][0]["ports"], json!([{"port": tcp_port("apps", "erp-t2"), "protocol": "TCP"}]));
    // The plain Services and t1's go, in the proxy namespace and the resource's; t2's stay.
    ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(earlier)).await;
    let plain = backend_name("apps", "erp");
    ok(&mut api, "DELETE", &format!("/api/v1/namespaces/ferry/services/{plain}"), json!({"kind": "Service"})).await;
    let t1 = backend_name("apps", "erp-t1");
    ok(&mut api, "DELETE", &format!("/api/v1/namespaces/ferry/services/{t1}"), json!({"kind": "Service"})).await;
    let apps = vec![app_service("erp", None), app_service("erp-t1", Some("t1")), app_service("erp-t2", Some("t2"))];
    ok(&mut api, "GET", "/api/v1/namespaces/apps/services", services(apps)).await;
    ok(&mut api, "DELETE", "/api/v1/namespaces/apps/services/erp", json!({"kind": "Service"})).await;
    // One already gone (a concurrent delete) is no failure.
    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                      "message": "services not found", "code": 404});
    expect(&mut api, "DELETE", "/api/v1/namespaces/apps/services/erp-t1", StatusCode::NOT_FOUND, gone).await;
    // The condition already names erp-t2 alone: no status write.
    assert_eq!(done(task).await.unwrap(), Action::requeue(Duration::from_secs(180)));

    // A failed delete fails the reconcile, to be retried.
    let task = run(annotated("[\"t2\"]"), &ctx);
    ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(vec![])).await;
    ok(&mut api, "PATCH", &format!("/api/v1/namespaces/ferry/services/{t2}"), json!({"kind": "Service"})).await;
    ok(&mut api, "PATCH", "/api/v1/namespaces/apps/services/erp-t2", json!({"kind": "Service"})).await;
    policy(&mut api, "erp").await;
    ok(&mut api, "GET", "/api/v1/namespaces/ferry/services", services(vec![tenant_backend("t1")])).await;
    let boom = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError",
                      "message": "etcd is down", "code": 500});
    expect(
        &mut api,
        "DELETE",
        &format!("/api/v1/namespaces/ferry/services/{t1}"),
        StatusCode::INTERNAL_SERVER_ERROR,
        boom,
    )
    .await;
    let err = done(task).await.unwrap_err();
    assert!(err.to_string().contains("etcd is down"), "{err}");
}
