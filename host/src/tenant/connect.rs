//! Opens a tenant's own NATS connection from its config: credentials read
//! from their sources at this moment, TLS as configured.
//!
//! A connection per tenant is the fence that matters most: the server's
//! account boundaries then apply to everything the tenant's handlers
//! subscribe to, publish, or open, whatever their manifests ask for.

use std::time::Duration;

use async_nats::ConnectOptions;

use super::config::{Auth, TenantConfig};
use super::TenantError;

/// How long a tenant's first connection attempt may take before it is
/// reported as failed (the others are not held up by it for longer).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects `tenant` to its URL, or `default_url` when it names none.
pub(super) async fn connect(tenant: &TenantConfig, default_url: &str) -> Result<async_nats::Client, TenantError> {
    let id = &tenant.id;
    let url = tenant.url.as_deref().unwrap_or(default_url);
    let secret_err =
        |field: &str, problem: String| TenantError::Secret { tenant: id.clone(), field: field.to_owned(), problem };
    let mut options = match &tenant.auth {
        Auth::None => ConnectOptions::new(),
        Auth::UserPassword { user, password } => {
            let password = password.resolve().map_err(|p| secret_err("password", p))?;
            ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned())
        }
        Auth::Token(token) => {
            ConnectOptions::with_token(token.resolve().map_err(|p| secret_err("token", p))?.expose().to_owned())
        }
        Auth::NKey(seed) => {
            let seed = seed.resolve().map_err(|p| secret_err("nkey", p))?;
            // Checked here so a bad seed is named, not reported later as a
            // vague handshake failure.
            if nkeys::KeyPair::from_seed(seed.expose()).is_err() {
                return Err(secret_err("nkey", "is not an nkey seed (SU...)".into()));
            }
            ConnectOptions::with_nkey(seed.expose().to_owned())
        }
        Auth::Creds(path) => {
            ConnectOptions::with_credentials_file(path).await.map_err(|source| TenantError::Secret {
                tenant: id.clone(),
                field: "creds".into(),
                problem: format!("{}: {source}", path.display()),
            })?
        }
    };
    if let Some(ca) = &tenant.tls.ca {
        check_readable(id, "tls.ca", ca)?;
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tenant.tls.client_cert {
        check_readable(id, "tls.cert", cert)?;
        check_readable(id, "tls.key", key)?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if tenant.tls.required {
        options = options.require_tls(true);
    }
    let tenant_id = id.to_string();
    options
        .event_callback(move |event| {
            let tenant = tenant_id.clone();
            async move {
                // Connection trouble is the first thing to look for when a
                // tenant's handlers go quiet.
                match event {
                    async_nats::Event::Connected => tracing::info!(%tenant, "NATS connection: {event}"),
                    _ => tracing::warn!(%tenant, "NATS connection: {event}"),
                }
            }
        })
        .name(format!("natsfn:{id}"))
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(|source| TenantError::Connect { tenant: id.clone(), url: url.to_owned(), source })
}

/// A missing certificate file is named by its field; the client would only
/// say that TLS failed.
fn check_readable(tenant: &crate::manifest::TenantId, field: &str, path: &std::path::Path) -> Result<(), TenantError> {
    std::fs::metadata(path).map(|_| ()).map_err(|e| TenantError::Secret {
        tenant: tenant.clone(),
        field: field.to_owned(),
        problem: format!("{}: {e}", path.display()),
    })
}
