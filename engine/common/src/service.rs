//! A client of the hub's service REST API, configured from hub.json: trusts the hub's CA and
//! signs each call with the service policy's SAS key, as the Azure service SDKs do.

use std::time::{SystemTime, UNIX_EPOCH};

use hyper::Method;
use roost_iothub::connstr::ServiceConnectionString;

use crate::client::{Client, ClientError, Response};
use crate::hubfile::HubInfo;
use crate::tls::{self, CertPaths, TlsError};

/// The IoT Hub API version roost's own callers use.
pub const API_VERSION: &str = "2021-04-12";
/// Lifetime of the tokens the client signs.
const TOKEN_TTL_SECS: u64 = 3600;

/// Why the service client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service connection string in hub.json: {0}")]
    ConnectionString(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

pub struct ServiceClient {
    pub hub: HubInfo,
    client: Client,
    /// The host name tokens are scoped to (the connection string's).
    scope: String,
    key_name: String,
    key: Vec<u8>,
    api_version: &'static str,
}

impl ServiceClient {
    /// A client of the hub's service API.
    pub fn new(hub: HubInfo) -> Result<Self, ServiceError> {
        let (url, cs) = (hub.service_url.clone(), hub.service_connection_string.clone());
        Self::of(hub, &url, &cs, API_VERSION)
    }

    /// A client of the API at `url` whose policy `connection_string` names (the hub's, or
    /// the provisioning service's), calling it with `api_version`; it trusts the hub's CA.
    pub fn of(
        hub: HubInfo,
        url: &str,
        connection_string: &str,
        api_version: &'static str,
    ) -> Result<Self, ServiceError> {
        let cs = ServiceConnectionString::parse(connection_string)
            .map_err(|e| ServiceError::ConnectionString(e.to_string()))?;
        let key = roost_iothub::sas::decode_key(&cs.key)
            .map_err(|e| ServiceError::ConnectionString(format!("key: {e}")))?;
        let tls = tls::ca_client_config(&CertPaths::of_ca(&hub.ca))?;
        let client = Client::new(url, Some((tls, cs.host_name.clone())))?;
        Ok(Self {
            hub,
            client,
            scope: cs.host_name,
            key_name: cs.key_name,
            key,
            api_version,
        })
    }

    /// A SAS token for the whole hub (or service), signed with the policy key.
    pub fn token(&self) -> String {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + TOKEN_TTL_SECS;
        let resource = roost_iothub::sas::encode_resource(&self.scope);
        roost_iothub::sas::sign(&resource, &self.key, expiry, Some(&self.key_name))
    }

    /// Calls `path` (which may carry a query; `api-version` is added) with a JSON body.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra_headers: &[(&str, String)],
    ) -> Result<Response, ClientError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{sep}api-version={}", self.api_version);
        let mut headers = vec![
            ("authorization", self.token()),
            ("accept", "application/json".to_string()),
        ];
        if body.is_some() {
            headers.push(("content-type", "application/json; charset=utf-8".into()));
        }
        headers.extend(extra_headers.iter().cloned());
        self.client.request(method, &path, &headers, body).await
    }
}
