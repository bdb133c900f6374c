//! Performs one bounded step of scanning or loading an Aura graph export (the decisions are in
//! `crate::restore::aura`): streams `graph.jsonl.gz` out of R2, inflates it (every gzip member),
//! skips the lines the cursor says are done, and sends the statements the loader cuts, at most
//! `max_statements` of them or for `max_time`, whichever comes first.
//!
//! Memory holds one R2 chunk, one line and one chunk of statements, never the file. The cursor is
//! written to Durable Object storage after every statement, so a step cut short (the isolate
//! killed, a timeout) goes on after the last statement that was answered. A statement that ran but
//! whose answer (or the cursor's write) was lost is sent again: the statements `MERGE` on
//! `_ferry_id`, so that changes nothing.

use std::io::Write as _;
use std::time::Duration;

use flate2::write::MultiGzDecoder;
use futures_util::StreamExt;
use worker::{Bucket, Storage};

use super::net;
use crate::error::StepError;
use crate::providers::aura::query_rows;
use crate::restore::aura::{query, GraphLoadOrder, GraphLoader, Group, LoadCursor};
use crate::restore::IoDone;

/// The longest line accepted (one node or relationship with its properties).
const MAX_LINE: usize = 32 << 20;

/// Runs one step; the cursor comes back whatever happened, with the error that stopped it.
pub(crate) async fn run(bucket: &Bucket, storage: &Storage, order: GraphLoadOrder) -> IoDone {
    let mut cursor = order.cursor.clone();
    // A step cut short may have got further than the job recorded.
    if let Ok(Some(text)) = storage.get::<String>(&order.record_key).await {
        if let Ok(saved) = serde_json::from_str::<LoadCursor>(&text) {
            if saved.ahead_of(&cursor) {
                cursor = saved;
            }
        }
    }
    let mut loader = GraphLoader::new(cursor, order.batch);
    let limit = order.max_time + Duration::from_secs(60);
    let error = match net::within(limit, step(bucket, storage, &order, &mut loader)).await {
        Some(Ok(())) => None,
        Some(Err(e)) => Some(e),
        None => Some(StepError::transient("a graph load step did not finish in time")),
    };
    if loader.cursor.finished {
        let _ = storage.delete(&order.record_key).await;
    }
    IoDone::GraphLoaded { cursor: Box::new(loader.cursor), error }
}

struct Budget {
    started: crate::time::Timestamp,
    max_time: Duration,
    statements: u32,
    max_statements: u32,
}

impl Budget {
    fn spent(&self) -> bool {
        self.statements >= self.max_statements || super::now().since(self.started) >= self.max_time
    }
}

async fn send_groups(
    storage: &Storage,
    order: &GraphLoadOrder,
    loader: &mut GraphLoader,
    groups: &[Group],
    budget: &mut Budget,
) -> Result<bool, StepError> {
    while (loader.cursor.groups_done as usize) < groups.len() {
        if budget.spent() {
            return Ok(false);
        }
        let group = &groups[loader.cursor.groups_done as usize];
        let req = query(&order.url, &order.authorization, &group.statement, serde_json::json!({ "rows": group.rows }));
        let resp = net::exchange(&req).await.map_err(|e| StepError::transient(format!("Query API: {e}")))?;
        query_rows(&resp, super::now())?;
        loader.sent();
        budget.statements += 1;
        save(storage, order, &loader.cursor).await;
    }
    Ok(true)
}

async fn save(storage: &Storage, order: &GraphLoadOrder, cursor: &LoadCursor) {
    if let Ok(text) = serde_json::to_string(cursor) {
        let _ = storage.put(&order.record_key, text).await;
    }
}

async fn step(
    bucket: &Bucket,
    storage: &Storage,
    order: &GraphLoadOrder,
    loader: &mut GraphLoader,
) -> Result<(), StepError> {
    if loader.done() {
        return Ok(());
    }
    let mut budget =
        Budget { started: super::now(), max_time: order.max_time, statements: 0, max_statements: order.max_statements };
    let object = bucket
        .get(order.key.clone())
        .execute()
        .await
        .map_err(|e| StepError::transient(format!("R2 get failed: {e}")))?
        .ok_or_else(|| StepError::permanent(format!("the graph export {} is missing from R2", order.key)))?;
    let body = object.body().ok_or_else(|| StepError::transient(format!("R2 returned no body for {}", order.key)))?;
    let mut stream = body.stream().map_err(|e| StepError::transient(format!("R2 read failed: {e}")))?;
    let mut decoder = MultiGzDecoder::new(Vec::new());
    let mut line: Vec<u8> = Vec::new();
    let mut read = 0u64;
    let inflate = |e: std::io::Error| StepError::permanent(format!("{} is not valid gzip: {e}", order.key));
    loop {
        let chunk = match stream.next().await {
            Some(chunk) => chunk.map_err(|e| StepError::transient(format!("R2 read failed: {e}")))?,
            None => {
                decoder.try_finish().map_err(inflate)?;
                Vec::new()
            }
        };
        let last = chunk.is_empty();
        let before = read;
        read += chunk.len() as u64;
        if !last {
            decoder.write_all(&chunk).map_err(inflate)?;
        }
        let out = std::mem::take(decoder.get_mut());
        let mut rest: &[u8] = &out;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            if !feed(storage, order, loader, &line, &mut budget).await? {
                return Ok(());
            }
            line.clear();
        }
        line.extend_from_slice(rest);
        if line.len() > MAX_LINE {
            return Err(StepError::permanent(format!("{} has a line over {} MiB", order.key, MAX_LINE >> 20)));
        }
        if last {
            break;
        }
        super::transfer::yield_now_and_then(before, read).await;
        if !loader.cursor.loading && budget.spent() {
            return Ok(());
        }
    }
    if !line.is_empty() && !feed(storage, order, loader, &line, &mut budget).await? {
        return Ok(());
    }
    if let Some(groups) = loader.end()? {
        if send_groups(storage, order, loader, &groups, &mut budget).await? {
            loader.last_chunk_done(&groups);
        }
    }
    save(storage, order, &loader.cursor).await;
    Ok(())
}

/// One line: `false` when the step's budget is spent (the cursor says where to go on).
async fn feed(
    storage: &Storage,
    order: &GraphLoadOrder,
    loader: &mut GraphLoader,
    line: &[u8],
    budget: &mut Budget,
) -> Result<bool, StepError> {
    let Some(groups) = loader.line(line)? else { return Ok(true) };
    if !send_groups(storage, order, loader, &groups, budget).await? {
        return Ok(false);
    }
    loader.chunk_done(&groups);
    save(storage, order, &loader.cursor).await;
    Ok(!budget.spent())
}
