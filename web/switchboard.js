// Switchboard browser client: an ES module for the `switchboard.v1` protocol.
//
//   import { SwitchboardClient } from "/switchboard.js";
//   const client = new SwitchboardClient({ url: "ws://localhost:8000/ws", name: "Ann", rooms: ["lobby"] });
//   // or, for a cluster: { urls: ["wss://node1.example/ws", "wss://node2.example/ws"], ... }
//   client.addEventListener("message", (e) => console.log(e.detail));   // {room, offset, name, message, time, id}
//   client.addEventListener("presence", (e) => console.log(e.detail));  // {room, members: [{id, name}]}
//   client.addEventListener("state", (e) => console.log(e.detail));     // "connecting" | "open" | "reconnecting" | "closed"
//   client.addEventListener("gap", (e) => console.log(e.detail));       // {room, since, first}: history lost
//   client.addEventListener("error", (e) => console.log(e.detail));     // server error envelopes
//   await client.publish("lobby", "hello");                             // resolves with the server's ack
//
// What it takes care of:
// - Reconnects with exponential backoff and full jitter (250 ms doubling to 10 s by default); with
//   `urls`, each attempt goes to the next node, so a dead node costs one reconnect.
// - Resumes: it remembers the last offset it saw in each room and rejoins "since" it, so the server
//   sends exactly what was missed. Messages at or below that offset are dropped: nothing twice.
// - Publishes carry a random id; unacknowledged ones are sent again after a reconnect and the server
//   stores each id once. With `storage` (sessionStorage by default), offsets and unsent publishes also
//   survive a page reload.
// - Authentication: `token` (a JWT string, or a function returning one or a promise of one). Over
//   WebSocket it is the first message of every connection, and over long polling and HTTP publishes
//   an `Authorization` header, so it shows in no URL. EventSource can send no header: over SSE the
//   token goes in the query string, where proxies may log it (the `switchboard_token` cookie avoids
//   that). With a function, the token is renewed `refreshMarginMs` before it expires, on the open
//   WebSocket. A token the server refuses (4001) ends the client when it is a fixed string, as no
//   retry can fix it; a function is asked again on the next, backed-off attempt.
// - Falls back to SSE, then long polling, where WebSocket does not get through, and goes back to
//   WebSocket as soon as a probe finds it does (checked every minute or so).

export const PROTOCOL = "switchboard.v1";

const DEFAULTS = {
  rooms: [],
  name: "Anonymous",
  minBackoffMs: 250,
  maxBackoffMs: 10000,
  storageKey: "switchboard",
  token: null,
  refreshMarginMs: 30000,
  // Tried in this order; the next one after a transport failed twice without ever opening.
  transports: ["websocket", "sse", "longpoll"],
  pollWaitSecs: 25,
  // On a fallback transport, the first WebSocket probe comes this long after it opened (then less
  // and less often, up to every 5 minutes, while the probes fail).
  upgradeProbeMs: 30000,
  // Over WebSocket, after this long without a word from the server a `ping` goes out; when
  // `heartbeatTimeoutMs` more bring nothing, the connection is taken for dead (a laptop that slept,
  // a NAT that forgot it: no close ever comes) and replaced. 0 turns it off.
  heartbeatMs: 25000,
  heartbeatTimeoutMs: 10000,
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
    // Several nodes of one cluster: after a connection fails or ends, the next one is tried (each
    // resumes from the same offsets, so moving costs a reconnect and nothing else).
    this.urls = this.options.urls?.length ? [...this.options.urls] : [this.options.url];
    this.urlIndex = 0;
    this.transports = [...this.options.transports];
    this.transportIndex = 0;
    this.failures = 0; // attempts on the current transport that never opened
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
    this.clientId = randomId(); // names this client's long polls, so it counts as present between them
    this.generation = 0; // each connect() counts one; a stream set up for an older one is dropped
    this.opening = false; // an SSE stream or long poll is being set up and has not opened yet
    this.restore();
    // After the constructor returns, so listeners added right after it see the first "connecting".
    queueMicrotask(() => this.connect());
    // Back from offline: try now rather than at the end of the backoff.
    this.onOnline = () => {
      if (this.stopped || this.retryTimer === null || this.retryTimer === undefined) return;
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.attempt = 0;
      this.connect();
    };
    globalThis.addEventListener?.("online", this.onOnline);
  }

  // ---------------------------------------------------------------- public API

  /** Joins a room (and keeps it across reconnects). */
  join(room) {
    if (this.rooms.has(room)) return;
    this.rooms.add(room);
    this.save();
    if (this.state === "open") this.sendJoin(room);
    this.restartStream();
  }

  /** Leaves a room. */
  leave(room) {
    if (!this.rooms.delete(room)) return;
    delete this.offsets[room];
    delete this.epochs[room];
    delete this.members[room];
    this.save();
    if (this.state === "open") this.send({ type: "leave", room });
    this.restartStream();
  }

  /** Changes the name used for publishes, and in the presence of every joined room. */
  setName(name) {
    if (this.name === name) return;
    this.name = name;
    // Joining again renames; `since` keeps the rejoin from replaying anything.
    if (this.state === "open") for (const room of this.rooms) this.sendJoin(room);
    this.restartStream();
  }

  /** Over SSE or long polling the rooms and the name are in the request: a change opens a new one,
   * also while one is still being set up, or while an EventSource reconnects by itself (either
   * would ask with the rooms of before). Waiting for our own reconnect, there is nothing to do: the
   * next attempt asks for the rooms as they are then. */
  restartStream() {
    if (this.transport === "websocket" || this.stopped) return;
    // An EventSource that reconnects by itself would ask again with the rooms of before.
    const reconnectingBySelf = this.transport === "sse" && this.socket;
    if (this.state !== "open" && !this.opening && !reconnectingBySelf) return;
    if (this.transport === "sse") this.socket?.close();
    this.socket = null;
    this.connect();
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
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.retryTimer);
    clearTimeout(this.refreshTimer);
    clearTimeout(this.probeTimer);
    globalThis.removeEventListener?.("online", this.onOnline);
    this.socket?.close?.(1000, "bye"); // an EventSource ignores the code; a long poll has nothing to close
    this.socket = null;
    this.setState("closed");
  }

  // ---------------------------------------------------------------- connection

  /** The transport in use or being tried: "websocket", "sse" or "longpoll". */
  get transport() {
    return this.transports[this.transportIndex];
  }

  connect() {
    if (this.stopped) return;
    this.generation += 1;
    clearTimeout(this.retryTimer); // a probe or a restart may come before a pending retry
    this.retryTimer = null;
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting");
    const available = { websocket: typeof WebSocket === "function", sse: typeof EventSource === "function", longpoll: typeof fetch === "function" };
    while (!available[this.transport] && this.transportIndex < this.transports.length - 1) this.transportIndex += 1;
    if (this.transport === "sse") return this.connectSse();
    if (this.transport === "longpoll") return this.connectPoll();
    let socket;
    try {
      socket = new WebSocket(this.urls[this.urlIndex], PROTOCOL);
    } catch (error) {
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    socket.onopen = async () => {
      if (this.socket !== socket) return socket.close(1000, "replaced");
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
      this.opened();
      for (const room of this.rooms) this.sendJoin(room);
      for (const entry of this.pending) this.sendPublish(entry);
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.lastHeard = Date.now();
      this.pingSentAt = null;
      this.onEnvelope(event.data);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      clearTimeout(this.refreshTimer);
      clearInterval(this.heartbeatTimer);
      if (event.code === 4001 || event.code === 4003) {
        this.emit("error", { code: event.code === 4001 ? "unauthorized" : "forbidden", message: event.reason, close: event.code });
      } else if (event.code === 4002) {
        this.emit("error", { code: "disconnected", message: event.reason, close: event.code });
      }
      if (this.stopped) return;
      if (event.code === 4001 && typeof this.options.token !== "function") {
        // A fixed token the server refused (bad, expired, or none where one is needed) will be
        // refused again: stop rather than ask again forever.
        this.close();
        return;
      }
      this.scheduleReconnect();
    };
    socket.onerror = () => {}; // onclose follows; the error event carries no detail
  }

  opened() {
    if (this.transport === "websocket") this.startHeartbeat(this.socket);
    this.transportWorked = true;
    this.opening = false;
    // With a token over WebSocket, the backoff starts over only once the server took the token
    // ("authed"): an open socket says nothing yet, and a refused token must not retry at full speed.
    if (!(this.options.token && this.transport === "websocket")) this.attempt = 0;
    this.members = {};
    this.setState("open");
    if (this.transportIndex > 0) this.scheduleProbe(this.options.upgradeProbeMs);
  }

  /** Watches `socket` for silence (see `heartbeatMs`); a dead one is dropped and replaced at once,
   * without waiting for a close that a vanished peer never sends. */
  startHeartbeat(socket) {
    clearInterval(this.heartbeatTimer);
    const { heartbeatMs, heartbeatTimeoutMs } = this.options;
    if (!heartbeatMs) return;
    this.lastHeard = Date.now();
    this.pingSentAt = null;
    this.heartbeatTimer = setInterval(() => {
      if (this.socket !== socket) return clearInterval(this.heartbeatTimer);
      const now = Date.now();
      // Dead only when a ping went out and its time passed with nothing heard: a timer that fired
      // late (a background tab, a laptop waking) sends its ping first rather than give up at once.
      if (this.pingSentAt !== null && now - this.pingSentAt >= heartbeatTimeoutMs) {
        clearInterval(this.heartbeatTimer);
        this.socket = null;
        socket.close(4000, "no answer to a ping");
        this.scheduleReconnect();
      } else if (this.pingSentAt === null && now - this.lastHeard >= heartbeatMs) {
        this.pingSentAt = now;
        this.send({ type: "ping" });
      }
    }, Math.max(50, Math.min(heartbeatMs, heartbeatTimeoutMs) / 4));
  }

  /** On a fallback transport, tries a WebSocket now and then; when one opens, moves back to it. */
  scheduleProbe(delay) {
    clearTimeout(this.probeTimer);
    if (this.transports[0] !== "websocket" || typeof WebSocket !== "function") return;
    this.probeTimer = setTimeout(() => {
      if (this.stopped || this.transportIndex === 0) return;
      let probe;
      if (this.state !== "open") return; // a reconnect is under way; its opening probes again
      try {
        probe = new WebSocket(this.urls[this.urlIndex], PROTOCOL);
      } catch {
        return this.scheduleProbe(Math.min(2 * delay, 300000));
      }
      probe.onopen = () => {
        const accepted = probe.protocol === PROTOCOL;
        probe.close(1000, "probe");
        if (!accepted || this.stopped || this.transportIndex === 0) return;
        // Moving costs a reconnect and nothing else: the offsets and unacknowledged publishes go along.
        if (this.transport === "sse") this.socket?.close();
        this.socket = null;
        this.transportIndex = 0;
        this.failures = 0;
        this.transportWorked = false;
        this.attempt = 0;
        this.connect();
      };
      probe.onerror = () => {
        if (!this.stopped && this.state === "open" && this.transportIndex > 0) this.scheduleProbe(Math.min(2 * delay, 300000));
      };
    }, delay);
  }

  scheduleReconnect() {
    this.opening = false;
    clearTimeout(this.probeTimer);
    this.setState("reconnecting");
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    // A transport that has never opened, tried twice on every URL (a proxy that strips Upgrade, a
    // network that holds streams), gives way to the next one; the place in each room goes along. One
    // that worked once stays: its failing now is the server away, not the transport.
    const giveUp = !this.transportWorked && ++this.failures >= 2 * this.urls.length;
    if (giveUp && this.transportIndex < this.transports.length - 1) {
      this.transportIndex += 1;
      this.failures = 0;
      this.attempt = 0;
    }
    const ceiling = Math.min(this.options.maxBackoffMs, this.options.minBackoffMs * 2 ** this.attempt);
    const delay = Math.random() * ceiling; // full jitter: clients restarted together spread out
    this.attempt += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  /** Over SSE and long polling a refused token comes as an HTTP answer: said as an error event, and,
   * for a fixed token, the end (as a WebSocket's 4001). */
  refusedOverHttp(status, answer) {
    if (status !== 401 && status !== 403) return false;
    this.emit("error", { code: answer?.code ?? (status === 401 ? "unauthorized" : "forbidden"), message: answer?.message ?? `HTTP ${status}` });
    if (status === 401 && typeof this.options.token !== "function") {
      this.close();
      return true;
    }
    return false;
  }

  async currentToken() {
    const { token } = this.options;
    return typeof token === "function" ? await token() : token;
  }

  // Renews the token before it expires; the server ends sessions whose token ran out.
  scheduleRefresh(exp) {
    clearTimeout(this.refreshTimer);
    if (typeof this.options.token !== "function" || !exp) return;
    const left = exp * 1000 - Date.now();
    // A token already within the margin (the function gave back one as old as the last) is renewed
    // halfway to its end, and never sooner than a second: not again at once, in a loop. setTimeout
    // takes at most 2^31 - 1 ms (24.8 days); more would fire at once.
    const delay = Math.min(Math.max(left - this.options.refreshMarginMs, left / 2, 1000), 2 ** 31 - 1);
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
    if (this.transport !== "websocket") return; // joins go in the stream's query; publishes by POST
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
    if (this.transport !== "websocket") return this.postPublish(entry);
    this.send({ type: "publish", room: entry.room, message: entry.message, name: entry.name, id: entry.id, req: entry.id });
  }

  // ---------------------------------------------------------------- SSE and long polling

  /** The HTTP base of the current server URL: ws://host/ws -> http://host. */
  httpBase() {
    const url = new URL(this.urls[this.urlIndex], globalThis.location?.href);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    return `${url.protocol}//${url.host}`;
  }

  /** Where this client stands in each room, as the server's opaque cursor. */
  cursor() {
    const places = {};
    for (const room of this.rooms) {
      if (this.offsets[room] !== undefined) places[room] = [this.epochs[room] ?? "", this.offsets[room]];
    }
    const bytes = new TextEncoder().encode(JSON.stringify(places));
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  async query(extra = {}) {
    const params = new URLSearchParams();
    for (const room of this.rooms) params.append("room", room);
    params.set("name", this.name);
    params.set("cursor", this.cursor());
    if (this.transport === "longpoll") params.set("client", this.clientId);
    // EventSource cannot send headers: its token goes in the query. A long poll sends a header.
    if (this.options.token && this.transport === "sse") params.set("token", await this.currentToken());
    for (const [key, value] of Object.entries(extra)) params.set(key, value);
    return params.toString();
  }

  async connectSse() {
    const generation = this.generation;
    this.opening = true;
    let query;
    try {
      query = await this.query();
    } catch (error) {
      if (generation !== this.generation) return;
      this.emit("error", { code: "token", message: String(error) });
      return this.scheduleReconnect();
    }
    if (this.stopped || generation !== this.generation) return;
    const url = `${this.httpBase()}/sse?${query}`;
    const source = new EventSource(url);
    this.socket = source;
    for (const kind of ["message", "joined", "presence", "error"]) {
      source.addEventListener(kind, (event) => {
        if (this.socket === source && event.data) this.onEnvelope(event.data);
      });
    }
    source.onopen = () => {
      if (this.socket !== source) return;
      this.opened();
      for (const entry of this.pending) this.postPublish(entry);
    };
    source.onerror = (event) => {
      // The server's own `error` events arrive here too, as messages: they are handled above.
      if (this.socket !== source || event.data !== undefined) return;
      // EventSource reconnects by itself (with Last-Event-ID) unless the server refused it; a
      // stream that never opened is this transport failing.
      if (source.readyState === EventSource.CLOSED || this.state !== "open") {
        const neverOpened = this.state !== "open";
        source.close();
        this.socket = null;
        this.scheduleReconnect();
        if (neverOpened && this.options.token) this.explainRefusal(url);
      } else {
        this.setState("reconnecting");
      }
    };
  }

  /** EventSource says nothing of why a stream was refused: the same request once more, by fetch,
   * reads the answer (and is cut off at once if it is a stream after all). */
  async explainRefusal(url) {
    const abort = new AbortController();
    try {
      const response = await fetch(url, { signal: abort.signal });
      if (response.status === 401 || response.status === 403) {
        this.refusedOverHttp(response.status, await response.json().catch(() => null));
      }
    } catch {
      // Unreachable: the reconnect already scheduled will say so by its state.
    } finally {
      abort.abort();
    }
  }

  async connectPoll() {
    const generation = this.generation;
    this.opening = true;
    const token = this.options.token ? await this.currentToken().catch(() => null) : null;
    if (this.stopped || generation !== this.generation) return;
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const session = {};
    this.socket = session;
    let first = true;
    while (this.socket === session && !this.stopped) {
      let answer;
      try {
        const wait = first ? 0 : this.options.pollWaitSecs;
        const response = await fetch(`${this.httpBase()}/poll?${await this.query({ wait })}`, { headers });
        answer = await response.json();
        if (!response.ok) {
          if (this.socket === session && this.refusedOverHttp(response.status, answer)) return;
          throw new Error(answer.message ?? `HTTP ${response.status}`);
        }
      } catch (error) {
        if (this.socket !== session) return;
        this.socket = null;
        return this.scheduleReconnect();
      }
      if (this.socket !== session) return;
      if (first) {
        first = false;
        this.opened();
        for (const entry of this.pending) this.postPublish(entry);
      }
      for (const [room, epoch] of Object.entries(answer.epochs ?? {})) if (this.epochs[room] === undefined) this.epochs[room] = epoch;
      for (const notice of answer.notices ?? []) this.onEnvelope(JSON.stringify(notice));
      for (const message of answer.messages ?? []) this.onMessage(message);
      this.adoptCursor(answer.cursor);
    }
  }

  /** Takes the place a poll's answer gives each room (after its messages): a room with no message
   * yet has its place there only, and without it a restart would find none and get only the recent
   * messages. */
  adoptCursor(cursor) {
    if (typeof cursor !== "string") return;
    let places;
    try {
      const base64 = cursor.replace(/-/g, "+").replace(/_/g, "/");
      const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
      places = JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
    } catch {
      return; // opaque after all: the offsets of the messages stand
    }
    for (const [room, place] of Object.entries(places ?? {})) {
      const [epoch, offset] = Array.isArray(place) ? place : [];
      if (!this.rooms.has(room) || !Number.isSafeInteger(offset)) continue;
      if (epoch && this.epochs[room] !== undefined && this.epochs[room] !== epoch) continue;
      if (!(this.offsets[room] >= offset)) this.offsets[room] = offset;
    }
    this.save();
  }

  /** Publishes over HTTP one after another, so that they are stored in the order they were made. */
  postPublish(entry) {
    this.posting = (this.posting ?? Promise.resolve()).then(() => this.postOne(entry));
    return this.posting;
  }

  async postOne(entry) {
    if (!this.pending.some((p) => p.id === entry.id)) return; // acknowledged meanwhile
    const headers = { "Content-Type": "application/json" };
    try {
      if (this.options.token) headers.Authorization = `Bearer ${await this.currentToken()}`;
      const body = JSON.stringify({ room: entry.room, message: entry.message, name: entry.name, id: entry.id });
      const response = await fetch(`${this.httpBase()}/publish`, { method: "POST", headers, body });
      const answer = await response.json();
      if (response.ok) {
        for (const ack of answer.acks ?? []) this.onAck({ ...ack, req: entry.id });
      } else if (response.status >= 400 && response.status < 500 && response.status !== 429 && response.status !== 408) {
        this.onEnvelope(JSON.stringify({ ...answer, req: entry.id }));
      } else {
        // Over the rate (429), too slow (408) or unavailable (5xx): again with the same id, before
        // any later one, after what Retry-After asks (1 to 60 s).
        const after = Math.min(60, Math.max(1, Number(response.headers.get("Retry-After")) || 1));
        await new Promise((r) => setTimeout(r, after * 1000));
        if (this.state === "open") await this.postOne(entry);
      }
    } catch {
      // The connection went: the publish stays pending and goes again when one is open.
    }
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
        // Only when the server says so: a rejoin while connected (a new name) may see live messages
        // past `joined.offset` arrive before its `joined`.
        const ahead = envelope.recovered === false && this.offsets[envelope.room] > envelope.offset;
        if ((envelope.epoch !== undefined && known !== undefined && envelope.epoch !== known) || ahead) {
          // A new history (the server's was lost), or one restored from a backup (our offset is past
          // its last): its offsets are given out again, so ours would hide every message as seen.
          delete this.offsets[envelope.room];
        }
        if (envelope.epoch !== undefined) this.epochs[envelope.room] = envelope.epoch;
        // Everything before `first` is behind us (seen, or reported as a gap): the place to resume
        // from even when the replay brings nothing (an empty room), or a restart would find no place
        // and get only the recent messages.
        if (Number.isSafeInteger(envelope.first) && !(this.offsets[envelope.room] >= envelope.first - 1)) {
          this.offsets[envelope.room] = envelope.first - 1;
        }
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
      case "pong":
        return undefined; // heard: that is all it is for
      case "authed":
        this.attempt = 0; // the server took the token: a later drop starts its backoff over
        this.emit("authed", { sub: envelope.sub, exp: envelope.exp });
        return this.scheduleRefresh(envelope.exp);
      case "left":
        if (envelope.reason === "not_allowed") {
          this.rooms.delete(envelope.room);
          this.emit("error", { code: "not_allowed", message: `left ${envelope.room}: the token no longer grants it` });
        }
        return undefined;
      case "error":
        if (envelope.code === "unavailable" && envelope.req && this.transport === "websocket") {
          // Not stored, or not known to be: the same publish again (its id keeps it once) in a second.
          const entry = this.pending.find((p) => p.id === envelope.req);
          if (entry) setTimeout(() => { if (this.pending.includes(entry)) this.sendPublish(entry); }, 1000);
        }
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
    const state = { rooms: [...this.rooms], offsets: this.offsets, epochs: this.epochs, pending: this.pending, clientId: this.clientId };
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
      if (state.clientId) this.clientId = state.clientId;
    } catch {
      // A corrupt entry is ignored.
    }
  }
}
