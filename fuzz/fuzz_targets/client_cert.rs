//! A client certificate as a device presents it in the TLS handshake (any bytes: the
//! handshake proves only that the client holds the key): reading it may refuse but never
//! panics, and what it reads is self-consistent — the thumbprints are the DER's digests.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_iothub::x509::ClientCert;

fuzz_target!(|data: &[u8]| {
    let Ok(cert) = ClientCert::from_der(data) else { return };
    assert_eq!(cert.sha1.len(), 40);
    assert_eq!(cert.sha256.len(), 64);
    assert!(cert.has_thumbprint(&cert.sha1.to_ascii_uppercase()));
    assert!(cert.has_thumbprint(&cert.sha256));
    let _ = cert.valid_at(1_800_000_000);
});
