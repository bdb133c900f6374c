//! Order-independent digests of a graph's typed values, per label and per relationship type.
//!
//! A drill that compares only counts passes a backup whose values changed type (a date turned
//! into a string) or value. So the export records, next to its counts, one digest per label and
//! per relationship type of every element's typed properties (the Query API's typed JSON, exactly
//! as the file holds them), and one per property name; a drill reads the loaded database back
//! page by page in typed JSON, computes the same digests and names every label, type and
//! property whose digest differs.
//!
//! A digest is the sum (mod 2^128) of the first 16 bytes of SHA-256 over each element's canonical
//! text, so it does not depend on the order elements are read in (export pages, drill pages and
//! ids differ), is bounded in size whatever the graph, and is folded in one element at a time.
//! Element ids are left out (a restore gives new ones); a node's text holds its sorted labels, so
//! a node that moved between labels changes both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// The digests of one label's nodes or one type's relationships.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Over every element: its labels or type and all its typed properties (hex, 32 digits).
    pub elements: String,
    /// Per property name, over the elements that have it: the name and its typed value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

/// The digests of a graph: per label and per relationship type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueDigests {
    /// Per label, over its nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, Digest>,
    /// Per relationship type, over its relationships.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub types: BTreeMap<String, Digest>,
}

fn hash(parts: &[&str]) -> u128 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let out = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out[..16]);
    u128::from_be_bytes(first)
}

/// Adds `value` to the hex sum `sum` (a sum that is not hex counts as zero: it then differs).
fn add(sum: &mut String, value: u128) {
    let current = u128::from_str_radix(sum, 16).unwrap_or(0);
    *sum = format!("{:032x}", current.wrapping_add(value));
}

fn fold(digest: &mut Digest, kind: &str, names: &str, props: &Map<String, Value>) {
    let all = Value::Object(props.clone()).to_string();
    add(&mut digest.elements, hash(&[kind, names, &all]));
    for (name, value) in props {
        add(digest.properties.entry(name.clone()).or_default(), hash(&[name, &value.to_string()]));
    }
}

impl ValueDigests {
    /// Folds in one node: its labels and typed properties (`{"name": {"$type", "_value"}}`).
    pub fn add_node(&mut self, labels: &[String], props: &Map<String, Value>) {
        let mut sorted: Vec<&str> = labels.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let names = sorted.join("\n");
        for label in sorted {
            fold(self.labels.entry(label.to_string()).or_default(), "node", &names, props);
        }
    }

    /// Folds in one relationship: its type and typed properties.
    pub fn add_relationship(&mut self, rel_type: &str, props: &Map<String, Value>) {
        fold(self.types.entry(rel_type.to_string()).or_default(), "relationship", rel_type, props);
    }

    /// What differs between the backup's digests (`self`) and the restored graph's, one finding
    /// per label or type, naming the properties whose values differ (at most `max_properties`
    /// each). Empty when they are equal.
    pub fn differences(&self, restored: &ValueDigests, max_properties: usize) -> Vec<String> {
        let mut found = Vec::new();
        for (what, expected, got) in [("label", &self.labels, &restored.labels), ("type", &self.types, &restored.types)]
        {
            let empty = Digest::default();
            let names: std::collections::BTreeSet<&String> = expected.keys().chain(got.keys()).collect();
            for name in names {
                let (want, have) = (expected.get(name).unwrap_or(&empty), got.get(name).unwrap_or(&empty));
                if want == have {
                    continue;
                }
                let props: std::collections::BTreeSet<&String> =
                    want.properties.keys().chain(have.properties.keys()).collect();
                let differing: Vec<String> = props
                    .into_iter()
                    .filter(|p| want.properties.get(*p) != have.properties.get(*p))
                    .map(|p| format!("{p:?}"))
                    .collect();
                let which = match differing.len() {
                    0 => String::new(),
                    n if n > max_properties => {
                        format!(
                            " (properties {}, and {} more)",
                            differing[..max_properties].join(", "),
                            n - max_properties
                        )
                    }
                    1 => format!(" (property {})", differing[0]),
                    _ => format!(" (properties {})", differing.join(", ")),
                };
                let elements = if what == "label" { "nodes" } else { "relationships" };
                found.push(format!(
                    "{what} {name:?}: the restored {elements}' values or types differ from the backup's{which}"
                ));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn date(s: &str) -> Value {
        json!({"$type": "Date", "_value": s})
    }

    fn text(s: &str) -> Value {
        json!({"$type": "String", "_value": s})
    }

    fn graph(order: &[usize], born: Value) -> ValueDigests {
        let nodes = [
            (vec!["Person".to_string()], props(json!({"name": text("Ada"), "born": born}))),
            (vec!["Person".to_string(), "Admin".to_string()], props(json!({"name": text("Bo")}))),
            (vec!["Company".to_string()], props(json!({"name": text("Acme"), "since": date("1999-01-01")}))),
        ];
        let mut d = ValueDigests::default();
        for &i in order {
            d.add_node(&nodes[i].0, &nodes[i].1);
        }
        d.add_relationship("WORKS_AT", &props(json!({"since": date("2020-02-02")})));
        d
    }

    #[test]
    fn digests_do_not_depend_on_the_order_elements_are_read_in() {
        assert_eq!(graph(&[0, 1, 2], date("1815-12-10")), graph(&[2, 0, 1], date("1815-12-10")));
        let d = graph(&[0, 1, 2], date("1815-12-10"));
        assert_eq!(d.labels.keys().collect::<Vec<_>>(), ["Admin", "Company", "Person"]);
        assert_eq!(d.labels["Person"].elements.len(), 32);
        assert!(d.differences(&graph(&[1, 2, 0], date("1815-12-10")), 5).is_empty());
    }

    #[test]
    fn a_date_turned_into_a_string_names_its_label_and_property() {
        let backup = graph(&[0, 1, 2], date("1815-12-10"));
        let restored = graph(&[0, 1, 2], text("1815-12-10"));
        assert_eq!(
            backup.differences(&restored, 5),
            ["label \"Person\": the restored nodes' values or types differ from the backup's (property \"born\")"]
        );
        let other_value = graph(&[0, 1, 2], date("1815-12-11"));
        assert_eq!(backup.differences(&other_value, 5).len(), 1, "a value that changed is found too");
    }

    #[test]
    fn values_swapped_between_nodes_missing_types_and_long_lists_are_found() {
        let mut a = ValueDigests::default();
        a.add_node(&["P".into()], &props(json!({"x": text("1"), "y": text("2")})));
        a.add_node(&["P".into()], &props(json!({"x": text("3"), "y": text("4")})));
        let mut b = ValueDigests::default();
        b.add_node(&["P".into()], &props(json!({"x": text("1"), "y": text("4")})));
        b.add_node(&["P".into()], &props(json!({"x": text("3"), "y": text("2")})));
        let found = a.differences(&b, 5);
        assert_eq!(found.len(), 1, "per-property sums agree, the per-node one does not: {found:?}");
        assert!(found[0].starts_with("label \"P\"") && !found[0].contains("property"), "{found:?}");
        let mut typed = ValueDigests::default();
        typed.add_relationship("R", &Map::new());
        assert_eq!(typed.differences(&ValueDigests::default(), 5).len(), 1, "a type gone is found");
        let mut wide = ValueDigests::default();
        wide.add_node(&["W".into()], &props(json!({"a": text("1"), "b": text("1"), "c": text("1")})));
        let found = wide.differences(&ValueDigests::default(), 2);
        assert!(found[0].ends_with("(properties \"a\", \"b\", and 1 more)"), "{found:?}");
    }
}
