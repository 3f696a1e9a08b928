//! The `webhook` endpoint: each batch is one `POST` of a JSON array of record objects (as the
//! consumer API shows them, with the endpoint's enrichments) to the URL, over a kept-alive
//! connection. Any 2xx answer delivers the batch; anything else, or no answer within
//! `timeout_ms`, is a failure and the batch is posted again later.

use std::sync::Arc;
use std::time::Duration;

use roost_common::client::Client;

use crate::item::{Form, Item};
use crate::sink::{Sink, SinkError};

pub struct Webhook {
    url: String,
    path: String,
    batch: usize,
    timeout: Duration,
    headers: Vec<(String, String)>,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl Webhook {
    pub fn new(
        url: &str,
        batch: usize,
        timeout_ms: u64,
        headers: Vec<(String, String)>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, SinkError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| SinkError::Refused(format!("bad URL {url}: {e}")))?;
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let tls = tls.map(|cfg| (cfg, host.to_string()));
        let client =
            Client::new(url, tls.clone()).map_err(|e| SinkError::Refused(e.to_string()))?;
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SinkError::Io(format!("webhook runtime: {e}")))?;
        Ok(Webhook {
            url: url.to_string(),
            path,
            batch: batch.max(1),
            timeout: Duration::from_millis(timeout_ms),
            headers,
            tls,
            client,
            runtime,
        })
    }
}

impl Sink for Webhook {
    fn form(&self) -> Form {
        Form::Json
    }

    fn batch(&self) -> usize {
        self.batch
    }

    fn deliver(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let mut body =
            String::with_capacity(2 + items.iter().map(|i| i.json.len() + 1).sum::<usize>());
        body.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&item.json);
        }
        body.push(']');
        let mut headers: Vec<(&str, String)> = vec![("content-type", "application/json".into())];
        headers.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let (client, path, url) = (&mut self.client, &self.path, &self.url);
        let sent = self.runtime.block_on(async {
            tokio::time::timeout(
                self.timeout,
                client.request(hyper::Method::POST, path, &headers, Some(body.into_bytes())),
            )
            .await
        });
        match sent {
            Err(_) => {
                // The abandoned request may still hold the connection: start a new one.
                if let Ok(fresh) = Client::new(&self.url, self.tls.clone()) {
                    self.client = fresh;
                }
                Err(SinkError::Timeout(format!(
                    "POST {url}: no answer in {} ms",
                    self.timeout.as_millis()
                )))
            }
            Ok(Err(e)) => Err(SinkError::Connect(format!("POST {url}: {e}"))),
            Ok(Ok(r)) if (200..300).contains(&r.status) => Ok(()),
            Ok(Ok(r)) => Err(SinkError::Refused(format!("POST {url}: HTTP {}", r.status))),
        }
    }
}
