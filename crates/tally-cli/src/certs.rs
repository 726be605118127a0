//! The cluster's certificates, made by `tallyctl certs` as `cockroach cert`
//! makes CockroachDB's (with `rcgen`).
//!
//! - `create-ca`: the cluster's CA (`ca.crt`, `ca.key`). Keep `ca.key` off
//!   the nodes: it only signs.
//! - `create-node NAME [HOST ...]`: `NAME.crt` and `NAME.key`, signed by the
//!   CA, valid for `NAME`, `localhost`, `127.0.0.1`, `::1` and each `HOST`
//!   (the names and addresses others dial the node at), for both server and
//!   client use: a shard serves with it, a coordinator serves with its own
//!   and presents it to the shards.
//! - `create-client NAME`: `client.NAME.crt` and `client.NAME.key`, for
//!   client use only: a tool that calls a shard directly (grpcurl with
//!   `-cert`) presents it.
//!
//! Keys are ECDSA P-256, written with mode 0600. Nothing is overwritten
//! unless asked.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CA certificate's file name in a certificates directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file name in a certificates directory.
pub const CA_KEY: &str = "ca.key";

/// How long a CA certificate is valid: ten years.
pub const CA_DAYS: u32 = 3650;
/// How long a node or client certificate is valid unless asked otherwise:
/// one year. Renew by making it again and sending the daemon a SIGHUP.
pub const DEFAULT_DAYS: u32 = 365;

/// The files a command wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks behind ours.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Writes `contents` to `path`, readable by the owner only if `secret`;
/// refuses to replace a file unless `overwrite`. The file is written
/// whole under a temporary name with its mode, synced, then renamed over
/// `path`: a replaced key is never readable with the old file's mode, nor
/// half written.
fn write_file(path: &Path, contents: &str, secret: bool, overwrite: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if !overwrite && path.exists() {
        anyhow::bail!("{} exists; pass --overwrite to replace it", path.display());
    }
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&temporary)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    written.with_context(|| format!("cannot write {}", path.display()))
}

fn write_pair(
    dir: &Path,
    stem: &str,
    cert: &rcgen::Certificate,
    key: &KeyPair,
    overwrite: bool,
) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let written = Written {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
    };
    if !overwrite {
        for path in [&written.cert, &written.key] {
            anyhow::ensure!(
                !path.exists(),
                "{} exists; pass --overwrite to replace it",
                path.display()
            );
        }
    }
    write_file(&written.key, &key.serialize_pem(), true, overwrite)?;
    write_file(&written.cert, &cert.pem(), false, overwrite)?;
    Ok(written)
}

/// Makes the cluster's CA in `dir`.
pub fn create_ca(dir: &Path, overwrite: bool) -> anyhow::Result<Written> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Tally cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_pair(dir, "ca", &cert, &key, overwrite)
}

/// The CA in `dir`, to sign with.
fn load_ca(dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (make the CA first: tallyctl certs create-ca)",
                path.display()
            )
        })
    };
    let key = KeyPair::from_pem(&read(CA_KEY)?).context("ca.key is not a usable private key")?;
    Issuer::from_ca_cert_pem(&read(CA_CERT)?, key).context("ca.crt is not a usable CA certificate")
}

/// Makes a node certificate for `name` in `dir`, signed by the CA there,
/// valid for `days` (see the module docs for its names).
pub fn create_node(
    dir: &Path,
    name: &str,
    hosts: &[String],
    days: u32,
    overwrite: bool,
) -> anyhow::Result<Written> {
    tally_runtime::config_file::validate_node_id(name).map_err(anyhow::Error::msg)?;
    let issuer = load_ca(dir)?;
    let mut names = vec![
        name.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut params = CertificateParams::new(names).context("a host is not a DNS name or IP")?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_pair(dir, name, &cert, &key, overwrite)
}

/// Makes a client certificate for `name` in `dir`, signed by the CA there.
pub fn create_client(
    dir: &Path,
    name: &str,
    days: u32,
    overwrite: bool,
) -> anyhow::Result<Written> {
    tally_runtime::config_file::validate_node_id(name).map_err(anyhow::Error::msg)?;
    let issuer = load_ca(dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_pair(dir, &format!("client.{name}"), &cert, &key, overwrite)
}

/// Adds a new token of `name` with `role` to the tokens file at `path`
/// (made, mode 0600, if missing) and returns the token, which is shown
/// once: the file keeps only its hash.
pub fn create_token(
    path: &Path,
    name: &str,
    role: tally_runtime::tokens::Role,
) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        let tokens = tally_runtime::tokens::Tokens::load(path)?;
        anyhow::ensure!(
            tokens.holder_named(name).is_none(),
            "{}: a token named {name:?} exists",
            path.display()
        );
    }
    let (token, hash) = tally_runtime::tokens::generate().context("no randomness")?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let entry = tally_runtime::tokens::file_entry(name, role, &hash);
    writeln!(file, "\n{entry}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

/// What `tallyctl dev --secure` runs with, under `dir`: the CA and one
/// node certificate (`tally-dev`, for every daemon of the local cluster),
/// made at the first run and kept; and a tokens file with one admin token,
/// made anew at each run. Returns the TLS files, the tokens file and the
/// token.
pub fn dev_security(dir: &Path) -> anyhow::Result<(tally_runtime::tls::TlsFiles, PathBuf, String)> {
    const NODE: &str = "tally-dev";
    let ca = dir.join(CA_CERT);
    let node = Written {
        cert: dir.join(format!("{NODE}.crt")),
        key: dir.join(format!("{NODE}.key")),
    };
    if !ca.exists() || !node.cert.exists() || !node.key.exists() {
        create_ca(dir, true)?;
        create_node(dir, NODE, &[], CA_DAYS, true)?;
    }
    let tokens_file = dir.join("tokens.toml");
    match std::fs::remove_file(&tokens_file) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(anyhow::Error::new(error)
                .context(format!("cannot replace {}", tokens_file.display())))
        }
        _ => {}
    }
    let token = create_token(
        &tokens_file,
        "dev-admin",
        tally_runtime::tokens::Role::Admin,
    )?;
    let files = tally_runtime::tls::TlsFiles {
        cert: node.cert,
        key: node.key,
        ca,
    };
    Ok((files, tokens_file, token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_runtime::tls::{ClientAuth, TlsFiles};

    #[test]
    fn made_certificates_make_tls_configurations() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca(dir.path(), false).unwrap();
        let node = create_node(dir.path(), "shard-1", &["10.0.0.7".into()], 30, false).unwrap();
        let files = TlsFiles {
            cert: node.cert.clone(),
            key: node.key.clone(),
            ca: ca.cert.clone(),
        };
        files.server_config(ClientAuth::Required, true).unwrap();
        files.client_config().unwrap();
        let client = create_client(dir.path(), "ops", 30, false).unwrap();
        TlsFiles {
            cert: client.cert,
            key: client.key,
            ca: ca.cert,
        }
        .client_config()
        .unwrap();
        // Keys are the owner's only; nothing is replaced unasked; a
        // replaced key is the owner's only, whatever the old file's mode.
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&node.key), 0o600);
        let again = create_node(dir.path(), "shard-1", &[], 30, false).unwrap_err();
        assert!(again.to_string().contains("--overwrite"), "{again}");
        std::fs::set_permissions(&node.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        create_node(dir.path(), "shard-1", &[], 30, true).unwrap();
        assert_eq!(mode(&node.key), 0o600);
    }

    #[test]
    fn a_node_certificate_needs_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let error = create_node(dir.path(), "shard-1", &[], 30, false).unwrap_err();
        assert!(format!("{error:#}").contains("create-ca"), "{error:#}");
    }

    #[test]
    fn tokens_are_added_once_per_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let admin = create_token(&path, "ops", tally_runtime::tokens::Role::Admin).unwrap();
        let reader = create_token(&path, "dash", tally_runtime::tokens::Role::Read).unwrap();
        let tokens = tally_runtime::tokens::Tokens::load(&path).unwrap();
        assert_eq!(
            tokens.holder(admin.as_bytes()).unwrap().role,
            tally_runtime::tokens::Role::Admin
        );
        assert_eq!(
            tokens.holder(reader.as_bytes()).unwrap().role,
            tally_runtime::tokens::Role::Read
        );
        assert!(create_token(&path, "ops", tally_runtime::tokens::Role::Read).is_err());
    }
}
