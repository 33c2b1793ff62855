# The peer of `duro bench`: the same counter and room as duro's built-in `counter` and `room`
# classes, as JavaScript Durable Objects on workerd with local-disk storage, behind workerd's own
# HTTP server.
#
# `duro bench` writes this file, worker.js and room.js to a temp dir and starts
#   workerd serve config.capnp --socket-fd http=FD --directory-path do-storage=DIR
# so the listening socket (loopback, port 0) and the storage dir are chosen at run time; the
# address and path below are placeholders that the overrides replace.

using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "main", worker = .benchWorker),
    (name = "do-storage", disk = (path = "/nonexistent", writable = true)),
  ],
  sockets = [
    (name = "http", address = "127.0.0.1:0", http = (), service = "main"),
  ],
);

const benchWorker :Workerd.Worker = (
  compatibilityDate = "2024-09-23",
  modules = [
    (name = "worker.js", esModule = embed "worker.js"),
    (name = "room.js", esModule = embed "room.js"),
  ],
  durableObjectNamespaces = [
    (className = "Counter", uniqueKey = "duro-bench-counter"),
    (className = "Room", uniqueKey = "duro-bench-room"),
  ],
  durableObjectStorage = (localDisk = "do-storage"),
  bindings = [
    (name = "COUNTER", durableObjectNamespace = "Counter"),
    (name = "ROOM", durableObjectNamespace = "Room"),
  ],
);
