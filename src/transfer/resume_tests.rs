//! The copy's one persistence rule ([`ResumePoints`]), played on a copy in miniature: the state
//! the runtime holds, the records waiting to be written, and storage, which a kill may cut off
//! after any call. Every state storage holds must be a resume point (parts, hash state and, for a
//! generated file, cursor and tail agree), and a copy resumed from it must end with every byte
//! stored exactly once.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::job::CopySource;

const JOB: &str = "j1";
/// Bytes in every part but the last.
const PART: u64 = 10;
/// Bytes of the file every copy here makes.
const SIZE: u64 = 95;
/// Bytes one page of a generated file adds (pages do not line up with parts).
const PAGE: u64 = 7;

fn http() -> CopySource {
    CopySource::Http(HttpRequest::get("https://files.example/db.gz"))
}

fn replica() -> CopySource {
    CopySource::R2 { key: "src/f/db.gz".into(), size: SIZE }
}

fn graph() -> CopySource {
    let config = crate::config::Config::from_value(&json!([{
        "name": "graph", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
        "client_id_secret": "AURA_ID", "client_secret_secret": "AURA_SECRET", "db_password_secret": "NEO_PW",
        "api_base": "http://127.0.0.1:9", "query_api_base": "http://127.0.0.1:9",
    }]))
    .unwrap();
    let mut creds = crate::providers::Credentials::new();
    creds.insert("NEO_PW", crate::secret::Secret::new("pw"));
    let provider = &config.sources[0].provider;
    let state = crate::providers::ProviderState::new(provider);
    let export = state.graph_export(provider, &creds, Timestamp::from_secs(0)).unwrap();
    CopySource::Graph(Box::new(export))
}

fn d1_query() -> CopySource {
    use crate::providers::d1::query::{QueryExport, QueryPlan};
    let export = QueryExport::new("http://d1/query".into(), "Bearer t".into(), &QueryPlan::default(), 100);
    CopySource::D1Query(Box::new(export))
}

/// The hash state after `offset` bytes (a stand-in: the rule only carries it along).
fn hash_at(offset: u64) -> String {
    if offset == 0 {
        fresh_hash_state()
    } else {
        format!("sha256 state after {offset} bytes")
    }
}

/// Bytes a generated file's cursor says were produced (0 before its first slice ended).
fn produced(state: &CopyState) -> u64 {
    state.cursor.as_ref().map_or(0, |c| c["at"].as_u64().unwrap())
}

fn tail_len(state: &CopyState) -> u64 {
    state.tail.as_ref().map_or(0, |(_, len)| *len)
}

/// A Durable Object's storage as a copy's writes leave it. Once `kill_after` calls have landed
/// the runtime is killed: that call and every later one are lost.
#[derive(Debug, Clone)]
struct Storage {
    entries: BTreeMap<String, String>,
    calls: usize,
    kill_after: Option<usize>,
    generated: bool,
}

impl Storage {
    /// Runs the calls of one write in order; false when the runtime was killed on the way.
    fn put(&mut self, batches: Vec<Vec<(String, String)>>) -> bool {
        for batch in batches {
            assert!(batch.len() <= STORAGE_KEYS_PER_CALL, "{} keys in one storage call", batch.len());
            if self.kill_after.is_some_and(|k| self.calls >= k) {
                return false;
            }
            self.entries.extend(batch);
            self.calls += 1;
            self.check_resumes();
        }
        true
    }

    /// The copy's state in the job's stored record.
    fn state(&self) -> CopyState {
        serde_json::from_str(&self.entries["job"]).unwrap()
    }

    /// The part records a completion reads back: under the state's prefix, as many as it counts
    /// (records past the count are leftovers).
    fn records(&self, state: &CopyState) -> Vec<PartRecord> {
        let prefix = state.part_prefix(JOB);
        self.entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .take(state.parts_stored as usize)
            .map(|(_, v)| serde_json::from_str(v).unwrap())
            .collect()
    }

    /// Panics unless the stored state is a resume point.
    fn check_resumes(&self) {
        let state = self.state();
        state.check_parts(&self.records(&state)).expect("every part the stored state counts has its record");
        assert_eq!(state.hash_state, hash_at(state.offset), "the stored hash state is the stored offset's");
        if let Some(id) = &state.upload_id {
            assert!(self.entries.contains_key(&format!("upload:{id}")), "the sweep knows the upload {id}");
        }
        if self.generated {
            assert_eq!(
                produced(&state),
                state.offset + tail_len(&state),
                "the stored cursor agrees with parts and tail"
            );
        } else {
            assert!(state.cursor.is_none() && state.tail.is_none());
        }
    }
}

/// How a slice of the model ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Paused,
    Finished,
    Failed,
    Killed,
}

/// A copy of a [`SIZE`]-byte file as the runtime drives it, saving what the rule says.
#[derive(Clone)]
struct Model {
    points: ResumePoints,
    state: CopyState,
    /// Records not written yet (parts settled, an upload created).
    waiting: Vec<(String, String)>,
    storage: Storage,
    /// Every answer of the rule, in order.
    saves: Vec<(Moment, Save)>,
    /// Parts a slice stores at most (a download) or pages it reads (a generated file).
    slice_budget: u64,
    /// A part whose upload fails, once.
    failing_part: Option<u16>,
}

impl Model {
    fn new(source: &CopySource) -> Self {
        let points = resume_points(source);
        let state = CopyState::new("src/f/db.gz".into(), 0, Timestamp::from_secs(0));
        let generated = points == ResumePoints::SliceEnd;
        let storage = Storage { entries: BTreeMap::new(), calls: 0, kill_after: None, generated };
        let mut copy = Self {
            points,
            state,
            waiting: Vec::new(),
            storage,
            saves: Vec::new(),
            slice_budget: 3,
            failing_part: None,
        };
        // The job is stored with the copy's first state when it orders the first slice.
        copy.storage.put(vec![vec![("job".into(), serde_json::to_string(&copy.state).unwrap())]]);
        copy.storage.calls = 0;
        copy
    }

    /// The same copy after a kill: the runtime starts again from what storage holds.
    fn resumed(&self) -> Self {
        let mut storage = self.storage.clone();
        storage.kill_after = None;
        let state = storage.state();
        Self {
            points: self.points,
            state,
            waiting: Vec::new(),
            storage,
            saves: Vec::new(),
            slice_budget: self.slice_budget,
            failing_part: None,
        }
    }

    /// Asks the rule what to write at `moment` and writes it; false when killed.
    fn at(&mut self, moment: Moment) -> bool {
        let save = self.points.save_at(moment);
        self.saves.push((moment, save));
        let job = match save {
            Save::Nothing => return true,
            Save::Records => None,
            Save::RecordsAndState => Some(("job".to_string(), serde_json::to_string(&self.state).unwrap())),
        };
        let records = std::mem::take(&mut self.waiting);
        self.storage.put(progress_batches(records, job))
    }

    fn reach(&mut self, moment: Moment) -> Result<(), End> {
        if self.at(moment) {
            Ok(())
        } else {
            Err(End::Killed)
        }
    }

    /// Sends the next part and settles it, creating the upload first if there is none.
    fn send(&mut self, size: u64) -> Result<(), End> {
        if self.state.upload_id.is_none() {
            let id = format!("u{}", self.state.restarts);
            self.waiting.push((format!("upload:{id}"), "{}".into()));
            self.state.upload_id = Some(id);
            self.reach(Moment::UploadCreated)?;
        }
        assert_eq!(
            self.storage.state().upload_id,
            self.state.upload_id,
            "the upload id is stored before a part is sent"
        );
        let number = self.state.next_part_number() as u16;
        if self.failing_part == Some(number) {
            self.failing_part = None;
            return Err(End::Failed);
        }
        let record = PartRecord { number, etag: format!("e{number}"), size, sha256: format!("p{number}") };
        self.waiting.push((self.state.part_key(JOB, number), serde_json::to_string(&record).unwrap()));
        self.state.record_part(&record, hash_at(self.state.offset + size));
        self.reach(Moment::PartSettled)
    }

    /// Completes the upload from the stored part records.
    fn complete(&mut self) -> Result<End, End> {
        let records = self.storage.records(&self.state);
        self.state.check_parts(&records).expect("completing finds every part's record");
        assert_eq!(self.state.offset, SIZE, "every byte stored exactly once");
        Ok(End::Finished)
    }

    fn download(&mut self) -> Result<End, End> {
        let mut parts = 0;
        while self.state.offset < SIZE {
            if parts == self.slice_budget {
                self.reach(Moment::SlicePaused)?;
                return Ok(End::Paused);
            }
            self.send(PART.min(SIZE - self.state.offset))?;
            parts += 1;
        }
        self.reach(Moment::FileFinished)?;
        self.complete()
    }

    fn generate(&mut self) -> Result<End, End> {
        // The tail parked by the last slice is read back first.
        let mut made = produced(&self.state);
        let mut filled = tail_len(&self.state);
        let mut pages = 0;
        while made < SIZE {
            if pages == self.slice_budget {
                self.state.cursor = Some(json!({ "at": made }));
                self.state.tail = (filled > 0).then(|| (format!("src/f/db.gz.tail-{made}"), filled));
                self.reach(Moment::SlicePaused)?;
                return Ok(End::Paused);
            }
            let page = PAGE.min(SIZE - made);
            made += page;
            filled += page;
            pages += 1;
            while filled >= PART {
                self.send(PART)?;
                filled -= PART;
            }
        }
        if filled > 0 {
            self.send(filled)?;
        }
        self.reach(Moment::FileFinished)?;
        self.complete()
    }

    /// One slice, then what the job stores of its outcome.
    fn slice(&mut self) -> End {
        let at_start = self.state.clone();
        let run = match self.points {
            ResumePoints::EveryPart => self.download(),
            ResumePoints::SliceEnd => self.generate(),
        };
        let end = match run {
            Ok(end) => end,
            Err(End::Failed) => {
                // The model settles every part as it is sent: none is in flight here.
                if !self.at(Moment::SliceFailed) {
                    return End::Killed;
                }
                self.waiting.clear();
                self.state = self.points.after_failure(at_start, self.state.clone());
                End::Failed
            }
            Err(end) => return end,
        };
        // The job keeps the state the slice reports, and is stored with it.
        if end != End::Finished
            && !self.storage.put(vec![vec![("job".into(), serde_json::to_string(&self.state).unwrap())]])
        {
            return End::Killed;
        }
        end
    }

    /// Slices until the file is finished or the runtime is killed.
    fn run(&mut self) -> End {
        for _ in 0..100 {
            match self.slice() {
                End::Paused | End::Failed => continue,
                end => return end,
            }
        }
        panic!("the copy never finished");
    }
}

#[test]
fn the_resume_points_are_a_property_of_the_source() {
    assert_eq!(resume_points(&http()), ResumePoints::EveryPart);
    assert_eq!(resume_points(&replica()), ResumePoints::EveryPart);
    assert_eq!(resume_points(&graph()), ResumePoints::SliceEnd);
    assert_eq!(resume_points(&d1_query()), ResumePoints::SliceEnd);
}

#[test]
fn a_download_is_saved_after_every_part() {
    for source in [http(), replica()] {
        let mut copy = Model::new(&source);
        assert_eq!(copy.slice(), End::Paused);
        let saves: Vec<Save> = copy.saves.iter().map(|(_, s)| *s).collect();
        let each_part = Save::RecordsAndState;
        assert_eq!(saves, vec![each_part, each_part, each_part, each_part, Save::Nothing], "{source:?}");
        // A slice killed anywhere resumes at the last stored part.
        for kill_after in 1..=4 {
            let mut killed = Model::new(&source);
            killed.storage.kill_after = Some(kill_after);
            assert_eq!(killed.slice(), End::Killed);
            assert_eq!(killed.storage.state().parts_stored, kill_after as u32 - 1, "{source:?}");
            assert_eq!(killed.resumed().run(), End::Finished);
        }
    }
}

#[test]
fn a_generated_file_saves_its_state_only_at_a_slice_end() {
    for source in [graph(), d1_query()] {
        let mut copy = Model::new(&source);
        assert_eq!(copy.slice(), End::Paused);
        let moments: Vec<(Moment, Save)> = copy.saves.clone();
        assert_eq!(
            moments,
            vec![
                (Moment::UploadCreated, Save::RecordsAndState),
                (Moment::PartSettled, Save::Nothing),
                (Moment::PartSettled, Save::Nothing),
                (Moment::SlicePaused, Save::RecordsAndState),
            ]
        );
        let stored = copy.storage.state();
        assert_eq!((stored.parts_stored, stored.offset, produced(&stored), tail_len(&stored)), (2, 20, 21, 1));
        assert_eq!(stored, copy.state);
        // Killed before the slice's end: the slice's start (with its upload) is what resumes.
        let mut killed = Model::new(&source);
        killed.storage.kill_after = Some(1);
        assert_eq!(killed.slice(), End::Killed);
        let stored = killed.storage.state();
        assert_eq!((stored.parts_stored, stored.cursor.clone(), stored.upload_id.as_deref()), (0, None, Some("u0")));
        assert_eq!(killed.resumed().run(), End::Finished);
    }
}

#[test]
fn a_finished_generated_file_saves_its_part_records_but_not_its_cursor() {
    assert_eq!(ResumePoints::SliceEnd.save_at(Moment::FileFinished), Save::Records);
    for source in [graph(), d1_query()] {
        let mut copy = Model::new(&source);
        copy.slice_budget = 100;
        assert_eq!(copy.slice(), End::Finished);
        assert_eq!(copy.saves.last(), Some(&(Moment::FileFinished, Save::Records)));
        let stored = copy.storage.state();
        assert_eq!((stored.parts_stored, stored.cursor.clone()), (0, None), "still the slice's start");
        let records = copy.storage.entries.keys().filter(|k| k.starts_with(&job_parts_prefix(JOB))).count();
        assert_eq!(records, 10, "the completion reads every part's record back");
        // Killed before the upload is completed: the slice runs again from its start, over the
        // same part numbers and record keys.
        assert_eq!(copy.resumed().run(), End::Finished);
    }
}

#[test]
fn the_upload_id_is_saved_before_any_part_is_sent() {
    for source in [http(), replica(), graph(), d1_query()] {
        let points = resume_points(&source);
        assert_eq!(points.save_at(Moment::UploadCreated), Save::RecordsAndState, "{points:?}");
        let mut killed = Model::new(&source);
        killed.storage.kill_after = Some(1);
        assert_eq!(killed.slice(), End::Killed);
        let stored = killed.storage.state();
        assert_eq!((stored.upload_id.as_deref(), stored.parts_stored), (Some("u0"), 0));
        assert!(killed.storage.entries.contains_key("upload:u0"), "with the sweep's record of it");
    }
}

#[test]
fn a_failed_generated_slice_resumes_from_the_slice_start_with_its_upload() {
    let mut at_start = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
    at_start.cursor = Some(json!({ "at": 21 }));
    at_start.tail = Some(("k.tail-1".into(), 1));
    let mut now = at_start.clone();
    now.upload_id = Some("u0".into());
    now.record_part(&PartRecord { number: 1, etag: "e".into(), size: 10, sha256: String::new() }, hash_at(10));
    let after = ResumePoints::SliceEnd.after_failure(at_start.clone(), now);
    assert_eq!(after, CopyState { upload_id: Some("u0".into()), ..at_start });
    assert!(!ResumePoints::SliceEnd.settles_parts_after_failure());
    assert_eq!(ResumePoints::SliceEnd.save_at(Moment::SliceFailed), Save::Nothing);
    for source in [graph(), d1_query()] {
        let mut copy = Model::new(&source);
        assert_eq!(copy.slice(), End::Paused);
        let paused = copy.state.clone();
        copy.failing_part = Some(4);
        assert_eq!(copy.slice(), End::Failed);
        assert_eq!(copy.state, paused, "the slice's start, its upload kept");
        assert_eq!(copy.storage.state(), paused);
        assert_eq!(copy.run(), End::Finished, "the same part numbers are sent again");
    }
}

#[test]
fn a_failed_download_keeps_every_part_r2_confirmed() {
    let at_start = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
    let mut now = at_start.clone();
    now.upload_id = Some("u0".into());
    now.record_part(&PartRecord { number: 1, etag: "e".into(), size: 10, sha256: String::new() }, hash_at(10));
    assert_eq!(ResumePoints::EveryPart.after_failure(at_start, now.clone()), now);
    assert!(ResumePoints::EveryPart.settles_parts_after_failure());
    assert_eq!(ResumePoints::EveryPart.save_at(Moment::SliceFailed), Save::RecordsAndState);
    for source in [http(), replica()] {
        let mut copy = Model::new(&source);
        copy.failing_part = Some(3);
        assert_eq!(copy.slice(), End::Failed);
        assert_eq!((copy.state.parts_stored, copy.storage.state().parts_stored), (2, 2));
        assert_eq!(copy.run(), End::Finished);
    }
}

#[test]
fn a_restart_is_saved_at_once_from_byte_zero() {
    for source in [http(), graph()] {
        let points = resume_points(&source);
        assert_eq!(points.save_at(Moment::Restarted), Save::RecordsAndState, "{points:?}");
    }
    let mut copy = Model::new(&http());
    assert_eq!(copy.slice(), End::Paused);
    copy.waiting.clear();
    assert_eq!(copy.state.restart("the source object changed".into()), Some("u0".into()));
    assert!(copy.at(Moment::Restarted));
    let stored = copy.storage.state();
    assert_eq!((stored.offset, stored.parts_stored, stored.restarts, stored.upload_id), (0, 0, 1, None));
    assert_eq!(copy.run(), End::Finished);
    assert_eq!(copy.storage.state().upload_id.as_deref(), Some("u1"), "a new upload, saved before its parts");
}

#[test]
fn a_kill_after_any_storage_call_resumes_to_the_whole_file() {
    for source in [http(), replica(), graph(), d1_query()] {
        for failing_part in [None, Some(2), Some(7)] {
            let mut whole = Model::new(&source);
            whole.failing_part = failing_part;
            assert_eq!(whole.run(), End::Finished);
            for kill_after in 0..whole.storage.calls {
                let mut killed = Model::new(&source);
                killed.failing_part = failing_part;
                killed.storage.kill_after = Some(kill_after);
                assert_eq!(killed.run(), End::Killed);
                assert_eq!(killed.resumed().run(), End::Finished, "{source:?}, killed after {kill_after} calls");
            }
        }
    }
}

#[test]
fn a_long_generated_slice_writes_its_records_in_calls_of_at_most_128_keys_with_the_state_last() {
    const PARTS: u16 = 300;
    let mut copy = Model::new(&graph());
    // Played by hand: 300 parts do not fit SIZE.
    copy.state.upload_id = Some("u0".into());
    copy.waiting.push(("upload:u0".into(), "{}".into()));
    assert!(copy.at(Moment::UploadCreated));
    for number in 1..=PARTS {
        let record = PartRecord { number, etag: "e".into(), size: PART, sha256: String::new() };
        copy.waiting.push((copy.state.part_key(JOB, number), serde_json::to_string(&record).unwrap()));
        copy.state.record_part(&record, hash_at(copy.state.offset + PART));
        assert!(copy.at(Moment::PartSettled));
    }
    copy.state.cursor = Some(json!({ "at": u64::from(PARTS) * PART }));
    let (start, calls) = (copy.storage.state(), copy.storage.calls);
    let mut killed = copy.clone();
    killed.storage.kill_after = Some(calls + 2);
    assert!(!killed.at(Moment::SlicePaused), "killed before the write's last call");
    assert_eq!(killed.storage.state(), start, "the stored state stays the slice's start until the last call");
    assert!(copy.at(Moment::SlicePaused));
    assert_eq!(copy.storage.calls, calls + 3, "300 records and the job: 128 + 128 + 45 keys");
    assert_eq!(copy.storage.state(), copy.state);
}

fn resume_points(source: &CopySource) -> ResumePoints {
    source.resume_points()
}
