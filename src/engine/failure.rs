//! Why a model call failed, and whether calling again can help.
//!
//! ONNX Runtime reports a failed `Run` as a status code plus a message. The codes that name a
//! broken model or a bad request (`INVALID_ARGUMENT`, `INVALID_GRAPH`, `NOT_IMPLEMENTED`, …) are
//! permanent: the same input fails again. `EP_FAIL` (the execution provider failed) and
//! `DEVICE_RESET` (the device was lost) are about the device, not the input. The generic codes
//! (`FAIL`, `RUNTIME_EXCEPTION`, `ENGINE_ERROR`) are used for everything else, so there the
//! message decides: running out of memory (ONNX Runtime's arena says "Failed to allocate memory
//! for requested buffer", CUDA, cuBLAS and cuDNN say "out of memory" / `*_ALLOC_FAILED`, the
//! C++ runtime says "bad allocation"), a busy or unavailable device, or a device fault
//! (`cudaErrorLaunchFailure`, an illegal address) is transient; anything else is permanent.
//! An out-of-memory failure often depends on the batch, so the batcher splits a failed batch
//! before it retries (see [`super::batcher`]).

use ort::error::ErrorCode;

/// A failed model call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFailure {
    /// One line, as ONNX Runtime (or the model wrapper) said it.
    pub message: String,
    /// Whether the same call may succeed later (out of memory, device busy or lost), rather
    /// than failing again for the same input.
    pub transient: bool,
}

impl ModelFailure {
    pub fn permanent(message: impl Into<String>) -> ModelFailure {
        ModelFailure {
            message: message.into(),
            transient: false,
        }
    }

    pub fn transient(message: impl Into<String>) -> ModelFailure {
        ModelFailure {
            message: message.into(),
            transient: true,
        }
    }

    /// Classifies an error from running a session: an [`ort::Error`] anywhere in the chain is
    /// judged by its code and message; any other error (a wrapper's own check) is permanent.
    pub fn of(error: &anyhow::Error) -> ModelFailure {
        let message = format!("{error:#}");
        let transient = error
            .chain()
            .find_map(|e| e.downcast_ref::<ort::Error>())
            .is_some_and(|e| is_transient(e.code(), e.message()));
        ModelFailure { message, transient }
    }
}

/// A model wrapper's own message (wrong output count, bad item): permanent.
impl From<String> for ModelFailure {
    fn from(message: String) -> ModelFailure {
        ModelFailure::permanent(message)
    }
}

impl From<&str> for ModelFailure {
    fn from(message: &str) -> ModelFailure {
        ModelFailure::permanent(message)
    }
}

impl std::fmt::Display for ModelFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Messages of failures that are the device's state, not the input's (matched without case).
const TRANSIENT_MESSAGES: &[&str] = &[
    // Memory: ONNX Runtime's BFC arena, CUDA, cuBLAS/cuDNN, the C++ runtime.
    "failed to allocate memory",
    "out of memory",
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "bad allocation",
    "bad_alloc",
    // The device is busy, unavailable or was lost.
    "busy or unavailable",
    "cudaerrordevicesunavailable",
    "cudaerrordeviceunavailable",
    "device unavailable",
    "device lost",
    "device removed",
    "cudaerrorlaunchfailure",
    "unspecified launch failure",
    "illegal memory access",
    "cudaerrorillegaladdress",
    "cudaerrorlaunchtimeout",
    "ecc error",
];

/// Whether a failure with this ONNX Runtime status code and message may pass by itself.
pub fn is_transient(code: ErrorCode, message: &str) -> bool {
    match code {
        ErrorCode::ExecutionProviderFailure | ErrorCode::DeviceReset => true,
        ErrorCode::GenericFailure | ErrorCode::RuntimeException | ErrorCode::EngineError => {
            let message = message.to_ascii_lowercase();
            TRANSIENT_MESSAGES.iter().any(|m| message.contains(m))
        }
        // INVALID_ARGUMENT, NO_SUCHFILE, NO_MODEL, INVALID_PROTOBUF, MODEL_LOADED,
        // NOT_IMPLEMENTED, INVALID_GRAPH, …: the model or the request, not the moment.
        _ => false,
    }
}

/// The failure an injected model fault stands for (see [`crate::faults`]): the code and message
/// ONNX Runtime would report, classified like a real failure, so the tests exercise the
/// classification too.
pub fn injected(fault: crate::faults::ModelFaultKind, model: &str) -> ModelFailure {
    use crate::faults::ModelFaultKind;
    let (code, message) = match fault {
        ModelFaultKind::OutOfMemory => (
            ErrorCode::RuntimeException,
            format!(
                "injected fault in model {model}: Non-zero status code returned while running \
                 Conv node. Status Message: BFCArena::AllocateRawInternal Failed to allocate \
                 memory for requested buffer of size 1073741824"
            ),
        ),
        ModelFaultKind::Fail => (
            ErrorCode::InvalidArgument,
            format!("injected fault in model {model}: the request cannot be run"),
        ),
    };
    ModelFailure {
        transient: is_transient(code, &message),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_classify() {
        // Out of memory, as ONNX Runtime's arena and CUDA report it.
        assert!(is_transient(
            ErrorCode::RuntimeException,
            "Non-zero status code returned while running Mul node. Status Message: \
             bfc_arena.cc:368 Failed to allocate memory for requested buffer of size 2830172160"
        ));
        assert!(is_transient(
            ErrorCode::GenericFailure,
            "CUDA failure 2: out of memory ; GPU=0"
        ));
        assert!(is_transient(
            ErrorCode::GenericFailure,
            "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED"
        ));
        assert!(is_transient(
            ErrorCode::RuntimeException,
            "CUDA error cudaErrorDevicesUnavailable: CUDA-capable device(s) is/are busy or unavailable"
        ));
        // The device itself.
        assert!(is_transient(
            ErrorCode::ExecutionProviderFailure,
            "anything"
        ));
        assert!(is_transient(ErrorCode::DeviceReset, "device reset"));
        // The input or the model: the same call fails again.
        assert!(!is_transient(
            ErrorCode::InvalidArgument,
            "Got invalid dimensions for input: pixel_values; out of memory"
        ));
        assert!(!is_transient(
            ErrorCode::RuntimeException,
            "Non-zero status code returned while running Reshape node: the input tensor cannot \
             be reshaped to the requested shape"
        ));
        assert!(!is_transient(ErrorCode::InvalidGraph, "bad graph"));
    }

    #[test]
    fn errors_are_classified_through_their_chain() {
        let oom = anyhow::Error::new(ort::Error::new_with_code(
            ErrorCode::RuntimeException,
            "Failed to allocate memory for requested buffer of size 64",
        ))
        .context("running model perception");
        let failure = ModelFailure::of(&oom);
        assert!(failure.transient);
        assert!(failure.message.starts_with("running model perception: "));
        assert!(!ModelFailure::of(&anyhow::anyhow!("out of memory, says a wrapper")).transient);
        assert!(!ModelFailure::from("returned 3 outputs for 4 inputs").transient);
    }

    #[test]
    fn injected_faults_classify_like_real_ones() {
        use crate::faults::ModelFaultKind;
        assert!(injected(ModelFaultKind::OutOfMemory, "perception").transient);
        assert!(!injected(ModelFaultKind::Fail, "perception").transient);
    }
}
