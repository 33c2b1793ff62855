// The peer of duro's built-in `room` class, for `duro bench room`.
//
// One room per name. Every text message a socket sends is given the next sequence number,
// stored as its own key `msg/<seq, zero-padded>` (the key 100 back is deleted, so the room
// keeps its last 100 messages) and broadcast to every socket of the room, the sender's too.
// A socket that joins is sent the kept messages first, before any new one.
//
// Sockets are accepted through the WebSocket Hibernation API (`ctx.acceptWebSocket`): the
// object may be evicted between messages while its sockets stay open, and is built again,
// history reloaded from storage, when the next message arrives.
//
// Order: `webSocketMessage` numbers, stores and broadcasts without awaiting, so one message
// is handled whole before the next starts, and every socket sees the messages in the order of
// their numbers. The writes are not awaited: workerd's output gate holds the sends that
// follow them until they are durable.

import { DurableObject } from "cloudflare:workers";

/// Messages a room keeps, and sends to a socket that joins.
const KEPT = 100;
/// Digits of the sequence number in a key, so that keys sort in sequence order.
const SEQ_DIGITS = 16;

function key(seq) {
  return "msg/" + String(seq).padStart(SEQ_DIGITS, "0");
}

export class Room extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    // The last message's number (0: none yet), and the kept messages, oldest first: the
    // copy in memory of what storage holds under `msg/`, so that a join sends it at once.
    this.seq = 0;
    this.kept = [];
    ctx.blockConcurrencyWhile(async () => {
      const stored = await ctx.storage.list({ prefix: "msg/" });
      for (const [k, text] of stored) {
        this.seq = Number(k.slice("msg/".length));
        this.kept.push(text);
      }
    });
  }

  async fetch(request) {
    if (request.headers.get("Upgrade")?.toLowerCase() !== "websocket") {
      return new Response("expected a WebSocket upgrade\n", { status: 426 });
    }
    const [client, server] = Object.values(new WebSocketPair());
    this.ctx.acceptWebSocket(server);
    // Sent now, before this handler returns, so no broadcast can come first.
    for (const text of this.kept) {
      server.send(text);
    }
    return new Response(null, { status: 101, webSocket: client });
  }

  webSocketMessage(ws, message) {
    if (typeof message !== "string") {
      return;
    }
    this.seq += 1;
    // As duro's built-in room posts a message: numbered and timed, as JSON.
    message = JSON.stringify({ seq: this.seq, text: message, at: Date.now() });
    const storage = this.ctx.storage;
    storage.put(key(this.seq), message);
    if (this.seq > KEPT) {
      storage.delete(key(this.seq - KEPT));
    }
    this.kept.push(message);
    if (this.kept.length > KEPT) {
      this.kept.shift();
    }
    for (const socket of this.ctx.getWebSockets()) {
      try {
        socket.send(message);
      } catch {
        // A socket closing as we send: it gets no more messages.
      }
    }
  }

  webSocketClose(ws, code) {
    // Complete the close handshake; 1005 and 1006 are not codes a close frame may carry.
    try {
      ws.close(code === 1005 || code === 1006 ? 1000 : code, "closing");
    } catch {
      // Already closed.
    }
  }

  webSocketError(ws) {
    try {
      ws.close(1011, "error");
    } catch {
      // Already closed.
    }
  }
}
