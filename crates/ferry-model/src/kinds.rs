//! The enumerated property values the service acts on.
//!
//! Values are matched case-sensitively because the SAP clients compare them that way
//! (`Authentication === 'OAuth2ClientCredentials'`): accepting `oauth2clientcredentials` here
//! would store a destination that the SDK then silently treats as unauthenticated.

use std::fmt;
use std::str::FromStr;

/// A value that is not one of the allowed spellings; the message lists them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a valid {what}; use one of: {allowed}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub allowed: String,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The exact spelling used in destination properties.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        what: $what,
                        value: s.to_owned(),
                        allowed: [$($text),+].join(", "),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// The `Type` property: which protocol family the destination describes.
    DestinationType, "Type", {
        Http => "HTTP",
        Rfc => "RFC",
        Mail => "MAIL",
        Ldap => "LDAP",
        Tcp => "TCP",
    }
);

string_enum!(
    /// The `Authentication` property (SPEC §2.1).
    AuthenticationType, "Authentication", {
        NoAuthentication => "NoAuthentication",
        BasicAuthentication => "BasicAuthentication",
        ClientCertificateAuthentication => "ClientCertificateAuthentication",
        PrincipalPropagation => "PrincipalPropagation",
        OAuth2ClientCredentials => "OAuth2ClientCredentials",
        OAuth2Password => "OAuth2Password",
        OAuth2UserTokenExchange => "OAuth2UserTokenExchange",
        OAuth2JWTBearer => "OAuth2JWTBearer",
        OAuth2SAMLBearerAssertion => "OAuth2SAMLBearerAssertion",
        SAMLAssertion => "SAMLAssertion",
        OAuth2RefreshToken => "OAuth2RefreshToken",
        OAuth2AuthorizationCode => "OAuth2AuthorizationCode",
        OAuth2TechnicalUserPropagation => "OAuth2TechnicalUserPropagation",
        OAuth2TokenExchange => "OAuth2TokenExchange",
        /// Deprecated by SAP; accepted so that old configurations still load.
        SAPAssertionSSO => "SAPAssertionSSO",
    }
);

string_enum!(
    /// The `ProxyType` property: how the target is reached.
    ProxyType, "ProxyType", {
        Internet => "Internet",
        OnPremise => "OnPremise",
        PrivateLink => "PrivateLink",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        for t in AuthenticationType::ALL {
            assert_eq!(t.as_str().parse::<AuthenticationType>(), Ok(*t));
        }
        for t in DestinationType::ALL {
            assert_eq!(t.to_string().parse::<DestinationType>(), Ok(*t));
        }
        let err = "http".parse::<DestinationType>().unwrap_err();
        assert_eq!(err.to_string(), "'http' is not a valid Type; use one of: HTTP, RFC, MAIL, LDAP, TCP");
        assert!("Basic".parse::<AuthenticationType>().unwrap_err().to_string().contains("BasicAuthentication"));
    }
}
