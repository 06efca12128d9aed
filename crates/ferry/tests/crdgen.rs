#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `ferry crdgen` prints the CRD the transparent-proxy chart installs, byte for byte.

#[test]
fn crdgen_prints_the_charts_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry")).arg("crdgen").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let chart =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
            .join("../../deploy/helm/ferry-transparent-proxy/crds/destinations.destination.connectivity.api.sap.yaml");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), std::fs::read_to_string(chart).unwrap());
}

#[test]
fn k8s_controller_names_a_bad_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.toml");
    std::fs::write(&path, "proxy_namespace = \"ferry\"\n[http]\ntarget_port = \"http\"\nselector = {}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["k8s-controller", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("controller.toml") && err.contains("tcp"), "{err}");
}
