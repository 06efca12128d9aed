//! The XSUAA claim set. The shape matters more than the values: the SAP Cloud SDK decodes
//! tokens without verifying them and throws if `zid` or a subdomain (`ext_attr.zdn` or a dotted
//! `iss` host) is missing; xssec matches `aud`/`scope` prefixes against `xsappname`.

use serde_json::{Map, Value, json};

use super::config::{OAuthClient, User};

/// XSUAA's origin key of its default identity provider (SAP ID service). Apps that check the
/// origin of a user expect it, and Ferry's configured users stand in for that provider.
pub(crate) const USER_ORIGIN: &str = "ldap";

/// The identity a user token carries. It is copied, not looked up again, when a token is
/// exchanged (jwt-bearer) or refreshed, because that is what XSUAA does: the new token speaks
/// for the same login, including its `auth_time`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UserIdentity {
    pub user_name: String,
    pub user_id: String,
    pub email: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub origin: String,
    pub auth_time: u64,
}

impl UserIdentity {
    pub fn from_user(user: &User, auth_time: u64) -> Self {
        Self {
            user_name: user.username.clone(),
            user_id: user.user_id.clone(),
            email: Some(user.email.clone()).filter(|e| !e.is_empty()),
            given_name: user.given_name.clone(),
            family_name: user.family_name.clone(),
            origin: USER_ORIGIN.to_owned(),
            auth_time,
        }
    }

    /// Reads the user part of a verified user token; `None` for a client (technical) token.
    pub fn from_claims(raw: &Value) -> Option<Self> {
        let s = |k: &str| raw.get(k).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned);
        let user_id = s("user_id").or_else(|| s("user_uuid"))?;
        Some(Self {
            user_name: s("user_name").unwrap_or_else(|| user_id.clone()),
            email: s("email"),
            given_name: s("given_name"),
            family_name: s("family_name"),
            origin: s("origin").unwrap_or_else(|| USER_ORIGIN.to_owned()),
            auth_time: raw.get("auth_time").or_else(|| raw.get("iat")).and_then(Value::as_u64).unwrap_or(0),
            user_id,
        })
    }
}

/// Everything that varies between two tokens of the same client.
pub(crate) struct TokenFacts<'a> {
    pub jti: &'a str,
    pub zid: &'a str,
    pub subdomain: &'a str,
    pub issuer: &'a str,
    pub grant_type: &'a str,
    pub scopes: &'a [String],
    pub user: Option<&'a UserIdentity>,
    pub iat: u64,
    pub exp: u64,
}

pub(crate) fn build(client: &OAuthClient, f: &TokenFacts<'_>) -> Value {
    let mut ext_attr = Map::new();
    ext_attr.insert("enhancer".into(), "XSUAA".into());
    ext_attr.insert("subaccountid".into(), f.zid.into());
    ext_attr.insert("zdn".into(), f.subdomain.into());
    if let Some(id) = &client.service_instance_id {
        ext_attr.insert("serviceinstanceid".into(), id.as_str().into());
    }
    let sub = f.user.map_or(client.client_id.as_str(), |u| u.user_id.as_str());
    let mut c = json!({
        "jti": f.jti,
        "ext_attr": ext_attr,
        "sub": sub,
        "scope": f.scopes,
        "client_id": client.client_id,
        "cid": client.client_id,
        "azp": client.client_id,
        "grant_type": f.grant_type,
        "rev_sig": rev_sig(&client.client_id, f.user.map(|u| u.user_id.as_str()), f.zid),
        "iat": f.iat,
        "exp": f.exp,
        "iss": f.issuer,
        "zid": f.zid,
        "aud": audience(client, f.scopes),
    });
    if let (Some(u), Some(obj)) = (f.user, c.as_object_mut()) {
        obj.insert("user_id".into(), u.user_id.as_str().into());
        obj.insert("user_uuid".into(), u.user_id.as_str().into());
        obj.insert("user_name".into(), u.user_name.as_str().into());
        obj.insert("origin".into(), u.origin.as_str().into());
        obj.insert("auth_time".into(), u.auth_time.into());
        // Only what is known is written: an empty given name would be displayed as one.
        for (k, v) in [("email", &u.email), ("given_name", &u.given_name), ("family_name", &u.family_name)] {
            if let Some(v) = v {
                obj.insert(k.into(), v.as_str().into());
            }
        }
        obj.insert("xs.user.attributes".into(), json!({}));
        obj.insert("xs.system.attributes".into(), json!({"xs.rolecollections": []}));
    }
    c
}

/// `aud` as XSUAA derives it: the client id plus the resource part of every scope. xssec falls
/// back to these prefixes when it checks a token's audience against `xsappname`, so a scope
/// `myapp!t1.Read` must yield `myapp!t1` even though an xsappname may itself contain dots.
pub(crate) fn audience(client: &OAuthClient, scopes: &[String]) -> Vec<String> {
    let mut aud = vec![client.client_id.clone()];
    for scope in scopes {
        let own = !client.xsappname.is_empty()
            && scope.len() > client.xsappname.len()
            && scope.starts_with(client.xsappname.as_str())
            && scope.as_bytes()[client.xsappname.len()] == b'.';
        let resource = if own {
            Some(client.xsappname.as_str())
        } else {
            scope.split_once('.').map(|(p, _)| p).filter(|p| !p.is_empty())
        };
        if let Some(r) = resource
            && !aud.iter().any(|a| a == r)
        {
            aud.push(r.to_owned());
        }
    }
    aud
}

/// XSUAA's revocation signature: a short hash that is equal for all tokens of one
/// (client, user, zone) grant, so that revoking the grant can be matched against tokens.
fn rev_sig(client_id: &str, user_id: Option<&str>, zid: &str) -> String {
    let input = format!("{client_id}\u{0}{}\u{0}{zid}", user_id.unwrap_or(""));
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input.as_bytes());
    digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(xsappname: &str) -> OAuthClient {
        OAuthClient {
            client_id: "sb-app!t1".into(),
            client_secret: "s".into(),
            tenant_id: "z".into(),
            xsappname: xsappname.into(),
            authorities: vec![],
            scopes: vec![],
            service_instance_id: None,
            grant_types: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn audience_from_scopes() {
        let scopes: Vec<String> =
            ["uaa.resource", "openid", "com.acme.app!t1.Read", "other!b2.Write", ".x", "uaa.user"]
                .map(Into::into)
                .into();
        assert_eq!(audience(&client("com.acme.app!t1"), &scopes), ["sb-app!t1", "uaa", "com.acme.app!t1", "other!b2"]);
        assert_eq!(audience(&client(""), &scopes), ["sb-app!t1", "uaa", "com", "other!b2"]);
    }

    #[test]
    fn rev_sig_is_stable_and_short() {
        assert_eq!(rev_sig("c", Some("u"), "z"), rev_sig("c", Some("u"), "z"));
        assert_ne!(rev_sig("c", Some("u"), "z"), rev_sig("c", None, "z"));
        assert_eq!(rev_sig("c", None, "z").len(), 8);
    }
}
