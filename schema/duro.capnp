@0xeab139527c8a42c8;
# duro's wire contract. Foreign clients are written against this file: names and ordinals are
# fixed. New methods and fields are added after the last ordinal; nothing is renumbered or renamed.
#
# Errors travel as Cap'n Proto exceptions; the exception type tells the caller what to do:
#   failed, message "remote: ..."   the object's code returned an error; the object lives on.
#   disconnected                    the stub is broken (object reset, host shutting down,
#                                   connection lost): call `Namespace.get` again for a new stub.
#   overloaded                      too many requests queued for the object or the host: back
#                                   off, do not retry at once.
#   failed, other message           a bad argument (invalid id, unknown namespace, limit
#                                   exceeded); the message names the rule. Fix the call.

interface Host {
  # The bootstrap capability of a duro host.

  namespace @0 (name :Text) -> (namespace :Namespace);
  # The namespace bound to `name`. An unknown name fails with a message naming it.
  # The returned capability stays valid for the life of the connection.

  listNamespaces @1 () -> (namespaces :List(NamespaceInfo));
  # Every namespace of the host with the class it is bound to, ordered by name.

  authenticate @2 (token :Text) -> (host :Host);
  # When the host was started with a token (`duro serve --token-file`), the bootstrap Host
  # answers every other method with `failed` "unauthenticated", and this method returns the
  # working Host for the right token (a wrong one gets the same error, after a short delay).
  # Without a token, it returns the Host itself, whatever the token.

  registerProvider @3 (className :Text, provider :ClassProvider) -> (registration :Registration);
  # Offers `provider` (implemented by the caller, a provider process) to build the instances of
  # the external class `className`: a class that the host binds a namespace to with
  # `duro serve --external NAMESPACE=CLASS`; another name fails, naming the rule. Several
  # providers may register one class: each new activation goes to one of them (round robin),
  # and an object's instance stays on the provider that built it until the object is reset or
  # evicted. At most 64 providers per class (`overloaded` past it).
  #
  # The registration lives while the caller holds `registration` and its connection lives.
  # Releasing it, or losing the connection, unregisters the provider: no instance is asked of
  # it any more, and every object whose instance it built is reset (its stubs break with
  # `disconnected`; the next `get` activates the object on another provider). While no
  # provider of a class is registered, a call to one of its objects waits up to 5 s for one,
  # then fails with `overloaded`.
  #
  # With a token (`--token-file`), only the Host that `authenticate` returned registers. The
  # host closes a connection that sends nothing for its idle timeout (10 min by default) while
  # it has no call in progress, as it does any client's: a provider calls the host now and
  # then (examples/duro_provider.py calls `listNamespaces` every second, which also tells it
  # soon that the connection was lost). So a provider that vanished without closing its
  # connection is unregistered at the latest then.
}

interface Registration {
  # A provider's hold on its registration (see `Host.registerProvider`): no methods. Release it
  # to unregister.
}

interface ClassProvider {
  # Implemented by a provider process: it builds the instances of one external class.

  newInstance @0 (context :ObjectContext) -> (instance :ExternalObject);
  # Builds the instance of one object, handed its `context`. Called once per activation: at
  # most one instance of an object is live in the host's view, whatever the number of
  # providers. The host releases `instance` (and `context` becomes useless) when the object is
  # evicted after an idle time or reset; the provider should then forget the instance. A
  # failure here resets the object.
}

interface ObjectContext {
  # What an instance knows of itself, implemented by the host for one activation: its ID, its
  # storage, and its env. Valid while the activation lives; once the object is reset or
  # evicted, its calls fail with `disconnected`.

  id @0 () -> (id :ObjectId, hex :Text);
  # The object's ID: its 32 bytes, the name it was derived from (empty for a unique ID), and
  # its 64-hex-digit text form.

  storage @1 () -> (storage :Storage);
  # The object's storage, and no other object's: there is no call to reach another's.

  env @2 () -> (host :Host);
  # The host's namespaces, to call other objects as any client does (`namespace`, `get`, ...).
  # A call the instance makes on a stub from here lets the object's other events in until it
  # returns, as an await on another object does for a Rust class (see `ExternalObject`).
}

interface Storage {
  # One object's transactional key-value storage, on raw bytes: the storage API of a Rust class
  # (`State::storage`), with the same limits (keys at most 2048 bytes, values at most 32 KiB,
  # at most 128 keys per batched call, by default; past a limit the call fails naming it and
  # writes nothing). Keys are ordered by their bytes. Implemented by the host.
  #
  # Every call is atomic and isolated on its own; reads see the object's writes at once, also
  # before they are durable. A write is durable before any answer the object gives after it
  # leaves the host (the output gate): when the instance answers `fetch` or `alarm`, the writes
  # it made before answering are committed and fsynced before the caller sees the answer.
  # Writes with no other call between them commit together, atomically.

  get @0 (key :Data) -> (found :Bool, value :Data);
  getMany @1 (keys :List(Data)) -> (entries :List(StorageEntry));
  # The keys found, in key order; missing keys are left out.
  put @2 (key :Data, value :Data);
  putMany @3 (entries :List(StorageEntry));
  # Atomically.
  delete @4 (key :Data) -> (existed :Bool);
  deleteMany @5 (keys :List(Data)) -> (count :UInt32);
  # Atomically; `count` of the keys existed.
  list @6 (options :ListOptions) -> (entries :List(StorageEntry));
  # In key order (descending with `reverse`). An answer that would pass what one message may
  # carry (about 8 MiB) fails, naming the bound: page with `limit` and `startAfter`.
  deleteAll @7 ();
  # Deletes every key and the alarm.

  transaction @8 () -> (txn :Transaction);
  # Begins a transaction: its reads see the storage with its own writes laid over it, its
  # writes are buffered, and `commit` applies them all at once or not at all (see
  # `Transaction`). Releasing `txn` without `commit` rolls it back.

  sync @9 ();
  # Returns once every write made before it is durable.

  getAlarm @10 () -> (hasAlarm :Bool, atMs :UInt64);
  setAlarm @11 (atMs :UInt64);
  deleteAlarm @12 ();
  # The object's one alarm, in milliseconds since the Unix epoch, by the host's clock: it
  # fires at or after `atMs` (a time past fires at once) as `ExternalObject.alarm`, and is
  # retried with backoff when that fails. Set and deleted as storage writes (the output gate
  # waits for them). Inside `alarm`, `getAlarm` shows only an alarm set anew.
}

struct StorageEntry {
  key @0 :Data;
  value @1 :Data;
}

struct ListOptions {
  # The range of a `list`: keys from `start` (included) or `startAfter` (excluded), up to `end`
  # (excluded), that begin with `prefix`. A field left unset (null) sets no bound; an empty
  # but set `end` or `startAfter` is a bound like any other.

  start @0 :Data;
  startAfter @1 :Data;
  # Not together with `start`.
  end @2 :Data;
  prefix @3 :Data;
  reverse @4 :Bool;
  # Descending order, over the same range.
  limit @5 :UInt32;
  # At most this many entries; 0 for no limit.
}

interface Transaction {
  # A transaction on one object's storage (see `Storage.transaction`), implemented by the
  # host. Optimistic: it holds no lock (a provider could keep one from the object), and
  # `commit` does not apply it (`committed` false, nothing written) when another write of the
  # object landed since it began; the provider then begins again. No other event of the object
  # runs while one does (see `ExternalObject`), so within an event only the instance's own
  # writes outside the transaction can cause that. It buffers at most 16 MiB of writes
  # (a write past it fails, naming the bound). After `commit` or `rollback`, every call fails.

  get @0 (key :Data) -> (found :Bool, value :Data);
  put @1 (key :Data, value :Data);
  delete @2 (key :Data) -> (existed :Bool);
  # Whether the key exists now, as the transaction sees it.
  list @3 (options :ListOptions) -> (entries :List(StorageEntry));
  commit @4 () -> (committed :Bool);
  # Applies every write of the transaction as one atomic write, if no other write of the
  # object landed since it began; else writes nothing and answers false.
  rollback @5 ();
  # Abandons the transaction: nothing it wrote is stored.
}

interface ExternalObject extends(DurableObject) {
  # An instance of an external class, implemented by its provider (see
  # `ClassProvider.newInstance`). The host calls it as any stub is called, and keeps the
  # guarantees it keeps for a Rust class:
  #
  # - E-order: the object's events (`fetch`, `alarm`, and calls of an interface of its own:
  #   the instance may answer one more interface ID, and typed calls on the object's stubs
  #   are forwarded to it) reach the instance in the order they were made on a stub.
  # - Input gate: one event at a time. The host delivers the next event once the instance
  #   answered the one before, or while the instance awaits a call it made on a stub of its
  #   context's env (another object, which may call back). So no event interleaves with a
  #   read-modify-write over `Storage`, whatever the latency between provider and host.
  # - Output gate: an answer is released only once the writes made before it are durable.
  #
  # The host sends every request to `fetch`, with its whole body (read up to the transport's
  # bound); `request` is not called. A failure of `fetch` reaches the caller as `failed`
  # "remote: ..."; a `disconnected` one resets the object.

  alarm @0 (retryCount :UInt32);
  # The object's alarm fired (see `Storage.setAlarm`). `retryCount`: how many deliveries of it
  # failed before. Returning deletes the alarm, unless the instance set a new one; a failure
  # retries it after 2, 4, 8 ... s (at most 6 times). An instance that does not implement it
  # (`unimplemented`) has the alarm deleted as if it returned.
}

struct NamespaceInfo {
  name @0 :Text;
  className @1 :Text;
}

interface Namespace {
  # A name bound to an object class. Every object of the namespace is addressed by an ObjectId
  # minted by this namespace; IDs of other namespaces are refused.

  newUniqueId @0 () -> (id :ObjectId);
  # A fresh random ID: never the same twice, and unguessable.

  idFromName @1 (name :Text) -> (id :ObjectId);
  # The ID for `name`: the same (namespace, name) gives the same ID, also after a restart.
  # `id.name` carries the name.

  idFromString @2 (id :Text) -> (id :ObjectId);
  # Parses the 64-hex-digit text form (either case). Fails when the text has the wrong length, is
  # not hexadecimal, or was not minted by this namespace (altered, forged, or of another one).

  get @3 (id :ObjectId) -> (stub :DurableObject);
  # A stub for the object. Answers at once, so `get(id).stub.fetch(req)` pipelines into one round
  # trip. There is at most one live instance per ID in the host: every stub to the same ID, from
  # any connection, reaches the same instance. The ID is checked as in `idFromString`.
  #
  # Calls made on one stub are delivered to the object in the order they were made (E-order),
  # also calls pipelined before the object finished activating. No order holds between stubs.
  #
  # A stub breaks when its object is reset (a panic in the object's code, a failed commit) or the
  # host shuts down: its in-flight and later calls fail with `disconnected`, and it stays broken.
  # Call `get` again for a stub to a fresh instance, built from the object's durable storage.

  getByName @4 (name :Text) -> (stub :DurableObject);
  # `get(idFromName(name))` in one step, so that it pipelines: an ID must arrive at the caller
  # before it can be passed to `get`, but a stub can be used before it arrives.

  listObjects @5 (startAfter :Text, limit :UInt32) -> (ids :List(ObjectId), more :Bool);
  # The namespace's objects that have stored data, in order of their hex IDs, starting after the
  # hex ID `startAfter` (empty: from the start). At most `limit` IDs (0 is refused); `more` says
  # whether more remain. `name` is filled for objects that were reached by name.

  listObjectInfo @6 (startAfter :Text, limit :UInt32) -> (objects :List(ObjectInfo), more :Bool);
  # `listObjects` with what the host stores about each object: the same objects, order, paging
  # and limits. A read of durable storage only: no object is activated, so an alarm set by a
  # write not yet committed is not shown.
}

struct ObjectInfo {
  # One object of `listObjectInfo`.

  id @0 :ObjectId;
  # As `listObjects` answers it: `name` is filled for objects that were reached by name.

  createdMs @1 :UInt64;
  # When the object first stored data (a key or an alarm), in milliseconds since the Unix epoch,
  # by the host's system clock. An object that lost all its data and stored again is new.

  hasAlarm @2 :Bool;
  # Whether the object has an alarm; `alarmMs` is meaningful only then.

  alarmMs @3 :UInt64;
  # The object's alarm, in milliseconds since the Unix epoch, by the host's clock: it fires at
  # or after this time. A time in the past means it is due now (or being retried).
}

struct ObjectId {
  bytes @0 :Data;
  # 32 bytes: 16 bytes of identity and a 16-byte MAC under the namespace's secret.
  # Text form: 64 lowercase hex digits.

  name @1 :Text;
  # The name the ID was derived from (idFromName / getByName); empty otherwise. When set in a
  # `get`, it must match the ID.
}

interface DurableObject {
  # A stub: a capability to one object (see Namespace.get for its lifecycle).

  fetch @0 (request :HttpRequest) -> (response :HttpResponse);
  # Delivers an HTTP request to the object. The response is released only after every write the
  # object made before it is durable (committed and fsynced).

  request @1 (request :HttpRequest, context :ResponseContext, bodyFollows :Bool)
          -> (requestBody :ByteStream);
  # Delivers an HTTP request whose body may be streamed, and whose response (a streamed body,
  # or a WebSocket) comes back through `context`, which the caller implements. In E-order with
  # `fetch` on the same stub.
  #
  # With `bodyFollows` false, `request.body` is the whole body and `requestBody` is unused.
  # With `bodyFollows` true, `request.body` is the start of the body (often empty) and the rest
  # is written to `requestBody` (implemented by the host), which is set before the call
  # returns: pipeline the writes on it, so the body starts flowing in the first round trip,
  # and call `end` after the last one. A `requestBody` released without `end` means the body
  # broke off: the object's read of it fails.
  #
  # The object answers by calling `context.startResponse` once, or, for a WebSocket upgrade it
  # accepted (a request with `Upgrade: websocket`; no `Sec-WebSocket-*` handshake is needed
  # over capnp), `context.startWebSocket`. The call returns once the response was handed over:
  # the response body's last write and `end` made (or the WebSocket started). It fails, with
  # the exception types of `fetch`, if the object fails before it answered, or if the response
  # body broke off after it began (the body stream then gets no `end`). Cancelling the call
  # cancels the request; a WebSocket already started lives on, as its capabilities do.
}

interface ResponseContext {
  # The response side of `DurableObject.request`, implemented by the caller.

  startResponse @0 (response :HttpResponse, bodyFollows :Bool) -> (body :ByteStream);
  # The response's status and headers. With `bodyFollows` false, `response.body` is the
  # whole body and `body` is unused. With `bodyFollows` true, `response.body` is empty and the
  # host writes the body to `body` (implemented by the caller) and ends it with `end`; a body
  # released without `end` broke off. The caller's `write`s may wait (flow control): the host
  # then waits, and so does the object writing the body.

  startWebSocket @1 (headers :List(Header), upSocket :WebSocket) -> (downSocket :WebSocket);
  # The object accepted the WebSocket upgrade; `headers` are those of its 101 response. The
  # caller sends its messages to `upSocket` (implemented by the host) and receives the
  # object's on `downSocket` (implemented by the caller). The socket is the host's from now
  # on: the object may be evicted and built again while it stays open.
}

interface ByteStream {
  # A stream of bytes, implemented by its reader: the host for a request body, the caller for
  # a response body.

  write @0 (bytes :Data) -> stream;
  # The next bytes. Streaming: the writer may send many writes without waiting for each, and
  # capnp's flow control holds it back when the reader is behind. Writes on one capability
  # are delivered in the order made.

  end @1 ();
  # No more bytes: the stream is complete. Without it, a released stream broke off.
}

interface WebSocket {
  # One direction of a WebSocket, implemented by its receiver: the host for the messages the
  # peer sends (`upSocket`), the caller for the messages the object sends (`downSocket`).
  # Calls on one capability arrive in the order made.

  sendText @0 (text :Text) -> stream;
  sendData @1 (data :Data) -> stream;
  # A text or binary message, at most 1 MiB by default (the host's message bound; a larger one
  # from the peer closes the socket with 1009). Streaming, so flow control holds back a
  # sender whose receiver is behind. The host's `sendText` returns once the object handled
  # the message.

  close @2 (code :UInt16, reason :Text);
  # A close frame: nothing follows it in this direction. The receiver answers with its own
  # `close` on the other direction (the host does, after the object heard of it). Releasing
  # a WebSocket capability without `close` means the peer went away: the object gets
  # `web_socket_error`. Close codes as in RFC 6455: 1001 the host shuts down, 1008 a bound was
  # passed (the peer did not read fast enough), 1009 a message was too big, 1011 the object was
  # reset.
}

struct HttpRequest {
  method @0 :Text;
  url @1 :Text;
  # An absolute URL or a path with its query, e.g. "/path?q=1".
  headers @2 :List(Header);
  body @3 :Data;
}

struct HttpResponse {
  status @0 :UInt16;
  statusText @1 :Text;
  headers @2 :List(Header);
  body @3 :Data;
}

struct Header {
  name @0 :Text;
  value @1 :Text;
  # The value as text. HTTP allows header values that are not UTF-8 (obs-text): for those,
  # `value` holds a lossy UTF-8 copy and `rawValue` the exact bytes.
  rawValue @2 :Data;
  # Set only when the value is not valid UTF-8; then it is the value, and readers use it
  # instead of `value`. A reader that predates it sees the lossy `value`. Writers must not set
  # it for a UTF-8 value, so that every value has one form on the wire.
}
