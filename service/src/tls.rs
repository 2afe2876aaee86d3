//! Client TLS for the backends a service connects to (Redis, CQL): one rustls configuration built from PEM files,
//! trusting the CA bundle named (else the system's roots) and presenting a client certificate when one is named.
//! The crypto provider is `ring`, named explicitly, so the process never depends on which provider other
//! dependencies enable.
//!
//! It opens no connection; NATS loads the same kinds of files through its own client.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The PEM files of one backend's TLS settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsFiles {
    /// The CAs to trust; `None` trusts the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain, with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// Every problem with these files, named by their keys (`[ca, cert, key]`): a certificate without its key (or the
    /// reverse), a file this process cannot read.
    pub fn problems(&self, keys: [&'static str; 3]) -> Vec<crate::ConfigError> {
        let [ca_key, cert_key, key_key] = keys;
        let mut checks = crate::config::Checks::default();
        checks.require(
            self.cert_file.is_some() == self.key_file.is_some(),
            cert_key,
            format!("{cert_key} and {key_key} go together"),
        );
        for (key, file) in [(ca_key, &self.ca_file), (cert_key, &self.cert_file), (key_key, &self.key_file)] {
            if let Some(path) = file {
                checks.check(crate::config::readable_file(key, path));
            }
        }
        checks.into_problems()
    }
}

/// Whether `error`, or any error it was caused by, is a TLS failure (a rustls error, also inside an IO error): a
/// certificate refused or not presented, as opposed to a server that cannot be reached.
pub fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return true;
            }
        }
        cause = current.source();
    }
    false
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the system's CA roots cannot be read: {0}")]
    SystemRoots(String),
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfAPair,
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Make `ring` the process's default rustls provider (once). Libraries that build a rustls configuration without
/// naming a provider (the NATS client) would otherwise find two compiled in (the CQL driver's rustls brings
/// another) and refuse to choose.
pub fn install_default_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // An error means another provider was installed first; that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A rustls client configuration for `files`.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            let certificates = certificates(path, "the CA bundle")?;
            let (added, _ignored) = roots.add_parsable_certificates(certificates);
            if added == 0 {
                return Err(TlsError::NoCertificate { path: path.clone() });
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            if native.certs.is_empty() {
                let errors: Vec<String> = native.errors.iter().map(ToString::to_string).collect();
                return Err(TlsError::SystemRoots(errors.join("; ")));
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "the client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
                what: "the client key",
                path: key.clone(),
                source,
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) | (None, Some(_)) => return Err(TlsError::HalfAPair),
    };
    Ok(config)
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem { what, path: path.to_path_buf(), source };
    let certificates = CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certificates)
}
