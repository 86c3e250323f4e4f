//! ID parsing on arbitrary text: never panics, and whatever parses prints
//! canonically and parses back to the same ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tradeid::Id;

fuzz_target!(|text: &str| {
    if let Ok(id) = Id::parse(text) {
        let canonical = id.to_string();
        assert_eq!(canonical.len(), 7);
        assert_eq!(Id::parse(&canonical), Ok(id));
        assert_eq!(Id::from_wire(canonical.as_bytes()), Some(id));
    }
});
