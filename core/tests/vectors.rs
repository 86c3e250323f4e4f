//! The shared parse vectors (`tests/vectors/ids.json`, read by the Python
//! client's tests too) checked against the Rust codec, so the two cannot
//! drift apart.
//!
//! The file's top-level objects are *modes* (ways an ID is written:
//! `"plain"`, and `"check"` for spaces with a check character); its other top-level fields (`description`, `version`,
//! `alphabet`) describe the file. Every mode in the file must have a parser
//! in [`MODES`]: a mode added to the file without one fails here, so no
//! section can go unchecked by Rust. Schema: clients/python/README.md.

use std::path::PathBuf;

use serde_json::{json, Map, Value};
use tradeid::id::{ParseError, ALPHABET};
use tradeid::Id;

/// A mode's Rust parser: the canonical form, or the reject as the file
/// writes it (`reason` and its fields, without `input` and `note`).
type Parser = fn(&str) -> Result<String, Value>;

/// Every mode the Rust codec parses, by its name in the file.
const MODES: &[(&str, Parser)] = &[("plain", plain), ("check", check)];

fn plain(text: &str) -> Result<String, Value> {
    Id::parse(text).map(|id| id.to_string()).map_err(|e| reject(&e))
}

fn check(text: &str) -> Result<String, Value> {
    Id::parse_checked(text).map(|id| id.to_string()).map_err(|e| reject(&e))
}

/// A parse error as the vectors file writes it.
fn reject(error: &ParseError) -> Value {
    match *error {
        ParseError::InvalidChar { ch, position } => {
            json!({ "reason": "invalid_char", "char": ch.to_string(), "position": position })
        }
        ParseError::Length { digits } => json!({ "reason": "length", "digits": digits }),
        ParseError::CheckMismatch => json!({ "reason": "check_mismatch" }),
    }
}

fn vectors() -> Map<String, Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/ids.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    match serde_json::from_str(&text) {
        Ok(Value::Object(doc)) => doc,
        other => panic!("{} is not a JSON object: {other:?}", path.display()),
    }
}

/// The mode sections: every top-level value that is an object.
fn modes(doc: &Map<String, Value>) -> Vec<(&str, &Map<String, Value>)> {
    doc.iter().filter_map(|(name, section)| Some((name.as_str(), section.as_object()?))).collect()
}

/// Every case of `kind` (`"valid"` or `"invalid"`) of every mode in
/// [`MODES`], with the mode's name and parser.
fn cases<'a>(doc: &'a Map<String, Value>, kind: &str) -> Vec<(&'static str, Parser, &'a Value)> {
    let mut all = Vec::new();
    for &(name, parse) in MODES {
        let section = doc.get(name).and_then(Value::as_object).unwrap_or_else(|| panic!("no mode {name:?}"));
        let list = section.get(kind).and_then(Value::as_array);
        let list = list.unwrap_or_else(|| panic!("mode {name:?} has no {kind:?} array"));
        all.extend(list.iter().map(|case| (name, parse, case)));
    }
    all
}

fn text<'a>(case: &'a Value, field: &str) -> &'a str {
    case.get(field).and_then(Value::as_str).unwrap_or_else(|| panic!("{case} has no string {field:?}"))
}

#[test]
fn the_file_describes_this_codec() {
    let doc = vectors();
    assert_eq!(doc.get("version"), Some(&json!(1)), "a new version means the fields changed meaning");
    assert_eq!(doc.get("alphabet").and_then(Value::as_str).map(str::as_bytes), Some(&ALPHABET[..]));
}

#[test]
fn every_mode_in_the_file_has_a_rust_parser() {
    let doc = vectors();
    let found: Vec<&str> = modes(&doc).into_iter().map(|(name, _)| name).collect();
    assert!(found.contains(&"plain"), "no plain section in {found:?}");
    for name in &found {
        assert!(
            MODES.iter().any(|(mode, _)| mode == name),
            "tests/vectors/ids.json has a mode {name:?} that no Rust parser checks: add it to MODES in {}",
            file!()
        );
    }
}

#[test]
fn valid_inputs_parse_to_their_canonical_form() {
    let doc = vectors();
    let valid = cases(&doc, "valid");
    for &(name, parse, case) in &valid {
        let (input, canonical) = (text(case, "input"), text(case, "canonical"));
        assert_eq!(parse(input), Ok(canonical.to_owned()), "mode {name}, input {input:?}");
        // The canonical form is a fixed point.
        assert_eq!(parse(canonical), Ok(canonical.to_owned()), "mode {name}, canonical {canonical:?}");
    }
    assert!(valid.len() >= 20, "only {} valid cases", valid.len());
}

#[test]
fn invalid_inputs_are_rejected_for_their_reason() {
    let doc = vectors();
    let invalid = cases(&doc, "invalid");
    for &(name, parse, case) in &invalid {
        let input = text(case, "input");
        let mut expected = case.as_object().expect("a case is an object").clone();
        expected.remove("input");
        expected.remove("note");
        assert_eq!(parse(input), Err(Value::Object(expected)), "mode {name}, input {input:?}");
    }
    assert!(invalid.len() >= 20, "only {} invalid cases", invalid.len());
}
