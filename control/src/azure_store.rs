//! An Azure Storage account (or an Azure-compatible one, such as Azurite) as the store file
//! uploads go to, instead of the embedded one (`blobs.rs`): the hub signs blob service SAS
//! tokens with the account key, as IoT Hub does for the account linked to it, and asks the
//! account for a finished blob's size.
//!
//! The container must exist in the account. The SAS is the documented service SAS for a blob
//! (`sr=b`, `sv=2021-08-06`): signed permissions, start, expiry, `/blob/{account}/{container}/
//! {blob}`, identifier, IP, protocol, version, resource, snapshot time, encryption scope and
//! the five response headers, one per line — checked against the Python storage SDK's own
//! signatures.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hyper::Method;
use roost_common::tls::{self, CertPaths};

use crate::blobs::{BlobPath, BlobTarget};

/// The service version SAS tokens are signed for.
const VERSION: &str = "2021-08-06";

/// An account: where it is and its key.
pub struct AzureStore {
    /// `https://host[:port]`.
    origin: String,
    host: String,
    /// The account's path for a path-style endpoint (`/devstoreaccount1`), or empty.
    prefix: String,
    account: String,
    key: Vec<u8>,
    /// Trusts the system's roots and the hub's CA.
    tls: std::sync::Arc<rustls::ClientConfig>,
}

/// What a URL component keeps unescaped: letters, digits and `-._~` (RFC 3986's unreserved).
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).collect()
}

impl AzureStore {
    /// `url` is the account's blob endpoint (`https://ACCOUNT.blob.core.windows.net`, or
    /// `https://host:port/ACCOUNT` path-style); `key` its base64 account key.
    pub fn new(url: &str, key: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let uri: hyper::Uri = url.trim_end_matches('/').parse()?;
        anyhow::ensure!(uri.scheme_str() == Some("https"), "the blob account URL must be https:// (the device SDKs upload over https)");
        let host = uri.host().ok_or_else(|| anyhow::anyhow!("the blob account URL has no host"))?.to_string();
        let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| host.clone());
        let prefix = uri.path().trim_end_matches('/').to_string();
        let account = match prefix.trim_start_matches('/').split('/').next() {
            Some(a) if !a.is_empty() => a.to_string(),
            _ => host.split('.').next().unwrap_or_default().to_string(),
        };
        anyhow::ensure!(!account.is_empty(), "no account name in the blob account URL");
        let key = base64::engine::general_purpose::STANDARD.decode(key.trim())?;
        let tls = tls::outbound_client_config(&CertPaths::new(data_dir))?;
        Ok(Self { origin: format!("https://{authority}"), host: authority, prefix, account, key, tls })
    }

    /// The signature of a service SAS for `path`.
    fn signature(&self, permissions: &str, expiry: &str, path: &BlobPath) -> String {
        let resource = format!("/blob/{}/{}/{}", self.account, path.container, path.blob);
        let fields = [permissions, "", expiry, &resource, "", "", "", VERSION, "b", "", "", "", "", "", "", ""];
        let to_sign = fields.join("\n");
        let mac = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key), to_sign.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.as_ref())
    }

    fn sas_until(&self, path: &BlobPath, permissions: &str, expiry: &str) -> String {
        let sig = self.signature(permissions, expiry, path);
        format!("?se={}&sp={permissions}&sv={VERSION}&sr=b&sig={}", enc(expiry), enc(&sig))
    }
}

impl BlobTarget for AzureStore {
    fn host_name(&self) -> String {
        format!("{}{}", self.host, self.prefix)
    }

    fn sas(&self, path: &BlobPath, permissions: &str, ttl: Duration) -> String {
        let expiry = humantime::format_rfc3339_seconds(SystemTime::now() + ttl).to_string();
        self.sas_until(path, permissions, &expiry)
    }

    fn size(&self, path: &BlobPath) -> Option<u64> {
        let target = format!(
            "{}/{}/{}{}",
            self.prefix,
            path.container,
            path.blob.split('/').map(enc).collect::<Vec<_>>().join("/"),
            self.sas(path, "r", Duration::from_secs(300)),
        );
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        let resp = runtime.block_on(async {
            let mut client = roost_common::client::Client::new(&self.origin, Some((self.tls.clone(), self.host.split(':').next().unwrap_or_default().to_string()))).ok()?;
            let headers = [("x-ms-version", VERSION.to_string())];
            tokio::time::timeout(Duration::from_secs(10), client.request(Method::HEAD, &target, &headers, None)).await.ok()?.ok()
        })?;
        if resp.status != 200 {
            tracing::info!(status = resp.status, blob = %path.blob, "the storage account did not find an uploaded blob");
            return None;
        }
        resp.headers.get("content-length")?.to_str().ok()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Azurite's well-known development account, and a SAS for it made by the Python storage
    /// SDK's own code (`BlobSharedAccessSignature.generate_blob`, azure-storage-blob 12.31.1,
    /// x_ms_version 2021-08-06, permission "rw", expiry 2030-01-01T00:00:00Z).
    const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    const SDK_SAS: &str = "se=2030-01-01T00%3A00%3A00Z&sp=rw&sv=2021-08-06&sr=b&sig=avvcF0nINzdmkzmudF8pCuidL5QZjY688W0atiNDRYs%3D";

    #[test]
    fn a_sas_is_signed_as_the_storage_sdk_signs_one() {
        let dir = std::env::temp_dir().join(format!("roost-azure-{}", std::process::id()));
        crate::certs::ensure(&dir, "localhost").expect("certs");
        let store = AzureStore::new("https://127.0.0.1:10000/devstoreaccount1", KEY, &dir).expect("store");
        assert_eq!(store.host_name(), "127.0.0.1:10000/devstoreaccount1");
        let path = BlobPath { container: "fileuploads".into(), blob: "dev-1/report.bin".into() };
        assert_eq!(store.sas_until(&path, "rw", "2030-01-01T00:00:00Z"), format!("?{SDK_SAS}"));
        assert_eq!(store.uri(&path), "https://127.0.0.1:10000/devstoreaccount1/fileuploads/dev-1/report.bin");
        let cloud = AzureStore::new("https://acct.blob.core.windows.net", KEY, &dir).expect("store");
        assert_eq!((cloud.account.as_str(), cloud.host_name().as_str()), ("acct", "acct.blob.core.windows.net"));
        assert!(AzureStore::new("http://acct.blob.core.windows.net", KEY, &dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
