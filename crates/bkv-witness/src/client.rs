//! Talking to a witness over HTTP: what the operator and the auditor use.

use crate::server::{Countersignature, Info, Submission};
use bkv_core::bundle::{Bundle, WitnessSignature, MAX_BUNDLE_BYTES};
use std::time::Duration;

/// Why a call to the witness failed.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The witness could not be reached.
    #[error("witness unreachable at {url}: {reason}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Why.
        reason: String,
    },
    /// The witness refused (its status and reason).
    #[error("the witness refused ({status}): {reason}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its `error` text.
        reason: String,
    },
    /// The witness answered something that does not parse.
    #[error("the witness answered nonsense: {0}")]
    Malformed(String),
}

/// A witness's base URL, e.g. `http://127.0.0.1:7456`.
#[derive(Clone, Debug)]
pub struct WitnessClient {
    base: String,
    http: reqwest::Client,
}

impl WitnessClient {
    /// A client for the witness at `base`.
    pub fn new(base: &str) -> Result<Self, WitnessError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| WitnessError::Unreachable {
                url: base.into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, WitnessError> {
        let response = request
            .send()
            .await
            .map_err(|e| WitnessError::Unreachable {
                url: url.into(),
                reason: e.to_string(),
            })?;
        let status = response.status();
        // Read at most a bundle's worth: a hostile witness cannot exhaust our memory.
        let too_large = || WitnessError::Malformed("answer too large".into());
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BUNDLE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| WitnessError::Unreachable {
                url: url.into(),
                reason: e.to_string(),
            })?
        {
            if body.len() + chunk.len() > MAX_BUNDLE_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let reason = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(WitnessError::Refused {
                status: status.as_u16(),
                reason,
            });
        }
        serde_json::from_slice(&body).map_err(|e| WitnessError::Malformed(e.to_string()))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The witness's namespace, keys and latest epoch.
    pub async fn info(&self) -> Result<Info, WitnessError> {
        let url = self.url("/v1/info");
        self.call(self.http.get(&url), &url).await
    }

    /// Asks the witness to sign `submission`.
    pub async fn submit(&self, submission: &Submission) -> Result<WitnessSignature, WitnessError> {
        let url = self.url("/v1/epochs");
        self.call(self.http.post(&url).json(submission), &url).await
    }

    /// Hands the operator's counter-signature of `epoch` to the witness's log.
    pub async fn countersign(
        &self,
        epoch: u64,
        countersignature: &Countersignature,
    ) -> Result<Bundle, WitnessError> {
        let url = self.url(&format!("/v1/epochs/{epoch}/countersignature"));
        self.call(self.http.post(&url).json(countersignature), &url)
            .await
    }

    /// The bundle of `epoch`.
    pub async fn epoch(&self, epoch: u64) -> Result<Bundle, WitnessError> {
        let url = self.url(&format!("/v1/epochs/{epoch}"));
        self.call(self.http.get(&url), &url).await
    }
}
