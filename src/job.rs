//! The v1 job message (design §4.3) and its validation.
//!
//! Parsing goes through `serde_json::Value` rather than a derived struct so that every rejection
//! names the field and the reason ("field 'prompt' must be a string"), which is what lands in the
//! dead-letter header for the people who enqueued the job.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Limits;
use crate::error::JobError;

/// Bounds on per-job options (design §4.3).
pub const MAX_ITERATIONS_LIMIT: u32 = 8;
/// The largest `options.diffusion_steps` any job may ask for; a diffusion tool bounds it
/// further to its bundle's `max_steps`.
pub const MAX_DIFFUSION_STEPS_LIMIT: u32 = 1000;

/// A validated retouch job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub job_id: String,
    /// `s3://bucket/key` for the worker; `run` also accepts a local path here.
    pub image: String,
    pub prompt: String,
    /// `s3://bucket/prefix/`; `None` means `s3.output`.
    pub output: Option<String>,
    pub options: JobOptions,
    pub metadata: Option<Value>,
}

/// Per-job overrides of the bundle's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct JobOptions {
    pub max_iterations: Option<u32>,
    pub saliency_threshold: Option<f32>,
    /// Denoising steps of diffusion repairs (1..=[`MAX_DIFFUSION_STEPS_LIMIT`]); the tool
    /// clamps it to its bundle's `max_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusion_steps: Option<u32>,
}

impl JobMessage {
    /// Parses and validates a message body. Unknown top-level fields are ignored.
    pub fn parse(body: &[u8], limits: &Limits) -> Result<JobMessage, JobError> {
        if body.len() > limits.max_message_bytes {
            return Err(JobError::invalid(format!(
                "message is {} bytes, over the limit of {}",
                body.len(),
                limits.max_message_bytes
            )));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| JobError::invalid(format!("message is not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(JobError::invalid("message must be a JSON object"));
        };

        let job_id = required_string(&obj, "job_id")?;
        validate_job_id(&job_id)?;
        let image = required_string(&obj, "image")?;
        if image.is_empty() {
            return Err(JobError::invalid("field 'image' must not be empty"));
        }
        let prompt = required_string(&obj, "prompt")?;
        if prompt.len() > limits.max_prompt_bytes {
            return Err(JobError::invalid(format!(
                "field 'prompt' is {} bytes, over the limit of {}",
                prompt.len(),
                limits.max_prompt_bytes
            )));
        }
        let output = match obj.get("output") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::String(_)) => {
                return Err(JobError::invalid("field 'output' must not be empty"))
            }
            Some(_) => return Err(JobError::invalid("field 'output' must be a string")),
        };
        let options = parse_options(obj.get("options"))?;
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => None,
            Some(m @ Value::Object(_)) => {
                let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
                if size > limits.max_metadata_bytes {
                    return Err(JobError::invalid(format!(
                        "field 'metadata' is {size} bytes, over the limit of {}",
                        limits.max_metadata_bytes
                    )));
                }
                Some(m.clone())
            }
            Some(_) => return Err(JobError::invalid("field 'metadata' must be a JSON object")),
        };
        Ok(JobMessage {
            job_id,
            image,
            prompt,
            output,
            options,
            metadata,
        })
    }

    /// The job id of a message that may not be valid, for logs and events about its rejection.
    pub fn sniff_job_id(body: &[u8]) -> Option<String> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let id = value.get("job_id")?.as_str()?;
        validate_job_id(id).ok()?;
        Some(id.to_string())
    }
}

fn required_string(obj: &Map<String, Value>, field: &str) -> Result<String, JobError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(JobError::invalid(format!(
            "required field '{field}' is missing"
        ))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(JobError::invalid(format!(
            "field '{field}' must be a string, got {}",
            json_type(other)
        ))),
    }
}

/// `job_id`: 1–128 of `[A-Za-z0-9._-]` (it becomes part of object keys and file names).
pub fn validate_job_id(id: &str) -> Result<(), JobError> {
    if id.is_empty() || id.len() > 128 {
        return Err(JobError::invalid(format!(
            "field 'job_id' must be 1 to 128 characters, got {}",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(JobError::invalid(format!(
            "field 'job_id' may only contain A-Z a-z 0-9 . _ -, found {c:?}"
        )));
    }
    if id == "." || id == ".." {
        return Err(JobError::invalid("field 'job_id' must not be '.' or '..'"));
    }
    Ok(())
}

fn parse_options(value: Option<&Value>) -> Result<JobOptions, JobError> {
    let obj = match value {
        None | Some(Value::Null) => return Ok(JobOptions::default()),
        Some(Value::Object(obj)) => obj,
        Some(_) => return Err(JobError::invalid("field 'options' must be a JSON object")),
    };
    let mut options = JobOptions::default();
    match obj.get("max_iterations") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let n = v.as_u64().filter(|n| *n <= u64::from(MAX_ITERATIONS_LIMIT));
            let n = n.ok_or_else(|| {
                JobError::invalid(format!(
                    "options.max_iterations must be an integer from 0 to {MAX_ITERATIONS_LIMIT}, got {v}"
                ))
            })?;
            options.max_iterations = Some(n as u32);
        }
    }
    match obj.get("saliency_threshold") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let t = v.as_f64().filter(|t| (0.0..=1.0).contains(t));
            let t = t.ok_or_else(|| {
                JobError::invalid(format!(
                    "options.saliency_threshold must be a number from 0 to 1, got {v}"
                ))
            })?;
            options.saliency_threshold = Some(t as f32);
        }
    }
    match obj.get("diffusion_steps") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let range = 1..=u64::from(MAX_DIFFUSION_STEPS_LIMIT);
            let n = v.as_u64().filter(|n| range.contains(n));
            let n = n.ok_or_else(|| {
                JobError::invalid(format!(
                    "options.diffusion_steps must be an integer from 1 to {MAX_DIFFUSION_STEPS_LIMIT}, got {v}"
                ))
            })?;
            options.diffusion_steps = Some(n as u32);
        }
    }
    Ok(options)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    fn limits() -> Limits {
        Limits {
            max_message_bytes: 65536,
            max_prompt_bytes: 4096,
            max_metadata_bytes: 16384,
            max_image_bytes: 1 << 20,
            max_image_pixels: 1 << 20,
        }
    }

    fn reason(body: &str) -> String {
        let err = JobMessage::parse(body.as_bytes(), &limits()).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidMessage);
        err.message
    }

    #[test]
    fn parses_the_design_example() {
        let body = r#"{"job_id":"2f6c-img-000123","image":"s3://generated/2026/11/26/000123.png",
            "prompt":"a violinist","output":"s3://retouched/v1/",
            "options":{"max_iterations":3,"saliency_threshold":0.5,"diffusion_steps":25},
            "metadata":{"tenant":"acme"},"future_field":1}"#;
        let job = JobMessage::parse(body.as_bytes(), &limits()).unwrap();
        assert_eq!(job.job_id, "2f6c-img-000123");
        assert_eq!(job.options.max_iterations, Some(3));
        assert_eq!(job.options.saliency_threshold, Some(0.5));
        assert_eq!(job.options.diffusion_steps, Some(25));
        assert_eq!(job.output.as_deref(), Some("s3://retouched/v1/"));
        assert_eq!(job.metadata.unwrap()["tenant"], "acme");
    }

    #[test]
    fn every_rejection_names_its_reason() {
        assert!(reason("{not json").contains("not valid JSON"));
        assert!(reason("[1]").contains("JSON object"));
        assert!(reason(r#"{"image":"s3://a/b","prompt":"p"}"#).contains("'job_id' is missing"));
        assert!(reason(r#"{"job_id":"a","prompt":"p"}"#).contains("'image' is missing"));
        assert!(reason(r#"{"job_id":"a","image":"s3://a/b"}"#).contains("'prompt' is missing"));
        assert!(reason(r#"{"job_id":7,"image":"s3://a/b","prompt":"p"}"#)
            .contains("'job_id' must be a string, got a number"));
        assert!(
            reason(r#"{"job_id":"a/b","image":"s3://a/b","prompt":"p"}"#)
                .contains("may only contain")
        );
        assert!(reason(
            r#"{"job_id":"a","image":"s3://a/b","prompt":"p","options":{"max_iterations":9}}"#
        )
        .contains("max_iterations"));
        assert!(reason(
            r#"{"job_id":"a","image":"s3://a/b","prompt":"p","options":{"saliency_threshold":1.5}}"#
        )
        .contains("saliency_threshold"));
        for steps in ["0", "1001", "2.5", "-3", "\"20\""] {
            let body = format!(
                r#"{{"job_id":"a","image":"s3://a/b","prompt":"p","options":{{"diffusion_steps":{steps}}}}}"#
            );
            assert!(
                reason(&body).contains("options.diffusion_steps must be an integer from 1 to 1000"),
                "{body}"
            );
        }
        assert!(
            reason(r#"{"job_id":"a","image":"s3://a/b","prompt":"p","metadata":[1]}"#)
                .contains("'metadata' must be a JSON object")
        );
        let long = format!(
            r#"{{"job_id":"a","image":"s3://a/b","prompt":"{}"}}"#,
            "x".repeat(5000)
        );
        assert!(reason(&long).contains("over the limit of 4096"));
        let big_meta = format!(
            r#"{{"job_id":"a","image":"s3://a/b","prompt":"p","metadata":{{"k":"{}"}}}}"#,
            "x".repeat(20000)
        );
        assert!(reason(&big_meta).contains("'metadata' is"));
        assert!(reason(&"x".repeat(70000)).contains("over the limit of 65536"));
        assert!(reason(&format!(
            r#"{{"job_id":"{}","image":"s3://a/b","prompt":"p"}}"#,
            "a".repeat(129)
        ))
        .contains("1 to 128"));
    }

    #[test]
    fn sniffs_ids_of_invalid_jobs() {
        assert_eq!(
            JobMessage::sniff_job_id(br#"{"job_id":"x-1","prompt":3}"#).as_deref(),
            Some("x-1")
        );
        assert_eq!(JobMessage::sniff_job_id(br#"{"job_id":"../x"}"#), None);
        assert_eq!(JobMessage::sniff_job_id(b"garbage"), None);
    }
}
