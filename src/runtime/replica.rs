//! Executes a replica's identity probe (`crate::replica::ReplicaProbe`): the core decided the key
//! and the token and judges what the primary's binding saw; this only performs the three calls.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use worker::Bucket;

use super::objects::Objects;
use crate::error::StepError;
use crate::replica::{judge_probe, ProbeAnswer, ReplicaProbe};

/// Writes the probe through the replica's bucket (an R2 binding or an S3-compatible bucket),
/// reads it through the primary's binding, deletes it through the replica's (when both are one
/// bucket, that also removes it from the primary), and judges. A failing call is a transient
/// error (the job retries the probe with a new key), unless the replica refused it for good (a
/// wrong key pair, a missing bucket).
pub(crate) async fn probe(replica: &Objects, primary: &Bucket, probe: &ReplicaProbe) -> Result<ProbeAnswer, StepError> {
    let key = probe.key.clone();
    let body = probe.token.as_bytes().to_vec();
    let digest: [u8; 32] = Sha256::digest(&body).into();
    replica.put(&key, body, "text/plain", &HashMap::new(), digest).await?;
    let read = match primary.get(key.clone()).execute().await {
        Ok(Some(object)) => match object.body() {
            Some(body) => Some(body.bytes().await.map_err(|e| {
                StepError::transient(format!("reading the replica probe {key} through the primary failed: {e}"))
            })?),
            None => Some(Vec::new()),
        },
        Ok(None) => None,
        Err(e) => {
            return Err(StepError::transient(format!(
                "R2 get of the replica probe {key} through the primary failed: {e}"
            )))
        }
    };
    replica.delete(&key).await?;
    Ok(judge_probe(probe, read.as_deref()))
}
