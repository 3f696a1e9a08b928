//! Loading the certificates `roost up` generates (`<data>/certs/`) into rustls configurations:
//! the device-facing server config (TLS 1.2 and 1.3; the Python SDK pins 1.2) and the mutually
//! authenticated configs of the QUIC control link.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN of the control link.
pub const LINK_ALPN: &[u8] = b"roost-link/1";
/// Server name the control plane's link certificate carries.
pub const LINK_SERVER_NAME: &str = "roost-control";

/// Paths of the files under `<data>/certs/`.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub dir: PathBuf,
}

impl CertPaths {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("certs"),
        }
    }
    /// The set a CA file belongs to (the CLI and the load generator find it through hub.json).
    pub fn of_ca(ca: &Path) -> Self {
        Self {
            dir: ca.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn cluster(&self) -> PathBuf {
        self.dir.join("cluster.pem")
    }
    pub fn cluster_key(&self) -> PathBuf {
        self.dir.join("cluster.key")
    }
}

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |detail: String| TlsError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(e.to_string()))?
        .collect();
    let certs = certs.map_err(|e| read_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(read_err("no certificate in file".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// The chain a server presents from `path`: its certificates without the trust anchors of
/// `ca`. A client that does not trust the hub's CA then sees an untrusted leaf, not a
/// self-signed certificate in the chain (the Node SDK's server-validation tests tell the two
/// apart); data folders made before the CA was left out still hold it in `server.pem`.
fn served_chain(path: &Path, ca: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let anchors = load_certs(ca)?;
    let chain: Vec<_> = load_certs(path)?
        .into_iter()
        .filter(|c| !anchors.contains(c))
        .collect();
    if chain.is_empty() {
        return Err(TlsError::Read {
            path: path.to_path_buf(),
            detail: "holds only the CA certificate".into(),
        });
    }
    Ok(chain)
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(roots)
}

/// The device-facing server config (MQTT :8883, HTTPS): TLS 1.2 and 1.3 (nothing older), a
/// client certificate asked for but not required ([`DeviceCertVerifier`]), the server's chain
/// without the root.
pub fn device_server_config(paths: &CertPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(DeviceCertVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            served_chain(&paths.server(), &paths.ca())?,
            load_key(&paths.server_key())?,
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Devices' client certificates (spec §1.4): asked for, never required — SAS devices share
/// the port — and taken from any client whose key signs the handshake (TLS's proof that it
/// holds the certificate). Which identity a certificate stands for, if any, is the device
/// session's decision at CONNECT (a thumbprint in the registry, or a chain to a verified CA),
/// where a refusal is a CONNACK with a counted reason rather than a failed handshake.
#[derive(Debug)]
pub struct DeviceCertVerifier {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for DeviceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The control plane's end of the link: requires a client certificate issued by the CA.
pub fn link_server_config(paths: &CertPaths) -> Result<ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&paths.ca())?), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            served_chain(&paths.cluster(), &paths.ca())?,
            load_key(&paths.cluster_key())?,
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![LINK_ALPN.to_vec()];
    Ok(cfg)
}

/// The engine's end of the link: trusts the CA, presents the cluster certificate.
pub fn link_client_config(paths: &CertPaths) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&paths.ca())?)
        .with_client_auth_cert(
            served_chain(&paths.cluster(), &paths.ca())?,
            load_key(&paths.cluster_key())?,
        )
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![LINK_ALPN.to_vec()];
    Ok(cfg)
}

/// A client config trusting only the hub's CA (the CLI's REST client).
pub fn ca_client_config(paths: &CertPaths) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&paths.ca())?)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Where Debian, Ubuntu and Alpine keep the system's trusted roots (one PEM bundle).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A client config for outbound HTTPS to others' servers (webhook endpoints): the system's
/// roots when the bundle is there, plus the hub's CA (so a webhook served with a certificate
/// the hub issued is trusted too). A root the bundle holds that rustls cannot read is skipped.
pub fn outbound_client_config(paths: &CertPaths) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = roots(&paths.ca())?;
    let system = Path::new(SYSTEM_ROOTS);
    if system.exists() {
        for c in load_certs(system)? {
            let _ = roots.add(c);
        }
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
