// The peers of duro's built-in `counter` and `room` classes, for `duro bench`.
//
// Routes mirror duro's HTTP gateway: /{namespace}/{name}/{rest} goes to the object `name`;
// `GET /room/{name}/ws` is a WebSocket upgrade, served by room.js.
//
// Counter:
// POST increments (storage get + put; workerd's output gate holds the response until the put
// is durable) and answers the new value; GET answers the current value (a cached read).

import { DurableObject } from "cloudflare:workers";

export { Room } from "./room.js";

export class Counter extends DurableObject {
  async fetch(request) {
    const storage = this.ctx.storage;
    const value = (await storage.get("value")) ?? 0;
    if (request.method === "POST") {
      await storage.put("value", value + 1);
      return new Response(String(value + 1));
    }
    return new Response(String(value));
  }
}

export default {
  async fetch(request, env) {
    const parts = new URL(request.url).pathname.split("/");
    // ["", namespace, name, ...rest]
    if (parts.length === 4 && parts[1] === "room" && parts[2] !== "" && parts[3] === "ws") {
      const stub = env.ROOM.get(env.ROOM.idFromName(parts[2]));
      return stub.fetch(request);
    }
    if (parts.length < 3 || parts[1] !== "counter" || parts[2] === "") {
      return new Response("use /counter/{name}/ or /room/{name}/ws\n", { status: 404 });
    }
    const stub = env.COUNTER.get(env.COUNTER.idFromName(parts[2]));
    return stub.fetch(request);
  },
};
