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
