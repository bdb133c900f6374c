//! Executes a replica's identity probe (`crate::replica::ReplicaProbe`): the core decided the key
//! and the token and judges what the primary's binding saw; this only performs the three calls.

use worker::{Bucket, Data};

use crate::error::StepError;
use crate::replica::{judge_probe, ProbeAnswer, ReplicaProbe};

/// Writes the probe through the replica's binding, reads it through the primary's, deletes it
/// through the replica's (when both are one bucket, that also removes it from the primary), and
/// judges. A failing call is a transient error: the job retries the probe with a new key.
pub(crate) async fn probe(replica: &Bucket, primary: &Bucket, probe: &ReplicaProbe) -> Result<ProbeAnswer, StepError> {
    let key = probe.key.clone();
    replica
        .put(key.clone(), Data::Bytes(probe.token.as_bytes().to_vec()))
        .execute()
        .await
        .map_err(|e| StepError::transient(format!("R2 put of the replica probe {key} failed: {e}")))?;
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
    replica
        .delete(key.clone())
        .await
        .map_err(|e| StepError::transient(format!("R2 delete of the replica probe {key} failed: {e}")))?;
    Ok(judge_probe(probe, read.as_deref()))
}
