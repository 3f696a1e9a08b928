//! What the generator needs from a roost hub: `hub.json`, device identities created through the
//! service API, and IoT Hub credentials for each connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hyper::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};

use crate::http;

/// The IoT Hub API version in usernames and service calls.
pub const API_VERSION: &str = "2021-04-12";
/// Bulk registry requests carry at most this many devices (IoT Hub's limit).
const BULK_MAX: usize = 100;

/// The parts of `<data>/hub.json` the generator uses.
#[derive(Debug, Clone)]
pub struct Hub {
    pub hostname: String,
    pub ca: PathBuf,
    pub service_url: String,
    pub ops_url: String,
    service_key_name: String,
    service_key: Vec<u8>,
    pub mqtt_port: Option<u16>,
    pub plain_mqtt_port: Option<u16>,
}

impl Hub {
    pub fn read(data_dir: &Path) -> anyhow::Result<Hub> {
        let path = data_dir.join("hub.json");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "no hub at {} (is `roost up` running with this --data-dir?)",
                path.display()
            )
        })?;
        let v: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("{} lacks {k}", path.display()))
        };
        let port = |k: &str| {
            v.get("ports")
                .and_then(|p| p.get(k))
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
        };
        let cs =
            roost_iothub::connstr::ServiceConnectionString::parse(&s("service_connection_string")?)
                .map_err(|e| anyhow::anyhow!("service connection string in hub.json: {e}"))?;
        let service_key = roost_iothub::sas::decode_key(&cs.key)
            .map_err(|e| anyhow::anyhow!("service key in hub.json: {e}"))?;
        Ok(Hub {
            hostname: s("hostname")?,
            ca: s("ca")?.into(),
            service_url: s("service_url")?,
            ops_url: s("ops_url").context("is the engine running?")?,
            service_key_name: cs.key_name,
            service_key,
            mqtt_port: port("mqtt"),
            plain_mqtt_port: port("plain_mqtt"),
        })
    }

    /// The MQTT address on loopback: the TLS listener or the plain one.
    pub fn mqtt_addr(&self, tls: bool) -> anyhow::Result<SocketAddr> {
        let port = if tls {
            self.mqtt_port.context("hub.json has no ports.mqtt")?
        } else {
            self.plain_mqtt_port.context("hub.json has no ports.plain_mqtt: start the hub with `roost up --plain-mqtt ADDR`, or pass --tls")?
        };
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn service_token(&self) -> String {
        let resource = roost_iothub::sas::encode_resource(&self.hostname);
        roost_iothub::sas::sign(
            &resource,
            &self.service_key,
            unix_now() + 3600,
            Some(&self.service_key_name),
        )
    }

    async fn service_client(&self) -> anyhow::Result<http::Client> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca)
            .with_context(|| format!("cannot read {}", self.ca.display()))?
        {
            roots.add(cert?)?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        http::Client::new(
            &self.service_url,
            Some((Arc::new(cfg), self.hostname.clone())),
        )
    }

    async fn call(
        &self,
        client: &mut http::Client,
        method: Method,
        path: &str,
        body: Value,
        if_match: bool,
    ) -> anyhow::Result<http::Response> {
        let mut headers = vec![
            ("authorization", self.service_token()),
            ("accept", "application/json".to_string()),
            (
                "content-type",
                "application/json; charset=utf-8".to_string(),
            ),
        ];
        if if_match {
            headers.push(("if-match", "\"*\"".to_string()));
        }
        let path = format!("{path}?api-version={API_VERSION}");
        client
            .request(method, &path, &headers, Some(serde_json::to_vec(&body)?))
            .await
    }

    /// Makes sure devices `ids` exist with symmetric key `key` (primary and secondary):
    /// bulk `create`, then bulk `update` for those that already existed (their key may differ);
    /// single `PUT` with `If-Match: *` if the hub has no bulk endpoint.
    pub async fn ensure_devices(&self, ids: &[String], key: &str) -> anyhow::Result<Provisioned> {
        let mut client = self.service_client().await?;
        let mut out = Provisioned::default();
        for (c, chunk) in ids.chunks(BULK_MAX).enumerate() {
            let base = c * BULK_MAX;
            let create = bulk_body(chunk, "create", key);
            let resp = self
                .call(&mut client, Method::POST, "/devices", create, false)
                .await?;
            if matches!(resp.status, 404 | 405) {
                out.bulk = false;
                for id in ids {
                    self.put_device(&mut client, id, key).await?;
                }
                out.written = ids.len();
                out.last = ids.len().checked_sub(1);
                return Ok(out);
            }
            out.bulk = true;
            let existing = existing_from_bulk(&resp, chunk)?;
            out.written += chunk.len();
            if let Some(i) = chunk.iter().rposition(|id| !existing.contains(id)) {
                out.last = Some(base + i);
            }
            if existing.is_empty() {
                continue;
            }
            out.existed += existing.len();
            let update = bulk_body(&existing, "update", key);
            let resp = self
                .call(&mut client, Method::POST, "/devices", update, false)
                .await?;
            if resp.status >= 300 {
                // A hub with bulk create but no bulk update: one PUT each.
                for id in &existing {
                    self.put_device(&mut client, id, key).await?;
                }
            }
            out.last = existing
                .last()
                .and_then(|id| chunk.iter().position(|c| c == id))
                .map(|i| base + i);
        }
        Ok(out)
    }

    async fn put_device(
        &self,
        client: &mut http::Client,
        id: &str,
        key: &str,
    ) -> anyhow::Result<()> {
        let body = json!({
            "deviceId": id,
            "status": "enabled",
            "authentication": { "type": "sas", "symmetricKey": { "primaryKey": key, "secondaryKey": key } },
            "capabilities": { "iotEdge": false },
        });
        let resp = self
            .call(client, Method::PUT, &format!("/devices/{id}"), body, true)
            .await?;
        if resp.status >= 300 {
            bail!(
                "creating device {id}: the hub answered {}: {}",
                resp.status,
                resp.text()
            );
        }
        Ok(())
    }
}

/// What [`Hub::ensure_devices`] did.
#[derive(Debug, Default, Clone)]
pub struct Provisioned {
    pub written: usize,
    pub existed: usize,
    /// Whether the bulk endpoint was used.
    pub bulk: bool,
    /// Index (into the ids) of the device written last: once the engine knows it, it knows
    /// every one written before (registry changes reach it in order).
    pub last: Option<usize>,
}

fn bulk_body(ids: &[String], mode: &str, key: &str) -> Value {
    let items: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({
                "id": id,
                "importMode": mode,
                "status": "enabled",
                "authentication": { "type": "sas", "symmetricKey": { "primaryKey": key, "secondaryKey": key } },
            })
        })
        .collect();
    Value::Array(items)
}

/// The devices of a bulk `create` answer that failed only because they already exist; any
/// other failure is an error.
fn existing_from_bulk(resp: &http::Response, chunk: &[String]) -> anyhow::Result<Vec<String>> {
    let parsed: Option<Value> = serde_json::from_slice(&resp.body).ok();
    let result = match (resp.status, parsed) {
        (200 | 400, Some(v)) if v.get("isSuccessful").is_some() => v,
        (status, _) => bail!(
            "bulk device create: the hub answered {status}: {}",
            resp.text()
        ),
    };
    if result["isSuccessful"].as_bool() == Some(true) {
        return Ok(Vec::new());
    }
    let mut existing = Vec::new();
    for e in result["errors"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let id = e["deviceId"].as_str().unwrap_or_default();
        let code = format!("{} {}", e["errorCode"], e["errorStatus"]);
        let exists = code.contains("409001") || code.to_ascii_lowercase().contains("alreadyexists");
        if !exists || !chunk.iter().any(|c| c == id) {
            bail!("bulk device create failed for {id:?}: {code}");
        }
        existing.push(id.to_string());
    }
    if existing.is_empty() {
        bail!(
            "bulk device create was not successful and named no device: {}",
            resp.text()
        );
    }
    Ok(existing)
}

/// MQTT credentials of device `id` with key `key` (base64): client id, username, SAS token
/// valid for `ttl_secs`.
pub fn device_credentials(
    hostname: &str,
    id: &str,
    key: &str,
    ttl_secs: u64,
) -> anyhow::Result<(String, String, String)> {
    let raw = STANDARD
        .decode(key)
        .context("the device key is not base64")?;
    let resource = roost_iothub::sas::encode_resource(&format!("{hostname}/devices/{id}"));
    let token = roost_iothub::sas::sign(&resource, &raw, unix_now() + ttl_secs, None);
    let username =
        format!("{hostname}/{id}/?api-version={API_VERSION}&DeviceClientType=roost-bench");
    Ok((id.to_string(), username, token))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: Value) -> http::Response {
        http::Response {
            status,
            body: serde_json::to_vec(&body).expect("json").into(),
        }
    }

    #[test]
    fn bulk_existing_devices_are_not_errors() {
        let chunk = vec!["a".to_string(), "b".to_string()];
        assert!(existing_from_bulk(
            &resp(
                200,
                json!({"isSuccessful": true, "errors": [], "warnings": []})
            ),
            &chunk
        )
        .expect("ok")
        .is_empty());
        let r = resp(
            400,
            json!({"isSuccessful": false, "errors": [{"deviceId": "b", "errorCode": "DeviceAlreadyExists", "errorStatus": "Device b already exists"}]}),
        );
        assert_eq!(
            existing_from_bulk(&r, &chunk).expect("ok"),
            vec!["b".to_string()]
        );
        let r = resp(
            400,
            json!({"isSuccessful": false, "errors": [{"deviceId": "b", "errorCode": 409001}]}),
        );
        assert_eq!(
            existing_from_bulk(&r, &chunk).expect("ok"),
            vec!["b".to_string()]
        );
    }

    #[test]
    fn other_bulk_failures_are_errors() {
        let chunk = vec!["a".to_string()];
        let r = resp(
            400,
            json!({"isSuccessful": false, "errors": [{"deviceId": "a", "errorCode": "BadRequest"}]}),
        );
        assert!(existing_from_bulk(&r, &chunk).is_err());
        assert!(existing_from_bulk(&resp(500, json!({})), &chunk).is_err());
        assert!(existing_from_bulk(
            &resp(400, json!({"isSuccessful": false, "errors": []})),
            &chunk
        )
        .is_err());
    }

    #[test]
    fn credentials_verify_with_the_key() {
        let key = STANDARD.encode([7u8; 32]);
        let (client_id, username, token) =
            device_credentials("localhost", "bench-1", &key, 60).expect("creds");
        assert_eq!(client_id, "bench-1");
        let user = roost_iothub::username::Username::parse(&username).expect("username parses");
        assert_eq!(user.device.as_str(), "bench-1");
        let sas = roost_iothub::sas::SasToken::parse(&token).expect("token parses");
        assert!(sas.verify_signature(&[7u8; 32]));
        assert!(sas.authorizes("localhost/devices/bench-1"));
    }
}
