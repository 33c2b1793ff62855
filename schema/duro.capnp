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

  registerProvider @3 (className :Text, provider :ClassProvider, usesRequest :Bool)
                   -> (registration :Registration);
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
  #
  # `usesRequest`: the provider's instances implement `DurableObject.request`, and the host
  # delivers every request to them there, with streamed bodies (see `ExternalObject`). False
  # (the default, and what a provider written before it sends): every request goes to `fetch`
  # with its whole body.

  admin @4 () -> (admin :Admin);
  # The operator's capability: read an object's storage, export, import, back up (see
  # `Admin`). With a token (`--token-file`), only the Host that `authenticate` returned gives
  # it. An object's `ObjectContext.env` Host does not (`unimplemented`): exports carry the
  # namespaces' secrets.

  nodeLink @5 (token :Text) -> (host :Host);
  # For the nodes of a cluster (`duro serve --node`): the Host that one node calls another's
  # objects through. It checks `token` as `authenticate` does (the cluster shares the token of
  # `--token-file`), and its namespaces serve only the objects of the virtual shards this node
  # owns now: a `get` for any other object is answered `disconnected` ("not the owner"), never
  # passed on again, so that two nodes whose views of ownership differ for a moment cannot
  # pass a call back and forth. The caller gets a new stub through its own node, which by then
  # knows the new owner.

  shardStub @6 (key :UInt64) -> (stub :DurableObject);
  # Between the shards of one server only (on any other connection it fails): the stub this
  # shard keeps for the stub numbered `key` of the calling shard, the one to which that stub
  # hands its fetches off. The calling stub sends its other calls through the capability
  # returned, so that both ways reach the same stub here: one instance, one order, and one
  # `disconnected` once the object was reset.
}

interface Admin {
  # What an operator needs to see inside a host and to take its data out and put it back,
  # without writing code. Nothing here activates an object or waits on its gates: reads see
  # durable storage (what has committed), not writes in flight.

  readStorage @0 (namespace :Text, id :ObjectId, options :ReadOptions) -> (page :StoragePage);
  # One page of the object's stored keys, in key byte order, and its alarm. The ID is checked
  # as in `Namespace.get`. An object without data answers an empty page.

  export @1 (namespaces :List(Text)) -> (stream :ChunkStream);
  # Every object of `namespaces` (empty: of every namespace the host serves) with its keys,
  # values, name, creation time and alarm, from one consistent snapshot of durable storage
  # taken when the call arrives, as JSON Lines (the format is in the README, "Export and
  # import"). The host keeps serving and committing meanwhile. The snapshot lives until the
  # stream is read to its end or released. The lines include each namespace's secret, which
  # mints and checks its IDs: keep an export as safe as the data dir.

  import @2 (overwrite :Bool) -> (sink :ImportSink);
  # Writes into the host what `export` wrote: the bytes of an export go to `sink.write`, in
  # order, and `sink.finish` applies them all in one transaction, or nothing (a malformed line,
  # an ID its namespace's secret does not check, a conflict: the error names the line). An
  # object that already has data is a conflict, unless `overwrite`: then its data is replaced
  # by the imported object's. A namespace whose secret differs from the import's takes the
  # imported secret if it has no objects (IDs it minted before no longer check), else the
  # import is refused: two secrets cannot serve one namespace. Namespaces the host does not
  # serve are refused. Live instances of the imported objects are reset (their stubs break).

  backup @3 () -> (stream :ChunkStream);
  # A consistent, compacted copy of the whole store, taken while the host serves (LMDB's
  # copy: one read snapshot, writers are not stopped): the bytes of an LMDB `data.mdb`. Put
  # them in an empty dir as `data.mdb`, and `duro serve --data DIR` serves the copy. A host
  # whose storage is not LMDB fails with a message saying so.
}

struct ReadOptions {
  # The range of `Admin.readStorage`: keys that begin with `prefix`, from `start` (included)
  # or after `startAfter` (excluded; for the next page, pass the last key of this one).

  prefix @0 :Data;
  start @1 :Data;
  startAfter @2 :Data;
  # Not together with `start`.
  limit @3 :UInt32;
  # At most this many entries, 1 to 1000; 0 means 100. A page also ends early once its values
  # pass 4 MiB (`more` is then true).
}

struct StoragePage {
  entries @0 :List(StoredEntry);
  more @1 :Bool;
  # Whether keys remain in the range after this page.
  hasAlarm @2 :Bool;
  alarmMs @3 :UInt64;
  # The object's alarm, in milliseconds since the Unix epoch, when `hasAlarm`.
}

struct StoredEntry {
  key @0 :Data;
  value @1 :Data;
  # The value as stored, without its encoding mark: CBOR when `encoding` is `cbor`.
  encoding @2 :ValueEncoding;
}

enum ValueEncoding {
  raw @0;
  # Bytes stored as given (`put_bytes`, and every value an external class stores).
  cbor @1;
  # A typed value of a Rust class (serde), as CBOR (RFC 8949).
}

interface ChunkStream {
  # A stream of bytes the caller pulls.

  next @0 () -> (chunk :Data, done :Bool);
  # The next bytes (at most 1 MiB; never empty unless `done`), or `done` at the end. Call it
  # again only after it answered. An error ends the stream.
}

interface ImportSink {
  write @0 (bytes :Data) -> stream;
  # The next bytes of the export, in order (any split; lines may cross calls).

  finish @1 () -> (namespaces :UInt32, objects :UInt64, keys :UInt64);
  # Applies what was written; see `Admin.import`. What it answers: how many of each it wrote.
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

  acceptWebSocket @3 (tags :List(Text)) -> (socket :ObjectSocket);
  # Accepts the WebSocket upgrade offered by the request the instance is handling now (its
  # `fetch` or `request`, called for a request with `Upgrade: websocket` from the HTTP
  # gateway or a capnp client's `request`), with `tags` (at most 10, each at most 256 bytes)
  # to find the socket again by (`getWebSockets`). The instance then answers the request with
  # status 101 (through `fetch`'s response or `startResponse`; any other status drops the
  # socket and fails the request). From then on the host holds the socket, also while the
  # object is evicted, and delivers its events to `ExternalObject.webSocketMessage`,
  # `webSocketClose` and `webSocketError`, in order with the object's other events.
  #
  # "Now" is the event holding the object's input gate: call it while handling the upgrade,
  # not while awaiting a call on another object (which lets other events in). Fails, naming
  # the rule, when that event is not an upgrade, was accepted already, or when the object
  # holds its most sockets (`overloaded`).

  getWebSockets @4 (tag :Text) -> (sockets :List(ObjectSocket));
  # The object's open WebSockets, those accepted with `tag` if it is set (not null), in the
  # order they were accepted. Valid across evictions: the sockets are the host's.

  setWebSocketAutoResponse @5 (request :Text, response :Text);
  # A text message that the host answers on any of the object's sockets with `response`,
  # without waking the object (a keep-alive "ping" -> "pong"); a null `request` removes it.
}

interface ObjectSocket {
  # One of the object's WebSockets, as the instance sees it: implemented by the host, handed
  # to the instance by `acceptWebSocket`, `getWebSockets` and the WebSocket events. Valid
  # while the activation that handed it out lives (as its `ObjectContext`); the socket
  # itself is the host's and outlives it: after an eviction, the next event hands the new
  # instance a new capability to the same socket.

  sendText @0 (text :Text);
  sendData @1 (data :Data);
  # Queues a message. It leaves once every write the object made before the call is durable
  # (the output gate), after the messages sent before it. Fails when the socket is closing,
  # or the message is over the host's bound (1 MiB by default). A peer that does not read
  # fills the socket's queue, which closes the socket with 1008 past its bound (8 MiB).

  close @2 (code :UInt16, reason :Text);
  # Closes the socket with `code` (1000-1003, 1007-1014, or 3000-4999 for the application's
  # own) and `reason` (cut to 123 bytes), after the messages sent before and once the writes
  # before it are durable. The object gets no `webSocketClose` for a close of its own.
  # Closing a closed socket does nothing.

  tags @3 () -> (tags :List(Text));
  # The tags the socket was accepted with.

  setAttachment @4 (attachment :Data);
  # Keeps `attachment` (at most 16 KiB) with the socket, replacing what was kept: it
  # survives the object's eviction (not the host's restart), so an instance built again
  # knows who is on the socket.

  attachment @5 () -> (attachment :Data, found :Bool);
  # What `setAttachment` kept; `found` false if nothing.

  isClosed @6 () -> (closed :Bool);
  # Whether the socket is closing or closed: sends fail.
}

struct SocketMessage {
  # A WebSocket message: text or binary.
  union {
    text @0 :Text;
    data @1 :Data;
  }
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
  # Requests: when the provider registered with `usesRequest`, the host delivers every request
  # to `request`, with a `ResponseContext` of its own: the request body streams in on
  # `requestBody` as the caller sends it (written as it arrives; `end` after the last
  # byte; released without `end` if the caller's body broke off), and the instance answers
  # with `startResponse`, streaming a body of any size to the returned `ByteStream` (its
  # writes wait while the caller is behind: flow control down to the instance). Releasing
  # that stream without `end` breaks the response off: the caller's read of it fails.
  # `startWebSocket` is refused: accept an upgrade with `ObjectContext.acceptWebSocket` and
  # answer 101. The event's turn (the input gate) ends when `startResponse` arrives: the
  # head is the handler's answer, held until the writes before it are durable, and the body
  # may go on streaming while the next events are delivered, as for a Rust class; the
  # instance's storage calls made after it are work outside any event (each its own turn).
  # `request` returning (or failing) without `startResponse` ends the event with an error.
  #
  # Otherwise every request goes to `fetch`, with its whole body (read up to the transport's
  # bound), and the answer is a whole response.
  #
  # A failure of `fetch` or `request` reaches the caller as `failed` "remote: ..."; a
  # `disconnected` one resets the object. A reset (the provider went, among others) closes
  # the object's WebSockets with 1011, as for a Rust class.

  alarm @0 (retryCount :UInt32);
  # The object's alarm fired (see `Storage.setAlarm`). `retryCount`: how many deliveries of it
  # failed before. Returning deletes the alarm, unless the instance set a new one; a failure
  # retries it after 2, 4, 8 ... s (at most 6 times). An instance that does not implement it
  # (`unimplemented`) has the alarm deleted as if it returned.

  webSocketMessage @1 (socket :ObjectSocket, message :SocketMessage);
  # A message from one of the object's WebSockets (see `ObjectContext.acceptWebSocket`),
  # delivered as an event: in the order the socket received them, in order with the
  # object's other events, through the input gate, building the instance again if the
  # object was evicted. A failure is logged; the socket stays open.

  webSocketClose @2 (socket :ObjectSocket, code :UInt16, reason :Text);
  # The peer closed the socket, with its code (1005 when it sent none) and reason. The host
  # answers the close once this returns, unless the instance closed the socket itself.

  webSocketError @3 (socket :ObjectSocket, error :Text);
  # The socket was lost without a close: the peer vanished, or it passed a bound (a message
  # over the size bound; a queue it did not read). The socket is gone by then.
  #
  # The three are optional: an instance that does not implement one (`unimplemented`) has
  # the event ignored, as a Rust class's default handlers do.
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

  fetchByName @7 (name :Text, request :HttpRequest) -> (response :HttpResponse);
  # `getByName(name).stub.fetch(request)` in one call, for a caller that makes one call on the
  # object: one question and one answer on the wire, where the pipelined pair takes two of
  # each and a release of the stub. It reaches the same single instance as every stub to
  # `idFromName(name)` does, through the same gates and bounds, and answers and fails as
  # `fetch` does; a name over the host's bound fails as in `getByName`. It holds no stub, so it
  # has no order with any other call: a caller that needs its calls delivered in order makes
  # them on one stub.
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
