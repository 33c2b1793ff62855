#!/usr/bin/env python3
"""A chat room class served from Python, over HTTP: each object of a namespace bound to the
external class `pyroom` is a room that numbers the messages posted to it and keeps the last
100 in its storage.

    duro serve --external room_py=pyroom &
    python3 examples/provider_room.py 127.0.0.1:7450 &
    curl -d 'hello' http://127.0.0.1:7451/room_py/lobby/messages      # {"seq": 1, ...}
    curl http://127.0.0.1:7451/room_py/lobby/messages                 # the kept messages
    curl 'http://127.0.0.1:7451/room_py/lobby/messages?after=1'       # those after seq 1

| request | answer |
|---|---|
| `POST /messages` with a text of 1 to 4096 bytes | 200, the message: `{"seq": n, "text": t, "at": ms}` |
| `GET /messages` (`?after=SEQ`) | 200, the kept messages (after SEQ), oldest first |

A post is one storage transaction: the next number, the message, and the deletion of the one
that falls out of the history are written together or not at all. Messages are keys
`msg/` + the zero-padded number, so a read is one `list`. Nothing is kept in memory: a room
moves to another provider (or this one again, after a restart) without losing anything.
Polling `?after=` is how a client follows a room: this room answers over `fetch` only, so it
holds no WebSockets (the host passes requests to an external class with whole bodies).
"""

import json
import sys
import time
import urllib.parse

from duro_provider import duro, main, response

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
        self.storage = context.storage().storage

    async def fetch(self, request, _context, **kwargs):
        url = urllib.parse.urlsplit(request.url)
        if url.path != "/messages":
            answer = json_response(404, {"error": "use /messages"})
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
                return json_response(200, message)

    async def read(self, after):
        options = {"prefix": PREFIX, "startAfter": message_key(after)}
        listed = await self.storage.list(options=options)
        return json_response(200, [json.loads(bytes(entry.value)) for entry in listed.entries])


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], "pyroom", Room))
