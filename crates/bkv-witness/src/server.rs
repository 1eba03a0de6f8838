//! The witness's HTTP API. It signs an epoch only when the operator asked for it (a
//! signed submission), only for its namespace, and only if the epoch extends its log.
//!
//! | method | path | answer |
//! | --- | --- | --- |
//! | GET | `/v1/info` | namespace, keys, latest epoch |
//! | POST | `/v1/epochs` | [`Submission`] → the Plexi `SignatureResponse` |
//! | POST | `/v1/epochs/{n}/countersignature` | [`Countersignature`] → the bundle |
//! | GET | `/v1/epochs/{n}`, `/v1/epochs/latest` | the bundle |

use crate::log::{LogError, WitnessLog};
use crate::signer::Signer;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bkv_core::bundle::{
    self, artifact_digest, countersign_message, submit_message, Artifact, WitnessSignature,
    CIPHERSUITE_PROTOBUF_ED25519, MAX_BUNDLE_BYTES,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What the operator sends to have an epoch signed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// The epoch: the log's latest plus one.
    pub epoch: u64,
    /// The artifact's exact JSON text.
    pub artifact: String,
    /// The operator's Ed25519 signature over [`submit_message`], hex.
    pub operator_request_signature: String,
}

/// The operator's counter-signature of an epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Countersignature {
    /// Ed25519 over [`countersign_message`] of the witness signature, hex.
    pub operator_signature: String,
}

/// What `/v1/info` says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Info {
    /// The namespace this witness signs for.
    pub namespace: String,
    /// The witness's Ed25519 key, hex.
    pub witness_key: String,
    /// The operator key submissions must be signed by, hex.
    pub operator_key: String,
    /// The latest epoch (0 when the log is empty).
    pub latest_epoch: u64,
}

/// Everything a witness serves with.
pub struct Witness {
    /// The namespace it signs for.
    pub namespace: String,
    /// Its signing key.
    pub signer: Signer,
    /// The operator whose submissions it accepts.
    pub operator_key: [u8; 32],
    /// Its log.
    pub log: WitnessLog,
    /// One submission at a time (the log orders them; this keeps signing out of races).
    pub lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witness")
            .field("namespace", &self.namespace)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// An error answer: a status and a JSON `{"error": …}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        let status = match e {
            LogError::NotNext { .. } | LogError::Conflict(_) => StatusCode::CONFLICT,
            LogError::Unknown(_) => StatusCode::NOT_FOUND,
            LogError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "witness log failure");
        }
        ApiError(status, e.to_string())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn bad_request(reason: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, reason.into())
}

async fn info(State(w): State<Arc<Witness>>) -> Result<Json<Info>, ApiError> {
    let latest = w.log.latest()?.map(|b| b.witness.epoch).unwrap_or(0);
    Ok(Json(Info {
        namespace: w.namespace.clone(),
        witness_key: hex::encode(w.signer.public_key()),
        operator_key: hex::encode(w.operator_key),
        latest_epoch: latest,
    }))
}

async fn submit(
    State(w): State<Arc<Witness>>,
    Json(s): Json<Submission>,
) -> Result<Json<WitnessSignature>, ApiError> {
    // The logged entry wraps the artifact; leave it room below every reader's limit.
    if s.artifact.len() > MAX_BUNDLE_BYTES / 2 {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("an artifact is at most {} bytes", MAX_BUNDLE_BYTES / 2),
        ));
    }
    let artifact: Artifact = serde_json::from_str(&s.artifact)
        .map_err(|e| bad_request(format!("the artifact is not a fleet-key artifact: {e}")))?;
    if artifact.namespace != w.namespace {
        return Err(bad_request(format!(
            "the artifact is for namespace {:?}; this witness signs {:?}",
            artifact.namespace, w.namespace
        )));
    }
    let digest = artifact_digest(&s.artifact);
    let request = hex::decode(&s.operator_request_signature)
        .map_err(|_| bad_request("operator_request_signature is not hex"))?;
    if !bundle::ed25519_verify(
        &w.operator_key,
        &submit_message(&w.namespace, s.epoch, &digest),
        &request,
    ) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "the submission is not signed by the operator key".into(),
        ));
    }
    let _one = w.lock.lock().await;
    let signature = w.log.append(s.epoch, &s.artifact, now_ms(), |timestamp| {
        let message = bundle::signature_message(&w.namespace, timestamp, s.epoch, &digest);
        let signature = w.signer.sign(&message).map_err(|e| e.to_string())?;
        Ok(WitnessSignature {
            version: CIPHERSUITE_PROTOBUF_ED25519,
            ciphersuite: CIPHERSUITE_PROTOBUF_ED25519,
            namespace: w.namespace.clone(),
            timestamp,
            epoch: s.epoch,
            digest: digest.to_vec(),
            signature,
            key_id: Some(bundle::plexi_key_id(&w.signer.public_key())),
            serialized_message: None,
        })
    })?;
    tracing::info!(epoch = s.epoch, digest = %hex::encode(digest), "signed epoch");
    Ok(Json(signature))
}

async fn countersign(
    State(w): State<Arc<Witness>>,
    Path(epoch): Path<u64>,
    Json(c): Json<Countersignature>,
) -> Result<Json<bkv_core::bundle::Bundle>, ApiError> {
    let _one = w.lock.lock().await;
    let entry = w.log.get(epoch)?;
    let signature = hex::decode(&c.operator_signature)
        .map_err(|_| bad_request("operator_signature is not hex"))?;
    if !bundle::ed25519_verify(
        &w.operator_key,
        &countersign_message(&entry.witness.signature),
        &signature,
    ) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "the counter-signature does not verify under the operator key".into(),
        ));
    }
    Ok(Json(w.log.countersign(epoch, &c.operator_signature)?))
}

async fn epoch(
    State(w): State<Arc<Witness>>,
    Path(epoch): Path<String>,
) -> Result<Json<bkv_core::bundle::Bundle>, ApiError> {
    let bundle = if epoch == "latest" {
        w.log
            .latest()?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "the log is empty".into()))?
    } else {
        let n: u64 = epoch
            .parse()
            .map_err(|_| bad_request("an epoch is a number or \"latest\""))?;
        w.log.get(n)?
    };
    Ok(Json(bundle))
}

/// The witness's routes.
pub fn router(witness: Arc<Witness>) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/epochs", post(submit))
        .route("/v1/epochs/{epoch}", get(epoch))
        .route("/v1/epochs/{epoch}/countersignature", post(countersign))
        .layer(DefaultBodyLimit::max(MAX_BUNDLE_BYTES))
        .with_state(witness)
}
