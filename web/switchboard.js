// Switchboard browser client: an ES module for the `switchboard.v1` protocol.
//
//   import { SwitchboardClient } from "/switchboard.js";
//   const client = new SwitchboardClient({ url: "ws://localhost:8000/ws", name: "Ann", rooms: ["lobby"] });
//   client.addEventListener("message", (e) => console.log(e.detail));   // {room, offset, name, message, time, id}
//   client.addEventListener("presence", (e) => console.log(e.detail));  // {room, members: [{id, name}]}
//   client.addEventListener("state", (e) => console.log(e.detail));     // "connecting" | "open" | "reconnecting" | "closed"
//   client.addEventListener("gap", (e) => console.log(e.detail));       // {room, since, first}: history lost
//   client.addEventListener("error", (e) => console.log(e.detail));     // server error envelopes
//   await client.publish("lobby", "hello");                             // resolves with the server's ack
//
// What it takes care of:
// - Reconnects with exponential backoff and full jitter (250 ms doubling to 10 s by default).
// - Resumes: it remembers the last offset it saw in each room and rejoins "since" it, so the server
//   sends exactly what was missed. Messages at or below that offset are dropped: nothing twice.
// - Publishes carry a random id; unacknowledged ones are sent again after a reconnect and the server
//   stores each id once. With `storage` (sessionStorage by default), offsets and unsent publishes also
//   survive a page reload.
// - Authentication: `token` (a JWT string, or a function returning one or a promise of one) is sent as
//   the first message of every connection, so it never shows in URLs or logs. With a function, the
//   token is renewed `refreshMarginMs` before it expires, on the open connection.

export const PROTOCOL = "switchboard.v1";

const DEFAULTS = {
  rooms: [],
  name: "Anonymous",
  minBackoffMs: 250,
  maxBackoffMs: 10000,
  storageKey: "switchboard",
  token: null,
  refreshMarginMs: 30000,
};

function defaultStorage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // storage can be disabled by the browser
  }
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export class SwitchboardClient extends EventTarget {
  constructor(options) {
    super();
    this.options = { ...DEFAULTS, ...options };
    if (!this.options.url) {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      this.options.url = `${scheme}://${location.host}/ws`;
    }
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.name = this.options.name;
    this.rooms = new Set(this.options.rooms);
    this.offsets = {}; // room -> last offset seen
    this.epochs = {}; // room -> the history those offsets belong to (from "joined")
    this.pending = []; // unacknowledged publishes: {id, room, message, name}
    this.waiters = new Map(); // publish id -> {resolve, reject}
    this.members = {}; // room -> Map(id -> name)
    this.state = "closed";
    this.attempt = 0;
    this.socket = null;
    this.stopped = false;
    this.reqCounter = 0;
    this.restore();
    this.connect();
  }

  // ---------------------------------------------------------------- public API

  /** Joins a room (and keeps it across reconnects). */
  join(room) {
    if (this.rooms.has(room)) return;
    this.rooms.add(room);
    this.save();
    if (this.state === "open") this.sendJoin(room);
  }

  /** Leaves a room. */
  leave(room) {
    if (!this.rooms.delete(room)) return;
    delete this.offsets[room];
    delete this.epochs[room];
    delete this.members[room];
    this.save();
    if (this.state === "open") this.send({ type: "leave", room });
  }

  /** Changes the name used for publishes, and in the presence of every joined room. */
  setName(name) {
    if (this.name === name) return;
    this.name = name;
    // Joining again renames; `since` keeps the rejoin from replaying anything.
    if (this.state === "open") for (const room of this.rooms) this.sendJoin(room);
  }

  /** Publishes a message; resolves with the ack ({room, offset, duplicate}) once the server stored it. */
  publish(room, message) {
    const entry = { id: randomId(), room, message, name: this.name };
    this.pending.push(entry);
    this.save();
    const acked = new Promise((resolve, reject) => this.waiters.set(entry.id, { resolve, reject }));
    if (this.state === "open") this.sendPublish(entry);
    return acked;
  }

  /** Members currently in a room: [{id, name}]. */
  presence(room) {
    return [...(this.members[room] ?? new Map()).entries()].map(([id, name]) => ({ id, name }));
  }

  /** Closes for good (no reconnect). */
  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.refreshTimer);
    if (this.socket) this.socket.close(1000, "bye");
    this.setState("closed");
  }

  // ---------------------------------------------------------------- connection

  connect() {
    if (this.stopped) return;
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting");
    let socket;
    try {
      socket = new WebSocket(this.options.url, PROTOCOL);
    } catch (error) {
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    socket.onopen = async () => {
      if (socket.protocol !== PROTOCOL) {
        this.emit("error", { code: "protocol", message: `server did not accept ${PROTOCOL}` });
        socket.close(1002, "subprotocol refused");
        return;
      }
      if (this.options.token) {
        // The token goes first: the server takes nothing else from a connection without one.
        let token;
        try {
          token = await this.currentToken();
        } catch (error) {
          this.emit("error", { code: "token", message: String(error) });
          socket.close(1000, "no token");
          return;
        }
        if (this.socket !== socket || socket.readyState !== WebSocket.OPEN) return;
        socket.send(JSON.stringify({ type: "auth", token }));
      }
      this.attempt = 0;
      this.members = {};
      this.setState("open");
      for (const room of this.rooms) this.sendJoin(room);
      for (const entry of this.pending) this.sendPublish(entry);
    };
    socket.onmessage = (event) => this.onEnvelope(event.data);
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      clearTimeout(this.refreshTimer);
      if (event.code === 4001 || event.code === 4003) {
        this.emit("error", { code: event.code === 4001 ? "unauthorized" : "forbidden", message: event.reason });
      }
      if (this.stopped) return;
      this.scheduleReconnect();
    };
    socket.onerror = () => {}; // onclose follows; the error event carries no detail
  }

  scheduleReconnect() {
    this.setState("reconnecting");
    const ceiling = Math.min(this.options.maxBackoffMs, this.options.minBackoffMs * 2 ** this.attempt);
    const delay = Math.random() * ceiling; // full jitter: clients restarted together spread out
    this.attempt += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  async currentToken() {
    const { token } = this.options;
    return typeof token === "function" ? await token() : token;
  }

  // Renews the token before it expires; the server ends sessions whose token ran out.
  scheduleRefresh(exp) {
    clearTimeout(this.refreshTimer);
    if (typeof this.options.token !== "function" || !exp) return;
    const delay = Math.max(0, exp * 1000 - Date.now() - this.options.refreshMarginMs);
    this.refreshTimer = setTimeout(async () => {
      try {
        this.send({ type: "auth", token: await this.currentToken() });
      } catch (error) {
        this.emit("error", { code: "token", message: String(error) });
      }
    }, delay);
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", state);
  }

  send(envelope) {
    // Not before "open": until then the token may still be on its way, and anything sent ahead of it
    // would end the connection. Joins and unacknowledged publishes are sent on open anyway.
    if (this.state === "open" && this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(envelope));
  }

  sendJoin(room) {
    const join = { type: "join", room, name: this.name };
    if (this.offsets[room] !== undefined) {
      join.since = this.offsets[room];
      if (this.epochs[room] !== undefined) join.epoch = this.epochs[room];
    }
    this.send(join);
  }

  sendPublish(entry) {
    this.send({ type: "publish", room: entry.room, message: entry.message, name: entry.name, id: entry.id, req: entry.id });
  }

  // ---------------------------------------------------------------- incoming

  onEnvelope(data) {
    let envelope;
    try {
      envelope = JSON.parse(data);
    } catch {
      return;
    }
    switch (envelope.type) {
      case "message":
        return this.onMessage(envelope);
      case "joined": {
        const members = new Map();
        for (const m of envelope.members ?? []) members.set(m.id, m.name);
        this.members[envelope.room] = members;
        if (envelope.recovered === false) {
          this.emit("gap", { room: envelope.room, since: this.offsets[envelope.room] ?? 0, first: envelope.first });
        }
        const known = this.epochs[envelope.room];
        if (envelope.epoch !== undefined && known !== undefined && envelope.epoch !== known) {
          // A new history (the server's was lost): its offsets start again, so the old ones would hide
          // every message as already seen.
          delete this.offsets[envelope.room];
        }
        if (envelope.epoch !== undefined) this.epochs[envelope.room] = envelope.epoch;
        this.save();
        return this.emitPresence(envelope.room);
      }
      case "presence": {
        const members = this.members[envelope.room] ?? new Map();
        this.members[envelope.room] = members;
        if (envelope.event === "join" || envelope.event === "update") members.set(envelope.member.id, envelope.member.name);
        if (envelope.event === "leave") members.delete(envelope.member.id);
        if (envelope.members) {
          members.clear();
          for (const m of envelope.members) members.set(m.id, m.name);
        }
        return this.emitPresence(envelope.room);
      }
      case "ack":
        return this.onAck(envelope);
      case "authed":
        this.emit("authed", { sub: envelope.sub, exp: envelope.exp });
        return this.scheduleRefresh(envelope.exp);
      case "left":
        if (envelope.reason === "not_allowed") {
          this.rooms.delete(envelope.room);
          this.emit("error", { code: "not_allowed", message: `left ${envelope.room}: the token no longer grants it` });
        }
        return undefined;
      case "error":
        if (envelope.req && this.waiters.has(envelope.req) && envelope.code !== "unavailable") {
          // A request the server refused outright will not succeed on retry.
          this.pending = this.pending.filter((p) => p.id !== envelope.req);
          this.save();
          this.waiters.get(envelope.req).reject(envelope);
          this.waiters.delete(envelope.req);
        }
        return this.emit("error", envelope);
      default:
        return undefined;
    }
  }

  onMessage(m) {
    const last = this.offsets[m.room];
    if (last !== undefined && m.offset <= last) return; // already seen: a resume overlap
    this.offsets[m.room] = m.offset;
    this.save();
    this.emit("message", { room: m.room, offset: m.offset, id: m.id, name: m.name, message: m.message, time: m.time, ts: m.ts });
  }

  onAck(ack) {
    const id = ack.req ?? ack.id;
    this.pending = this.pending.filter((p) => p.id !== id);
    this.save();
    const waiter = this.waiters.get(id);
    if (waiter) {
      this.waiters.delete(id);
      waiter.resolve({ room: ack.room, offset: ack.offset, duplicate: ack.duplicate });
    }
  }

  emitPresence(room) {
    this.emit("presence", { room, members: this.presence(room) });
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ---------------------------------------------------------------- persistence

  save() {
    if (!this.storage) return;
    const state = { rooms: [...this.rooms], offsets: this.offsets, epochs: this.epochs, pending: this.pending };
    try {
      this.storage.setItem(this.options.storageKey, JSON.stringify(state));
    } catch {
      // Storage full or disabled: keep working from memory.
    }
  }

  restore() {
    if (!this.storage) return;
    try {
      const state = JSON.parse(this.storage.getItem(this.options.storageKey) ?? "null");
      if (!state) return;
      for (const room of state.rooms ?? []) this.rooms.add(room);
      this.offsets = state.offsets ?? {};
      this.epochs = state.epochs ?? {};
      this.pending = state.pending ?? [];
    } catch {
      // A corrupt entry is ignored.
    }
  }
}
