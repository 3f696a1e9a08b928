//! File upload (wire spec §3): a device asks for an upload target (`POST /devices/{d}/files`
//! with `{"blobName"}`), is answered a SAS URI to one blob of the blob store
//! (`{correlationId, hostName, containerName, blobName: "{device}/{name}", sasToken}`),
//! uploads there with the unmodified Azure Storage client, then says how it went
//! (`POST /devices/{d}/files/notifications[/{correlationId}]`). A device has at most
//! [`MAX_ACTIVE`] uploads in flight (IoT Hub's 403006). The requests reach control from an
//! engine's port 443 over the control link (`ServiceRequest::FileUpload`), the device already
//! authenticated there.
//!
//! Upload slots are held in memory: a control restart forgets them (the blobs stay).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::blobs::{BlobPath, BlobTarget};
use crate::store::{ServiceQueue, Store, StoreError};

/// Uploads one device may have started and not finished.
pub const MAX_ACTIVE: usize = 10;
/// How long an upload's SAS (and its slot) lasts: IoT Hub's default.
pub const SAS_TTL: Duration = Duration::from_secs(3600);

/// A refusal: HTTP status, IoT Hub error code, and message.
pub type Refusal = (u16, u32, String);

/// A file-upload notification, as IoT Hub delivers it to the service.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub device_id: String,
    pub blob_uri: String,
    pub blob_name: String,
    pub size: u64,
    pub last_updated: String,
    pub enqueued: String,
}

impl Notification {
    /// The JSON body of a notification message.
    pub fn body(&self) -> Value {
        json!({
            "deviceId": self.device_id,
            "blobUri": self.blob_uri,
            "blobName": self.blob_name,
            "lastUpdatedTime": self.last_updated,
            "blobSizeInBytes": self.size,
            "enqueuedTimeUtc": self.enqueued,
        })
    }
}

struct Upload {
    device_id: String,
    blob: BlobPath,
    expires: Instant,
}

/// The upload slots and where a finished upload's notification goes.
pub struct FileUploads {
    pub blobs: Arc<dyn BlobTarget>,
    pub container: String,
    active: Mutex<HashMap<String, Upload>>,
    pub metrics: Arc<crate::metrics::ControlMetrics>,
    /// The notifications waiting for the service (`/messages/serviceBound/filenotifications`).
    store: Arc<Store>,
    /// Told each successful upload, after it is queued (the hub's `file_upload` event).
    pub notify: Box<dyn Fn(&Notification) + Send + Sync>,
}

/// The counter numbering queued notifications.
const NOTIFICATION_SEQ: &[u8] = b"file_notification_seq";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartBody {
    blob_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DoneBody {
    #[serde(default)]
    correlation_id: Option<String>,
    is_success: bool,
    #[serde(default)]
    status_code: Option<i64>,
    #[serde(default)]
    status_description: Option<String>,
}

fn bad(message: impl Into<String>) -> Refusal {
    (400, 400004, message.into())
}

impl FileUploads {
    pub fn new(
        blobs: Arc<dyn BlobTarget>,
        container: String,
        store: Arc<Store>,
        metrics: Arc<crate::metrics::ControlMetrics>,
        notify: Box<dyn Fn(&Notification) + Send + Sync>,
    ) -> Self {
        Self {
            blobs,
            container,
            active: Mutex::new(HashMap::new()),
            metrics,
            store,
            notify,
        }
    }

    /// The oldest notification waiting for the service and the lock that completes it.
    pub fn next_notification(&self) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let rows = self.store.queue_list(ServiceQueue::FileNotifications, 1)?;
        Ok(rows.into_iter().next().map(|(seq, body)| (seq.to_string(), body)))
    }

    /// The notification read with `lock` is delivered; `false` for a token that is not one.
    pub fn complete_notification(&self, lock: &str) -> Result<bool, StoreError> {
        let Ok(seq) = lock.parse::<u64>() else {
            return Ok(false);
        };
        self.store.queue_delete_through(ServiceQueue::FileNotifications, seq)?;
        Ok(true)
    }

    fn count(&self, outcome: &str) {
        self.metrics.file_uploads.with_label_values(&[outcome]).inc();
    }

    /// `POST /devices/{d}/files`: an upload target for `device_id`.
    pub fn start(&self, device_id: &str, body: &[u8]) -> Result<Value, Refusal> {
        let req: StartBody = serde_json::from_slice(body)
            .map_err(|e| bad(format!("the body must be {{\"blobName\": \"…\"}}: {e}")))?;
        let name = req.blob_name.trim_start_matches('/');
        let ok = !name.is_empty()
            && name.len() <= 1023usize.saturating_sub(device_id.len())
            && !name.contains(['?', '#', '%', '\\', '\0'])
            && !name.ends_with(['.', '/']);
        let blob = BlobPath::parse(&format!("/{}/{device_id}/{name}", self.container))
            .filter(|_| ok)
            .ok_or_else(|| bad(format!("invalid blob name {:?}", name.chars().take(100).collect::<String>())))?;
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        active.retain(|_, u| u.expires > now);
        if active.values().filter(|u| u.device_id == device_id).count() >= MAX_ACTIVE {
            self.count("refused_active_limit");
            return Err((403, 403006, format!("Number of active file upload requests cannot exceed {MAX_ACTIVE}")));
        }
        let mut bytes = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| (500, 500001, "no randomness for a correlation id".to_string()))?;
        use base64::Engine as _;
        let correlation_id = base64::engine::general_purpose::STANDARD.encode(bytes);
        let sas = self.blobs.sas(&blob, "rw", SAS_TTL);
        let answer = json!({
            "correlationId": correlation_id,
            "hostName": self.blobs.host_name(),
            "containerName": blob.container,
            "blobName": blob.blob,
            "sasToken": sas,
        });
        active.insert(correlation_id, Upload { device_id: device_id.to_string(), blob, expires: now + SAS_TTL });
        self.count("started");
        Ok(answer)
    }

    /// `POST /devices/{d}/files/notifications[/{correlationId}]`: the upload is over; a
    /// successful one is notified to the service.
    pub fn complete(&self, device_id: &str, correlation_id: Option<&str>, body: &[u8]) -> Result<(), Refusal> {
        let done: DoneBody = serde_json::from_slice(body)
            .map_err(|e| bad(format!("the body must be {{\"correlationId\", \"isSuccess\", \"statusCode\", \"statusDescription\"}}: {e}")))?;
        let Some(cid) = correlation_id.map(str::to_string).or(done.correlation_id) else {
            return Err(bad("no correlationId"));
        };
        let upload = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            match active.get(&cid) {
                Some(u) if u.device_id == device_id => active.remove(&cid),
                _ => None,
            }
        };
        let Some(upload) = upload else {
            return Err(bad("no upload of this device has that correlationId (finished, expired, or never started)"));
        };
        tracing::debug!(device = %device_id, ok = done.is_success, status = ?done.status_code, description = ?done.status_description, "file upload finished");
        if !done.is_success {
            self.count("failed");
            return Ok(());
        }
        let Some(size) = self.blobs.size(&upload.blob) else {
            self.count("missing_blob");
            return Err(bad("the upload says it succeeded but the blob does not exist"));
        };
        self.count("completed");
        self.metrics.file_upload_bytes.inc_by(size);
        let now = crate::api::iso_now();
        let notification = Notification {
            device_id: device_id.to_string(),
            blob_uri: self.blobs.uri(&upload.blob),
            blob_name: upload.blob.blob.clone(),
            size,
            last_updated: now.clone(),
            enqueued: now,
        };
        let queued = self.store.next_counter(NOTIFICATION_SEQ).and_then(|seq| {
            let body = notification.body().to_string().into_bytes();
            self.store.queue_put(ServiceQueue::FileNotifications, &[(seq, body)])
        });
        queued.map_err(|e| (500, 500001, format!("the notification could not be stored: {e}")))?;
        (self.notify)(&notification);
        Ok(())
    }

    /// Answers an engine's `ServiceRequest::FileUpload` as the HTTPS device API answers.
    pub fn serve(&self, device_id: &str, notification: bool, correlation_id: Option<&str>, body: &[u8]) -> (u16, Vec<u8>) {
        let result = match notification {
            false => self.start(device_id, body).map(|v| (200, v.to_string().into_bytes())),
            true => self.complete(device_id, correlation_id, body).map(|()| (204, Vec::new())),
        };
        result.unwrap_or_else(|(status, code, message)| {
            (status, crate::api::error_body(code, &message).to_string().into_bytes())
        })
    }
}

/// Answers an AMQP file-notification receiver's call (`FileNotificationReceive`,
/// `FileNotificationComplete`) as the feedback receiver's are answered.
pub fn serve_notifications(
    files: Option<&FileUploads>,
    request: roost_model::link::ServiceRequest,
) -> roost_model::link::ServiceReply {
    use roost_model::link::{ServiceReply, ServiceRequest};
    let Some(files) = files else {
        return ServiceReply::NoFeedback;
    };
    let server = |e: StoreError| ServiceReply::Refused {
        status: 500,
        code: 500001,
        message: e.to_string(),
    };
    match request {
        ServiceRequest::FileNotificationReceive => match files.next_notification() {
            Ok(Some((lock, body))) => ServiceReply::Feedback { lock, body },
            Ok(None) => ServiceReply::NoFeedback,
            Err(e) => server(e),
        },
        ServiceRequest::FileNotificationComplete { lock } => match files.complete_notification(&lock) {
            Ok(true) => ServiceReply::Done,
            Ok(false) => ServiceReply::Refused {
                status: 412,
                code: 412002,
                message: format!("{lock} is not a file notification lock token"),
            },
            Err(e) => server(e),
        },
        _ => ServiceReply::Refused {
            status: 500,
            code: 500001,
            message: "not a file notification call".into(),
        },
    }
}
