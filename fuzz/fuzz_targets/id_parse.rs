//! ID parsing on arbitrary text: never panics, whatever parses prints
//! canonically and parses back to the same ID, and the checked parse
//! accepts exactly the IDs whose check character is right.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tradeid::Id;

fuzz_target!(|text: &str| {
    if let Ok(id) = Id::parse(text) {
        let canonical = id.to_string();
        assert_eq!(canonical.len(), 7);
        assert_eq!(Id::parse(&canonical), Ok(id));
        assert_eq!(Id::from_wire(canonical.as_bytes()), Some(id));
        let checked = Id::parse_checked(text);
        assert_eq!(checked.is_ok(), id.has_valid_check());
        if !id.has_valid_check() {
            assert_eq!(checked, Err(tradeid::id::ParseError::CheckMismatch));
        }
    } else {
        // A text that is not an ID is never a valid checked one either.
        assert_eq!(Id::parse_checked(text).err(), Id::parse(text).err());
    }
});
