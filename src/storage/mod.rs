//! Object storage: where job images come from and where results go.
//!
//! A [`Location`] is either an S3 object (the worker) or a local file (the `run` command); one
//! [`Storage`] handle serves both. Every failure is a [`JobError`] whose class tells the worker
//! whether a retry can help (design §4.5): a missing object is permanent, an unreachable or
//! throttling S3 is transient. Buckets outside `s3.allowed_buckets` are refused before any request
//! is made, so a job cannot make the worker touch a bucket it was not meant to.

mod local;
mod s3;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{ErrorClass, JobError};

/// Longest S3 key AWS accepts, in bytes.
const MAX_KEY_BYTES: usize = 1024;
/// How much of an offending URI an error message quotes: messages end up in AMQP headers.
const MAX_QUOTED_CHARS: usize = 200;

/// Where an object lives: an S3 object or a local file (the local `run` command).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    S3 { bucket: String, key: String },
    File(PathBuf),
}

impl Location {
    /// Parses `s3://bucket/key` (an object, or a prefix ending in `/`).
    ///
    /// The bucket must be 3–63 characters of `[a-z0-9.-]`, starting and ending with a letter or
    /// digit; the key must be 1–1024 bytes with no leading `/`, no empty segment (`a//b`), no `.`
    /// or `..` segment and no control characters. A trailing `/` is allowed (a prefix). Anything
    /// else is an [`ErrorClass::InvalidMessage`] naming the problem.
    pub fn parse_s3(uri: &str) -> Result<Location, JobError> {
        let (bucket, key) = split_s3(uri)?;
        if key.is_empty() {
            return Err(bad_uri(uri, "the object key is empty"));
        }
        validate_key(uri, key)?;
        Ok(Location::S3 {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }

    /// Parses an output prefix: like [`Location::parse_s3`], but the bucket root (`s3://bucket`
    /// or `s3://bucket/`) is allowed too, and the key is normalised to end with `/` so that
    /// [`Location::join`] never glues a name onto a partial segment.
    pub fn parse_s3_prefix(uri: &str) -> Result<Location, JobError> {
        let (bucket, key) = split_s3(uri)?;
        let mut key = key.to_owned();
        if !key.is_empty() {
            validate_key(uri, &key)?;
            if !key.ends_with('/') {
                key.push('/');
                if key.len() > MAX_KEY_BYTES {
                    return Err(bad_uri(uri, "the key is longer than 1024 bytes"));
                }
            }
        }
        Ok(Location::S3 {
            bucket: bucket.to_owned(),
            key,
        })
    }

    /// Appends a relative name (`"job-1/retouched.png"`) to a prefix location: an S3 prefix
    /// (a `/` is inserted if the prefix lacks one) or a folder.
    ///
    /// The name is trusted (job ids are validated when the message is parsed); a key that ends up
    /// over 1024 bytes is refused by S3 when used.
    pub fn join(&self, name: &str) -> Location {
        match self {
            Location::S3 { bucket, key } => {
                let key = if key.is_empty() || key.ends_with('/') {
                    format!("{key}{name}")
                } else {
                    format!("{key}/{name}")
                };
                Location::S3 {
                    bucket: bucket.clone(),
                    key,
                }
            }
            Location::File(dir) => Location::File(dir.join(name)),
        }
    }

    /// The bucket of an S3 location; `None` for a file.
    pub fn bucket(&self) -> Option<&str> {
        match self {
            Location::S3 { bucket, .. } => Some(bucket),
            Location::File(_) => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            Location::File(path) => {
                // Diagnostics are read long after the fact, from another directory: print the
                // absolute path. `absolute` does not touch the file system beyond the cwd.
                let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                write!(f, "file://{}", abs.display())
            }
        }
    }
}

/// Splits `s3://bucket/rest` and validates the bucket; `rest` may be empty.
fn split_s3(uri: &str) -> Result<(&str, &str), JobError> {
    let rest = match uri.get(..5) {
        Some(scheme) if scheme.eq_ignore_ascii_case("s3://") => &uri[5..],
        _ => return Err(bad_uri(uri, "it does not start with s3://")),
    };
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    validate_bucket(uri, bucket)?;
    Ok((bucket, key))
}

fn validate_bucket(uri: &str, bucket: &str) -> Result<(), JobError> {
    if bucket.is_empty() {
        return Err(bad_uri(uri, "the bucket name is empty"));
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err(bad_uri(
            uri,
            "the bucket name must be 3 to 63 characters long",
        ));
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(bad_uri(
            uri,
            "the bucket name may only contain lowercase letters, digits, '.' and '-'",
        ));
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bucket.as_bytes()[0]) || !alnum(bucket.as_bytes()[bucket.len() - 1]) {
        return Err(bad_uri(
            uri,
            "the bucket name must start and end with a letter or digit",
        ));
    }
    if bucket.contains("..") {
        return Err(bad_uri(uri, "the bucket name contains '..'"));
    }
    Ok(())
}

fn validate_key(uri: &str, key: &str) -> Result<(), JobError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(bad_uri(uri, "the key is longer than 1024 bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(bad_uri(uri, "the key contains control characters"));
    }
    if key.starts_with('/') {
        return Err(bad_uri(uri, "the key starts with '/'"));
    }
    // A trailing '/' marks a prefix; every other segment must be a real name. S3 itself would
    // accept `a//b` or `../x`, but gateways and file-backed servers (SeaweedFS, MinIO) normalise
    // them, so such a key may name a different object than the one the job meant.
    let body = key.strip_suffix('/').unwrap_or(key);
    for segment in body.split('/') {
        match segment {
            "" => {
                return Err(bad_uri(
                    uri,
                    "the key contains an empty path segment ('//')",
                ))
            }
            "." | ".." => {
                return Err(bad_uri(uri, "the key contains a '.' or '..' path segment"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn bad_uri(uri: &str, why: &str) -> JobError {
    JobError::invalid(format!("invalid S3 URI '{}': {why}", quote(uri)))
}

/// A bounded, escaped rendering of untrusted text for error messages.
fn quote(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_QUOTED_CHARS).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out.escape_debug().to_string()
}

/// S3 connection settings (the `s3.*` configuration keys; credentials are never here).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct S3Settings {
    /// Custom endpoint (`http://127.0.0.1:8333` for SeaweedFS/MinIO); empty = AWS.
    pub endpoint: String,
    /// Signing region; empty = the AWS chain (`AWS_REGION`, profile), else `us-east-1`.
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most self-hosted servers.
    pub force_path_style: bool,
    /// The only buckets the worker may touch. Empty allows none.
    pub allowed_buckets: Vec<String>,
}

/// Timeouts and retries of the S3 client. The defaults suit production; tests shorten them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Tuning {
    /// Time to establish a TCP/TLS connection.
    pub connect_timeout: Duration,
    /// Time for one attempt of a request (until the response headers arrive).
    pub attempt_timeout: Duration,
    /// Time for a whole operation: all attempts and, for `get`, reading the body.
    pub operation_timeout: Duration,
    /// Attempts per operation, including the first (the SDK's standard retry strategy).
    pub max_attempts: u32,
}

impl Default for S3Tuning {
    fn default() -> Self {
        S3Tuning {
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(60),
            max_attempts: 3,
        }
    }
}

/// Called once per S3 operation with the operation (`get`, `put`, `head`, `check`) and its
/// outcome (`ok`, `not_found`, `error`), for request metrics.
///
/// The outcome describes S3's answer: a `get` refused for size after S3 answered is `ok`.
pub type RequestObserver = Arc<dyn Fn(&'static str, &'static str) + Send + Sync>;

/// One handle for both kinds of location. Cheap to clone (Arc inside).
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    s3: Option<s3::S3Backend>,
    allowed_buckets: Vec<String>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("s3", &self.inner.s3.is_some())
            .field("allowed_buckets", &self.inner.allowed_buckets)
            .finish()
    }
}

impl Storage {
    /// Local files only (no S3): S3 locations fail with a clear error.
    pub fn local() -> Storage {
        Storage {
            inner: Arc::new(Inner {
                s3: None,
                allowed_buckets: Vec::new(),
            }),
        }
    }

    /// S3 via the standard AWS credential chain (`AWS_ACCESS_KEY_ID`…, profiles, instance roles),
    /// with the default [`S3Tuning`] (connect 5 s, operation 60 s, standard retries, 3 attempts).
    pub async fn s3(settings: &S3Settings) -> Result<Storage, JobError> {
        Storage::s3_tuned(settings, &S3Tuning::default()).await
    }

    /// [`Storage::s3`] with explicit timeouts and retries.
    pub async fn s3_tuned(settings: &S3Settings, tuning: &S3Tuning) -> Result<Storage, JobError> {
        let backend = s3::S3Backend::connect(settings, tuning).await?;
        Ok(Storage::with_backend(
            backend,
            settings.allowed_buckets.clone(),
        ))
    }

    /// Wraps a ready S3 client (its own credentials, endpoint, timeouts). `get_timeout` bounds
    /// a whole `get`, body included, which the client's operation timeout does not cover.
    pub fn from_s3_client(
        client: aws_sdk_s3::Client,
        allowed_buckets: Vec<String>,
        get_timeout: Duration,
    ) -> Storage {
        Storage::with_backend(s3::S3Backend::new(client, get_timeout), allowed_buckets)
    }

    fn with_backend(backend: s3::S3Backend, allowed_buckets: Vec<String>) -> Storage {
        Storage {
            inner: Arc::new(Inner {
                s3: Some(backend),
                allowed_buckets,
            }),
        }
    }

    /// Reports every later S3 operation of this handle (and its clones) to `observer`.
    pub fn with_observer(self, observer: RequestObserver) -> Storage {
        let s3 = self
            .inner
            .s3
            .as_ref()
            .map(|backend| backend.with_observer(observer));
        Storage {
            inner: Arc::new(Inner {
                s3,
                allowed_buckets: self.inner.allowed_buckets.clone(),
            }),
        }
    }

    /// Enforces `s3.allowed_buckets`: a bucket outside it is [`ErrorClass::BucketNotAllowed`].
    /// An empty allow-list allows nothing for S3. File locations are always allowed here.
    pub fn check_allowed(&self, loc: &Location) -> Result<(), JobError> {
        let Location::S3 { bucket, .. } = loc else {
            return Ok(());
        };
        if self.inner.s3.is_none() {
            return Err(no_s3(loc));
        }
        if self.inner.allowed_buckets.iter().any(|b| b == bucket) {
            return Ok(());
        }
        let allowed = if self.inner.allowed_buckets.is_empty() {
            "none".to_owned()
        } else {
            self.inner.allowed_buckets.join(", ")
        };
        Err(JobError::new(
            ErrorClass::BucketNotAllowed,
            format!(
                "bucket '{}' is not in s3.allowed_buckets (allowed: {allowed})",
                quote(bucket)
            ),
        ))
    }

    /// Reads a whole object, refusing objects over `max_bytes` ([`ErrorClass::ImageTooLarge`],
    /// checked from the announced size before reading and enforced while streaming).
    ///
    /// A missing object or bucket is [`ErrorClass::ImageNotFound`] (permanent); access denied,
    /// timeouts, connection errors, 5xx and throttling are [`ErrorClass::StorageUnavailable`]
    /// (transient: servers come back, credentials get rotated).
    pub async fn get(&self, loc: &Location, max_bytes: u64) -> Result<Bytes, JobError> {
        self.check_allowed(loc)?;
        match loc {
            Location::S3 { bucket, key } => self.backend(loc)?.get(bucket, key, max_bytes).await,
            Location::File(path) => local::get(path, max_bytes).await,
        }
    }

    /// Writes an object with the given content type. Files (which have no content type) are
    /// written to a temporary file in the same folder and renamed into place, creating parent
    /// folders, so a reader never sees half a file.
    pub async fn put(
        &self,
        loc: &Location,
        body: Bytes,
        content_type: &str,
    ) -> Result<(), JobError> {
        self.check_allowed(loc)?;
        match loc {
            Location::S3 { bucket, key } => {
                self.backend(loc)?
                    .put(bucket, key, body, content_type)
                    .await
            }
            Location::File(path) => local::put(path, body).await,
        }
    }

    /// Whether the object exists (S3 HEAD; a missing object or bucket is `Ok(false)`).
    pub async fn exists(&self, loc: &Location) -> Result<bool, JobError> {
        self.check_allowed(loc)?;
        match loc {
            Location::S3 { bucket, key } => self.backend(loc)?.exists(bucket, key).await,
            Location::File(path) => local::exists(path).await,
        }
    }

    /// Readiness probe. For S3, HeadBucket on the first allowed bucket proves that the endpoint
    /// answers and the credentials work; an empty allow-list fails (nothing could ever be read).
    /// Local storage is always ready.
    pub async fn check(&self) -> Result<(), JobError> {
        let Some(backend) = &self.inner.s3 else {
            return Ok(());
        };
        let Some(bucket) = self.inner.allowed_buckets.first() else {
            return Err(JobError::new(
                ErrorClass::StorageUnavailable,
                "s3.allowed_buckets is empty: the worker may not use any bucket",
            ));
        };
        backend.check(bucket).await
    }

    fn backend(&self, loc: &Location) -> Result<&s3::S3Backend, JobError> {
        self.inner.s3.as_ref().ok_or_else(|| no_s3(loc))
    }
}

/// The error for an S3 location on local-only storage: permanent, since retrying the same job
/// with the same command cannot help.
fn no_s3(loc: &Location) -> JobError {
    JobError::invalid(format!(
        "{loc} is an S3 location, but S3 is not configured here (local files only)"
    ))
}

/// `path` for messages, without the `file://` noise.
fn show_path(path: &Path) -> String {
    quote(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, key: &str) -> Location {
        Location::S3 {
            bucket: bucket.into(),
            key: key.into(),
        }
    }

    #[test]
    fn parses_good_uris() {
        assert_eq!(
            Location::parse_s3("s3://generated/2026/11/26/000123.png").unwrap(),
            s3("generated", "2026/11/26/000123.png")
        );
        assert_eq!(Location::parse_s3("s3://abc/x").unwrap(), s3("abc", "x"));
        assert_eq!(
            Location::parse_s3("s3://my.bucket-1/v1/").unwrap(),
            s3("my.bucket-1", "v1/")
        );
        // Keys may hold spaces, unicode and dots inside names.
        assert_eq!(
            Location::parse_s3("s3://b12/a b/é.../.hidden/x..y").unwrap(),
            s3("b12", "a b/é.../.hidden/x..y")
        );
        let long = "k".repeat(1024);
        assert!(Location::parse_s3(&format!("s3://b12/{long}")).is_ok());
        assert_eq!(
            Location::parse_s3(&format!("s3://{}/x", "a".repeat(63))).unwrap(),
            s3(&"a".repeat(63), "x")
        );
    }

    fn rejects(uri: &str, why: &str) {
        let err = Location::parse_s3(uri).expect_err(uri);
        assert_eq!(err.class, ErrorClass::InvalidMessage, "{uri}");
        assert!(err.message.contains(why), "{uri}: {}", err.message);
    }

    #[test]
    fn rejects_bad_uris() {
        rejects("", "does not start with s3://");
        rejects("https://b12/x", "does not start with s3://");
        rejects("s3:/b12/x", "does not start with s3://");
        rejects("s3://b12", "key is empty");
        rejects("s3://b12/", "key is empty");
        rejects("s3:///x", "bucket name is empty");
        rejects("s3://B12/x", "lowercase");
        rejects("s3://b_2/x", "lowercase");
        rejects("s3://ab/x", "3 to 63");
        rejects(&format!("s3://{}/x", "a".repeat(64)), "3 to 63");
        rejects("s3://-ab/x", "start and end");
        rejects("s3://ab./x", "start and end");
        rejects("s3://a..b/x", "'..'");
        rejects("s3://b12/../x", "'..' path segment");
        rejects("s3://b12/a/./x", "'..' path segment");
        rejects("s3://b12/a/..", "'..' path segment");
        rejects("s3://b12/a/../", "'..' path segment");
        rejects("s3://b12//x", "starts with '/'");
        rejects("s3://b12/a//x", "empty path segment");
        rejects("s3://b12/a/x//", "empty path segment");
        rejects("s3://b12/a\nb", "control characters");
        rejects("s3://b12/a\u{0}b", "control characters");
        rejects("s3://b12/a\u{7f}b", "control characters");
        rejects(
            &format!("s3://b12/{}", "k".repeat(1025)),
            "longer than 1024",
        );
        // Multi-byte characters count in bytes, as S3 does.
        rejects(&format!("s3://b12/{}", "é".repeat(513)), "longer than 1024");
    }

    #[test]
    fn error_messages_are_one_bounded_line() {
        let uri = format!("s3://b12/a\nb{}", "x".repeat(5000));
        let err = Location::parse_s3(&uri).unwrap_err();
        assert!(!err.message.contains('\n'));
        assert!(err.message.len() < 400, "{}", err.message.len());
        assert!(err.message.contains("a\\nb"), "{}", err.message);
    }

    #[test]
    fn parses_prefixes() {
        assert_eq!(
            Location::parse_s3_prefix("s3://out").unwrap(),
            s3("out", "")
        );
        assert_eq!(
            Location::parse_s3_prefix("s3://out/").unwrap(),
            s3("out", "")
        );
        assert_eq!(
            Location::parse_s3_prefix("s3://out/v1").unwrap(),
            s3("out", "v1/")
        );
        assert_eq!(
            Location::parse_s3_prefix("s3://out/v1/").unwrap(),
            s3("out", "v1/")
        );
        assert!(Location::parse_s3_prefix("s3://out//").is_err());
        assert!(Location::parse_s3_prefix("s3://out/../").is_err());
        assert!(Location::parse_s3_prefix("s3://OUT/").is_err());
        assert!(Location::parse_s3_prefix(&format!("s3://out/{}", "k".repeat(1024))).is_err());
    }

    #[test]
    fn joins() {
        let name = "job-1/retouched.png";
        assert_eq!(
            s3("out", "v1/").join(name),
            s3("out", "v1/job-1/retouched.png")
        );
        assert_eq!(
            s3("out", "v1").join(name),
            s3("out", "v1/job-1/retouched.png")
        );
        assert_eq!(s3("out", "").join(name), s3("out", "job-1/retouched.png"));
        assert_eq!(
            Location::File(PathBuf::from("/tmp/out")).join(name),
            Location::File(PathBuf::from("/tmp/out/job-1/retouched.png"))
        );
    }

    #[test]
    fn displays() {
        assert_eq!(s3("out", "v1/a.png").to_string(), "s3://out/v1/a.png");
        assert_eq!(
            Location::File(PathBuf::from("/tmp/out/a.png")).to_string(),
            "file:///tmp/out/a.png"
        );
        let relative = Location::File(PathBuf::from("out/a.png")).to_string();
        let expected = std::env::current_dir().unwrap().join("out/a.png");
        assert_eq!(relative, format!("file://{}", expected.display()));
        // Display and parse agree.
        let loc = Location::parse_s3("s3://out/v1/a.png").unwrap();
        assert_eq!(Location::parse_s3(&loc.to_string()).unwrap(), loc);
    }

    #[test]
    fn bucket_accessor() {
        assert_eq!(s3("out", "k").bucket(), Some("out"));
        assert_eq!(Location::File(PathBuf::from("/x")).bucket(), None);
    }

    #[test]
    fn allow_list() {
        let storage = Storage::with_backend_for_test(vec!["a12".into(), "b12".into()]);
        assert!(storage.check_allowed(&s3("a12", "k")).is_ok());
        assert!(storage
            .check_allowed(&Location::File(PathBuf::from("/x")))
            .is_ok());
        let err = storage.check_allowed(&s3("c12", "k")).unwrap_err();
        assert_eq!(err.class, ErrorClass::BucketNotAllowed);
        assert_eq!(
            err.message,
            "bucket 'c12' is not in s3.allowed_buckets (allowed: a12, b12)"
        );
        let none = Storage::with_backend_for_test(Vec::new());
        let err = none.check_allowed(&s3("a12", "k")).unwrap_err();
        assert_eq!(
            err.message,
            "bucket 'a12' is not in s3.allowed_buckets (allowed: none)"
        );
    }

    #[test]
    fn local_storage_refuses_s3() {
        let storage = Storage::local();
        let err = storage.check_allowed(&s3("a12", "k")).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidMessage);
        assert!(
            err.message.contains("S3 is not configured"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn local_files_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local();
        storage.check().await.unwrap();
        let loc = Location::File(dir.path().to_path_buf()).join("job-1/retouched.png");
        assert!(!storage.exists(&loc).await.unwrap());
        let err = storage.get(&loc, 100).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::ImageNotFound);

        storage
            .put(&loc, Bytes::from_static(b"hello"), "image/png")
            .await
            .unwrap();
        assert!(storage.exists(&loc).await.unwrap());
        assert_eq!(
            storage.get(&loc, 5).await.unwrap(),
            Bytes::from_static(b"hello")
        );
        let err = storage.get(&loc, 4).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::ImageTooLarge);

        // Overwrite in place; no temporary files are left behind.
        storage
            .put(&loc, Bytes::from_static(b"again"), "image/png")
            .await
            .unwrap();
        assert_eq!(
            storage.get(&loc, 100).await.unwrap(),
            Bytes::from_static(b"again")
        );
        let names: Vec<_> = std::fs::read_dir(dir.path().join("job-1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("retouched.png")]);

        // A folder is not an image.
        let err = storage
            .get(&Location::File(dir.path().to_path_buf()), 100)
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::ImageNotFound);
    }

    impl Storage {
        /// An S3 storage whose client points nowhere: enough for allow-list checks.
        fn with_backend_for_test(allowed: Vec<String>) -> Storage {
            let config = aws_sdk_s3::Config::builder()
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .region(aws_sdk_s3::config::Region::new("us-east-1"))
                .build();
            Storage::from_s3_client(
                aws_sdk_s3::Client::from_conf(config),
                allowed,
                Duration::from_secs(1),
            )
        }
    }
}
