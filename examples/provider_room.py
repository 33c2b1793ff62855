#!/usr/bin/env python3
"""A chat room class served from Python, over WebSockets and HTTP: each object of a namespace
bound to the external class `pyroom` is a room that numbers the messages posted to it, keeps
the last 100 in its storage, and sends each to every member connected, as the built-in Rust
`room` class does.

    duro serve --external room_py=pyroom &
    python3 examples/provider_room.py 127.0.0.1:7450 &
    python3 examples/ws_client.py ... or any WebSocket client: ws://127.0.0.1:7451/room_py/lobby/ws
    curl -d 'hello' http://127.0.0.1:7451/room_py/lobby/messages      # {"seq": 1, ...}
    curl http://127.0.0.1:7451/room_py/lobby/messages                 # the kept messages
    curl 'http://127.0.0.1:7451/room_py/lobby/messages?after=1'       # those after seq 1

| request | answer |
|---|---|
| `GET /ws` with a WebSocket upgrade | 101: joins the room; the socket gets the kept messages, oldest first, then every message posted |
| `POST /messages` with a text of 1 to 4096 bytes | 200, the message: `{"seq": n, "text": t, "at": ms}` |
| `GET /messages` (`?after=SEQ`) | 200, the kept messages (after SEQ), oldest first |

A member posts by sending a text on its socket: the message goes to every socket of the room,
the sender's too, as `{"seq": n, "text": t, "at": ms}`. A text that is empty or too long gets
`{"error": "..."}` on the sender's socket alone; a binary message closes the socket with 1003.
A message posted over HTTP reaches the sockets too.

A post is one storage transaction: the next number, the message, and the deletion of the one
that falls out of the history are written together or not at all. Messages are keys
`msg/` + the zero-padded number, so a read is one `list`. Nothing is kept in memory: the
sockets are the host's (`context.acceptWebSocket`), so a room evicted while members are
connected is built again by the next message, and a room moves to another provider (or this
one again, after a restart) without losing a kept message (its sockets are closed with 1011
when its provider goes, as on any reset: members join again). The host delivers one event at a
time, so a join (history, then the socket) and a post (numbered, then sent) never interleave:
every member gets the messages in `seq` order, none missing from its join on.
"""

import json
import sys
import time
import urllib.parse

import capnp

from duro_provider import duro, is_upgrade, main, response

HISTORY_MAX = 100
TEXT_BYTES_MAX = 4096
SEQ_KEY = b"seq"
PREFIX = b"msg/"


def message_key(seq):
    return PREFIX + b"%012d" % seq


def json_response(status, value):
    return response(status, json.dumps(value) + "\n", "application/json")


class Room(duro.ExternalObject.Server):
    """One room: its messages in its object's storage."""

    def __init__(self, context):
        self.context = context
        self.storage = context.storage().storage

    async def fetch(self, request, _context, **kwargs):
        url = urllib.parse.urlsplit(request.url)
        if url.path == "/ws":
            answer = await self.join(request)
        elif url.path != "/messages":
            answer = json_response(404, {"error": "use /messages or /ws"})
        elif request.method == "POST":
            answer = await self.post(bytes(request.body))
        elif request.method == "GET":
            after = urllib.parse.parse_qs(url.query).get("after", ["0"])[0]
            answer = await self.read(int(after) if after.isdigit() else 0)
        else:
            answer = json_response(405, {"error": "use GET or POST"})
        _context.results.response = answer

    async def post(self, body):
        if not 1 <= len(body) <= TEXT_BYTES_MAX:
            return json_response(400, {"error": f"a message is 1 to {TEXT_BYTES_MAX} bytes"})
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return json_response(400, {"error": "a message is UTF-8 text"})
        while True:
            txn = (await self.storage.transaction()).txn
            last = await txn.get(key=SEQ_KEY)
            seq = int(bytes(last.value)) + 1 if last.found else 1
            message = {"seq": seq, "text": text, "at": int(time.time() * 1000)}
            # Buffered in the transaction: sent together, answered together.
            writes = [
                txn.put(key=SEQ_KEY, value=str(seq).encode()),
                txn.put(key=message_key(seq), value=json.dumps(message).encode()),
            ]
            if seq > HISTORY_MAX:
                writes.append(txn.delete(key=message_key(seq - HISTORY_MAX)))
            for write in writes:
                await write
            # False only if another write of the room landed meanwhile: begin again.
            if (await txn.commit()).committed:
                await self.broadcast(message)
                return json_response(200, message)

    async def join(self, request):
        """Accepts the upgrade, then sends the kept messages to the new socket."""
        if not is_upgrade(request):
            return json_response(426, {"error": "join with a WebSocket upgrade"})
        socket = (await self.context.acceptWebSocket(tags=[])).socket
        listed = await self.storage.list(options={"prefix": PREFIX})
        for entry in listed.entries:
            await socket.sendText(text=bytes(entry.value).decode())
        return response(101, b"")

    async def broadcast(self, message):
        """Sends `message` to every socket of the room. Each leaves once the post is durable."""
        text = json.dumps(message)
        sockets = (await self.context.getWebSockets()).sockets
        for socket in sockets:
            try:
                await socket.sendText(text=text)
            except capnp.KjException:
                pass  # closing meanwhile: it leaves the room

    async def webSocketMessage(self, socket, message, _context, **kwargs):
        if message.which() != "text":
            await socket.close(code=1003, reason="a room is text")
            return
        answer = await self.post(message.text.encode())
        if answer["status"] != 200:
            await socket.sendText(text=answer["body"].decode().strip())

    async def read(self, after):
        options = {"prefix": PREFIX, "startAfter": message_key(after)}
        listed = await self.storage.list(options=options)
        return json_response(200, [json.loads(bytes(entry.value)) for entry in listed.entries])


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], "pyroom", Room))
