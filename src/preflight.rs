//! `keymeter --check-config`: everything a start would find wrong with the machine,
//! found without starting. Each problem names the configuration key it comes from.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, ConfigError};

/// Checks the files and directories `config` names: the broker's TLS files, the gRPC
/// listener's certificate, key (and that they belong together) and client CA, the
/// outbox directory (creatable and writable), the keys file (readable and valid) and
/// the snapshot's directory.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    crate::mqtt::options(config).map_err(|e| ConfigError::invalid("mqtt.tls", e.to_string()))?;
    if let Some(tls) = &config.listen.grpc_tls {
        let certs = certificates(&tls.cert_file, "listen.grpc_tls.cert_file")?;
        let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| {
            ConfigError::invalid(
                "listen.grpc_tls.key_file",
                format!("{}: no private key: {e}", tls.key_file.display()),
            )
        })?;
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| {
            ConfigError::invalid(
                "listen.grpc_tls.key_file",
                format!("does not go with listen.grpc_tls.cert_file: {e}"),
            )
        })?;
        if let Some(ca) = &tls.client_ca_file {
            certificates(ca, "listen.grpc_tls.client_ca_file")?;
        }
    }
    writable_dir(&config.outbox.dir, "outbox.dir")?;
    if let Some(snapshot) = &config.keys.snapshot {
        let dir = snapshot
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        writable_dir(dir, "keys.snapshot")?;
    }
    if let Some(file) = &config.keys.file {
        let bytes = std::fs::read(file)
            .map_err(|e| ConfigError::invalid("keys.file", format!("{}: {e}", file.display())))?;
        crate::keys::sync::parse_key_list(&bytes)
            .map_err(|r| ConfigError::invalid("keys.file", format!("{}: {r}", file.display())))?;
    }
    Ok(())
}

fn certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| ConfigError::invalid(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{}: no PEM certificate in it", path.display()),
        ));
    }
    Ok(certs)
}

/// `dir` is a writable directory, or the nearest of its ancestors that exists is one
/// (a start creates the rest). Nothing is created here.
fn writable_dir(dir: &Path, key: &str) -> Result<(), ConfigError> {
    let fail = |what: String| ConfigError::invalid(key, format!("{}: {what}", dir.display()));
    let existing = dir
        .ancestors()
        .find(|p| p.exists() || p.as_os_str().is_empty())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !existing.is_dir() {
        return Err(fail(format!(
            "{} is not a directory, so it cannot hold one",
            existing.display()
        )));
    }
    if !writable(existing) {
        return Err(fail(format!("{} is not writable", existing.display())));
    }
    Ok(())
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads a NUL-terminated path and nothing else.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}
