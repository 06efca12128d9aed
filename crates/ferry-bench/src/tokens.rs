//! Token issuance and verification rates, next to the raw RSA-2048 sign/verify rates of the
//! same crypto library measured in the same run (the ceiling: a token costs one signature to
//! issue and one verification to check).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256};
use ferry_auth::KeySet;
use ferry_auth::token_service::{OAuthClient, Tenant, TokenService, TokenServiceConfig};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn rate(secs: u64, mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < deadline {
        for _ in 0..16 {
            op();
        }
        n += 16;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

pub async fn run(secs: u64) -> anyhow::Result<()> {
    // Anchors: the primitive alone.
    let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| anyhow::anyhow!("keygen"))?;
    let rng = SystemRandom::new();
    let msg = [7u8; 600];
    let mut sig = vec![0u8; pair.public_modulus_len()];
    let raw_sign = rate(secs, || {
        let _ = pair.sign(&RSA_PKCS1_SHA256, &rng, &msg, &mut sig);
    });
    let comps = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    let raw_verify = rate(secs, || {
        let _ =
            PublicKeyComponents { n: &comps.n[..], e: &comps.e[..] }.verify(&RSA_PKCS1_2048_8192_SHA256, &msg, &sig);
    });

    // Ferry: a client-credentials request through the token service router (form parsing,
    // client authentication, claims, signature, JSON), and Verifier::verify of the result.
    let keys = Arc::new(KeySet::generate()?);
    let zid = "0a0b0c0d-0000-4000-8000-000000000001";
    let service = TokenService::new(TokenServiceConfig {
        tenants: vec![Tenant { id: zid.into(), subdomain: "bench".into(), keys: keys.clone() }],
        clients: vec![OAuthClient {
            client_id: "sb-bench!b1".into(),
            client_secret: "bench-secret".into(),
            tenant_id: zid.into(),
            xsappname: "bench!b1".into(),
            authorities: vec!["uaa.resource".into()],
            ..Default::default()
        }],
        public_url: "http://127.0.0.1:18081".into(),
        uaadomain: "127.0.0.1:18443".into(),
        ..Default::default()
    })?;
    let router = service.router();
    let request = || {
        http::Request::post("/oauth/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(axum::body::Body::from(
                "grant_type=client_credentials&client_id=sb-bench%21b1&client_secret=bench-secret",
            ))
            .expect("request")
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut issued = 0u64;
    let mut token = String::new();
    while Instant::now() < deadline {
        let resp = router.clone().oneshot(request()).await?;
        anyhow::ensure!(resp.status() == 200, "token request failed: {}", resp.status());
        if token.is_empty() {
            let body = resp.into_body().collect().await?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            token = v["access_token"].as_str().unwrap_or_default().to_owned();
        }
        issued += 1;
    }
    let issue_rate = issued as f64 / start.elapsed().as_secs_f64();
    let verifier = service.verifier();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut verified = 0u64;
    while Instant::now() < deadline {
        verifier.verify(&token).await.map_err(|e| anyhow::anyhow!("verify: {e}"))?;
        verified += 1;
    }
    let verify_rate = verified as f64 / start.elapsed().as_secs_f64();

    println!("| operation (one core) | anchor: raw RSA-2048 | Ferry | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| issue a client-credentials token | {raw_sign:.0} signs/s | {issue_rate:.0} tokens/s | {:.2} |",
        issue_rate / raw_sign
    );
    println!(
        "| verify a token | {raw_verify:.0} verifies/s | {verify_rate:.0} tokens/s | {:.2} |",
        verify_rate / raw_verify
    );
    Ok(())
}
