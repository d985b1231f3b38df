//! Artifact storage: where the output of a completed task is kept.
//!
//! With S3 configured (any S3-compatible store: path-style addressing, custom endpoint,
//! credentials from `MINIO_*` or the standard AWS chain), outputs go to
//! `s3://<bucket>/artifacts/<task>/<lease>.json`: the key is deterministic per task and
//! lease, so a retried upload overwrites instead of duplicating. Without S3, or when an
//! upload fails, the content stays inline in Postgres (the original service's fallback),
//! and the fallback is counted in `bloom_s3_fallbacks_total`; the reconciler moves such
//! content to S3 later ([`ArtifactStore::upload_moved`]). Outputs above 8 MiB are
//! uploaded in parts; content is streamed back from S3 without loading it whole. After a failure S3 is skipped
//! for a few seconds, so an outage costs one timeout, not one per artifact.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;

use crate::config::S3Settings;
use crate::domain::ArtifactBody;
use crate::domain::{Artifact, ArtifactId, LeaseId, TaskId};
use crate::metrics::Metrics;
use crate::time::now_ms;

/// Reading an artifact failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact has no content")]
    Empty,
    #[error("artifact URL {0} is not in the configured bucket")]
    ForeignUrl(String),
    #[error("S3 is not configured")]
    NoS3,
    #[error("S3: {0}")]
    S3(String),
}

/// The content of an artifact: inline, or a stream from S3.
pub enum Content {
    Inline(String),
    Stream(ByteStream),
}

#[derive(Clone)]
struct S3 {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// The bucket is known to exist; cleared when S3 says it does not (a server that
    /// lost it), so the next upload creates it again.
    bucket_ready: Arc<std::sync::atomic::AtomicBool>,
    /// After a failure, S3 is skipped (content goes to Postgres at once) until then
    /// (ms since the epoch), so an outage does not stall every completion on timeouts.
    skip_until: Arc<AtomicI64>,
}

/// Outputs larger than this are uploaded in parts of this size (S3's minimum part is 5 MiB).
const MULTIPART_PART_BYTES: usize = 8 * 1024 * 1024;

/// How long S3 is skipped after a failed upload.
const S3_COOLDOWN_MS: i64 = 5_000;

/// Stores artifact bodies.
#[derive(Clone)]
pub struct ArtifactStore {
    s3: Option<S3>,
    metrics: Arc<Metrics>,
}

impl ArtifactStore {
    /// A store that keeps content in Postgres.
    pub fn postgres(metrics: Arc<Metrics>) -> ArtifactStore {
        ArtifactStore { s3: None, metrics }
    }

    /// A store for `settings` (Postgres only when `None`).
    pub async fn from_settings(settings: Option<S3Settings>, metrics: Arc<Metrics>) -> ArtifactStore {
        let Some(s) = settings else {
            return ArtifactStore::postgres(metrics);
        };
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).region(Region::new(s.region.clone()));
        if let Some((access, secret)) = &s.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                access.expose(),
                secret.expose(),
                None,
                None,
                "bloom-static",
            ));
        }
        let sdk = loader.load().await;
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .operation_timeout(s.timeout)
            .connect_timeout(s.timeout.min(Duration::from_secs(5)))
            .build();
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(s.path_style).timeout_config(timeouts);
        if let Some(ep) = &s.endpoint {
            conf = conf.endpoint_url(ep);
        }
        let s3 = S3 {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            bucket: s.bucket.clone(),
            bucket_ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            skip_until: Arc::new(AtomicI64::new(0)),
        };
        ArtifactStore { s3: Some(s3), metrics }
    }

    /// S3 is configured.
    pub fn uses_s3(&self) -> bool {
        self.s3.is_some()
    }

    /// The deterministic object key of the artifact of one lease of a task.
    pub fn object_key(task: &TaskId, lease: &LeaseId) -> String {
        format!("artifacts/{task}/{lease}.json")
    }

    /// Stores the output of one lease and says where it went.
    pub async fn store(&self, task: &TaskId, lease: &LeaseId, output: Option<&str>) -> ArtifactBody {
        let (Some(s3), Some(out)) = (&self.s3, output) else {
            return ArtifactBody::Inline;
        };
        let key = Self::object_key(task, lease);
        let fallback = || ArtifactBody::Inline;
        if now_ms() < s3.skip_until.load(Ordering::Relaxed) {
            self.metrics.s3_fallbacks_total.inc();
            return fallback();
        }
        match s3.put(&key, out.as_bytes().to_vec()).await {
            Ok(()) => ArtifactBody::S3 { url: format!("s3://{}/{key}", s3.bucket) },
            Err(e) => {
                s3.skip_until.store(now_ms() + S3_COOLDOWN_MS, Ordering::Relaxed);
                self.metrics.s3_fallbacks_total.inc();
                tracing::warn!(task.id = %task, error = %e, "artifact upload failed, storing in PostgreSQL");
                fallback()
            }
        }
    }

    /// Stores an output as [`store`](Self::store) does, except that an output of at most
    /// `defer_up_to` bytes is kept in Postgres for the artifact mover to upload later
    /// (write-behind: its task completes without waiting for S3).
    pub async fn store_or_defer(
        &self,
        task: &TaskId,
        lease: &LeaseId,
        output: Option<&str>,
        defer_up_to: usize,
    ) -> ArtifactBody {
        if output.is_some_and(|out| out.len() <= defer_up_to) {
            if self.s3.is_some() {
                self.metrics.artifacts_written_behind_total.inc();
            }
            return ArtifactBody::Inline;
        }
        self.store(task, lease, output).await
    }

    /// Uploads the content of an artifact kept in Postgres to S3, under a key that is
    /// deterministic per artifact (`artifacts/<task>/<artifact>.json`: a retried move
    /// overwrites), and returns its URL. While S3 cools down after a failure this fails
    /// at once, and a failure starts the cooldown, as for live uploads: moves never
    /// stall completions behind an outage.
    pub async fn upload_moved(
        &self,
        task: &TaskId,
        artifact: &ArtifactId,
        content: String,
    ) -> Result<String, ArtifactError> {
        let s3 = self.s3.as_ref().ok_or(ArtifactError::NoS3)?;
        if now_ms() < s3.skip_until.load(Ordering::Relaxed) {
            return Err(ArtifactError::S3("cooling down after a failure".into()));
        }
        let key = format!("artifacts/{task}/{artifact}.json");
        match s3.put(&key, content.into_bytes()).await {
            Ok(()) => Ok(format!("s3://{}/{key}", s3.bucket)),
            Err(e) => {
                s3.skip_until.store(now_ms() + S3_COOLDOWN_MS, Ordering::Relaxed);
                Err(ArtifactError::S3(e))
            }
        }
    }

    /// The content of an artifact.
    pub async fn content(&self, artifact: &Artifact) -> Result<Content, ArtifactError> {
        if let Some(c) = &artifact.content {
            return Ok(Content::Inline(c.clone()));
        }
        let url = artifact.url.as_deref().ok_or(ArtifactError::Empty)?;
        let s3 = self.s3.as_ref().ok_or(ArtifactError::NoS3)?;
        let key = s3.key_of(url)?;
        let obj = s3
            .client
            .get_object()
            .bucket(&s3.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| ArtifactError::S3(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
        Ok(Content::Stream(obj.body))
    }

    /// A presigned GET URL of an artifact stored in S3, valid for `expires_in`.
    pub async fn presign(&self, artifact: &Artifact, expires_in: Duration) -> Result<String, ArtifactError> {
        let url = artifact.url.as_deref().ok_or(ArtifactError::Empty)?;
        let s3 = self.s3.as_ref().ok_or(ArtifactError::NoS3)?;
        let key = s3.key_of(url)?;
        let cfg = PresigningConfig::expires_in(expires_in).map_err(|e| ArtifactError::S3(e.to_string()))?;
        let req = s3
            .client
            .get_object()
            .bucket(&s3.bucket)
            .key(key)
            .presigned(cfg)
            .await
            .map_err(|e| ArtifactError::S3(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
        Ok(req.uri().to_string())
    }
}

impl S3 {
    /// A multipart upload, aborted (no orphaned parts) when any part fails.
    async fn put_multipart(&self, key: &str, body: Vec<u8>) -> Result<(), String> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .send()
            .await
            .map_err(|e| err(&aws_sdk_s3::error::DisplayErrorContext(e)))?;
        let upload_id = upload.upload_id().ok_or("S3 returned no upload id")?.to_owned();
        let mut parts = Vec::new();
        let result: Result<(), String> = async {
            for (i, chunk) in body.chunks(MULTIPART_PART_BYTES).enumerate() {
                let number = i as i32 + 1;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(ByteStream::from(chunk.to_vec()))
                    .send()
                    .await
                    .map_err(|e| err(&aws_sdk_s3::error::DisplayErrorContext(e)))?;
                parts.push(
                    CompletedPart::builder().set_e_tag(part.e_tag().map(str::to_owned)).part_number(number).build(),
                );
            }
            let completed = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await;
            match completed {
                Ok(_) => Ok(()),
                // The outcome is unknown (a lost or unparsable answer; some S3-compatible
                // servers answer with another XML root): the object tells.
                Err(e) => {
                    let head = self.client.head_object().bucket(&self.bucket).key(key).send().await;
                    match head {
                        Ok(h) if h.content_length() == Some(body.len() as i64) => Ok(()),
                        _ => Err(err(&aws_sdk_s3::error::DisplayErrorContext(e))),
                    }
                }
            }
        }
        .await;
        if result.is_err() {
            let _ =
                self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&upload_id).send().await;
        }
        result
    }

    /// The key of `s3://<bucket>/<key>` (or the seed's `minio://`) in our bucket.
    fn key_of<'a>(&self, url: &'a str) -> Result<&'a str, ArtifactError> {
        let rest = url.strip_prefix("s3://").or_else(|| url.strip_prefix("minio://"));
        rest.and_then(|r| r.strip_prefix(self.bucket.as_str()))
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| ArtifactError::ForeignUrl(url.to_owned()))
    }

    async fn ensure_bucket(&self) -> Result<(), String> {
        if self.bucket_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_err() {
            if let Err(e) = self.client.create_bucket().bucket(&self.bucket).send().await {
                let text = aws_sdk_s3::error::DisplayErrorContext(&e).to_string();
                // Another process created it first.
                if !text.contains("BucketAlreadyOwnedByYou") && !text.contains("BucketAlreadyExists") {
                    return Err(text);
                }
            } else {
                tracing::info!(bucket = %self.bucket, "created artifact bucket");
            }
        }
        self.bucket_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), String> {
        self.ensure_bucket().await?;
        let put = self.put_object(key, body).await;
        if put.as_ref().is_err_and(|e| e.contains("NoSuchBucket")) {
            self.bucket_ready.store(false, Ordering::Relaxed);
        }
        put
    }

    async fn put_object(&self, key: &str, body: Vec<u8>) -> Result<(), String> {
        if body.len() > MULTIPART_PART_BYTES {
            return self.put_multipart(key, body).await;
        }
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(e).to_string())
    }
}
