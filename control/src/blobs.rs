//! The embedded blob store file uploads go to (wire spec §3): a local directory served over
//! HTTPS with the part of Azure Blob Storage's REST API the storage SDKs use for a block blob —
//! Put Blob (`PUT /{container}/{blob}`), Put Block (`?comp=block&blockid=…`), Put Block List
//! (`?comp=blocklist`, the `<BlockList>` XML), Get Blob and Get Blob Properties (`GET`,
//! `HEAD`). Every request carries a SAS the hub signed for that one blob (`sr=b`, `sp`, `se`,
//! `sig`); it is checked from the request's query before its body is read.
//!
//! Blobs live in `<data>/blobs/{container}/{blob path}`; staged blocks in
//! `<data>/blobs/.blocks/{hash of the blob's path}/`. Answers are 201 with an empty body for
//! writes, as the SDKs require, and errors in Storage's XML form.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use roost_common::httpd::{self, Req, Resp};
pub use roost_iothub::files::BlobPath;
use roost_iothub::files::{block_list, parse_range};

/// The largest Put Blob or Put Block body taken (the Python storage SDK puts up to 64 MiB in
/// one request).
pub const MAX_BLOB_BODY: usize = 64 * 1024 * 1024 + 64 * 1024;
/// The largest blob a block list may commit.
pub const MAX_BLOB: u64 = 4 * 1024 * 1024 * 1024;
/// Blocks one uncommitted blob may stage.
const MAX_BLOCKS: usize = 50_000;
/// The storage API version answered.
const VERSION: &str = "2021-08-06";

/// Where uploads go: the embedded [`BlobStore`], or an Azure Storage account
/// (`crate::azure_store`).
pub trait BlobTarget: Send + Sync {
    /// `hostName` of an upload's answer: what devices put after `https://` and before
    /// `/{container}/{blob}` (`host[:port]`, with an account's path for a path-style store).
    fn host_name(&self) -> String;
    /// A SAS for `path` (`?…&sig=…`) granting `permissions`, valid for `ttl`.
    fn sas(&self, path: &BlobPath, permissions: &str, ttl: Duration) -> String;
    /// The blob's URI.
    fn uri(&self, path: &BlobPath) -> String {
        format!("https://{}/{}/{}", self.host_name(), path.container, path.blob)
    }
    /// The blob's size if it exists (blocking: it may ask the store).
    fn size(&self, path: &BlobPath) -> Option<u64>;
}

impl BlobTarget for BlobStore {
    fn host_name(&self) -> String {
        self.host.clone()
    }

    fn sas(&self, path: &BlobPath, permissions: &str, ttl: Duration) -> String {
        BlobStore::sas(self, path, permissions, ttl)
    }

    fn size(&self, path: &BlobPath) -> Option<u64> {
        BlobStore::size(self, path)
    }
}

/// What signs and locates blob SAS URIs.
pub struct BlobStore {
    root: PathBuf,
    key: Vec<u8>,
    /// `host:port` devices reach the store at (the `hostName` of an upload's answer).
    pub host: String,
}

/// A refusal in Storage's form.
fn storage_error(status: StatusCode, code: &str, message: &str) -> Resp {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{}</Message></Error>",
        message.replace('&', "&amp;").replace('<', "&lt;")
    );
    let mut resp = httpd::text(status, body);
    let h = resp.headers_mut();
    h.insert("content-type", hyper::header::HeaderValue::from_static("application/xml"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(code) {
        h.insert("x-ms-error-code", v);
    }
    resp
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 UTC with seconds, as a SAS `se` writes it.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl BlobStore {
    pub fn new(root: PathBuf, key: Vec<u8>, host: String) -> Self {
        Self { root, key, host }
    }

    fn hmac_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key)
    }

    /// What a SAS signs: its permissions, expiry and the blob.
    fn to_sign(permissions: &str, expiry: &str, path: &BlobPath) -> String {
        format!("{permissions}\n{expiry}\n{}", path.resource())
    }

    fn signature(&self, permissions: &str, expiry: &str, path: &BlobPath) -> String {
        let mac = ring::hmac::sign(&self.hmac_key(), Self::to_sign(permissions, expiry, path).as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.as_ref())
    }

    /// A SAS for `path` (`?sv=…&sr=b&sp=…&se=…&sig=…`), valid for `ttl`.
    pub fn sas(&self, path: &BlobPath, permissions: &str, ttl: Duration) -> String {
        let expiry = rfc3339(SystemTime::now() + ttl);
        let sig = self.signature(permissions, &expiry, path);
        let enc = |s: &str| -> String {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).collect()
        };
        format!("?sv={VERSION}&sr=b&sp={permissions}&se={}&sig={}", enc(&expiry), enc(&sig))
    }

    /// Checks a request's SAS for `path` and the permission `needed` (`r` or `w`).
    fn authorize(&self, uri: &hyper::Uri, path: &BlobPath, needed: char) -> Result<(), &'static str> {
        let q = |k| httpd::uri_query_param(uri, k);
        let (Some(sp), Some(se), Some(sig)) = (q("sp"), q("se"), q("sig")) else {
            return Err("the request carries no shared access signature");
        };
        if q("sr").as_deref() != Some("b") {
            return Err("the signature is not for a blob");
        }
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig)
            .map_err(|_| "the signature is not base64")?;
        ring::hmac::verify(&self.hmac_key(), Self::to_sign(&sp, &se, path).as_bytes(), &sig)
            .map_err(|_| "the signature does not match")?;
        let expiry = humantime::parse_rfc3339(&se).map_err(|_| "the signature's expiry cannot be read")?;
        if expiry < SystemTime::now() {
            return Err("the signature has expired");
        }
        if !sp.contains(needed) {
            return Err("the signature does not grant this operation");
        }
        Ok(())
    }

    /// Before the body: the path and the SAS; a write may send up to [`MAX_BLOB_BODY`].
    pub fn admit(&self, parts: &Parts) -> Result<usize, Resp> {
        let Some(path) = BlobPath::parse(parts.uri.path()) else {
            return Err(storage_error(StatusCode::BAD_REQUEST, "InvalidUri", "not a container and blob path"));
        };
        let needed = match parts.method {
            Method::PUT => 'w',
            Method::GET | Method::HEAD => 'r',
            _ => return Err(storage_error(StatusCode::METHOD_NOT_ALLOWED, "UnsupportedHttpVerb", "PUT, GET or HEAD")),
        };
        self.authorize(&parts.uri, &path, needed)
            .map_err(|why| storage_error(StatusCode::FORBIDDEN, "AuthenticationFailed", why))?;
        Ok(if needed == 'w' { MAX_BLOB_BODY } else { 0 })
    }

    fn file(&self, path: &BlobPath) -> PathBuf {
        self.root.join(&path.container).join(&path.blob)
    }

    fn blocks_dir(&self, path: &BlobPath) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, path.resource().as_bytes());
        self.root.join(".blocks").join(hex(&digest.as_ref()[..16]))
    }

    /// The blob's size, if it exists.
    pub fn size(&self, path: &BlobPath) -> Option<u64> {
        std::fs::metadata(self.file(path)).ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    /// Serves an admitted request (blocking file work: call it off the async threads).
    pub fn handle(&self, req: &Req) -> Resp {
        let Some(path) = BlobPath::parse(req.uri().path()) else {
            return storage_error(StatusCode::BAD_REQUEST, "InvalidUri", "not a container and blob path");
        };
        let q = |k| httpd::query_param(req, k);
        let result = match (req.method(), q("comp").as_deref()) {
            (&Method::PUT, None) => self.put_blob(req, &path),
            (&Method::PUT, Some("block")) => self.put_block(req, &path, q("blockid").as_deref()),
            (&Method::PUT, Some("blocklist")) => self.put_block_list(req, &path),
            (&Method::GET | &Method::HEAD, None) => self.get_blob(req, &path),
            _ => Err(storage_error(StatusCode::BAD_REQUEST, "UnsupportedQueryParameter", "an operation this store does not serve")),
        };
        result.unwrap_or_else(|resp| resp)
    }

    fn created(&self, path: &BlobPath) -> Resp {
        let mut resp = httpd::empty(StatusCode::CREATED);
        let h = resp.headers_mut();
        let etag = std::fs::metadata(self.file(path))
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or_else(|| "\"0x0\"".to_string(), |d| format!("\"0x{:X}\"", d.as_nanos()));
        for (k, v) in [
            ("etag", etag),
            ("last-modified", httpdate(SystemTime::now())),
            ("x-ms-version", VERSION.to_string()),
            ("x-ms-request-server-encrypted", "false".to_string()),
            ("x-ms-request-id", crate::api::tracking_id()),
        ] {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        }
        resp
    }

    fn io_error(e: std::io::Error) -> Resp {
        tracing::warn!(error = %e, "blob store write failed");
        storage_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "the store could not write the blob")
    }

    fn refuses_overwrite(&self, req: &Req, path: &BlobPath) -> Result<(), Resp> {
        let none_match = req.headers().get("if-none-match").and_then(|v| v.to_str().ok());
        if none_match == Some("*") && self.size(path).is_some() {
            return Err(storage_error(StatusCode::CONFLICT, "BlobAlreadyExists", "the specified blob already exists"));
        }
        Ok(())
    }

    /// Writes `bytes` as the blob, whole or not at all.
    fn commit(&self, path: &BlobPath, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<(), Resp> {
        let target = self.file(path);
        let dir = target.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(Self::io_error)?;
        let tmp = dir.join(format!(".{}.partial", crate::api::tracking_id()));
        let mut f = std::fs::File::create(&tmp).map_err(Self::io_error)?;
        let written = write(&mut f).and_then(|()| f.sync_all());
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &target)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Self::io_error(e));
        }
        Ok(())
    }

    fn put_blob(&self, req: &Req, path: &BlobPath) -> Result<Resp, Resp> {
        self.refuses_overwrite(req, path)?;
        self.commit(path, |f| std::io::Write::write_all(f, req.body()))?;
        Ok(self.created(path))
    }

    fn put_block(&self, req: &Req, path: &BlobPath, id: Option<&str>) -> Result<Resp, Resp> {
        let id = id
            .and_then(|i| base64::engine::general_purpose::STANDARD.decode(i).ok())
            .filter(|i| !i.is_empty() && i.len() <= 64)
            .ok_or_else(|| storage_error(StatusCode::BAD_REQUEST, "InvalidQueryParameterValue", "blockid must be base64 of at most 64 bytes"))?;
        let dir = self.blocks_dir(path);
        std::fs::create_dir_all(&dir).map_err(Self::io_error)?;
        let (count, bytes) = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .fold((0usize, 0u64), |(n, b), m| (n + 1, b + m.len()))
            })
            .unwrap_or((0, 0));
        if count >= MAX_BLOCKS {
            return Err(storage_error(StatusCode::CONFLICT, "BlockCountExceedsLimit", "too many uncommitted blocks"));
        }
        if bytes + req.body().len() as u64 > MAX_BLOB {
            return Err(storage_error(StatusCode::PAYLOAD_TOO_LARGE, "RequestBodyTooLarge", "the uncommitted blocks would make too large a blob"));
        }
        std::fs::write(dir.join(hex(&id)), req.body()).map_err(Self::io_error)?;
        Ok(self.created(path))
    }

    fn put_block_list(&self, req: &Req, path: &BlobPath) -> Result<Resp, Resp> {
        self.refuses_overwrite(req, path)?;
        let xml = std::str::from_utf8(req.body())
            .map_err(|_| storage_error(StatusCode::BAD_REQUEST, "InvalidXmlDocument", "the block list is not UTF-8"))?;
        let ids = block_list(xml)
            .ok_or_else(|| storage_error(StatusCode::BAD_REQUEST, "InvalidXmlDocument", "not a <BlockList>"))?;
        let dir = self.blocks_dir(path);
        let mut files = Vec::new();
        let mut total = 0u64;
        for id in &ids {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(id)
                .map_err(|_| storage_error(StatusCode::BAD_REQUEST, "InvalidBlockList", "a block id is not base64"))?;
            let file = dir.join(hex(&bytes));
            let len = std::fs::metadata(&file)
                .map_err(|_| storage_error(StatusCode::BAD_REQUEST, "InvalidBlockList", "a listed block was not staged"))?
                .len();
            total += len;
            files.push(file);
        }
        if total > MAX_BLOB {
            return Err(storage_error(StatusCode::PAYLOAD_TOO_LARGE, "RequestBodyTooLarge", "the blob would be too large"));
        }
        self.commit(path, |out| {
            for f in &files {
                std::io::copy(&mut std::fs::File::open(f)?, out)?;
            }
            Ok(())
        })?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(self.created(path))
    }

    fn get_blob(&self, req: &Req, path: &BlobPath) -> Result<Resp, Resp> {
        let not_found = || storage_error(StatusCode::NOT_FOUND, "BlobNotFound", "the specified blob does not exist");
        let size = self.size(path).ok_or_else(not_found)?;
        // `x-ms-range` (or `Range`): `bytes=a-b` or `bytes=a-`, as the storage SDKs read in
        // chunks; answered 206 with `Content-Range`.
        let range = ["x-ms-range", "range"]
            .iter()
            .find_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok()))
            .and_then(|r| parse_range(r, size));
        let (status, start, len) = match range {
            Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
            None => (StatusCode::OK, 0, size),
        };
        let mut resp = if req.method() == Method::HEAD {
            httpd::empty(StatusCode::OK)
        } else {
            let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
            if len > 0 {
                use std::io::{Read, Seek};
                let mut f = std::fs::File::open(self.file(path)).map_err(|_| not_found())?;
                f.seek(std::io::SeekFrom::Start(start)).map_err(Self::io_error)?;
                f.read_exact(&mut bytes).map_err(Self::io_error)?;
            }
            let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(bytes)));
            *r.status_mut() = status;
            r
        };
        let h = resp.headers_mut();
        h.insert("content-type", hyper::header::HeaderValue::from_static("application/octet-stream"));
        h.insert("x-ms-blob-type", hyper::header::HeaderValue::from_static("BlockBlob"));
        h.insert("x-ms-version", hyper::header::HeaderValue::from_static(VERSION));
        let mut set = |k: &'static str, v: String| {
            if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        set("content-length", len.to_string());
        if status == StatusCode::PARTIAL_CONTENT {
            set("content-range", format!("bytes {start}-{}/{size}", start + len - 1));
        }
        Ok(resp)
    }
}

/// An HTTP date (RFC 7231).
fn httpdate(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .ok()
        .and_then(|a| a.to_rfc2822().ok())
        .map(|s| s.replace("+0000", "GMT"))
        .unwrap_or_default()
}

/// Staged blocks no block list committed are removed this long after their last write (the
/// SAS that wrote them has expired by then).
const STALE_BLOCKS: Duration = Duration::from_secs(2 * 3600);

impl BlobStore {
    /// Removes the staged blocks of uploads abandoned for [`STALE_BLOCKS`]; answers how many
    /// blobs' blocks went.
    pub fn sweep_stale_blocks(&self) -> usize {
        let Ok(dirs) = std::fs::read_dir(self.root.join(".blocks")) else {
            return 0;
        };
        let mut removed = 0;
        for d in dirs.filter_map(Result::ok) {
            let stale = d
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_BLOCKS);
            if stale && std::fs::remove_dir_all(d.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Serves the blob store's HTTPS port (and sweeps abandoned blocks every ten minutes).
pub async fn serve(store: Arc<BlobStore>, listener: tokio::net::TcpListener, tls: tokio_rustls::TlsAcceptor, limits: httpd::Limits) {
    let sweeper = store.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let s = sweeper.clone();
            if let Ok(n) = tokio::task::spawn_blocking(move || s.sweep_stale_blocks()).await {
                if n > 0 {
                    tracing::info!(blobs = n, "removed the staged blocks of abandoned uploads");
                }
            }
        }
    });
    let admit = store.clone();
    httpd::serve(
        listener,
        Some(tls),
        limits,
        move |parts: &Parts| admit.admit(parts),
        move |req: Req| {
            let store = store.clone();
            async move {
                tokio::task::spawn_blocking(move || store.handle(&req))
                    .await
                    .unwrap_or_else(|_| storage_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "the request failed"))
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sas_names_one_blob_its_rights_and_its_expiry() {
        let store = BlobStore::new(std::env::temp_dir(), vec![7; 32], "h:1".into());
        let path = BlobPath { container: "c".into(), blob: "d/f".into() };
        let uri = |sas: &str| -> hyper::Uri { format!("/c/d/f{sas}").parse().expect("uri") };
        let sas = store.sas(&path, "rw", Duration::from_secs(60));
        assert_eq!(store.authorize(&uri(&sas), &path, 'w'), Ok(()));
        assert_eq!(store.authorize(&uri(&sas), &path, 'r'), Ok(()));
        let other = BlobPath { container: "c".into(), blob: "d/g".into() };
        assert!(store.authorize(&uri(&sas), &other, 'w').is_err());
        let read_only = store.sas(&path, "r", Duration::from_secs(60));
        assert!(store.authorize(&uri(&read_only), &path, 'w').is_err());
        let forged = sas.replace("sp=rw", "sp=rwd");
        assert_ne!(forged, sas);
        assert!(store.authorize(&uri(&forged), &path, 'w').is_err());
    }
}
