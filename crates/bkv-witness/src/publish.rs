//! The operator's side: have the witness sign the next epoch, counter-sign it, and
//! return the bundle the vault serves.

use crate::client::{WitnessClient, WitnessError};
use crate::server::{Countersignature, Submission};
use crate::signer::{Signer, SignerError};
use bkv_core::bundle::{
    artifact_digest, countersign_message, submit_message, Artifact, Bundle, BundleKeys,
};

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The witness failed or refused.
    #[error(transparent)]
    Witness(#[from] WitnessError),
    /// The operator's key failed.
    #[error(transparent)]
    Signer(#[from] SignerError),
    /// The witness answered a signature that does not verify: it is not the witness we
    /// think, or it is broken. Nothing is counter-signed.
    #[error("the witness's signature does not check out: {0}")]
    BadWitness(String),
}

/// What [`publish`] did.
#[derive(Debug)]
pub struct Published {
    /// The bundle, counter-signed.
    pub bundle: Bundle,
    /// False when the artifact equalled the latest epoch's and nothing new was signed.
    pub new_epoch: bool,
}

/// Publishes `artifact` as the next epoch, unless it equals the latest one (then the
/// latest bundle is returned, counter-signed if it was not yet).
pub async fn publish(
    witness: &WitnessClient,
    witness_key: &[u8; 32],
    operator: &Signer,
    artifact: &Artifact,
) -> Result<Published, PublishError> {
    let info = witness.info().await?;
    let text = artifact.to_json();
    let latest = if info.latest_epoch > 0 {
        Some(witness.epoch(info.latest_epoch).await?)
    } else {
        None
    };
    let keys = BundleKeys {
        witness: *witness_key,
        operator: operator.public_key(),
    };
    let (epoch, signature, new_epoch) = match latest {
        Some(latest) if latest.artifact == text => {
            (latest.witness.epoch, latest.witness.clone(), false)
        }
        _ => {
            let epoch = info.latest_epoch + 1;
            let digest = artifact_digest(&text);
            let request = operator.sign(&submit_message(&artifact.namespace, epoch, &digest))?;
            let signature = witness
                .submit(&Submission {
                    epoch,
                    artifact: text.clone(),
                    operator_request_signature: hex::encode(request),
                })
                .await?;
            (epoch, signature, true)
        }
    };
    let countersignature = operator.sign(&countersign_message(&signature.signature))?;
    let bundle = Bundle {
        artifact: text,
        witness: signature,
        operator_signature: Some(hex::encode(&countersignature)),
    };
    // Check the whole bundle as a client will before anyone serves it.
    bundle
        .verify(&keys)
        .map_err(|e| PublishError::BadWitness(e.to_string()))?;
    if bundle.witness.epoch != epoch {
        return Err(PublishError::BadWitness(format!(
            "asked for epoch {epoch}, signed {}",
            bundle.witness.epoch
        )));
    }
    witness
        .countersign(
            epoch,
            &Countersignature {
                operator_signature: hex::encode(&countersignature),
            },
        )
        .await?;
    Ok(Published { bundle, new_epoch })
}
