//! Servers for multi-tenancy tests: a nats-server with accounts written by
//! the test, certificates made on the spot with `rcgen`, and an operator
//! with account and user JWTs (signed with real nkeys) for `.creds` files.
//!
//! Everything is generated per test into a temporary folder; nothing is
//! checked in, so no key ever expires or leaks.

use std::path::{Path, PathBuf};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use sha2::Digest;

use crate::NatsServer;

/// A nats-server started with `config` (written to a file in `dir`), with
/// JetStream on a free loopback port as usual.
pub fn server_with_config(dir: &Path, config: &str) -> NatsServer {
    let path = dir.join("server.conf");
    std::fs::write(&path, config).expect("write server config");
    NatsServer::builder().config_file(path).start().expect("start nats-server with config")
}

/// Two accounts, `A` and `B`, each with JetStream and one password user
/// (`a`/`apass`, `b`/`bpass`); `B` also admits the nkey user `b_nkey`.
pub fn two_accounts(b_nkey_public: &str) -> String {
    format!(
        r#"
accounts {{
  A: {{ jetstream: enabled, users: [ {{ user: a, password: apass }} ] }}
  B: {{ jetstream: enabled, users: [ {{ user: b, password: bpass }}, {{ nkey: {b_nkey_public} }} ] }}
}}
"#
    )
}

/// A CA, a server certificate for 127.0.0.1/localhost, a client certificate
/// it signed, and a "rogue" client certificate from another CA.
pub struct Pki {
    /// Where the PEM files are.
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// Generates every certificate.
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair as CertKey};
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).expect("write pem");

        let ca = |cn: &str| {
            let key = CertKey::generate().expect("ca key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.self_signed(&key).expect("self-sign ca");
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("natsfn test CA");
        let (rogue_ca, rogue_ca_key) = ca("someone else's CA");
        write("ca.pem", ca_cert.pem());

        let leaf = |names: Vec<String>, cn: &str, issuer: &rcgen::Certificate, issuer_key: &CertKey| {
            let key = CertKey::generate().expect("leaf key");
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, issuer, issuer_key).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "nats-server", &ca_cert, &ca_key);
        write("server.pem", cert);
        write("server-key.pem", key);
        let (cert, key) = leaf(vec!["client".into()], "tenant-a", &ca_cert, &ca_key);
        write("client.pem", cert);
        write("client-key.pem", key);
        let (cert, key) = leaf(vec!["rogue".into()], "rogue", &rogue_ca, &rogue_ca_key);
        write("rogue.pem", cert);
        write("rogue-key.pem", key);
        Pki { dir }
    }

    /// A file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A server `tls {}` block that requires and verifies client
    /// certificates from the CA.
    pub fn server_tls(&self) -> String {
        format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem")
        )
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// An operator that signs account JWTs, for servers in operator mode.
pub struct Operator {
    key: KeyPair,
    accounts: Vec<(KeyPair, String)>,
}

/// Encodes and signs `claims` (with `iss`, `iat` and `jti` filled in) the
/// way NATS JWTs are: ed25519 over `header.claims`, base64url without
/// padding, `jti` a hash of the claims.
fn jwt(issuer: &KeyPair, mut claims: serde_json::Value) -> String {
    claims["iss"] = issuer.public_key().into();
    claims["iat"] = 1_700_000_000u64.into();
    claims["jti"] = "".into();
    let hash = sha2::Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = BASE32_NOPAD.encode(&hash).into();
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{body}");
    let signature = issuer.sign(signing_input.as_bytes()).expect("sign jwt");
    format!("{signing_input}.{}", BASE64URL_NOPAD.encode(&signature))
}

impl Operator {
    /// A new operator key, with a system account (JetStream needs one).
    pub fn new() -> Operator {
        let mut op = Operator { key: KeyPair::new_operator(), accounts: Vec::new() };
        op.add_account("SYS", false);
        op
    }

    /// Adds an account (with JetStream) and returns its index.
    pub fn account(&mut self, name: &str) -> usize {
        self.add_account(name, true)
    }

    fn add_account(&mut self, name: &str, jetstream: bool) -> usize {
        let key = KeyPair::new_account();
        let js = if jetstream { -1 } else { 0 };
        let claims = serde_json::json!({
            "sub": key.public_key(),
            "name": name,
            "nats": {
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": js, "disk_storage": js, "streams": js, "consumer": js
                },
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account",
                "version": 2
            }
        });
        let token = jwt(&self.key, claims);
        self.accounts.push((key, token));
        self.accounts.len() - 1
    }

    /// A `.creds` file's text for a new user of account `account`.
    pub fn user_creds(&self, account: usize, name: &str) -> String {
        let (account_key, _) = &self.accounts[account];
        let user = KeyPair::new_user();
        let claims = serde_json::json!({
            "sub": user.public_key(),
            "name": name,
            "nats": { "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2 }
        });
        let token = jwt(account_key, claims);
        let seed = user.seed().expect("user seed");
        format!(
            "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }

    /// The server config for operator mode with every account preloaded.
    pub fn server_config(&self) -> String {
        let operator = jwt(
            &self.key,
            serde_json::json!({ "sub": self.key.public_key(), "name": "natsfn-test", "nats": { "type": "operator", "version": 2 } }),
        );
        let preload: String =
            self.accounts.iter().map(|(key, token)| format!("  {}: {}\n", key.public_key(), token)).collect();
        let system = self.accounts[0].0.public_key();
        format!("operator: {operator}\nsystem_account: {system}\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n")
    }
}

impl Default for Operator {
    fn default() -> Self {
        Operator::new()
    }
}
