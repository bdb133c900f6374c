//! Performs one bounded step of scanning or loading an Aura graph export (the decisions are in
//! `crate::restore::aura`): streams `graph.jsonl.gz` out of R2 from the gzip member the cursor
//! names (a ranged read: the export is one member per export slice, so a step does not inflate
//! what earlier steps did), inflates it member by member (`MemberLines`, which reports where each
//! member ends), skips the lines of that member the cursor says are done, and sends the
//! statements the loader cuts, at most `max_statements` of them or for `max_time`, whichever
//! comes first.
//!
//! Memory holds one R2 chunk, one inflated buffer, one line and one chunk of statements, never
//! the file. The cursor is
//! written to Durable Object storage after every statement, so a step cut short (the isolate
//! killed, a timeout) goes on after the last statement that was answered. A statement that ran but
//! whose answer (or the cursor's write) was lost is sent again: the statements `MERGE` on the
//! load's helper property (under the import label, an index lookup; see the module doc of
//! `crate::restore::aura`), so that changes nothing. A version 2 file's rows go out in typed JSON.

use std::time::Duration;

use futures_util::StreamExt;
use worker::{Bucket, Range, Storage};

use super::net;
use crate::error::StepError;
use crate::providers::aura::query_rows;
use crate::restore::aura::{load_request, GraphLoadOrder, GraphLoader, Group, LoadCursor, MemberLines, Piece};
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
    let mut loader = GraphLoader::new(cursor, order.batch).with_helper(order.helper.clone());
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
        let req = load_request(&order.url, &order.authorization, group);
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
    // Start at the member the cursor names: the lines before it are done and not read again.
    let from = loader.read_from();
    let mut input = Input::open(bucket, order, from).await?;
    let mut lines = MemberLines::new(from, MAX_LINE);
    let mut read = 0u64;
    loop {
        match lines.next_piece()? {
            Piece::Line(line) => {
                if !feed(storage, order, loader, &line, &mut budget).await? {
                    return Ok(());
                }
            }
            Piece::MemberEnd(offset) => loader.member_end(offset),
            Piece::NeedInput => match input.next().await? {
                Some(chunk) => {
                    let before = read;
                    read += chunk.len() as u64;
                    lines.feed(chunk);
                    super::transfer::yield_now_and_then(before, read).await;
                    if !loader.cursor.loading && budget.spent() {
                        save(storage, order, &loader.cursor).await;
                        return Ok(());
                    }
                }
                None => lines.end_input(),
            },
            Piece::Done => break,
        }
    }
    if let Some(groups) = loader.end()? {
        if send_groups(storage, order, loader, &groups, &mut budget).await? {
            loader.last_chunk_done(&groups);
        }
    }
    save(storage, order, &loader.cursor).await;
    Ok(())
}

/// Bytes of an encrypted graph file a read decrypts at once.
const SEALED_READ: u64 = 1024 * 1024;

/// Where a step reads the graph file from: R2's stream of the object from an offset, or, for an
/// encrypted file, its plaintext decrypted window by window.
enum Input<'a> {
    Stream(worker::ByteStream),
    Sealed { opener: super::restore::Opener<'a>, at: u64 },
}

impl<'a> Input<'a> {
    async fn open(bucket: &'a Bucket, order: &'a GraphLoadOrder, from: u64) -> Result<Input<'a>, StepError> {
        if let Some((size, identity)) = &order.sealed {
            let opener = super::restore::Opener::new(bucket, &order.key, *size, Some(identity)).await?;
            return Ok(Self::Sealed { opener, at: from });
        }
        let mut get = bucket.get(order.key.clone());
        if from > 0 {
            get = get.range(Range::OffsetToEnd { offset: from });
        }
        let object = get
            .execute()
            .await
            .map_err(|e| StepError::transient(format!("R2 get failed: {e}")))?
            .ok_or_else(|| StepError::permanent(format!("the graph export {} is missing from R2", order.key)))?;
        let body =
            object.body().ok_or_else(|| StepError::transient(format!("R2 returned no body for {}", order.key)))?;
        Ok(Self::Stream(body.stream().map_err(|e| StepError::transient(format!("R2 read failed: {e}")))?))
    }

    /// The next bytes, `None` at the end.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, StepError> {
        match self {
            Self::Stream(stream) => match stream.next().await {
                Some(chunk) => Ok(Some(chunk.map_err(|e| StepError::transient(format!("R2 read failed: {e}")))?)),
                None => Ok(None),
            },
            Self::Sealed { opener, at } => {
                let plain = opener.read(*at, SEALED_READ).await?;
                *at += plain.len() as u64;
                Ok((!plain.is_empty()).then_some(plain))
            }
        }
    }
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
