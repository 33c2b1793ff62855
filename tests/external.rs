//! External classes (`Host.registerProvider`): a provider written here in Rust over a real
//! capnp connection serves the class `ext`, and the host keeps for it what it keeps for any
//! class: one instance per object, the input gate (whatever the latency between provider and
//! host), the output gate, resets when the provider goes, a bounded wait for one. The provider
//! answers each request by its path (see [`Object::handle`]), so each test drives the exact
//! storage calls it needs. The Python providers of `examples/` are run by tests/python.rs.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use duro::client::{Client, WebSocketEvent};
use duro::duro_capnp::{
    byte_stream, class_provider, durable_object, external_object, host, object_context,
    object_socket, registration, response_context, socket_message, storage,
};
use duro::testing::{FaultyBackend, ManualClock, TestServer, fetch_by_name, run_local};
use duro::{Body, BodySender, WebSocketMessage};
use duro::{Error, HostLimits, Server};

/// The typed counter's interface (examples/typed_counter.capnp), which the provider's
/// instances export besides `ExternalObject`.
mod typed_counter_capnp {
    #![allow(clippy::all, dead_code)]
    include!(concat!(env!("OUT_DIR"), "/typed_counter_capnp.rs"));
}
use typed_counter_capnp::counter;

/// The object's storage key of the counter of `/incr`.
const COUNT: &[u8] = b"n";

/// What the provider's instances did, for the tests to look at.
#[derive(Clone, Default)]
struct Log {
    /// The hex ID of each instance built, in order, with the provider's name.
    built: Rc<RefCell<Vec<(String, &'static str)>>>,
    /// Alarms delivered: (hex ID, retry count).
    alarms: Rc<RefCell<Vec<(String, u32)>>>,
    /// The storage capability of each object, as its instance got it.
    storages: Rc<RefCell<Vec<storage::Client>>>,
    /// The WebSocket events the instances saw, in order: "close CODE REASON", "error".
    socket_events: Rc<RefCell<Vec<String>>>,
    /// Lets `/sse` write its second event.
    release: Rc<tokio::sync::Notify>,
}

struct Provider {
    name: &'static str,
    log: Log,
}

impl class_provider::Server for Provider {
    fn new_instance(
        self: Rc<Self>,
        params: class_provider::NewInstanceParams,
        mut results: class_provider::NewInstanceResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let made = params
            .get()
            .and_then(|p| p.get_context())
            .inspect(|context| {
                let storage = context.storage_request().send().pipeline.get_storage();
                let env = context.env_request().send().pipeline.get_host();
                self.log.storages.borrow_mut().push(storage.clone());
                let object = Object {
                    context: context.clone(),
                    storage,
                    env,
                    log: self.log.clone(),
                };
                let both: capnp::capability::Client = capnp_rpc::new_client(Both(Rc::new(object)));
                let instance = external_object::Client { client: both };
                results.get().set_instance(instance);
            });
        async move {
            let id = made?.id_request().send().promise.await?;
            let hex = id.get()?.get_hex()?.to_string()?;
            self.log.built.borrow_mut().push((hex, self.name));
            Ok(())
        }
    }
}

struct Object {
    context: object_context::Client,
    storage: storage::Client,
    env: host::Client,
    log: Log,
}

impl durable_object::Server for Object {
    fn fetch(
        self: Rc<Self>,
        params: durable_object::FetchParams,
        mut results: durable_object::FetchResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let request = params.get().and_then(|p| {
            let request = p.get_request()?;
            let url = request.get_url()?.to_string()?;
            Ok((request.get_method()?.to_string()?, url))
        });
        async move {
            let (_method, url) = request?;
            let body = self.handle(&url).await?;
            let mut response = results.get().init_response();
            response.set_status(200);
            response.set_body(body.as_bytes());
            Ok(())
        }
    }

    fn request(
        self: Rc<Self>,
        params: durable_object::RequestParams,
        mut results: durable_object::RequestResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let taken = (|| -> capnp::Result<_> {
            let params = params.get()?;
            let request = params.get_request()?;
            let url = request.get_url()?.to_string()?;
            let start = Bytes::copy_from_slice(request.get_body()?);
            let body = if params.get_body_follows() {
                let (mut sender, body) = Body::channel();
                let _ = futures::FutureExt::now_or_never(sender.send(start));
                let stream: byte_stream::Client =
                    capnp_rpc::new_client(RequestBody(RefCell::new(Some(sender))));
                results.get().set_request_body(stream);
                results.set_pipeline()?;
                body
            } else {
                Body::full(start)
            };
            Ok((url, params.get_context()?, body))
        })();
        async move {
            let (url, context, body) = taken?;
            self.stream(url, context, body).await
        }
    }
}

/// `request`'s requests by path (see [`Object::stream`]); each one not named there is
/// answered by [`Object::handle`], whole, as `fetch` answers it.
impl Object {
    async fn stream(
        self: Rc<Self>,
        url: String,
        context: response_context::Client,
        body: Body,
    ) -> capnp::Result<()> {
        let path = url.split('?').next().unwrap_or("").to_owned();
        let q = query(&url);
        match path.as_str() {
            // The body read as it arrives: its size and an order-sensitive checksum.
            "/upload" => {
                let seen = read_all(body).await?;
                start(&context, 200, Some(seen.as_bytes()));
                Ok(())
            }
            // The body written back as it arrives, streamed.
            "/echo" => {
                let stream = start(&context, 200, None).unwrap();
                let mut body = body;
                while let Some(chunk) = body.chunk().await {
                    let chunk = chunk.map_err(|e| failed(e.to_string()))?;
                    write(&stream, &chunk).await?;
                }
                stream.end_request().send().promise.await?;
                Ok(())
            }
            "/download" => {
                let bytes: usize = q.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
                let stream = start(&context, 200, None).unwrap();
                for at in (0..bytes).step_by(64 << 10) {
                    write(&stream, &pattern(at, (64 << 10).min(bytes - at))).await?;
                }
                stream.end_request().send().promise.await?;
                Ok(())
            }
            // An event, then the next once the test lets it go.
            "/sse" => {
                let stream = start(&context, 200, None).unwrap();
                write(&stream, b"data: 1\n\n").await?;
                self.log.release.notified().await;
                write(&stream, b"data: 2\n\n").await?;
                stream.end_request().send().promise.await?;
                Ok(())
            }
            // Some bytes, then the stream released without `end`.
            "/broken" => {
                let stream = start(&context, 200, None).unwrap();
                write(&stream, &pattern(0, 1000)).await?;
                drop(stream);
                Err(failed("broke off"))
            }
            "/ws" => {
                let mut accept = self.context.accept_web_socket_request();
                let tag = q.get("tag").cloned().unwrap_or_else(|| "all".into());
                accept.get().init_tags(1).set(0, &tag);
                let socket = accept.send().pipeline.get_socket();
                let mut attach = socket.set_attachment_request();
                attach.get().set_attachment(tag.as_bytes());
                attach.send().promise.await?;
                start(&context, 101, Some(b""));
                Ok(())
            }
            _ => {
                let answer = self.handle(&url).await?;
                start(&context, 200, Some(answer.as_bytes()));
                Ok(())
            }
        }
    }
}

/// Calls `startResponse` with `status` and the whole `body`, or, with `None`, a body that
/// follows on the returned stream (pipelined).
fn start(
    context: &response_context::Client,
    status: u16,
    body: Option<&[u8]>,
) -> Option<byte_stream::Client> {
    let mut call = context.start_response_request();
    call.get().init_response().set_status(status);
    if let Some(body) = body {
        call.get().init_response().set_status(status);
        call.get().get_response().unwrap().set_body(body);
    }
    call.get().set_body_follows(body.is_none());
    let sent = call.send();
    let stream = sent.pipeline.get_body();
    tokio::task::spawn_local(async move { drop(sent.promise.await) });
    body.is_none().then_some(stream)
}

async fn write(stream: &byte_stream::Client, bytes: &[u8]) -> capnp::Result<()> {
    let mut call = stream.write_request();
    call.get().set_bytes(bytes);
    call.send().await
}

/// `bytes` bytes of a pattern that depends on each byte's place in the body (from `at`).
fn pattern(at: usize, bytes: usize) -> Vec<u8> {
    (at..at + bytes).map(|i| (i % 251) as u8).collect()
}

/// A body's size and FNV-1a checksum (sensitive to order), as "SIZE CHECKSUM".
async fn read_all(mut body: Body) -> capnp::Result<String> {
    let (mut size, mut sum) = (0usize, 0xcbf2_9ce4_8422_2325u64);
    while let Some(chunk) = body.chunk().await {
        let chunk = chunk.map_err(|e| failed(e.to_string()))?;
        size += chunk.len();
        sum = checksum(sum, &chunk);
    }
    Ok(format!("{size} {sum}"))
}

fn checksum(mut sum: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        sum = (sum ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
    }
    sum
}

/// A request body's `ByteStream`, as the instance implements it: into a [`Body::channel`].
struct RequestBody(RefCell<Option<BodySender>>);

impl byte_stream::Server for RequestBody {
    fn write(
        self: Rc<Self>,
        params: byte_stream::WriteParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let chunk = params
            .get()
            .and_then(|p| Ok(Bytes::copy_from_slice(p.get_bytes()?)));
        async move {
            let mut sender = self.0.borrow_mut().take().ok_or_else(|| failed("ended"))?;
            sender
                .send(chunk?)
                .await
                .map_err(|e| failed(e.to_string()))?;
            *self.0.borrow_mut() = Some(sender);
            Ok(())
        }
    }

    async fn end(
        self: Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> capnp::Result<()> {
        let sender = self.0.borrow_mut().take().ok_or_else(|| failed("ended"))?;
        sender.finish();
        Ok(())
    }
}

/// An instance answering both `ExternalObject` and the typed `Counter`, by interface ID.
struct Both(Rc<Object>);

impl capnp::capability::FromServer<Both> for capnp::capability::Client {
    type Dispatch = BothDispatch;

    fn from_server(server: Rc<Both>) -> BothDispatch {
        BothDispatch(server)
    }
}

#[derive(Clone)]
struct BothDispatch(Rc<Both>);

impl std::ops::Deref for BothDispatch {
    type Target = Both;

    fn deref(&self) -> &Both {
        &self.0
    }
}

impl capnp::capability::Server for BothDispatch {
    fn dispatch_call(
        self,
        interface_id: u64,
        method_id: u16,
        params: capnp::capability::Params<capnp::any_pointer::Owned>,
        results: capnp::capability::Results<capnp::any_pointer::Owned>,
    ) -> capnp::capability::DispatchCallResult {
        let object = self.0.0.clone();
        if interface_id == <counter::Client as capnp::traits::HasTypeId>::TYPE_ID {
            return counter::ServerDispatch::<Object>::dispatch_call_internal(
                object, method_id, params, results,
            );
        }
        capnp::capability::Server::dispatch_call(
            external_object::ServerDispatch { server: object },
            interface_id,
            method_id,
            params,
            results,
        )
    }

    fn as_ptr(&self) -> usize {
        Rc::as_ptr(&self.0) as usize
    }
}

impl counter::Server for Object {
    fn increment(
        self: Rc<Self>,
        params: counter::IncrementParams,
        mut results: counter::IncrementResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let by = params.get().map(|p| p.get_by());
        async move {
            let count: i64 = Object::get(&self, COUNT)
                .await?
                .map_or(0, |v| v.parse().unwrap_or(0));
            let value = count + by?;
            self.put(COUNT, value.to_string().as_bytes()).await?;
            results.get().set_value(value);
            Ok(())
        }
    }

    async fn get(
        self: Rc<Self>,
        _: counter::GetParams,
        mut results: counter::GetResults,
    ) -> capnp::Result<()> {
        let count: i64 = Object::get(&self, COUNT)
            .await?
            .map_or(0, |v| v.parse().unwrap_or(0));
        results.get().set_value(count);
        Ok(())
    }
}

impl external_object::Server for Object {
    fn alarm(
        self: Rc<Self>,
        params: external_object::AlarmParams,
        _: external_object::AlarmResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let retry = params.get().map(|p| p.get_retry_count());
        async move {
            let id = self.context.id_request().send().promise.await?;
            let hex = id.get()?.get_hex()?.to_string()?;
            self.log.alarms.borrow_mut().push((hex, retry?));
            Ok(())
        }
    }

    /// Echoes each text as "TAG: TEXT" to every socket of the object (the sender's tag from
    /// its attachment, which survives evictions); "close" closes the sender with 4000, and
    /// "count" answers the number of instances built so far.
    async fn web_socket_message(
        self: Rc<Self>,
        params: external_object::WebSocketMessageParams,
        _: external_object::WebSocketMessageResults,
    ) -> capnp::Result<()> {
        let params = params.get()?;
        let socket = params.get_socket()?;
        let socket_message::Which::Text(text) = params.get_message()?.which()? else {
            return Err(failed("text only"));
        };
        let text = text?.to_string()?;
        if text == "close" {
            let mut close = socket.close_request();
            close.get().set_code(4000);
            close.get().set_reason("asked to");
            close.send().promise.await?;
            return Ok(());
        }
        if text == "count" {
            let built = self.log.built.borrow().len();
            send_text(&socket, &built.to_string()).await?;
            return Ok(());
        }
        let attachment = socket.attachment_request().send().promise.await?;
        let tag = attachment.get()?.get_attachment()?.to_vec();
        let line = format!("{}: {text}", String::from_utf8_lossy(&tag));
        let all = self
            .context
            .get_web_sockets_request()
            .send()
            .promise
            .await?;
        for other in all.get()?.get_sockets()? {
            send_text(&other?, &line).await?;
        }
        Ok(())
    }

    async fn web_socket_close(
        self: Rc<Self>,
        params: external_object::WebSocketCloseParams,
        _: external_object::WebSocketCloseResults,
    ) -> capnp::Result<()> {
        let params = params.get()?;
        let event = format!(
            "close {} {}",
            params.get_code(),
            params.get_reason()?.to_str()?
        );
        self.log.socket_events.borrow_mut().push(event);
        Ok(())
    }

    async fn web_socket_error(
        self: Rc<Self>,
        _: external_object::WebSocketErrorParams,
        _: external_object::WebSocketErrorResults,
    ) -> capnp::Result<()> {
        self.log.socket_events.borrow_mut().push("error".into());
        Ok(())
    }
}

async fn send_text(socket: &object_socket::Client, text: &str) -> capnp::Result<()> {
    let mut send = socket.send_text_request();
    send.get().set_text(text);
    send.send().promise.await?;
    Ok(())
}

/// The query of `url` as a map.
fn query(url: &str) -> BTreeMap<String, String> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect()
}

/// `text` with its `%3F`, `%26` and `%3D` decoded: enough for a path in a query.
fn decode(text: &str) -> String {
    text.replace("%3F", "?")
        .replace("%26", "&")
        .replace("%3D", "=")
}

fn failed(message: impl Into<String>) -> capnp::Error {
    capnp::Error::failed(message.into())
}

impl Object {
    /// Answers `url` (a path and its query) with the storage calls it names.
    async fn handle(&self, url: &str) -> capnp::Result<String> {
        let path = url.split('?').next().unwrap_or("");
        let q = query(url);
        let arg = |name: &str| q.get(name).cloned().unwrap_or_default();
        match path {
            "/incr" => self.increment(arg("delay_ms").parse().unwrap_or(0)).await,
            "/get" => Ok(self.get(arg("k").as_bytes()).await?.unwrap_or_default()),
            "/put" => {
                self.put(arg("k").as_bytes(), arg("v").as_bytes()).await?;
                Ok("ok".into())
            }
            "/put-unawaited" => {
                // Sent, not awaited: the call leaves before the answer does.
                let mut put = self.storage.put_request();
                put.get().set_key(arg("k").as_bytes());
                put.get().set_value(arg("v").as_bytes());
                let sent = put.send().promise;
                tokio::task::spawn_local(async move { drop(sent.await) });
                Ok("sent".into())
            }
            "/keys" => self.keys().await,
            "/id" => {
                let id = self.context.id_request().send().promise.await?;
                let id = id.get()?;
                let name = id.get_id()?.get_name()?.to_string()?;
                Ok(format!("{} {}", id.get_hex()?.to_string()?, name))
            }
            "/call" => self.call(&arg("name"), &arg("path")).await,
            "/sync" => {
                self.storage.sync_request().send().promise.await?;
                Ok("synced".into())
            }
            "/txn" => self.transaction(&arg("mode")).await,
            "/batch" => self.batch().await,
            "/fill" => {
                let n: usize = arg("n").parse().unwrap_or(0);
                let bytes: usize = arg("bytes").parse().unwrap_or(1);
                self.fill(n, bytes).await?;
                Ok("filled".into())
            }
            "/count" => {
                let listed = self.list(&q).await?;
                let keys: Vec<&str> = listed
                    .split(',')
                    .map(|p| p.split('=').next().unwrap())
                    .collect();
                let (first, last) = (keys[0], keys[keys.len() - 1]);
                Ok(format!("{} {first} {last}", keys.len()))
            }
            "/list" => self.list(&q).await,
            "/alarm" => {
                let mut set = self.storage.set_alarm_request();
                set.get().set_at_ms(arg("at").parse().unwrap_or(0));
                set.send().promise.await?;
                let alarm = self.storage.get_alarm_request().send().promise.await?;
                Ok(alarm.get()?.get_at_ms().to_string())
            }
            "/fail" => Err(failed("the object says no")),
            _ => Err(failed(format!("no route {path}"))),
        }
    }

    async fn get(&self, key: &[u8]) -> capnp::Result<Option<String>> {
        let mut get = self.storage.get_request();
        get.get().set_key(key);
        let reply = get.send().promise.await?;
        let reply = reply.get()?;
        let value = String::from_utf8_lossy(reply.get_value()?).into_owned();
        Ok(reply.get_found().then_some(value))
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> capnp::Result<()> {
        let mut put = self.storage.put_request();
        put.get().set_key(key);
        put.get().set_value(value);
        put.send().promise.await?;
        Ok(())
    }

    /// Reads the counter, waits `delay_ms` (a slow provider, or a long way to the host), and
    /// writes it plus one: a read-modify-write with awaits between read and write.
    async fn increment(&self, delay_ms: u64) -> capnp::Result<String> {
        let count: u64 = self.get(COUNT).await?.map_or(0, |v| v.parse().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        self.put(COUNT, (count + 1).to_string().as_bytes()).await?;
        Ok((count + 1).to_string())
    }

    async fn keys(&self) -> capnp::Result<String> {
        let mut list = self.storage.list_request();
        list.get().init_options();
        let reply = list.send().promise.await?;
        let entries = reply.get()?.get_entries()?;
        let keys: Vec<String> = entries
            .iter()
            .map(|e| Ok(String::from_utf8_lossy(e.get_key()?).into_owned()))
            .collect::<capnp::Result<_>>()?;
        Ok(keys.join(","))
    }

    /// `list` with the options of the query: `start`, `startAfter`, `end`, `prefix`,
    /// `reverse`, `limit`; answers `key=value` pairs.
    async fn list(&self, q: &BTreeMap<String, String>) -> capnp::Result<String> {
        let mut list = self.storage.list_request();
        {
            let mut options = list.get().init_options();
            for (name, value) in q {
                match name.as_str() {
                    "start" => options.set_start(value.as_bytes()),
                    "startAfter" => options.set_start_after(value.as_bytes()),
                    "end" => options.set_end(value.as_bytes()),
                    "prefix" => options.set_prefix(value.as_bytes()),
                    "reverse" => options.set_reverse(value == "true"),
                    "limit" => options.set_limit(value.parse().unwrap_or(0)),
                    _ => {}
                }
            }
        }
        let reply = list.send().promise.await?;
        let pairs: Vec<String> = reply
            .get()?
            .get_entries()?
            .iter()
            .map(|e| {
                let key = String::from_utf8_lossy(e.get_key()?).into_owned();
                Ok(format!("{key}={}", String::from_utf8_lossy(e.get_value()?)))
            })
            .collect::<capnp::Result<_>>()?;
        Ok(pairs.join(","))
    }

    /// Puts `n` keys `m/0000`... with values of `bytes` bytes, 100 to a call.
    async fn fill(&self, n: usize, bytes: usize) -> capnp::Result<()> {
        for start in (0..n).step_by(100) {
            let keys: Vec<usize> = (start..n.min(start + 100)).collect();
            let mut put = self.storage.put_many_request();
            let mut entries = put.get().init_entries(keys.len() as u32);
            for (i, key) in keys.iter().enumerate() {
                let mut entry = entries.reborrow().get(i as u32);
                entry.set_key(format!("m/{key:04}").as_bytes());
                entry.set_value(&vec![b'v'; bytes]);
            }
            put.send().promise.await?;
        }
        Ok(())
    }

    /// Calls the object `name` of namespace `ext` through the env, on `path`.
    async fn call(&self, name: &str, path: &str) -> capnp::Result<String> {
        let mut namespace = self.env.namespace_request();
        namespace.get().set_name("ext");
        let namespace = namespace.send().pipeline.get_namespace();
        let mut get = namespace.get_by_name_request();
        get.get().set_name(name);
        let stub = get.send().pipeline.get_stub();
        let mut fetch = stub.fetch_request();
        let mut request = fetch.get().init_request();
        request.set_method("POST");
        request.set_url(path);
        let reply = fetch.send().promise.await?;
        let body = reply.get()?.get_response()?.get_body()?;
        Ok(String::from_utf8_lossy(body).into_owned())
    }

    /// Puts, gets and deletes in batches; answers what each saw.
    async fn batch(&self) -> capnp::Result<String> {
        let mut put = self.storage.put_many_request();
        {
            let mut entries = put.get().init_entries(3);
            for (i, (k, v)) in [("a", "1"), ("b", "2"), ("c", "3")].iter().enumerate() {
                let mut entry = entries.reborrow().get(i as u32);
                entry.set_key(k.as_bytes());
                entry.set_value(v.as_bytes());
            }
        }
        put.send().promise.await?;
        let mut get = self.storage.get_many_request();
        {
            let mut keys = get.get().init_keys(3);
            keys.set(0, b"c");
            keys.set(1, b"zz");
            keys.set(2, b"a");
        }
        let reply = get.send().promise.await?;
        let found: Vec<String> = reply
            .get()?
            .get_entries()?
            .iter()
            .map(|e| Ok(String::from_utf8_lossy(e.get_key()?).into_owned()))
            .collect::<capnp::Result<_>>()?;
        let mut delete = self.storage.delete_many_request();
        {
            let mut keys = delete.get().init_keys(2);
            keys.set(0, b"a");
            keys.set(1, b"zz");
        }
        let deleted = delete.send().promise.await?.get()?.get_count();
        let mut one = self.storage.delete_request();
        one.get().set_key(b"b");
        let existed = one.send().promise.await?.get()?.get_existed();
        Ok(format!(
            "found {} deleted {deleted} existed {existed} left {}",
            found.join(","),
            self.keys().await?
        ))
    }

    /// A transaction that commits (`commit`), rolls back (`rollback`), or meets a write from
    /// outside it before its commit (`conflict`); answers what it saw.
    async fn transaction(&self, mode: &str) -> capnp::Result<String> {
        let txn = self.storage.transaction_request().send().pipeline.get_txn();
        let mut put = txn.put_request();
        put.get().set_key(b"t");
        put.get().set_value(mode.as_bytes());
        put.send().promise.await?;
        let mut get = txn.get_request();
        get.get().set_key(b"t");
        let seen = get.send().promise.await?;
        let seen = String::from_utf8_lossy(seen.get()?.get_value()?).into_owned();
        let outside = self.get(b"t").await?;
        match mode {
            "rollback" => {
                txn.rollback_request().send().promise.await?;
                let mut after = txn.put_request();
                after.get().set_key(b"u");
                let refused = after.send().promise.await.is_err();
                Ok(format!("saw {seen} outside {outside:?} refused {refused}"))
            }
            _ => {
                if mode == "conflict" {
                    self.put(b"other", b"write").await?;
                }
                let committed = txn.commit_request().send().promise.await?;
                let committed = committed.get()?.get_committed();
                Ok(format!(
                    "saw {seen} outside {outside:?} committed {committed}"
                ))
            }
        }
    }
}

/// A host with the class `ext` bound to the namespace `ext`, and the built-in classes.
fn builder() -> duro::Builder {
    duro::builtin::register(Server::builder()).external("ext", "ext")
}

/// Registers a provider named `name` of `class` on `host`, logging into `log`.
async fn register(
    host: &host::Client,
    class: &str,
    name: &'static str,
    log: &Log,
) -> Result<registration::Client, Error> {
    register_as(host, class, name, log, false).await
}

/// [`register`], with `uses_request`: requests then reach the instances' `request`.
async fn register_as(
    host: &host::Client,
    class: &str,
    name: &'static str,
    log: &Log,
    uses_request: bool,
) -> Result<registration::Client, Error> {
    let mut call = host.register_provider_request();
    call.get().set_class_name(class);
    call.get().set_uses_request(uses_request);
    let provider: class_provider::Client = capnp_rpc::new_client(Provider {
        name,
        log: log.clone(),
    });
    call.get().set_provider(provider);
    Ok(call.send().promise.await?.get()?.get_registration()?)
}

/// A client of `server` with one provider `p` of `ext` registered on it: the client, the
/// provider's log, and its registration (the provider is served while it is held).
async fn with_provider(server: &TestServer) -> (host::Client, Log, registration::Client) {
    let host = server.connect().await;
    let log = Log::default();
    let registration = register(&host, "ext", "p", &log).await.unwrap();
    (host, log, registration)
}

/// A provider on a connection of its own, which the test can cut (dropping the returned
/// handle aborts the connection's task, as a provider process that dies).
async fn provider_connection(
    server: &TestServer,
    name: &'static str,
    log: &Log,
) -> (registration::Client, tokio::task::JoinHandle<()>) {
    let addr = duro::ListenAddr::Tcp(server.addr());
    let (host, rpc) = duro::wire::connect(&addr).await.unwrap();
    let task = tokio::task::spawn_local(async move {
        let _ = rpc.await;
    });
    let registration = register(&host, "ext", name, log).await.unwrap();
    (registration, task)
}

async fn call(host: &host::Client, name: &str, path: &str) -> Result<String, Error> {
    let response = fetch_by_name(host, "ext", name, "POST", path, b"").await?;
    Ok(String::from_utf8_lossy(response.body()).into_owned())
}

/// Waits until `done` holds, at most 5 s.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn an_object_lives_in_one_instance_of_its_provider_and_keeps_its_storage() {
    let server = TestServer::start(builder());
    run_local(async {
        let (host, log, _registration) = with_provider(&server).await;
        for expected in 1..=3 {
            assert_eq!(
                call(&host, "a", "/incr").await.unwrap(),
                expected.to_string()
            );
        }
        assert_eq!(call(&host, "b", "/incr").await.unwrap(), "1");
        let id = call(&host, "a", "/id").await.unwrap();
        let (hex, name) = id.split_once(' ').unwrap();
        assert_eq!((hex.len(), name), (64, "a"));
        // One instance per object, however many calls and stubs.
        let built = log.built.borrow().clone();
        assert_eq!(built.len(), 2, "{built:?}");
        assert_eq!(built[0].0, hex);
        // The instance's error reaches the caller as the object's own.
        let error = call(&host, "a", "/fail").await.unwrap_err();
        // Its own text, then the call's request ID.
        let own =
            matches!(&error, Error::Remote(m) if m.starts_with("the object says no (request id "));
        assert!(own, "{error:?}");
        assert_eq!(call(&host, "a", "/get?k=n").await.unwrap(), "3");
    });
}

#[test]
fn no_event_interleaves_with_a_storage_call_in_flight() {
    // Each increment reads, waits 3 ms, then writes: were a second event delivered while the
    // first one's calls travel, both would read the same count and one increment would be
    // lost. The provider itself runs calls concurrently (capnp-rpc dispatches each at once).
    let server = TestServer::start(builder());
    run_local(async {
        let (host, _log, _registration) = with_provider(&server).await;
        let calls = (0..40).map(|_| call(&host, "hot", "/incr?delay_ms=3"));
        let mut answers: Vec<u64> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|answer| answer.unwrap().parse().unwrap())
            .collect();
        answers.sort();
        assert_eq!(answers, (1..=40).collect::<Vec<_>>());
        assert_eq!(call(&host, "hot", "/get?k=n").await.unwrap(), "40");
    });
}

#[test]
fn a_call_on_another_object_lets_events_in_so_call_backs_do_not_deadlock() {
    let server = TestServer::start(builder());
    run_local(async {
        let (host, _log, _registration) = with_provider(&server).await;
        // `a` calls itself through its env: the call is an event of `a`, delivered while the
        // first one awaits it.
        let own = call(&host, "a", "/call?name=a&path=/incr");
        let own = tokio::time::timeout(Duration::from_secs(5), own).await;
        assert_eq!(own.expect("a call back to itself deadlocked").unwrap(), "1");
        // `b` calls `c`, which calls back `b`.
        let chain = call(
            &host,
            "b",
            "/call?name=c&path=/call%3Fname%3Db%26path%3D/incr",
        );
        let chain = tokio::time::timeout(Duration::from_secs(5), chain).await;
        let chain = chain.expect("a call back through another object deadlocked");
        assert_eq!(chain.unwrap(), "1");
    });
}

#[test]
fn an_answer_waits_for_the_writes_its_instance_sent_before_it() {
    let slot: Arc<Mutex<Option<Arc<FaultyBackend>>>> = Arc::default();
    let wrap_slot = slot.clone();
    let server = TestServer::start(builder().wrap_backend(move |inner| {
        let faulty = FaultyBackend::new(inner);
        *wrap_slot.lock().unwrap() = Some(faulty.clone());
        faulty
    }));
    let faulty = slot.lock().unwrap().clone().unwrap();
    run_local(async {
        let (host, _log, _registration) = with_provider(&server).await;
        assert_eq!(call(&host, "g", "/put?k=warm&v=1").await.unwrap(), "ok");
        let before = faulty.commits();
        faulty.hold();
        // The instance sends its put and answers at once, without waiting for the put's
        // answer: the put arrives before the answer, so the answer waits for it.
        let pending = tokio::task::spawn_local({
            let host = host.clone();
            async move { call(&host, "g", "/put-unawaited?k=x&v=1").await }
        });
        until("the put's commit", || faulty.commits() > before).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answered_early = pending.is_finished();
        // Released before asserting: a held commit would keep the server from shutting down.
        faulty.release();
        assert!(!answered_early, "answered before its write was durable");
        assert_eq!(pending.await.unwrap().unwrap(), "sent");
        assert_eq!(call(&host, "g", "/get?k=x").await.unwrap(), "1");
    });
}

#[test]
fn an_instance_sees_its_own_objects_storage_and_no_other() {
    let server = TestServer::start(builder());
    run_local(async {
        let (host, _log, _registration) = with_provider(&server).await;
        call(&host, "a", "/put?k=mine-a&v=1").await.unwrap();
        call(&host, "b", "/put?k=mine-b&v=2").await.unwrap();
        assert_eq!(call(&host, "a", "/keys").await.unwrap(), "mine-a");
        assert_eq!(call(&host, "b", "/keys").await.unwrap(), "mine-b");
        assert_eq!(call(&host, "a", "/get?k=mine-b").await.unwrap(), "");
    });
}

#[test]
fn providers_share_the_activations_round_robin() {
    let server = TestServer::start(builder());
    run_local(async {
        let host = server.connect().await;
        let log = Log::default();
        let (_one, _one_task) = provider_connection(&server, "one", &log).await;
        let (_two, _two_task) = provider_connection(&server, "two", &log).await;
        for i in 0..10 {
            assert_eq!(call(&host, &format!("o{i}"), "/incr").await.unwrap(), "1");
        }
        // Every call of an object goes to its one instance.
        for i in 0..10 {
            assert_eq!(call(&host, &format!("o{i}"), "/incr").await.unwrap(), "2");
        }
        let built = log.built.borrow().clone();
        assert_eq!(built.len(), 10);
        // Round robin on each shard: both providers take about half (exactly half with one
        // shard).
        let on_one = built.iter().filter(|(_, p)| *p == "one").count();
        assert!((3..=7).contains(&on_one), "{built:?}");
    });
}

#[test]
fn a_provider_that_goes_resets_its_objects_and_another_takes_over() {
    let server = TestServer::start(builder());
    run_local(async {
        let host = server.connect().await;
        let log = Log::default();
        let (registration, task) = provider_connection(&server, "first", &log).await;
        assert_eq!(call(&host, "a", "/incr").await.unwrap(), "1");
        // A stub held across the loss, and a call in flight when it happens.
        let stub = {
            let mut ns = host.namespace_request();
            ns.get().set_name("ext");
            let ns = ns.send().pipeline.get_namespace();
            let mut get = ns.get_by_name_request();
            get.get().set_name("a");
            get.send().pipeline.get_stub()
        };
        let in_flight = tokio::task::spawn_local({
            let stub = stub.clone();
            let request = duro::testing::request("POST", "/incr?delay_ms=300", b"");
            async move { duro::testing::fetch(&stub, request).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The provider's process dies: its connection is cut.
        task.abort();
        drop(registration);
        let lost = in_flight.await.unwrap().unwrap_err();
        assert!(matches!(lost, Error::Disconnected(_)), "{lost:?}");
        let broken = duro::testing::fetch(&stub, duro::testing::request("GET", "/get?k=n", b""));
        assert!(matches!(broken.await, Err(Error::Disconnected(_))));
        // A second provider: a new `get` activates the object on it, from its storage.
        let (_second, _task) = provider_connection(&server, "second", &log).await;
        assert_eq!(call(&host, "a", "/incr").await.unwrap(), "2");
        let built = log.built.borrow().clone();
        assert_eq!(
            built.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
            ["first", "second"]
        );
    });
}

#[test]
fn releasing_the_registration_unregisters_the_provider() {
    let server = TestServer::start(builder());
    run_local(async {
        let host = server.connect().await;
        let log = Log::default();
        let registration = register(&host, "ext", "p", &log).await.unwrap();
        assert_eq!(call(&host, "a", "/incr").await.unwrap(), "1");
        drop(registration);
        let second = register(&host, "ext", "q", &log).await.unwrap();
        // `a` was reset with the first provider's registration; its next `get` builds it on q.
        assert_eq!(call(&host, "a", "/incr").await.unwrap(), "2");
        let built: Vec<&str> = log.built.borrow().iter().map(|(_, p)| *p).collect();
        assert_eq!(built, ["p", "q"]);
        drop(second);
    });
}

#[test]
fn with_no_provider_a_call_waits_for_one_then_fails_overloaded() {
    let server = TestServer::start(builder());
    run_local(async {
        let host = server.connect().await;
        let began = Instant::now();
        let error = call(&host, "a", "/incr").await.unwrap_err();
        let waited = began.elapsed();
        assert!(matches!(error, Error::Overloaded(_)), "{error:?}");
        assert!(waited >= duro::rpc::PROVIDER_WAIT, "{waited:?}");
        assert!(waited < duro::rpc::PROVIDER_WAIT * 2, "{waited:?}");
        // A provider that registers during the wait serves the calls waiting, in order.
        let stub = {
            let mut ns = host.namespace_request();
            ns.get().set_name("ext");
            let ns = ns.send().pipeline.get_namespace();
            let mut get = ns.get_by_name_request();
            get.get().set_name("b");
            get.send().pipeline.get_stub()
        };
        let request = duro::testing::request("POST", "/incr", b"");
        let calls: Vec<_> = (0..3)
            .map(|_| duro::testing::fetch_call(&stub, &request).promise)
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = Log::default();
        let _registration = register(&host, "ext", "p", &log).await.unwrap();
        let mut answers = Vec::new();
        for call in calls {
            let reply = call.await.unwrap();
            let body = reply
                .get()
                .unwrap()
                .get_response()
                .unwrap()
                .get_body()
                .unwrap();
            answers.push(String::from_utf8_lossy(body).into_owned());
        }
        assert_eq!(answers, ["1", "2", "3"]);
    });
}

async fn call_owned(
    host: host::Client,
    name: &'static str,
    path: &'static str,
) -> Result<String, Error> {
    call(&host, name, path).await
}

#[test]
fn register_provider_refuses_unknown_classes_and_asks_for_the_token() {
    let server = TestServer::start(builder().token("sesame"));
    run_local(async {
        let guard = server.connect().await;
        let log = Log::default();
        let refused = register(&guard, "ext", "p", &log).await.err().unwrap();
        assert!(
            format!("{refused}").contains("unauthenticated"),
            "{refused}"
        );
        let host = duro::testing::authenticate(&guard, "sesame").await.unwrap();
        let unknown = register(&host, "nope", "p", &log).await.err().unwrap();
        assert!(
            matches!(&unknown, Error::InvalidArgument(m) if m.contains("--external")),
            "{unknown:?}"
        );
        let _registration = register(&host, "ext", "p", &log).await.unwrap();
        assert_eq!(call(&host, "a", "/incr").await.unwrap(), "1");
    });
}

#[test]
fn transactions_commit_roll_back_and_see_conflicts() {
    let server = TestServer::start(builder());
    run_local(async {
        let (host, _log, _registration) = with_provider(&server).await;
        // Inside, a transaction sees its writes; outside, nothing until it commits.
        let committed = call(&host, "t", "/txn?mode=commit").await.unwrap();
        assert_eq!(committed, "saw commit outside None committed true");
        assert_eq!(call(&host, "t", "/get?k=t").await.unwrap(), "commit");
        let rolled_back = call(&host, "t", "/txn?mode=rollback").await.unwrap();
        assert_eq!(
            rolled_back,
            "saw rollback outside Some(\"commit\") refused true"
        );
        assert_eq!(call(&host, "t", "/get?k=t").await.unwrap(), "commit");
        // A write outside the transaction landed before its commit: nothing of it is written.
        let conflict = call(&host, "t", "/txn?mode=conflict").await.unwrap();
        assert_eq!(
            conflict,
            "saw conflict outside Some(\"commit\") committed false"
        );
        assert_eq!(call(&host, "t", "/get?k=t").await.unwrap(), "commit");
        assert_eq!(call(&host, "t", "/get?k=other").await.unwrap(), "write");
    });
}

#[test]
fn batches_lists_and_limits_work_on_raw_bytes() {
    let server = TestServer::start(builder());
    run_local(async {
        let (host, _log, _registration) = with_provider(&server).await;
        let batch = call(&host, "l", "/batch").await.unwrap();
        assert_eq!(batch, "found a,c deleted 1 existed true left c");
        for key in ["p/1", "p/2", "p/3", "q/1"] {
            call(&host, "l", &format!("/put?k={key}&v={key}"))
                .await
                .unwrap();
        }
        let list = |q: &'static str| call_owned(host.clone(), "l", q);
        assert_eq!(
            list("/list?prefix=p/").await.unwrap(),
            "p/1=p/1,p/2=p/2,p/3=p/3"
        );
        let reversed = list("/list?prefix=p/&reverse=true&limit=2").await.unwrap();
        assert_eq!(reversed, "p/3=p/3,p/2=p/2");
        assert_eq!(list("/list?startAfter=p/2&end=q").await.unwrap(), "p/3=p/3");
        assert_eq!(list("/list?start=p/2&end=p/3").await.unwrap(), "p/2=p/2");
        // An empty `end` set is a bound: nothing is below it.
        assert_eq!(list("/list?end=").await.unwrap(), "");
        // Lists read a page at a time inside the host, and answer all the same.
        call(&host, "l", "/fill?n=600").await.unwrap();
        assert_eq!(list("/count?prefix=m/").await.unwrap(), "600 m/0000 m/0599");
        let reversed = list("/count?prefix=m/&reverse=true&limit=300")
            .await
            .unwrap();
        assert_eq!(reversed, "300 m/0599 m/0300");
        let after = list("/count?prefix=m/&startAfter=m/0100&end=m/0500")
            .await
            .unwrap();
        assert_eq!(after, "399 m/0101 m/0499");
        // An answer larger than a message is refused, naming the bound; a limit fits it.
        call(&host, "big", "/fill?n=300&bytes=32000").await.unwrap();
        let refused = call(&host, "big", "/count").await.unwrap_err();
        assert!(
            format!("{refused}").contains("RESPONSE_BYTES_MAX"),
            "{refused}"
        );
        assert_eq!(
            call(&host, "big", "/count?limit=100").await.unwrap(),
            "100 m/0000 m/0099"
        );
        let long = "k".repeat(3000);
        let refused = call(&host, "l", &format!("/put?k={long}&v=1"))
            .await
            .unwrap_err();
        assert!(format!("{refused}").contains("key_bytes_max"), "{refused}");
    });
}

#[test]
fn an_alarm_reaches_the_instance() {
    let clock = ManualClock::new(1_000_000);
    let server = TestServer::start(builder().clock(Arc::new(clock.clone())));
    run_local(async {
        let (host, log, _registration) = with_provider(&server).await;
        assert_eq!(
            call(&host, "w", "/alarm?at=1005000").await.unwrap(),
            "1005000"
        );
        let hex = call(&host, "w", "/id").await.unwrap();
        let hex = hex.split(' ').next().unwrap().to_owned();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(log.alarms.borrow().is_empty());
        clock.advance(5_000);
        until("the alarm", || !log.alarms.borrow().is_empty()).await;
        assert_eq!(log.alarms.borrow()[0], (hex, 0));
    });
}

#[test]
fn the_context_of_an_evicted_object_can_no_longer_write() {
    let limits = HostLimits {
        idle_evict_ms: 100,
        ..HostLimits::default()
    };
    let server = TestServer::start(builder().limits(limits));
    run_local(async {
        let (host, log, _registration) = with_provider(&server).await;
        assert_eq!(call(&host, "e", "/incr").await.unwrap(), "1");
        let kept = log.storages.borrow()[0].clone();
        // Idle: evicted (the sweep runs every 50 ms), and its instance released.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut put = kept.put_request();
        put.get().set_key(COUNT);
        put.get().set_value(b"100");
        let refused = put.send().promise.await.map(|_| ()).map_err(Error::from);
        assert!(
            matches!(refused, Err(Error::Disconnected(_))),
            "{refused:?}"
        );
        // The next call builds a new instance, from the durable count.
        assert_eq!(call(&host, "e", "/incr").await.unwrap(), "2");
        assert_eq!(log.built.borrow().len(), 2);
    });
}

#[test]
fn typed_calls_reach_the_providers_instance_in_turn_with_fetch() {
    let server = TestServer::start(builder());
    run_local(async {
        let host = server.connect().await;
        let log = Log::default();
        let _registration = register(&host, "ext", "one", &log).await.unwrap();
        let namespace = host.namespace_request();
        let namespace = {
            let mut namespace = namespace;
            namespace.get().set_name("ext");
            namespace.send().pipeline.get_namespace()
        };
        let mut get = namespace.get_by_name_request();
        get.get().set_name("typed");
        let stub = get.send().pipeline.get_stub();
        let typed = counter::Client {
            client: stub.client.clone(),
        };
        // A typed call, a fetch and a typed call, all sent before any answer: one order.
        let mut first = typed.increment_request();
        first.get().set_by(2);
        let first = first.send().promise;
        let incr = duro::testing::request("POST", "/incr", b"");
        let fetched = duro::testing::fetch_call(&stub, &incr).promise;
        let mut second = typed.increment_request();
        second.get().set_by(10);
        let second = second.send().promise;
        assert_eq!(first.await.unwrap().get().unwrap().get_value(), 2);
        let fetched = fetched.await.unwrap();
        let body = fetched
            .get()
            .unwrap()
            .get_response()
            .unwrap()
            .get_body()
            .unwrap();
        assert_eq!(body, b"3");
        assert_eq!(second.await.unwrap().get().unwrap().get_value(), 13);
        let read = typed.get_request().send().promise.await.unwrap();
        assert_eq!(read.get().unwrap().get_value(), 13);
        assert_eq!(log.built.borrow().len(), 1, "one instance");
    });
}

/// A client of `server` with a provider `s` of `ext` registered whose instances take their
/// requests at `request` (`usesRequest`).
async fn with_streaming_provider(server: &TestServer) -> (host::Client, Log, registration::Client) {
    let host = server.connect().await;
    let log = Log::default();
    let registration = register_as(&host, "ext", "s", &log, true).await.unwrap();
    (host, log, registration)
}

/// [`builder`] with the HTTP gateway on loopback.
fn gateway_builder() -> duro::Builder {
    builder().http("127.0.0.1:0".parse().unwrap())
}

/// A streamed request of `method` to `path` whose body is `chunks` chunks of 64 KiB of
/// [`pattern`], written by a task as the call reads it; with the body's "SIZE CHECKSUM".
fn streamed(method: &str, path: &str, chunks: usize) -> (http::Request<Body>, String) {
    let (mut sender, body) = Body::channel();
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    for k in 0..chunks {
        sum = checksum(sum, &pattern(k * (64 << 10), 64 << 10));
    }
    tokio::task::spawn_local(async move {
        for k in 0..chunks {
            let chunk = Bytes::from(pattern(k * (64 << 10), 64 << 10));
            if sender.send(chunk).await.is_err() {
                return;
            }
        }
        sender.finish();
    });
    let request = http::Request::builder().method(method).uri(path).body(body);
    (request.unwrap(), format!("{} {sum}", chunks * (64 << 10)))
}

/// "SIZE CHECKSUM" of `bytes` bytes of [`pattern`].
fn expected(bytes: usize) -> String {
    format!(
        "{bytes} {}",
        checksum(0xcbf2_9ce4_8422_2325, &pattern(0, bytes))
    )
}

#[test]
fn a_streamed_request_body_reaches_the_instance_whole_and_in_order() {
    let server = TestServer::start(builder());
    run_local(async {
        let (_host, _log, _registration) = with_streaming_provider(&server).await;
        let client = Client::connect(server.addr()).await.unwrap();
        let stub = client.namespace("ext").get_by_name("up");
        // 3 MiB, streamed: read by the instance as it arrives.
        let (request, sent) = streamed("PUT", "/upload", 48);
        let response = stub.fetch_stream(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let seen = response.into_body().bytes().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&seen), sent);
        // Both ways at once: the instance writes the body back as it reads it.
        let (request, sent) = streamed("PUT", "/echo", 48);
        let response = stub.fetch_stream(request).await.unwrap();
        let mut body = response.into_body();
        let (mut size, mut sum, mut chunks) = (0, 0xcbf2_9ce4_8422_2325u64, 0);
        while let Some(chunk) = body.chunk().await {
            let chunk = chunk.unwrap();
            size += chunk.len();
            sum = checksum(sum, &chunk);
            chunks += 1;
        }
        assert_eq!(format!("{size} {sum}"), sent);
        assert!(chunks > 1, "the echo came in one piece");
        // A small whole request travels in the call, and storage works from `request` too.
        assert_eq!(
            call(&client_host(&server).await, "up", "/incr")
                .await
                .unwrap(),
            "1"
        );
    });
}

async fn client_host(server: &TestServer) -> host::Client {
    server.connect().await
}

#[test]
fn a_streamed_response_passes_through_capnp_and_the_gateway_as_it_is_written() {
    let server = TestServer::start(gateway_builder());
    let addr = server.http_addr().unwrap();
    run_local(async move {
        let (_host, log, _registration) = with_streaming_provider(&server).await;
        let client = Client::connect(server.addr()).await.unwrap();
        let stub = client.namespace("ext").get_by_name("down");
        const BYTES: usize = 5 << 20;
        let request = http::Request::get(format!("/download?bytes={BYTES}")).body(Body::empty());
        let response = stub.fetch_stream(request.unwrap()).await.unwrap();
        let body = response.into_body().bytes().await.unwrap();
        let sum = checksum(0xcbf2_9ce4_8422_2325, &body);
        assert_eq!(format!("{} {sum}", body.len()), expected(BYTES));
        // The first event arrives while the instance waits to write the second.
        let request = http::Request::get("/sse").body(Body::empty());
        let response = stub.fetch_stream(request.unwrap()).await.unwrap();
        let mut body = response.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.chunk()).await;
        assert_eq!(first.unwrap().unwrap().unwrap(), "data: 1\n\n");
        log.release.notify_one();
        assert_eq!(body.bytes().await.unwrap(), "data: 2\n\n");

        // The same through the gateway.
        use http_body_util::BodyExt;
        let mut sender = http_sender(addr).await;
        let request = http::Request::get(format!("/ext/down/download?bytes={BYTES}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let sum = checksum(0xcbf2_9ce4_8422_2325, &body);
        assert_eq!(format!("{} {sum}", body.len()), expected(BYTES));
        let request = http::Request::get("/ext/down/sse")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let mut body = response.into_body();
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
        let first = frame.unwrap().unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: 1\n\n");
        log.release.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "data: 2\n\n");
    });
}

#[test]
fn a_response_body_the_instance_breaks_off_fails_the_callers_read() {
    let server = TestServer::start(gateway_builder());
    let addr = server.http_addr().unwrap();
    run_local(async move {
        let (_host, _log, _registration) = with_streaming_provider(&server).await;
        let client = Client::connect(server.addr()).await.unwrap();
        let stub = client.namespace("ext").get_by_name("broken");
        let request = http::Request::get("/broken").body(Body::empty());
        let response = stub.fetch_stream(request.unwrap()).await.unwrap();
        assert_eq!(response.status(), 200);
        let read = response.into_body().bytes().await;
        assert!(read.is_err(), "a broken body read as whole: {read:?}");
        use http_body_util::BodyExt;
        let mut sender = http_sender(addr).await;
        let request = http::Request::get("/ext/broken/broken")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        // The gateway fails the read: after the head, or (when the body broke before hyper
        // flushed the head, which it then drops with the connection) at the head. Either way
        // the caller never reads a broken body as whole.
        let read = match sender.send_request(request).await {
            Ok(response) => response.into_body().collect().await.map(|_| ()),
            Err(error) => Err(error),
        };
        assert!(
            read.is_err(),
            "a broken body read as whole through the gateway"
        );
        // The object lives on.
        let request = http::Request::get("/incr").body(Body::empty());
        let response = stub.fetch_stream(request.unwrap()).await.unwrap();
        assert_eq!(response.into_body().bytes().await.unwrap(), "1");
    });
}

/// An HTTP/1.1 client connection to `addr`, driven by a local task.
async fn http_sender<B>(addr: std::net::SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::task::spawn_local(connection);
    sender
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to the object `name` of `ext` through the gateway, tagged `tag`.
async fn join(addr: std::net::SocketAddr, name: &str, tag: &str) -> Socket {
    let url = format!("ws://{addr}/ext/{name}/ws?tag={tag}");
    let (socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    socket
}

/// The next text (skipping pings), or the close frame's code as `Err`.
async fn next(socket: &mut Socket) -> Result<String, u16> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
        match message.expect("a message in time") {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(1006),
        }
    }
}

async fn send(socket: &mut Socket, text: &str) {
    use futures::SinkExt;
    let message = tokio_tungstenite::tungstenite::Message::text(text);
    socket.send(message).await.unwrap();
}

#[test]
fn an_instance_accepts_web_sockets_and_talks_on_them_in_order() {
    let server = TestServer::start(gateway_builder());
    let addr = server.http_addr().unwrap();
    run_local(async move {
        let (_host, log, _registration) = with_streaming_provider(&server).await;
        let mut a = join(addr, "chat", "a").await;
        let mut b = join(addr, "chat", "b").await;
        send(&mut a, "hi").await;
        assert_eq!(next(&mut a).await, Ok("a: hi".into()));
        assert_eq!(next(&mut b).await, Ok("a: hi".into()));
        for i in 0..50 {
            send(&mut b, &format!("m{i}")).await;
        }
        for i in 0..50 {
            assert_eq!(next(&mut a).await, Ok(format!("b: m{i}")));
            assert_eq!(next(&mut b).await, Ok(format!("b: m{i}")));
        }
        // A capnp client's upgrade reaches the same room.
        let client = Client::connect(server.addr()).await.unwrap();
        let stub = client.namespace("ext").get_by_name("chat");
        let upgrade = http::Request::get("/ws?tag=c").body(Bytes::new()).unwrap();
        let mut c = stub.web_socket(upgrade).await.unwrap();
        c.send("yo").await.unwrap();
        let yo = Some(WebSocketEvent::Message(WebSocketMessage::Text(
            "c: yo".into(),
        )));
        assert_eq!(c.recv().await, yo);
        assert_eq!(next(&mut a).await, Ok("c: yo".into()));
        assert_eq!(next(&mut b).await, Ok("c: yo".into()));
        // The instance closes a socket with its code; a peer's close reaches the instance.
        send(&mut a, "close").await;
        assert_eq!(next(&mut a).await, Err(4000));
        {
            use tokio_tungstenite::tungstenite::protocol::CloseFrame;
            let frame = CloseFrame {
                code: 1000.into(),
                reason: "bye".into(),
            };
            b.close(Some(frame)).await.unwrap();
        }
        assert_eq!(next(&mut b).await, Err(1000));
        until("the close event", || {
            log.socket_events
                .borrow()
                .iter()
                .any(|e| e == "close 1000 bye")
        })
        .await;
        // A request that is not an upgrade cannot accept one.
        let request = http::Request::get("/ws").body(Body::empty());
        let refused = stub.fetch_stream(request.unwrap()).await.unwrap_err();
        assert!(matches!(refused, Error::Remote(_)), "{refused:?}");
    });
}

#[test]
fn sockets_outlive_the_eviction_of_an_external_object_and_a_message_rebuilds_it() {
    let limits = HostLimits {
        idle_evict_ms: 100,
        ..HostLimits::default()
    };
    let server = TestServer::start(gateway_builder().limits(limits));
    let addr = server.http_addr().unwrap();
    run_local(async move {
        let (_host, _log, _registration) = with_streaming_provider(&server).await;
        let mut a = join(addr, "sleepy", "a").await;
        let mut b = join(addr, "sleepy", "b").await;
        send(&mut a, "count").await;
        assert_eq!(next(&mut a).await, Ok("1".into()));
        // Idle for several eviction periods: the instance is released, the sockets stay.
        tokio::time::sleep(Duration::from_millis(600)).await;
        send(&mut b, "after").await;
        // A new instance finds both sockets, and the attachment kept with the sender's.
        assert_eq!(next(&mut a).await, Ok("b: after".into()));
        assert_eq!(next(&mut b).await, Ok("b: after".into()));
        send(&mut a, "count").await;
        assert_eq!(next(&mut a).await, Ok("2".into()), "rebuilt once");
    });
}

#[test]
fn a_provider_that_goes_closes_its_objects_sockets_with_1011() {
    let server = TestServer::start(gateway_builder());
    let addr = server.http_addr().unwrap();
    run_local(async move {
        let log = Log::default();
        let (host, rpc) = duro::wire::connect(&duro::ListenAddr::Tcp(server.addr()))
            .await
            .unwrap();
        let task = tokio::task::spawn_local(async move {
            let _ = rpc.await;
        });
        let registration = register_as(&host, "ext", "gone", &log, true).await.unwrap();
        let mut a = join(addr, "orphan", "a").await;
        send(&mut a, "hi").await;
        assert_eq!(next(&mut a).await, Ok("a: hi".into()));
        task.abort();
        drop(registration);
        assert_eq!(next(&mut a).await, Err(1011));
        // Another provider serves the object afresh.
        let (_host, _log, _registration) = with_streaming_provider(&server).await;
        let mut a = join(addr, "orphan", "a2").await;
        send(&mut a, "again").await;
        assert_eq!(next(&mut a).await, Ok("a2: again".into()));
    });
}
