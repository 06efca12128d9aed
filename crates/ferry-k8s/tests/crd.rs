#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CRD the transparent-proxy chart installs must be what the Rust types generate, or the API
//! server would accept resources the proxy cannot read (or refuse ones it can).

#[test]
fn the_chart_ships_the_generated_crd() {
    let path =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
            .join("../../deploy/helm/ferry-transparent-proxy/crds/destinations.destination.connectivity.api.sap.yaml");
    let shipped = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let generated = ferry_k8s::crd_yaml().unwrap();
    assert!(
        shipped == generated,
        "{} differs from the CRD the types generate; regenerate it:\n  cargo run -p ferry -- crdgen > {}",
        path.display(),
        "deploy/helm/ferry-transparent-proxy/crds/destinations.destination.connectivity.api.sap.yaml"
    );
}

#[test]
fn the_crd_is_the_one_sap_clients_expect() {
    let crd: serde_json::Value = serde_yaml::from_str(&ferry_k8s::crd_yaml().unwrap()).unwrap();
    assert_eq!(crd["metadata"]["name"], "destinations.destination.connectivity.api.sap");
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1");
    assert!(crd["spec"]["versions"][0]["subresources"]["status"].is_object(), "status must be a subresource");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for key in
        ["destinationRef", "fragmentRef", "chainRef", "destinationServiceInstanceName", "service", "accessControl"]
    {
        assert!(spec["properties"][key].is_object(), "spec.{key} missing from the schema");
    }
}
