//! Certificates for tests of TLS connections to real servers: a CA made for one test, a server certificate for
//! `127.0.0.1` and `localhost` signed by it, a client certificate signed by it, and a second CA nobody uses (to
//! show an untrusted server is refused), all written as PEM files in a folder the caller owns.
//!
//! It starts no server.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// The PEM files of one test's certificates.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting only it, a client must refuse the server.
    pub other_ca: PathBuf,
}

impl TestPki {
    /// Generate the certificates into `dir`.
    pub fn generate(dir: &Path) -> Result<TestPki> {
        std::fs::create_dir_all(dir)?;
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let (ca, ca_key) = authority("Switchyard test CA")?;
        let (other, _) = authority("Switchyard unrelated CA")?;

        let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
        server.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        server.distinguished_name.push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &ca, &ca_key)?;

        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, "switchyard-test-client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client_cert = client.signed_by(&client_key, &ca, &ca_key)?;

        Ok(TestPki {
            ca: write("ca.pem", ca.pem())?,
            server_cert: write("server.pem", server_cert.pem())?,
            server_key: write("server-key.pem", server_key.serialize_pem())?,
            client_cert: write("client.pem", client_cert.pem())?,
            client_key: write("client-key.pem", client_key.serialize_pem())?,
            other_ca: write("other-ca.pem", other.pem())?,
        })
    }
}

fn authority(name: &str) -> Result<(rcgen::Certificate, KeyPair)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}
