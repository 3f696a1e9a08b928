//! The certificates `roost up` makes on first start: a private CA, the hub's server certificate
//! (for the host name devices use, plus `localhost` and `127.0.0.1`), and the cluster
//! certificate both ends of the control link present.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use roost_common::tls::{CertPaths, LINK_SERVER_NAME};

/// Creates the CA and certificates under `<data>/certs/` unless they already exist.
pub fn ensure(data_dir: &Path, hostname: &str) -> anyhow::Result<CertPaths> {
    let paths = CertPaths::new(data_dir);
    if paths.ca().exists() && paths.server().exists() && paths.cluster().exists() {
        return Ok(paths);
    }
    roost_common::hubfile::private_dir(&paths.dir)
        .with_context(|| format!("creating {}", paths.dir.display()))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "roost local CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec![
        hostname.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    names.dedup();
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, hostname);
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let cluster_key = KeyPair::generate()?;
    let mut cluster_params = CertificateParams::new(vec![LINK_SERVER_NAME.to_string()])?;
    cluster_params
        .distinguished_name
        .push(DnType::CommonName, LINK_SERVER_NAME);
    cluster_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    cluster_params.use_authority_key_identifier_extension = true;
    let cluster_cert = cluster_params.signed_by(&cluster_key, &issuer)?;

    write_private(&paths.ca_key(), &ca_key_pem)?;
    write_private(&paths.server_key(), &server_key.serialize_pem())?;
    write_private(&paths.cluster_key(), &cluster_key.serialize_pem())?;
    // Leaves only: a server presents its chain without the root the client must already trust.
    std::fs::write(paths.server(), server_cert.pem())?;
    std::fs::write(paths.cluster(), cluster_cert.pem())?;
    // The CA goes last: its presence marks the set as complete.
    std::fs::write(paths.ca(), ca_pem)?;
    tracing::info!(dir = %paths.dir.display(), hostname, "generated CA and certificates");
    Ok(paths)
}

/// A device's certificate and key (IoT Hub's `selfSigned` or `certificateAuthority`
/// authentication): its common name the identity (`device` or `device/module`), valid for
/// `days`, for client authentication.
pub struct DeviceCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// Uppercase hex SHA-256 of the certificate's DER, as the registry takes it.
    pub thumbprint: String,
}

/// A certificate valid from five minutes ago for `days`, its subject's common name `cn`.
fn params_for(cn: &str, days: u32) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    params.not_before = now - std::time::Duration::from_secs(300);
    params.not_after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    Ok(params)
}

/// A client-authentication leaf for `identity`.
fn device_params(identity: &str, days: u32) -> anyhow::Result<CertificateParams> {
    let mut params = params_for(identity, days)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn device_cert(cert: rcgen::Certificate, key: &KeyPair) -> anyhow::Result<DeviceCert> {
    let read = roost_iothub::x509::ClientCert::from_der(cert.der())?;
    Ok(DeviceCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        thumbprint: read.sha256.to_ascii_uppercase(),
    })
}

pub fn self_signed_device_cert(identity: &str, days: u32) -> anyhow::Result<DeviceCert> {
    let key = KeyPair::generate()?;
    let cert = device_params(identity, days)?.self_signed(&key)?;
    device_cert(cert, &key)
}

/// A certificate for `identity` (`device` or `device/module`) signed by the CA whose
/// certificate and key are given in PEM (IoT Hub's `certificateAuthority` authentication).
pub fn ca_signed_device_cert(
    identity: &str,
    days: u32,
    ca_cert_pem: &str,
    ca_key_pem: &str,
) -> anyhow::Result<DeviceCert> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("reading the CA's key")?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("reading the CA's certificate")?;
    let key = KeyPair::generate()?;
    let cert = device_params(identity, days)?.signed_by(&key, &issuer)?;
    device_cert(cert, &key)
}

/// A CA for a fleet's device certificates: its certificate and key, PEM.
pub fn fleet_ca(cn: &str, days: u32) -> anyhow::Result<(String, String)> {
    let mut params = params_for(cn, days)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The proof of possession of a CA's key that IoT Hub asks for: a certificate whose common
/// name is the verification code, signed by the CA (PEM).
pub fn verification_cert(code: &str, ca_cert_pem: &str, ca_key_pem: &str) -> anyhow::Result<String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("reading the CA's key")?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).context("reading the CA's certificate")?;
    let key = KeyPair::generate()?;
    Ok(params_for(code, 1)?.signed_by(&key, &issuer)?.pem())
}

/// Writes a private key (owner-only).
pub fn write_private(path: &Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}
