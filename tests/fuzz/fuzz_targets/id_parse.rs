//! Object IDs from any text or bytes: `from_hex`, `IdMinter::parse` and `IdMinter::check` must
//! refuse what is not a well-formed ID minted by the namespace, and never panic.
#![no_main]

use duro::id::{self, IdMinter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let minter = IdMinter::new("ns", &[7; 32]);
    // Bytes as `get` receives them, with and without a name.
    let _ = minter.check(data, None);
    let name = String::from_utf8_lossy(data);
    let _ = minter.check(&data[..data.len().min(id::ID_BYTES)], Some(&name));
    let lossy = minter.parse(&name);
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(lossy.is_err(), "{name:?} was accepted");
        return;
    };
    let well_formed = text.len() == id::ID_HEX_LEN && text.bytes().all(|c| c.is_ascii_hexdigit());
    match id::from_hex(text) {
        Ok(bytes) => {
            assert!(well_formed, "{text:?} decoded");
            assert_eq!(id::to_hex(&bytes), text.to_ascii_lowercase());
        }
        Err(_) => assert!(!well_formed, "{text:?} refused"),
    }
    if let Ok(parsed) = minter.parse(text) {
        assert!(well_formed);
        assert_eq!(parsed.to_hex(), text.to_ascii_lowercase());
        assert!(minter.check(parsed.bytes(), None).is_ok());
    }
    // The ID of this text as a name parses back, and only with the same name.
    let by_name = minter.from_name(text);
    assert_eq!(
        minter.parse(&by_name.to_hex()).unwrap().bytes(),
        by_name.bytes()
    );
    assert!(minter.check(by_name.bytes(), Some(text)).is_ok());
    let mut altered = *by_name.bytes();
    altered[data.len() % id::ID_BYTES] ^= 1 << (data.len() % 8);
    assert!(minter.check(&altered, None).is_err());
});
