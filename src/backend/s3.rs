//! A repository in an S3 bucket (AWS, or an S3-compatible store such as SeaweedFS, Ceph RGW, MinIO).
//!
//! Locations:
//! - `s3://bucket/prefix` — AWS S3, region and credentials from the standard AWS chain (environment,
//!   profile, web identity, instance metadata);
//! - `s3:http(s)://host:port/bucket/prefix` — an S3-compatible endpoint, path-style addressing.
//!
//! The engine's threads call this backend synchronously; each call runs on a private tokio runtime. Every
//! object is sent with a SHA-256 checksum the server verifies, so corruption in transit is refused. Large
//! objects go up as multipart uploads. Throttling, 5xx answers, timeouts and dropped connections are retried
//! by the SDK's standard retry strategy (exponential backoff with jitter); the retries are counted and
//! reported. `create_new` is a conditional PUT (`If-None-Match: *`), atomic on servers that support it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::{ByteStream, DateTime, SdkBody};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockMode, ObjectLockRetention,
    ObjectLockRetentionMode, ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::throttle::{self, Limits, Throttle};
use super::{Backend, ObjectInfo, Retention, RetentionPolicy};
use crate::error::{Error, Result};

/// Options users of S3 expect; all optional.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// Region (default: from the AWS configuration; `us-east-1` for custom endpoints).
    pub region: Option<String>,
    /// AWS profile name for credentials and region.
    pub profile: Option<String>,
    /// PEM file with extra CA certificates for a private endpoint.
    pub ca_bundle: Option<std::path::PathBuf>,
    /// `AES256` (SSE-S3) or `aws:kms` (SSE-KMS).
    pub sse: Option<String>,
    /// KMS key id for SSE-KMS.
    pub sse_kms_key_id: Option<String>,
    /// Storage class for data packs (e.g. `STANDARD_IA`); metadata stays STANDARD.
    pub data_storage_class: Option<String>,
    /// Object Lock retention for every object written: (`GOVERNANCE` or `COMPLIANCE`, days).
    pub object_lock: Option<(String, u32)>,
    /// Maximum attempts per request (first try included).
    pub max_attempts: u32,
    /// Access key and secret; default: the standard AWS credential chain.
    pub credentials: Option<(String, String)>,
    /// Bandwidth limits (`--limit-upload`, `--limit-download`).
    pub limits: Limits,
}

impl S3Options {
    /// Options from `DISKVAULT_S3_*` environment variables.
    pub fn from_env() -> Result<S3Options> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let object_lock = match var("DISKVAULT_S3_OBJECT_LOCK") {
            None => None,
            Some(v) => {
                let (mode, days) = v
                    .split_once(':')
                    .ok_or_else(|| Error::invalid("DISKVAULT_S3_OBJECT_LOCK must be MODE:DAYS, e.g. GOVERNANCE:30"))?;
                let days: u32 =
                    days.parse().map_err(|_| Error::invalid("DISKVAULT_S3_OBJECT_LOCK: DAYS is not a number"))?;
                Some((mode.to_ascii_uppercase(), days))
            }
        };
        Ok(S3Options {
            region: var("DISKVAULT_S3_REGION"),
            profile: var("DISKVAULT_S3_PROFILE"),
            ca_bundle: var("DISKVAULT_S3_CA_BUNDLE").map(Into::into),
            sse: var("DISKVAULT_S3_SSE"),
            sse_kms_key_id: var("DISKVAULT_S3_SSE_KMS_KEY_ID"),
            data_storage_class: var("DISKVAULT_S3_STORAGE_CLASS"),
            object_lock,
            max_attempts: var("DISKVAULT_S3_MAX_ATTEMPTS").and_then(|v| v.parse().ok()).unwrap_or(8),
            credentials: None,
            limits: Limits::default(),
        })
    }
}

/// The objects that make up backups (retention applies to them); locks, markers and verification records are
/// rewritten or removed by design and get no retention.
fn is_immutable(name: &str) -> bool {
    name == "config" || ["packs/", "index/", "snapshots/", "keys/"].iter().any(|p| name.starts_with(p))
}

/// Objects larger than this are uploaded in parts of this size.
const MULTIPART_PART: usize = 16 << 20;

pub struct S3Backend {
    client: Client,
    runtime: tokio::runtime::Runtime,
    bucket: String,
    /// Key prefix ending in `/`, or empty.
    prefix: String,
    location: String,
    opts: S3Options,
    attempts: Arc<AtomicU64>,
    requests: AtomicU64,
    /// Storage clock minus ours, in seconds, once measured (for Object Lock retention).
    clock_offset: std::sync::OnceLock<i64>,
}

/// Splits `s3://bucket/prefix` or `s3:http(s)://host:port/bucket/prefix` into (endpoint, bucket, prefix).
pub fn parse_location(location: &str) -> Result<(Option<String>, String, String)> {
    let bad = || {
        Error::invalid(format!(
            "{location:?} is not an S3 location: use s3://bucket/prefix or s3:http(s)://host:port/bucket/prefix"
        ))
    };
    let (endpoint, path) = if let Some(rest) = location.strip_prefix("s3://") {
        (None, rest)
    } else if let Some(rest) = location.strip_prefix("s3:") {
        let scheme_end = rest.find("://").ok_or_else(bad)?;
        let after = &rest[scheme_end + 3..];
        let slash = after.find('/').ok_or_else(bad)?;
        (Some(rest[..scheme_end + 3 + slash].to_string()), &after[slash + 1..])
    } else {
        return Err(bad());
    };
    let path = path.trim_matches('/');
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() {
        return Err(bad());
    }
    Ok((endpoint, bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// Counts HTTP attempts, so that retries (attempts beyond the first per request) can be reported.
#[derive(Debug)]
struct AttemptCounter(Arc<AtomicU64>);

impl aws_sdk_s3::config::Intercept for AttemptCounter {
    fn name(&self) -> &'static str {
        "diskvault-attempt-counter"
    }
    fn read_before_attempt(
        &self,
        _ctx: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_s3::error::BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn describe<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> String {
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            match (err.code(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                _ => format!("{err}"),
            }
        }
        SdkError::TimeoutError(_) => "timed out (after retries)".into(),
        SdkError::DispatchFailure(d) => {
            // The cause chain says why (refused, TLS certificate not trusted, DNS…).
            let mut causes = Vec::new();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                causes.push(c.to_string());
                src = c.source();
            }
            let why = causes.last().cloned().unwrap_or_default();
            if d.is_io() {
                format!("connection failed (is the S3 server reachable?): {why}")
            } else if d.is_timeout() {
                "connection timed out".into()
            } else {
                format!("request could not be sent: {d:?}")
            }
        }
        SdkError::ResponseError(_) => "the server's answer could not be read".into(),
        other => other.to_string(),
    }
}

fn status<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3Backend {
    pub fn open(location: &str, opts: S3Options) -> Result<S3Backend> {
        let (endpoint, bucket, prefix) = parse_location(location)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("diskvault-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::invalid(format!("cannot start the S3 client runtime: {e}")))?;
        let mut trust = aws_smithy_http_client::tls::TrustStore::default();
        if let Some(ca) = &opts.ca_bundle {
            let pem = std::fs::read(ca).map_err(|e| Error::local(ca, format!("cannot read CA bundle: {e}")))?;
            trust = trust.with_pem_certificate(pem);
        }
        let tls = aws_smithy_http_client::tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(tls)
            .build_https();
        let retry = aws_sdk_s3::config::retry::RetryConfig::standard()
            .with_max_attempts(opts.max_attempts.max(1))
            .with_initial_backoff(Duration::from_millis(200))
            .with_max_backoff(Duration::from_secs(20));
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .operation_attempt_timeout(Duration::from_secs(300))
            .build();
        let region_default = if endpoint.is_some() { Some("us-east-1".to_string()) } else { None };
        let sdk_config = runtime.block_on(async {
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .http_client(http)
                .retry_config(retry)
                .timeout_config(timeouts);
            if let Some(p) = &opts.profile {
                loader = loader.profile_name(p);
            }
            if let Some(r) = opts.region.clone().or_else(|| std::env::var("AWS_REGION").ok()).or(region_default) {
                loader = loader.region(Region::new(r));
            }
            // Explicit keys win; otherwise the standard chain (environment first, then profile, web identity, IMDS).
            if let Some((id, secret)) = &opts.credentials {
                loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "diskvault-options"));
            }
            loader.load().await
        });
        let attempts = Arc::new(AtomicU64::new(0));
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk_config).interceptor(AttemptCounter(attempts.clone()));
        if let Some(ep) = &endpoint {
            conf = conf.endpoint_url(ep).force_path_style(true);
        }
        let client = Client::from_conf(conf.build());
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Ok(S3Backend {
            client,
            runtime,
            bucket,
            prefix,
            location: location.to_string(),
            opts,
            attempts,
            requests: AtomicU64::new(0),
            clock_offset: std::sync::OnceLock::new(),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// An object's metadata (`HeadObject`), `None` if it does not exist.
    fn head(&self, name: &str) -> Result<Option<HeadObjectOutput>> {
        self.runtime.block_on(async {
            self.counted();
            match self.client.head_object().bucket(&self.bucket).key(self.key(name)).send().await {
                Ok(o) => Ok(Some(o)),
                Err(e) if e.as_service_error().is_some_and(|se| se.is_not_found()) || status(&e) == Some(404) => {
                    Ok(None)
                }
                Err(e) => Err(Error::backend("stat", name, describe(&e))),
            }
        })
    }

    /// Now by the storage's clock, from the Last-Modified of a probe object written for the purpose.
    fn probe_clock(&self) -> Result<i64> {
        let probe = format!("locks/.clock-{}", hex::encode(crate::crypto::random_array::<8>()));
        self.put(&probe, b"clock probe")?;
        let written = self.head(&probe);
        let _ = self.delete(&probe);
        written?
            .ok_or_else(|| Error::backend("stat", probe.clone(), "probe object vanished"))?
            .last_modified()
            .map(|t| t.secs())
            .ok_or_else(|| Error::backend("stat", probe, "no Last-Modified"))
    }

    /// Now by the storage's clock (Object Lock dates are the storage's): the offset from ours is measured once.
    fn storage_now(&self) -> Result<i64> {
        let offset = match self.clock_offset.get() {
            Some(offset) => *offset,
            None => {
                let storage_now = self.probe_clock()?;
                *self.clock_offset.get_or_init(|| storage_now - crate::util::now_secs())
            }
        };
        Ok(crate::util::now_secs() + offset)
    }

    fn counted(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests retried so far (attempts beyond the first of each request).
    pub fn retries(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed).saturating_sub(self.requests.load(Ordering::Relaxed))
    }

    /// Creates the bucket if it does not exist (used by `init`).
    fn ensure_bucket(&self) -> Result<()> {
        self.runtime.block_on(async {
            self.counted();
            if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
                return Ok(());
            }
            self.counted();
            // Object Lock can only be enabled when a bucket is created.
            let create = self
                .client
                .create_bucket()
                .bucket(&self.bucket)
                .object_lock_enabled_for_bucket(self.opts.object_lock.is_some());
            match create.send().await {
                Ok(_) => Ok(()),
                Err(e) if matches!(e.code(), Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")) => Ok(()),
                Err(e) => Err(Error::backend("create bucket", self.bucket.clone(), describe(&e))),
            }
        })
    }

    /// Storage class, encryption and retention for one object.
    fn put_request(&self, name: &str) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .checksum_algorithm(ChecksumAlgorithm::Sha256);
        if let Some(sse) = &self.opts.sse {
            req = req.server_side_encryption(ServerSideEncryption::from(sse.as_str()));
        }
        if let Some(k) = &self.opts.sse_kms_key_id {
            req = req.ssekms_key_id(k);
        }
        if let (Some(class), true) = (&self.opts.data_storage_class, name.starts_with("packs/")) {
            req = req.storage_class(StorageClass::from(class.as_str()));
        }
        if let Some((mode, days)) = self.opts.object_lock.as_ref().filter(|_| is_immutable(name)) {
            let until = DateTime::from_secs(crate::util::now_secs() + *days as i64 * 86400);
            req = req.object_lock_mode(ObjectLockMode::from(mode.as_str())).object_lock_retain_until_date(until);
        }
        req
    }

    /// A PUT of `data` as object `name`.
    fn put_object(
        &self,
        name: &str,
        data: Bytes,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        self.with_body(
            self.put_request(name),
            data,
            |r, b, len| r.body(b).content_length(len),
            |r, c| r.checksum_sha256(c),
        )
    }

    /// Sets `data` as the body of `req` (with `body`). Under an upload limit it is streamed piece by piece as
    /// the budget allows ([`PacedBody`]), and its SHA-256 is given here (`checksum`): the SDK would send a
    /// streamed body's checksum as an aws-chunked trailer, which not every S3 server takes. Otherwise the body
    /// goes from memory as it is and the SDK adds the checksum.
    fn with_body<R>(
        &self,
        req: R,
        data: Bytes,
        body: impl FnOnce(R, ByteStream, i64) -> R,
        checksum: impl FnOnce(R, String) -> R,
    ) -> R {
        let len = data.len() as i64;
        let Some(throttle) = self.opts.limits.upload.clone() else { return body(req, ByteStream::from(data), len) };
        let sum = aws_smithy_types::base64::encode(ring::digest::digest(&ring::digest::SHA256, &data));
        // Retryable: each attempt streams the same bytes again.
        let stream = ByteStream::new(SdkBody::retryable(move || {
            SdkBody::from_body_1_x(PacedBody { data: data.clone(), throttle: throttle.clone(), wait: None })
        }));
        checksum(body(req, stream, len), sum)
    }

    /// GET of a whole object or of `(offset, len)`.
    fn fetch(&self, name: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.fetch_into(name, range, &mut buf)?;
        Ok(buf)
    }

    /// [`S3Backend::fetch`] into `buf`, replacing what it held. The body is copied into `buf` as it arrives:
    /// collecting it first held each download twice (its pieces, then one contiguous copy), and a reader
    /// thread's buffer was not reused (a check against S3 peaked at 270-340 MiB).
    fn fetch_into(&self, name: &str, range: Option<(u64, u64)>, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        self.runtime.block_on(async {
            self.counted();
            let mut req = self.client.get_object().bucket(&self.bucket).key(self.key(name));
            if let Some((offset, len)) = range {
                req = req.range(format!("bytes={}-{}", offset, offset + len - 1));
            }
            let out = match req.send().await {
                Ok(o) => o,
                Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) || status(&e) == Some(404) => {
                    return Err(Error::Missing { object: name.into() })
                }
                Err(e) if status(&e) == Some(416) => {
                    let at = range.map(|r| r.0).unwrap_or(0);
                    return Err(Error::corrupt(name, format!("truncated: no bytes at offset {at}")));
                }
                Err(e) => return Err(Error::backend("get", name, describe(&e))),
            };
            // Only the asked length is trusted: a server that sends more is refused before it fills memory.
            let limit = range.map_or(usize::MAX, |(_, len)| len as usize);
            buf.reserve(range.map_or(0, |_| limit));
            let mut body = out.body;
            loop {
                match body.try_next().await {
                    Ok(Some(piece)) if buf.len() + piece.len() > limit => {
                        return Err(Error::corrupt(name, format!("the server sent more than the {limit} bytes asked")))
                    }
                    Ok(Some(piece)) => {
                        buf.extend_from_slice(&piece);
                        // Waiting before the next piece holds the connection back: TCP slows the sender.
                        if let Some(t) = &self.opts.limits.download {
                            tokio::time::sleep(t.reserve(piece.len())).await;
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(Error::backend("get", name, format!("download broke off: {e}"))),
                }
            }
        })
    }

    /// PUT of `data`, in parts when it is large. Every attempt and every part shares `data`'s buffer: a pack
    /// copied into the request cost a second pack of memory per upload in flight.
    fn put_bytes(&self, name: &str, data: Bytes) -> Result<()> {
        self.runtime.block_on(async {
            if data.len() > MULTIPART_PART * 2 {
                return self.put_multipart(name, data).await;
            }
            self.counted();
            self.put_object(name, data).send().await.map(|_| ()).map_err(|e| Error::backend("put", name, describe(&e)))
        })
    }

    async fn put_multipart(&self, name: &str, data: Bytes) -> Result<()> {
        let key = self.key(name);
        let err = |op: &'static str, e: String| Error::backend(op, name, e);
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256);
        if let Some(sse) = &self.opts.sse {
            create = create.server_side_encryption(ServerSideEncryption::from(sse.as_str()));
        }
        if let Some(k) = &self.opts.sse_kms_key_id {
            create = create.ssekms_key_id(k);
        }
        if let Some(class) = &self.opts.data_storage_class {
            create = create.storage_class(StorageClass::from(class.as_str()));
        }
        if let Some((mode, days)) = &self.opts.object_lock {
            let until = DateTime::from_secs(crate::util::now_secs() + *days as i64 * 86400);
            create = create.object_lock_mode(ObjectLockMode::from(mode.as_str())).object_lock_retain_until_date(until);
        }
        self.counted();
        let upload = create.send().await.map_err(|e| err("start multipart upload", describe(&e)))?;
        let upload_id =
            upload.upload_id().ok_or_else(|| err("start multipart upload", "no upload id".into()))?.to_string();
        let result: Result<()> = async {
            let mut parts = Vec::new();
            for (i, start) in (0..data.len()).step_by(MULTIPART_PART).enumerate() {
                let n = i as i32 + 1;
                let chunk = data.slice(start..(start + MULTIPART_PART).min(data.len()));
                self.counted();
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256);
                let out = self
                    .with_body(req, chunk, |r, b, len| r.body(b).content_length(len), |r, c| r.checksum_sha256(c))
                    .send()
                    .await
                    .map_err(|e| err("upload part", describe(&e)))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .set_checksum_sha256(out.checksum_sha256().map(str::to_string))
                        .build(),
                );
            }
            self.counted();
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map_err(|e| err("complete multipart upload", describe(&e)))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            self.counted();
            let _ =
                self.client.abort_multipart_upload().bucket(&self.bucket).key(&key).upload_id(&upload_id).send().await;
        }
        result
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.put_bytes(name, Bytes::copy_from_slice(data))
    }

    fn put_owned(&self, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>> {
        self.put_bytes(name, Bytes::from(data))?;
        Ok(None)
    }

    fn create_new(&self, name: &str, data: &[u8]) -> Result<bool> {
        self.runtime
            .block_on(async {
                self.counted();
                match self.put_object(name, Bytes::copy_from_slice(data)).if_none_match("*").send().await {
                    Ok(_) => Ok(true),
                    // 412: the object exists — possibly our own first attempt, which landed although its answer
                    // was lost and the request retried. 409: a concurrent conditional write is in progress.
                    Err(e) if matches!(status(&e), Some(412 | 409)) => Ok(false),
                    Err(e) => Err(Error::backend("create", name, describe(&e))),
                }
            })
            .map(|created| {
                // Callers write unique bytes (sealed with a random nonce): the same bytes there mean it was us.
                if created || self.fetch(name, None).ok().as_deref() != Some(data) {
                    return created;
                }
                tracing::debug!("{name}: created by an earlier attempt of this request");
                true
            })
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        self.fetch(name, None)
    }

    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.get_range_into(name, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(&self, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        if len == 0 {
            return Ok(());
        }
        self.fetch_into(name, Some((offset, len)), buf)?;
        if buf.len() as u64 != len {
            return Err(super::truncated(name, offset, len, buf.len() as u64));
        }
        Ok(())
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.head(name)?.map(|o| o.content_length().unwrap_or(0) as u64))
    }

    fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        self.runtime.block_on(async {
            let mut out = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(format!("{}{dir}/", self.prefix))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                self.counted();
                let page = page.map_err(|e| Error::backend("list", dir, describe(&e)))?;
                for o in page.contents() {
                    let Some(k) = o.key() else { continue };
                    let name = k.strip_prefix(&self.prefix).unwrap_or(k);
                    out.push(ObjectInfo { name: name.to_string(), size: o.size().unwrap_or(0) as u64 });
                }
            }
            Ok(out)
        })
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.runtime.block_on(async {
            self.counted();
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.key(name))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| Error::backend("delete", name, describe(&e)))
        })
    }

    fn age(&self, name: &str) -> Result<Option<Duration>> {
        // The object's Last-Modified against that of a probe written now: both are the storage's clock (a fresh
        // probe each time: lock expiry must not rest on our clock having kept pace since an earlier probe).
        let Some(written) = self.head(name)?.and_then(|o| o.last_modified().map(|t| t.secs())) else { return Ok(None) };
        let now = self.probe_clock()?;
        Ok(Some(Duration::from_secs(now.saturating_sub(written).max(0) as u64)))
    }

    fn retention_policy(&self) -> Option<RetentionPolicy> {
        self.opts.object_lock.as_ref().map(|(mode, days)| RetentionPolicy { mode: mode.clone(), days: *days })
    }

    fn retention(&self, name: &str) -> Result<Option<Retention>> {
        let head = self.head(name)?;
        let Some((mode, until)) =
            head.as_ref().and_then(|o| o.object_lock_mode().zip(o.object_lock_retain_until_date()))
        else {
            return Ok(None);
        };
        let left = until.secs() - self.storage_now()?;
        Ok(Some(Retention { mode: mode.as_str().to_string(), left: Duration::from_secs(left.max(0) as u64) }))
    }

    fn extend_retention(&self, name: &str, mode: &str, keep: Duration) -> Result<bool> {
        let until = DateTime::from_secs(self.storage_now()? + keep.as_secs() as i64);
        let retention =
            ObjectLockRetention::builder().mode(ObjectLockRetentionMode::from(mode)).retain_until_date(until).build();
        self.runtime.block_on(async {
            self.counted();
            let sent = self
                .client
                .put_object_retention()
                .bucket(&self.bucket)
                .key(self.key(name))
                .retention(retention)
                .send()
                .await;
            match sent {
                Ok(_) => Ok(true),
                Err(e) if status(&e) == Some(404) => Ok(false),
                Err(e) => Err(Error::backend("extend the retention of", name, describe(&e))),
            }
        })
    }

    fn remove_stale_temporaries(&self, older_than: Duration) -> Result<usize> {
        // The temporaries of S3 are incomplete multipart uploads.
        self.runtime.block_on(async {
            self.counted();
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .send()
                .await
                .map_err(|e| Error::backend("list uploads", self.bucket.clone(), describe(&e)))?;
            let cutoff = crate::util::now_secs() - older_than.as_secs() as i64;
            let mut removed = 0;
            for u in out.uploads() {
                let (Some(key), Some(id), Some(started)) = (u.key(), u.upload_id(), u.initiated()) else { continue };
                if started.secs() < cutoff {
                    self.counted();
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(id)
                        .send()
                        .await
                        .map_err(|e| Error::backend("abort upload", key, describe(&e)))?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    fn create_container(&self) -> Result<()> {
        self.ensure_bucket()
    }

    fn retries(&self) -> u64 {
        S3Backend::retries(self)
    }
}

/// An upload body that hands out [`throttle::PIECE`]-sized pieces of `data`, each once the upload budget
/// allows: hyper sends a piece, then the body waits out its cost before the next.
struct PacedBody {
    data: Bytes,
    throttle: Arc<Throttle>,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for PacedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        let this = &mut *self;
        if let Some(wait) = this.wait.as_mut() {
            std::task::ready!(wait.as_mut().poll(cx));
            this.wait = None;
        }
        if this.data.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let piece = this.data.split_to(this.data.len().min(throttle::PIECE));
        let cost = this.throttle.reserve(piece.len());
        if !cost.is_zero() {
            this.wait = Some(Box::pin(tokio::time::sleep(cost)));
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_location;

    #[test]
    fn locations() {
        assert_eq!(parse_location("s3://b/p/q").unwrap(), (None, "b".into(), "p/q".into()));
        assert_eq!(parse_location("s3://b").unwrap(), (None, "b".into(), "".into()));
        assert_eq!(
            parse_location("s3:http://127.0.0.1:9000/bucket/repo/").unwrap(),
            (Some("http://127.0.0.1:9000".into()), "bucket".into(), "repo".into())
        );
        assert!(parse_location("s3:http://host").is_err());
        assert!(parse_location("s3://").is_err());
    }
}
