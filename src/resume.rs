//! Which resume points a copy has, read off its order's source: the one place a [`CopySource`]
//! decides how its copy is saved. The rule itself, what is saved at each moment of a slice and
//! where a failed slice leaves the copy, is [`ResumePoints`] in `crate::transfer`; its tests,
//! which play it against kills after every storage call, are in `src/transfer/resume_tests.rs`.
//!
//! It is a module of its own because `job`, which defines [`CopySource`], imports `transfer`:
//! `transfer` cannot name it back without a circle. It belongs on `CopySource` itself.

use crate::job::CopySource;
use crate::transfer::ResumePoints;

/// The resume points of a copy from `source`: every settled part for bytes read from an offset
/// (a download, a replica's ranged reads of the primary object), only a slice's end for a file
/// Ferry generates page by page from a cursor (the Aura graph export, D1's query artifact).
pub fn resume_points(source: &CopySource) -> ResumePoints {
    match source {
        CopySource::Http(_) | CopySource::R2 { .. } => ResumePoints::EveryPart,
        CopySource::Graph(_) | CopySource::D1Query(_) => ResumePoints::SliceEnd,
    }
}
