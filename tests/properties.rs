//! Properties checked on generated inputs: the text form of IDs, the HTTP ↔ Cap'n Proto
//! conversion, the encoding of stored values, and `list` against a `BTreeMap` model.
//!
//! Every test prints its seed; set `DURO_SEED` to run the same cases again.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use duro::duro_capnp::{host, http_request, http_response, namespace};
use duro::id::{self, IdMinter};
use duro::storage::{Error as StorageError, Limits, ListOptions, value};
use duro::testing::{TestServer, fetch_call, run_local, state};
use duro::wire::{convert, reader_options};
use duro::{BoxError, DurableObject, Error, Request, Response, Server, Storage};
use futures::future::join_all;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde::{Deserialize, Serialize};

/// The seed of this run: `DURO_SEED` if set, else a fresh one; printed either way.
fn seed() -> u64 {
    let seed = std::env::var("DURO_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| getrandom::u64().expect("the OS random number generator"));
    println!("seed {seed} (set DURO_SEED={seed} to repeat)");
    seed
}

/// Runs `cases` cases of `strategy` through `test`, from the printed seed. Failures are
/// shrunk and reported with the seed; nothing is written to the source tree.
fn check<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed()),
        failure_persistence: None,
        ..Config::default()
    };
    if let Err(e) = TestRunner::new(config).run(&strategy, test) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// IDs

fn secret() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

/// The hex digit of `value` in either case.
fn hex_digit(value: u8, upper: bool) -> u8 {
    let digit = b"0123456789abcdef"[value as usize];
    if upper {
        digit.to_ascii_uppercase()
    } else {
        digit
    }
}

#[test]
fn id_text_round_trips_in_either_case() {
    let strategy = (secret(), ".{0,20}", ".{0,40}", any::<bool>());
    check(256, strategy, |(secret, namespace, name, unique)| {
        let minter = IdMinter::new(&namespace, &secret);
        let id = if unique {
            minter.new_unique()
        } else {
            minter.from_name(&name)
        };
        let hex = id.to_hex();
        prop_assert_eq!(hex.len(), 64);
        prop_assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        prop_assert_eq!(*minter.parse(&hex).unwrap().bytes(), *id.bytes());
        let upper = minter.parse(&hex.to_uppercase()).unwrap();
        prop_assert_eq!(upper.bytes(), id.bytes());
        prop_assert_eq!(id::from_hex(&hex).unwrap(), *id.bytes());
        prop_assert!(minter.check(id.bytes(), None).is_ok());
        if !unique {
            prop_assert_eq!(minter.check(id.bytes(), Some(&name)).unwrap(), id);
        }
        Ok(())
    });
}

#[test]
fn an_altered_digit_is_refused() {
    // A digit replaced by another value (in either case), anywhere in the text.
    let strategy = (secret(), ".{0,20}", 0..64usize, 1..16u8, any::<bool>());
    check(1024, strategy, |(secret, name, position, delta, upper)| {
        let minter = IdMinter::new("ns", &secret);
        let mut digits = minter.from_name(&name).to_hex().into_bytes();
        let old = (digits[position] as char).to_digit(16).unwrap() as u8;
        digits[position] = hex_digit((old + delta) % 16, upper);
        let altered = String::from_utf8(digits).unwrap();
        prop_assert_eq!(
            minter.parse(&altered),
            Err(id::Error::NotMinted("ns".into()))
        );
        Ok(())
    });
}

#[test]
fn hex_that_was_not_minted_is_refused() {
    check(1024, (secret(), any::<[u8; 32]>()), |(secret, bytes)| {
        let minter = IdMinter::new("ns", &secret);
        let text = id::to_hex(&bytes);
        prop_assert_eq!(id::from_hex(&text).unwrap(), bytes);
        prop_assert_eq!(minter.parse(&text), Err(id::Error::NotMinted("ns".into())));
        prop_assert!(minter.check(&bytes, None).is_err());
        Ok(())
    });
}

#[test]
fn ids_of_one_namespace_are_refused_by_another() {
    // Namespaces differ by their secret (each gets a random one in its data dir).
    let strategy = (secret(), secret(), ".{0,20}", any::<bool>());
    check(512, strategy, |(a, b, name, unique)| {
        prop_assume!(a != b);
        let (ours, theirs) = (IdMinter::new("a", &a), IdMinter::new("b", &b));
        let id = if unique {
            ours.new_unique()
        } else {
            ours.from_name(&name)
        };
        prop_assert_eq!(
            theirs.parse(&id.to_hex()),
            Err(id::Error::NotMinted("b".into()))
        );
        // Not even with the name: the name is checked after the MAC.
        prop_assert!(theirs.check(id.bytes(), Some(&name)).is_err());
        Ok(())
    });
}

#[test]
fn any_text_but_64_hex_digits_is_refused_by_its_rule() {
    let strategy = (secret(), prop_oneof![".{0,80}", "[0-9a-fA-F]{60,68}"]);
    check(2048, strategy, |(secret, text)| {
        let minter = IdMinter::new("ns", &secret);
        let result = minter.parse(&text);
        let well_formed = text.len() == 64 && text.bytes().all(|c| c.is_ascii_hexdigit());
        match result {
            Ok(_) => prop_assert!(false, "{text:?} was accepted"),
            Err(id::Error::NotMinted(_)) => prop_assert!(well_formed),
            Err(id::Error::TextLength(n)) => prop_assert!(n != 64 || text.len() != 64),
            Err(id::Error::NotHex(c, i)) => {
                prop_assert!(!well_formed);
                prop_assert_eq!(text.as_bytes()[i] as char, c);
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
        Ok(())
    });
}

/// A small deterministic generator for the bulk test below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: any seed, zero included, gives a good stream.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Hex of `bytes`, each digit in a random case.
fn random_case_hex(rng: &mut Rng, bytes: &[u8]) -> String {
    let hex = id::to_hex(bytes);
    hex.chars()
        .map(|c| {
            if rng.below(2) == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

/// `count` IDs that were not minted: half random, half minted ones with 1 to 4 bits flipped;
/// and every `CONTROL_EVERY`th one a real minted ID, which must be accepted.
fn candidate_ids(rng: &mut Rng, minted: &[[u8; 32]], count: usize) -> Vec<(String, bool)> {
    (0..count)
        .map(|i| {
            let mut bytes = minted[i % minted.len()];
            if i % CONTROL_EVERY == 0 {
                return (random_case_hex(rng, &bytes), true);
            }
            if rng.below(2) == 0 {
                bytes.iter_mut().for_each(|b| *b = rng.next() as u8);
            } else {
                let flips = 1 + rng.below(4) as usize;
                let mut bits = std::collections::BTreeSet::new();
                while bits.len() < flips {
                    bits.insert(rng.below(256));
                }
                for bit in bits {
                    bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
                }
            }
            (random_case_hex(rng, &bytes), false)
        })
        .collect()
}

/// How often the bulk test slips in a genuine ID, so that a refusal of everything fails it.
const CONTROL_EVERY: usize = 997;
/// IDs checked in the bulk test through the namespace's own checks (what `idFromString` and
/// `get` run).
const BULK_IDS: usize = 100_000;
/// More IDs, checked as calls through the in-process capability (the same servers as on the
/// wire, without the socket).
const BULK_IDS_IN_PROCESS: usize = 10_000;
/// Of the first, checked as calls over a real connection: about 2,500 calls a second in a
/// debug build.
const BULK_IDS_OVER_THE_WIRE: usize = 2_000;
/// Calls in flight at once: well under `CONNECTION_CALLS_MAX`.
const BULK_WINDOW: usize = 1_000;

fn namespace_of(host: &host::Client, name: &str) -> namespace::Client {
    let mut call = host.namespace_request();
    call.get().set_name(name);
    call.send().pipeline.get_namespace()
}

async fn mint(ns: &namespace::Client, count: usize) -> Vec<[u8; 32]> {
    let calls = (0..count).map(|_| ns.new_unique_id_request().send().promise);
    join_all(calls)
        .await
        .into_iter()
        .map(|reply| {
            let reply = reply.unwrap();
            let bytes = reply.get().unwrap().get_id().unwrap().get_bytes().unwrap();
            bytes.try_into().unwrap()
        })
        .collect()
}

/// Sends `idFromString(text)` and `get(from_hex(text)).fetch` for one candidate; whether each
/// was accepted, as (idFromString, fetch).
async fn try_id(ns: &namespace::Client, text: &str) -> (Result<(), Error>, Result<(), Error>) {
    let mut parse = ns.id_from_string_request();
    parse.get().set_id(text);
    let parse = parse.send().promise;
    let mut get = ns.get_request();
    get.get()
        .init_id()
        .set_bytes(&id::from_hex(text).expect("64 hex digits"));
    let stub = get.send().pipeline.get_stub();
    let fetch = fetch_call(&stub, &duro::testing::request("GET", "/", b"")).promise;
    let (parsed, fetched) = futures::join!(parse, fetch);
    (
        parsed.map(drop).map_err(Error::from),
        fetched.map(drop).map_err(Error::from),
    )
}

/// Checks every candidate on `host` (over the wire or in-process), `BULK_WINDOW` at a time.
async fn check_candidates(host: &host::Client, candidates: &[(String, bool)], via: &str) {
    let echo = namespace_of(host, "echo");
    for window in candidates.chunks(BULK_WINDOW) {
        let results = join_all(window.iter().map(|(text, _)| try_id(&echo, text))).await;
        for ((text, genuine), (parsed, fetched)) in window.iter().zip(results) {
            if *genuine {
                assert!(parsed.is_ok() && fetched.is_ok(), "{via}: {text} refused");
                continue;
            }
            for (call, result) in [("idFromString", parsed), ("get", fetched)] {
                match result {
                    Err(Error::InvalidArgument(message)) if message.contains("not minted") => {}
                    other => panic!("{via}: {call}({text}) gave {other:?}"),
                }
            }
        }
    }
}

/// Checks every candidate with the namespace's own API: `id_from_string`, and `check_id`, which
/// `get` runs on the bytes it is sent.
fn check_candidates_directly(ns: &duro::Namespace, candidates: &[(String, bool)]) {
    for (text, genuine) in candidates {
        let bytes = id::from_hex(text).unwrap();
        let (parsed, checked) = (ns.id_from_string(text), ns.check_id(&bytes, None));
        if *genuine {
            assert!(parsed.is_ok() && checked.is_ok(), "{text} refused");
            continue;
        }
        for result in [parsed, checked] {
            match result {
                Err(Error::InvalidArgument(message)) if message.contains("not minted") => {}
                other => panic!("{text} gave {other:?}"),
            }
        }
    }
}

/// 100,000 random or bit-flipped IDs are refused by the namespace's checks; a share of them
/// also as `idFromString` and `get` (with a `fetch` pipelined on it) calls, in-process and over
/// a real connection; IDs of another namespace too. Genuine IDs slipped in between are
/// accepted, so a check that refused everything would fail.
#[test]
fn random_and_bit_flipped_ids_are_refused_in_process_and_over_the_wire() {
    let mut rng = Rng(seed());
    let server = TestServer::start(duro::builtin::register(Server::builder()));
    let (minted, candidates) = run_local(async {
        let host = server.connect().await;
        let echo = namespace_of(&host, "echo");
        let minted = mint(&echo, 64).await;
        let candidates = candidate_ids(&mut rng, &minted, BULK_IDS);
        let wire = &candidates[..BULK_IDS_OVER_THE_WIRE];
        check_candidates(&host, wire, "over the wire").await;
        // IDs of another namespace, genuine there, are refused here.
        let counter = namespace_of(&host, "counter");
        let foreign = mint(&counter, 64).await;
        let foreign: Vec<(String, bool)> = foreign
            .iter()
            .map(|bytes| (random_case_hex(&mut rng, bytes), false))
            .collect();
        check_candidates(&host, &foreign, "another namespace").await;
        (minted, candidates)
    });
    // The same data dir, so the same secrets: what was minted on the wire is genuine here.
    let dir = server.stop();
    run_local(async {
        let local = duro::builtin::register(Server::builder()).data_dir(dir.path());
        let local = local.open_host().unwrap();
        check_candidates_directly(&local.namespace("echo").unwrap(), &candidates);
        let more = candidate_ids(&mut rng, &minted, BULK_IDS_IN_PROCESS);
        check_candidates(
            &duro::rpc::bootstrap(&local, &Default::default()),
            &more,
            "in-process",
        )
        .await;
        local.shutdown().await;
    });
}

// ---------------------------------------------------------------------------------------------
// HTTP ↔ Cap'n Proto

fn method() -> impl Strategy<Value = http::Method> {
    let standard = prop::sample::select(vec![
        http::Method::GET,
        http::Method::POST,
        http::Method::PUT,
        http::Method::DELETE,
        http::Method::PATCH,
        http::Method::HEAD,
        http::Method::OPTIONS,
        http::Method::CONNECT,
        http::Method::TRACE,
    ]);
    let extension = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}"
        .prop_map(|m| http::Method::from_bytes(m.as_bytes()).expect("a token is a method"));
    prop_oneof![3 => standard, 1 => extension]
}

/// A path with an optional query, as `http::Uri` accepts them (no fragment: it is not sent),
/// with or without a scheme and authority.
fn url() -> impl Strategy<Value = http::Uri> {
    // What `http` takes unescaped (its `PATH_MAP` and `QUERY_MAP`), and non-ASCII text.
    let path = r#"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%"{}|^\[\]\\é€😀]{0,40}"#;
    let query = prop::option::of(r#"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%{}|^`\[\]\\é😀]{0,40}"#);
    let origin = prop::option::of(prop::sample::select(vec![
        "http://example.com",
        "https://a.b:8443",
        "http://[::1]:80",
    ]));
    (origin, path, query).prop_map(|(origin, path, query)| {
        let mut url = format!("{}{path}", origin.unwrap_or(""));
        if let Some(query) = query {
            url.push('?');
            url.push_str(&query);
        }
        url.parse()
            .unwrap_or_else(|e| panic!("the generator made an invalid URL {url:?}: {e}"))
    })
}

/// Headers with repeated names, values of any text a header value may hold.
fn headers() -> impl Strategy<Value = Vec<(http::HeaderName, http::HeaderValue)>> {
    let name = prop_oneof![
        prop::sample::select(vec!["x-a", "X-A", "set-cookie", "content-type", "accept"])
            .prop_map(str::to_owned),
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}",
    ]
    .prop_map(|n| http::HeaderName::from_bytes(n.as_bytes()).expect("a token is a name"));
    let value = "[\t\\x20-\\x7eé€😀]{0,40}"
        .prop_map(|v| http::HeaderValue::from_str(&v).expect("visible text is a value"));
    prop::collection::vec((name, value), 0..12)
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2048)
}

/// Writes `root` into a message, frames it as on the wire, and reads it back with the
/// server's reader options.
fn through_the_wire(message: &capnp::message::Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    let mut framed = Vec::new();
    capnp::serialize::write_message(&mut framed, message).unwrap();
    framed
}

#[test]
fn requests_round_trip_through_capnp() {
    let strategy = (method(), url(), headers(), body());
    check(512, strategy, |(method, url, headers, body)| {
        let mut request = Request::new(Bytes::from(body));
        *request.method_mut() = method;
        *request.uri_mut() = url;
        for (name, value) in headers {
            request.headers_mut().append(name, value);
        }
        let mut message = capnp::message::Builder::new_default();
        convert::request_to_capnp(&request, message.init_root());
        let framed = through_the_wire(&message);
        let read = capnp::serialize::read_message(&mut &framed[..], reader_options()).unwrap();
        let back = convert::request_from_capnp(read.get_root::<http_request::Reader>().unwrap())
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(back.method(), request.method());
        prop_assert_eq!(back.uri(), request.uri());
        prop_assert_eq!(back.uri().to_string(), request.uri().to_string());
        prop_assert_eq!(back.headers(), request.headers());
        prop_assert_eq!(back.body(), request.body());
        Ok(())
    });
}

#[test]
fn responses_round_trip_through_capnp() {
    let strategy = (100..1000u16, headers(), body());
    check(512, strategy, |(status, headers, body)| {
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        for (name, value) in headers {
            response.headers_mut().append(name, value);
        }
        let mut message = capnp::message::Builder::new_default();
        convert::response_to_capnp(&response, message.init_root());
        let framed = through_the_wire(&message);
        let read = capnp::serialize::read_message(&mut &framed[..], reader_options()).unwrap();
        let reader = read.get_root::<http_response::Reader>().unwrap();
        let reason = response.status().canonical_reason().unwrap_or("");
        prop_assert_eq!(reader.get_status_text().unwrap().to_str().unwrap(), reason);
        let back = convert::response_from_capnp(reader)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(back.status(), response.status());
        prop_assert_eq!(back.headers(), response.headers());
        prop_assert_eq!(back.body(), response.body());
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Stored values

/// Bytes that serialize as a byte string (not a list of integers).
#[derive(Clone, Debug, PartialEq)]
struct ByteString(Vec<u8>);

impl Serialize for ByteString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, bytes: &[u8]) -> Result<ByteString, E> {
                Ok(ByteString(bytes.to_vec()))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// A nested value of every kind serde knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Tree {
    Unit,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Wide(i128),
    Float(f64),
    Single(f32),
    Char(char),
    Text(String),
    Bytes(ByteString),
    Maybe(Option<Box<Tree>>),
    List(Vec<Tree>),
    Map(BTreeMap<String, Tree>),
    Keyed(BTreeMap<i32, Tree>),
    Record {
        name: String,
        tags: Vec<String>,
        score: Option<f64>,
    },
}

fn float() -> impl Strategy<Value = f64> {
    use proptest::num::f64::*;
    // Every float but NaN, which is not equal to itself.
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO | INFINITE
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        Just(Tree::Unit),
        any::<bool>().prop_map(Tree::Bool),
        any::<i64>().prop_map(Tree::Int),
        any::<u64>().prop_map(Tree::Uint),
        any::<i128>().prop_map(Tree::Wide),
        float().prop_map(Tree::Float),
        float().prop_map(|f| Tree::Single(f as f32)),
        any::<char>().prop_map(Tree::Char),
        ".{0,20}".prop_map(Tree::Text),
        body().prop_map(|b| Tree::Bytes(ByteString(b))),
        (
            ".{0,8}",
            prop::collection::vec(".{0,8}", 0..4),
            prop::option::of(float())
        )
            .prop_map(|(name, tags, score)| Tree::Record { name, tags, score }),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            prop::option::of(inner.clone().prop_map(Box::new)).prop_map(Tree::Maybe),
            prop::collection::vec(inner.clone(), 0..8).prop_map(Tree::List),
            prop::collection::btree_map(".{0,8}", inner.clone(), 0..8).prop_map(Tree::Map),
            prop::collection::btree_map(any::<i32>(), inner, 0..8).prop_map(Tree::Keyed),
        ]
    })
}

#[test]
fn typed_values_round_trip() {
    check(1024, tree(), |tree| {
        let encoded = value::encode(&tree).unwrap();
        prop_assert_eq!(encoded[0], value::TAG_CBOR);
        let back: Tree = value::decode(&encoded).unwrap();
        prop_assert_eq!(&back, &tree);
        // Bit for bit: -0.0 stays -0.0, and encoding is deterministic.
        prop_assert_eq!(value::encode(&back).unwrap(), encoded.clone());
        prop_assert!(matches!(
            value::decode_raw(&encoded),
            Err(StorageError::Decode(_))
        ));
        Ok(())
    });
}

#[test]
fn raw_values_round_trip_and_do_not_pass_for_typed_ones() {
    check(1024, body(), |raw| {
        let encoded = value::encode_raw(&raw);
        prop_assert_eq!(encoded[0], value::TAG_RAW);
        prop_assert_eq!(value::payload_len(&encoded), raw.len());
        prop_assert_eq!(value::decode_raw(&encoded).unwrap(), Bytes::from(raw));
        prop_assert!(matches!(
            value::decode::<Tree>(&encoded),
            Err(StorageError::Decode(_))
        ));
        Ok(())
    });
}

#[test]
fn decoding_any_stored_bytes_fails_cleanly_or_succeeds() {
    check(2048, body(), |stored| {
        let stored = Bytes::from(stored);
        let typed = value::decode::<Tree>(&stored);
        let raw = value::decode_raw(&stored);
        match stored.first() {
            Some(&value::TAG_RAW) => prop_assert_eq!(raw.unwrap(), stored.slice(1..)),
            Some(&value::TAG_CBOR) => prop_assert!(raw.is_err()),
            _ => {
                prop_assert!(matches!(typed, Err(StorageError::Corrupt(_))));
                prop_assert!(matches!(raw, Err(StorageError::Corrupt(_))));
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// `list` against a model

/// A class with no behaviour of its own: it binds the namespace whose object's storage the
/// model tests drive directly, through `duro::testing::state`.
struct Probe;

impl DurableObject for Probe {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        Ok(Response::new("probe".into()))
    }
}

/// Opens a host on `dir` and returns it with the storage of the one probe object.
fn open_probe(dir: &std::path::Path, limits: &Limits) -> (duro::Host, Storage) {
    let host = Server::builder()
        .class("probe", |_state, _env| Probe)
        .namespace("probe", "probe")
        .storage_limits(limits.clone())
        .data_dir(dir)
        .open_host()
        .unwrap();
    let storage = state(&host, "probe", "model").unwrap().storage().clone();
    (host, storage)
}

/// A value as stored: raw bytes or a typed value.
#[derive(Clone, Debug)]
enum Val {
    Raw(Vec<u8>),
    Typed(u32),
}

impl Val {
    fn encoded(&self) -> Bytes {
        match self {
            Val::Raw(bytes) => value::encode_raw(bytes),
            Val::Typed(n) => value::encode(n).unwrap(),
        }
    }
}

#[derive(Clone, Debug)]
enum TxnOp {
    Put(Vec<u8>, Val),
    Delete(Vec<u8>),
    List(ListOptions),
}

/// How a transaction body ends.
#[derive(Clone, Copy, Debug)]
enum TxnEnd {
    Commit,
    /// `rollback()`, then `Ok`.
    Rollback,
    /// The body returns an error.
    Fail,
}

#[derive(Clone, Debug)]
enum Step {
    Put(Vec<u8>, Val),
    PutMany(Vec<(Vec<u8>, u32)>),
    Delete(Vec<u8>),
    DeleteMany(Vec<Vec<u8>>),
    DeleteAll,
    Txn(Vec<TxnOp>, TxnEnd),
    Sync,
    /// Sync, shut the host down, and open it again on the same data dir.
    Restart,
}

/// Keys over a small alphabet with 0x00 and 0xff, some behind long shared prefixes (longer
/// than LMDB's 511-byte key limit once the object's prefix is added, and not).
fn key() -> impl Strategy<Value = Vec<u8>> {
    let atom = prop::sample::select(vec![0x00u8, 0x01, b'a', b'b', 0xfe, 0xff]);
    let tail = prop::collection::vec(atom, 0..4);
    let long = |fill: u8, len: usize, end: &[u8]| [vec![fill; len], end.to_vec()].concat();
    let prefix = prop_oneof![
        6 => Just(Vec::new()),
        1 => Just(long(b'L', 420, b"")),
        1 => Just(long(b'L', 420, &[0xff; 8])),
        1 => Just(long(b'L', 419, &[0x00])),
        1 => Just(long(0xff, 600, b"")),
        1 => Just(long(b'a', 1500, b"b")),
    ];
    (prefix, tail).prop_map(|(prefix, tail)| [prefix, tail].concat())
}

fn val() -> impl Strategy<Value = Val> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Val::Raw),
        any::<u32>().prop_map(Val::Typed),
    ]
}

fn list_options() -> impl Strategy<Value = ListOptions> {
    let bound = || prop::option::weighted(0.35, key());
    // Prefixes of keys, so that they match some.
    let prefix = (key(), 0..6usize).prop_map(|(k, cut)| k[..k.len().saturating_sub(cut)].to_vec());
    (
        (bound(), bound(), bound()),
        prop::option::weighted(0.3, prefix),
        any::<bool>(),
        prop::option::weighted(0.5, 0..12usize),
    )
        .prop_map(
            |((start, start_after, end), prefix, reverse, limit)| ListOptions {
                start,
                start_after,
                end,
                prefix,
                reverse,
                limit,
            },
        )
}

fn txn_op() -> impl Strategy<Value = TxnOp> {
    prop_oneof![
        3 => (key(), val()).prop_map(|(k, v)| TxnOp::Put(k, v)),
        2 => key().prop_map(TxnOp::Delete),
        2 => list_options().prop_map(TxnOp::List),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let end = prop::sample::select(vec![TxnEnd::Commit, TxnEnd::Rollback, TxnEnd::Fail]);
    prop_oneof![
        8 => (key(), val()).prop_map(|(k, v)| Step::Put(k, v)),
        2 => prop::collection::vec((key(), any::<u32>()), 1..6).prop_map(Step::PutMany),
        4 => key().prop_map(Step::Delete),
        1 => prop::collection::vec(key(), 1..6).prop_map(Step::DeleteMany),
        1 => Just(Step::DeleteAll),
        3 => (prop::collection::vec(txn_op(), 0..8), end).prop_map(|(ops, end)| Step::Txn(ops, end)),
        1 => Just(Step::Sync),
        1 => Just(Step::Restart),
    ]
}

type Model = BTreeMap<Vec<u8>, Bytes>;

/// What `list` must answer under `options`, from the model.
fn expected_list(model: &Model, options: &ListOptions) -> Result<Vec<(Vec<u8>, Bytes)>, ()> {
    if options.start.is_some() && options.start_after.is_some() || options.limit == Some(0) {
        return Err(());
    }
    let lower = match (&options.start, &options.start_after) {
        (Some(key), _) => Bound::Included(key.clone()),
        (_, Some(key)) => Bound::Excluded(key.clone()),
        _ => Bound::Unbounded,
    };
    let in_range = |key: &Vec<u8>| {
        let above = match &lower {
            Bound::Included(b) => key >= b,
            Bound::Excluded(b) => key > b,
            Bound::Unbounded => true,
        };
        let below = options.end.as_ref().is_none_or(|end| key < end);
        let prefixed = options.prefix.as_ref().is_none_or(|p| key.starts_with(p));
        above && below && prefixed
    };
    let mut entries: Vec<(Vec<u8>, Bytes)> = model
        .iter()
        .filter(|(key, _)| in_range(key))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if options.reverse {
        entries.reverse();
    }
    entries.truncate(options.limit.unwrap_or(usize::MAX));
    Ok(entries)
}

fn check_list(
    got: Result<Vec<(Vec<u8>, Bytes)>, StorageError>,
    model: &Model,
    options: &ListOptions,
) -> Result<(), TestCaseError> {
    match (got, expected_list(model, options)) {
        (Ok(got), Ok(expected)) => prop_assert_eq!(got, expected, "list {:?}", options),
        (Err(StorageError::InvalidList(_)), Err(())) => {}
        (got, expected) => prop_assert!(
            false,
            "list {:?}: got {:?}, expected {:?}",
            options,
            got.map(|e| e.len()),
            expected.map(|e| e.len())
        ),
    }
    Ok(())
}

/// Why a generated transaction body stopped.
#[derive(Debug)]
enum BodyError {
    Storage(StorageError),
    Abort,
}

impl From<StorageError> for BodyError {
    fn from(error: StorageError) -> BodyError {
        BodyError::Storage(error)
    }
}

/// Runs `ops` in one transaction, checking its reads against `view` (the model with the
/// transaction's own writes); returns the view, to be applied if the transaction commits.
async fn run_txn(s: &Storage, model: &Model, ops: &[TxnOp], end: TxnEnd) -> Option<Model> {
    let result = s
        .transaction(|txn| async move {
            let mut view = model.clone();
            for op in ops {
                match op {
                    TxnOp::Put(key, Val::Raw(bytes)) => txn.put_bytes(key, bytes).await?,
                    TxnOp::Put(key, Val::Typed(n)) => txn.put(key, n).await?,
                    TxnOp::Delete(key) => {
                        assert_eq!(txn.delete(key).await?, view.contains_key(key));
                    }
                    TxnOp::List(options) => {
                        check_list(txn.list_encoded(options), &view, options).unwrap();
                    }
                }
                if let TxnOp::Put(key, value) = op {
                    view.insert(key.clone(), value.encoded());
                }
                if let TxnOp::Delete(key) = op {
                    view.remove(key);
                }
            }
            match end {
                TxnEnd::Commit => Ok(Some(view)),
                TxnEnd::Rollback => {
                    txn.rollback();
                    Ok(None)
                }
                TxnEnd::Fail => Err(BodyError::Abort),
            }
        })
        .await;
    match (result, end) {
        (Ok(view), _) => view,
        (Err(BodyError::Abort), TxnEnd::Fail) => None,
        (Err(BodyError::Storage(error)), _) => panic!("transaction failed: {error}"),
        (Err(BodyError::Abort), end) => panic!("a transaction to {end:?} aborted"),
    }
}

/// Applies one step (not a restart) to the storage and the model.
async fn apply(s: &Storage, model: &mut Model, step: &Step) -> Result<(), TestCaseError> {
    match step {
        Step::Put(key, value) => {
            match value {
                Val::Raw(bytes) => s.put_bytes(key, bytes).await.unwrap(),
                Val::Typed(n) => s.put(key, n).await.unwrap(),
            }
            model.insert(key.clone(), value.encoded());
        }
        Step::PutMany(entries) => {
            s.put_many(entries).await.unwrap();
            for (key, n) in entries {
                model.insert(key.clone(), value::encode(n).unwrap());
            }
        }
        Step::Delete(key) => {
            prop_assert_eq!(s.delete(key).await.unwrap(), model.remove(key).is_some());
        }
        Step::DeleteMany(keys) => {
            let existed = keys
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .iter()
                .filter(|key| model.remove(**key).is_some())
                .count();
            prop_assert_eq!(s.delete_many(keys).await.unwrap(), existed);
        }
        Step::DeleteAll => {
            s.delete_all().await.unwrap();
            model.clear();
        }
        Step::Txn(ops, end) => {
            if let Some(view) = run_txn(s, model, ops, *end).await {
                *model = view;
            }
        }
        Step::Sync => s.sync().await.unwrap(),
        Step::Restart => unreachable!("restarts are handled by the caller"),
    }
    Ok(())
}

/// Point reads of every key the step touched, through the typed and raw getters.
async fn check_reads(s: &Storage, model: &Model, step: &Step) -> Result<(), TestCaseError> {
    let keys: Vec<&Vec<u8>> = match step {
        Step::Put(key, _) | Step::Delete(key) => vec![key],
        Step::PutMany(entries) => entries.iter().map(|(k, _)| k).collect(),
        Step::DeleteMany(keys) => keys.iter().collect(),
        Step::Txn(ops, _) => ops
            .iter()
            .filter_map(|op| match op {
                TxnOp::Put(key, _) | TxnOp::Delete(key) => Some(key),
                TxnOp::List(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    for key in keys {
        let expected = model.get(key);
        let got = match expected.map(|v| v[0]) {
            Some(value::TAG_CBOR) => s
                .get::<u32>(key)
                .await
                .unwrap()
                .map(|n| value::encode(&n).unwrap()),
            _ => s
                .get_bytes(key)
                .await
                .unwrap()
                .map(|b| value::encode_raw(&b)),
        };
        prop_assert_eq!(got.as_ref(), expected, "get {:?}", key);
    }
    Ok(())
}

/// Runs `steps` (each with a list to check after it) on one data dir, opening the host again
/// at every restart and once more at the end; at every opening, every list made so far is
/// checked again, so what was synced is what the model holds.
fn run_model(steps: &[(Step, ListOptions)], cache_bytes_max: usize) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        cache_bytes_max,
        ..Limits::default()
    };
    let mut model = Model::new();
    let mut lists: Vec<ListOptions> = vec![ListOptions::default()];
    let segments = steps.split(|(step, _)| matches!(step, Step::Restart));
    let last: &[(Step, ListOptions)] = &[];
    for segment in segments.chain([last]) {
        run_local(async {
            let (host, s) = open_probe(dir.path(), &limits);
            for options in &lists {
                check_list(s.list_encoded(options), &model, options)?;
            }
            for (step, options) in segment {
                apply(&s, &mut model, step).await?;
                check_reads(&s, &model, step).await?;
                check_list(s.list_encoded(options), &model, options)?;
                lists.push(options.clone());
            }
            s.sync().await.unwrap();
            host.shutdown().await;
            Ok::<_, TestCaseError>(())
        })?;
    }
    Ok(())
}

/// Random puts, deletes, delete_alls, transactions (committed, rolled back, failed), syncs and
/// restarts; after every step, a random `list` and the point reads are checked against a
/// `BTreeMap`; after a restart, every list made so far is checked again. A small cache makes
/// entries come from the cache, from LMDB, and from both merged.
#[test]
fn list_matches_a_model_through_transactions_and_restarts() {
    let steps = prop::collection::vec((step(), list_options()), 1..40);
    let cache = prop::sample::select(vec![2048usize, 8 << 20]);
    check(160, (steps, cache), |(steps, cache)| {
        run_model(&steps, cache)
    });
}
