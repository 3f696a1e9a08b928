//! What the generator needs from a roost hub: `hub.json`, device identities created through the
//! service API, and IoT Hub credentials for each connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hyper::Method;
use roost_common::client::Response;
use roost_common::hubfile;
use roost_common::service::{ServiceClient, API_VERSION};
use serde_json::{json, Value};

/// Bulk registry requests carry at most this many devices (IoT Hub's limit).
const BULK_MAX: usize = 100;

/// The parts of `<data>/hub.json` the generator uses (read with `roost_common::hubfile`).
#[derive(Debug, Clone)]
pub struct Hub {
    pub hostname: String,
    pub ca: PathBuf,
    pub ops: crate::readback::OpsEndpoint,
    info: hubfile::HubInfo,
}

impl Hub {
    pub fn read(data_dir: &Path) -> anyhow::Result<Hub> {
        let info = hubfile::read(data_dir)?;
        Ok(Hub {
            hostname: info.hostname.clone(),
            ca: info.ca.clone(),
            ops: crate::readback::OpsEndpoint {
                url: info.ops_url(data_dir)?.to_string(),
                auth: info.ops_auth(),
            },
            info,
        })
    }

    /// The MQTT address on loopback: the TLS listener or the plain one.
    pub fn mqtt_addr(&self, tls: bool) -> anyhow::Result<SocketAddr> {
        let port = if tls {
            self.info.mqtt_port.context("hub.json has no ports.mqtt")?
        } else {
            self.info.plain_mqtt_port.context("hub.json has no ports.plain_mqtt: start the hub with `roost up --plain-mqtt ADDR`, or pass --tls")?
        };
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Port 443's listener, for MQTT over WebSockets.
    pub fn https_addr(&self) -> anyhow::Result<SocketAddr> {
        let port = self
            .info
            .https_port
            .context("hub.json has no ports.https: start the hub with --https ADDR")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    async fn call(
        &self,
        client: &mut ServiceClient,
        method: Method,
        path: &str,
        body: Value,
        if_match: bool,
    ) -> anyhow::Result<Response> {
        let any = [("if-match", "\"*\"".to_string())];
        let extra: &[(&str, String)] = if if_match { &any } else { &[] };
        Ok(client
            .call(method, path, Some(serde_json::to_vec(&body)?), extra)
            .await?)
    }

    /// Makes sure devices `ids` exist with symmetric key `key` (primary and secondary):
    /// bulk `create`, then bulk `update` for those that already existed (their key may differ);
    /// single `PUT` with `If-Match: *` if the hub has no bulk endpoint.
    pub async fn ensure_devices(&self, ids: &[String], key: &str) -> anyhow::Result<Provisioned> {
        let mut client = ServiceClient::new(self.info.clone())?;
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
        client: &mut ServiceClient,
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
fn existing_from_bulk(resp: &Response, chunk: &[String]) -> anyhow::Result<Vec<String>> {
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

    fn resp(status: u16, body: Value) -> Response {
        Response {
            status,
            etag: None,
            headers: Default::default(),
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
