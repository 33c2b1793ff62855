//! What the fuzz targets share: a walk over every field of a Cap'n Proto message, an in-process
//! host opened once per process, and the input format of `kv_request`.

use std::cell::RefCell;
use std::future::Future;
use std::path::PathBuf;

use capnp::dynamic_value;
use duro::duro_capnp::{durable_object, header, host, http_request, http_response, namespace};
use duro::wire::convert;

/// Deepest nesting the walk follows. The reader options already bound nesting at 64.
const WALK_DEPTH_MAX: u32 = 96;
/// Values one message's walk reads at most. The traversal limit lets a message make the reader
/// visit a million words (a list of zero-sized elements costs one word each); reading them
/// all, under each of the readings below, would spend the fuzzer's time on one input instead
/// of finding more. The conversions (`request_from_capnp`...) are not bounded: they are what
/// the server runs.
const WALK_VALUES_MAX: usize = 1024;

/// Reads a message's root as everything the server may find there: an RPC message, and
/// duro's own structs. Returns how many values were read (so nothing is optimised away).
pub fn walk_message<S: capnp::message::ReaderSegments>(
    message: &capnp::message::Reader<S>,
) -> usize {
    let mut walk = Walk {
        left: WALK_VALUES_MAX,
    };
    if let Ok(root) = message.get_root::<capnp_rpc::rpc_capnp::message::Reader>() {
        walk.value(root.into(), 0);
    }
    if let Ok(root) = message.get_root::<capnp::any_pointer::Reader>() {
        walk.payload(root, 0);
    }
    WALK_VALUES_MAX - walk.left
}

/// A walk over the values of one message, within [`WALK_VALUES_MAX`].
struct Walk {
    left: usize,
}

impl Walk {
    /// Reads every set field of `value`, following only the active member of each union.
    fn value(&mut self, value: dynamic_value::Reader<'_>, depth: u32) {
        if depth > WALK_DEPTH_MAX || self.left == 0 {
            return;
        }
        self.left -= 1;
        match value {
            dynamic_value::Reader::Struct(s) => self.fields(s, depth),
            dynamic_value::Reader::List(list) => {
                for item in list.iter().flatten() {
                    if self.left == 0 {
                        break;
                    }
                    self.value(item, depth + 1);
                }
            }
            dynamic_value::Reader::Text(text) => _ = text.to_str(),
            dynamic_value::Reader::Data(data) => _ = data.iter().fold(0u8, |a, b| a ^ b),
            dynamic_value::Reader::AnyPointer(pointer) => self.payload(pointer, depth + 1),
            _ => {}
        }
    }

    /// The fields that are set: a null pointer reads as its default value, whose own null
    /// pointers do too, so following them would walk the schema rather than the message.
    fn fields(&mut self, s: capnp::dynamic_struct::Reader<'_>, depth: u32) {
        let fields = s.get_schema().get_non_union_fields().into_iter().flatten();
        let active = s.which().ok().flatten();
        for field in fields.chain(active) {
            if s.has(field).unwrap_or(false)
                && let Ok(value) = s.get(field)
            {
                self.value(value, depth + 1);
            }
        }
    }

    /// Reads a pointer of unknown type (a call's params, a return's results) as every struct
    /// duro's servers and clients read there, and converts it as an HTTP request and response.
    fn payload(&mut self, pointer: capnp::any_pointer::Reader<'_>, depth: u32) {
        if pointer.is_null() || depth > WALK_DEPTH_MAX {
            return;
        }
        macro_rules! as_structs {
            ($($ty:ty),* $(,)?) => {
                $(
                    if let Ok(s) = pointer.get_as::<$ty>() {
                        self.value(s.into(), depth + 1);
                    }
                )*
            };
        }
        as_structs![
            host::namespace_params::Reader,
            host::namespace_results::Reader,
            host::list_namespaces_results::Reader,
            host::authenticate_params::Reader,
            namespace::id_from_name_params::Reader,
            namespace::id_from_string_params::Reader,
            namespace::get_params::Reader,
            namespace::get_by_name_params::Reader,
            namespace::list_objects_params::Reader,
            namespace::list_objects_results::Reader,
            durable_object::fetch_params::Reader,
            durable_object::fetch_results::Reader,
            header::Reader,
        ];
        if let Ok(request) = pointer.get_as::<http_request::Reader>() {
            _ = convert::request_from_capnp(request);
        }
        if let Ok(response) = pointer.get_as::<http_response::Reader>() {
            _ = convert::response_from_capnp(response);
        }
        if let Ok(params) = pointer.get_as::<durable_object::fetch_params::Reader>()
            && let Ok(request) = params.get_request()
        {
            _ = convert::request_from_capnp(request);
        }
    }
}

/// A host opened once per process, with a runtime and `LocalSet` to drive it, and a data dir
/// on tmpfs when there is one (commits wait on fsync).
pub struct LocalHost {
    runtime: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
    pub host: duro::Host,
}

impl LocalHost {
    /// Opens `builder` in a fresh data dir of this process.
    pub fn open(builder: duro::Builder) -> LocalHost {
        let dir = data_dir();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        let local = tokio::task::LocalSet::new();
        let host = local
            .block_on(&runtime, async { builder.data_dir(&dir).open_host() })
            .expect("opening the host");
        LocalHost {
            runtime,
            local,
            host,
        }
    }

    /// Runs `future` to completion on the host's thread.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.local.block_on(&self.runtime, future)
    }
}

/// `duro-fuzz-{pid}` under /dev/shm (or the temp dir), emptied; dirs of processes that are
/// gone are removed, since a fuzzer exits without running destructors.
fn data_dir() -> PathBuf {
    let base = PathBuf::from("/dev/shm");
    let base = if base.is_dir() {
        base
    } else {
        std::env::temp_dir()
    };
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("duro-fuzz-") else {
                continue;
            };
            if !PathBuf::from(format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!("duro-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the data dir");
    dir
}

/// One request of a `kv_request` input.
#[derive(Debug)]
pub struct KvRequest {
    pub method: http::Method,
    pub url: Vec<u8>,
    pub body: Vec<u8>,
}

/// Most requests one `kv_request` input makes.
pub const KV_REQUESTS_MAX: usize = 8;

/// The ASCII record separator: between the requests of a `kv_request` input.
pub const KV_SEPARATOR: u8 = 0x1e;

const KV_METHODS: [http::Method; 6] = [
    http::Method::GET,
    http::Method::PUT,
    http::Method::DELETE,
    http::Method::POST,
    http::Method::PATCH,
    http::Method::HEAD,
];

/// Reads a `kv_request` input: up to [`KV_REQUESTS_MAX`] requests separated by
/// [`KV_SEPARATOR`], each a method byte (its value modulo 6 picks GET, PUT, DELETE, POST,
/// PATCH, HEAD), the URL up to the first newline, then the body.
pub fn parse_kv_input(data: &[u8]) -> Vec<KvRequest> {
    data.split(|b| *b == KV_SEPARATOR)
        .take(KV_REQUESTS_MAX)
        .filter_map(|record| {
            let (&method, rest) = record.split_first()?;
            let (url, body) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            Some(KvRequest {
                method: KV_METHODS[method as usize % KV_METHODS.len()].clone(),
                url: url.to_vec(),
                body: body.to_vec(),
            })
        })
        .collect()
}

/// Writes requests in the `kv_request` input format (for seeds).
pub fn format_kv_input(requests: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (method, url, body)) in requests.iter().enumerate() {
        if i > 0 {
            out.push(KV_SEPARATOR);
        }
        let index = KV_METHODS
            .iter()
            .position(|m| m.as_str() == *method)
            .expect("a method of KV_METHODS");
        out.push(b'0' + index as u8);
        out.extend_from_slice(url.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(body);
    }
    out
}

thread_local! {
    /// The states of the objects built on this thread (see [`stash_state`]).
    static STATES: RefCell<Vec<duro::State>> = const { RefCell::new(Vec::new()) };
}

/// Keeps an object's state as it is built, so a target can clean its storage afterwards.
pub fn stash_state(state: &duro::State) {
    STATES.with(|s| s.borrow_mut().push(state.clone()));
}

/// Takes the states stashed since the last call.
pub fn take_states() -> Vec<duro::State> {
    STATES.with(|s| std::mem::take(&mut *s.borrow_mut()))
}
