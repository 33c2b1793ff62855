#!/usr/bin/env python3
"""A durable counter class served from Python: each object of a namespace bound to the
external class `pycounter` is an instance of `Counter` below, living in this process.

    duro serve --external counter_py=pycounter &
    python3 examples/provider_counter.py 127.0.0.1:7450 &
    curl -X POST http://127.0.0.1:7451/counter_py/visits/      # 1
    curl -X POST http://127.0.0.1:7451/counter_py/visits/      # 2

It answers as duro's built-in `counter` does: `POST` adds 1 and answers the new value (`1\\n`),
`GET` answers the value, `DELETE` sets it back to 0. The value lives in the object's storage
(the key `count`, as decimal text), durable before any answer leaves the host. Several of
these processes may serve the class at once: each object lives in one of them, and when one
goes, its objects move to another at their next call.

With `duro serve --token-file PATH`, pass `--token-file PATH` here too. See
examples/duro_provider.py for the connection, and schema/duro.capnp for the contract.
"""

import sys

from duro_provider import duro, main, response

KEY = b"count"


class Counter(duro.ExternalObject.Server):
    """One counter: its value under `count` in its object's storage."""

    def __init__(self, context):
        # Pipelined: usable before the host answered `storage()`.
        self.storage = context.storage().storage

    async def fetch(self, request, _context, **kwargs):
        if request.method not in ("GET", "POST", "DELETE"):
            _context.results.response = response(405, "use GET, POST or DELETE\n")
            return
        # No other event of this object runs between this read and the write below: the
        # host delivers them one at a time.
        stored = await self.storage.get(key=KEY)
        count = int(bytes(stored.value)) if stored.found else 0
        if request.method == "POST":
            count += 1
            await self.storage.put(key=KEY, value=str(count).encode())
        elif request.method == "DELETE":
            count = 0
            await self.storage.delete(key=KEY)
        _context.results.response = response(200, f"{count}\n")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], "pycounter", Counter))
