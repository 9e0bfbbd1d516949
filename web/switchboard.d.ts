// Types of switchboard.js, the browser client of the `switchboard.v1` protocol (docs/protocol.md).
// Checked in the web tests: `tsc --strict --noEmit` over tests/types/usage.ts, and a test that every
// export of switchboard.js is declared here.

/** The WebSocket subprotocol the client speaks. */
export declare const PROTOCOL: "switchboard.v1";

/** How the client reaches the server, tried in the order of `transports`. */
export type Transport = "websocket" | "sse" | "longpoll";

/** The connection's state, as the `state` event tells it. */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** A JWT, or a function giving one (called again before each expiry, to renew it on the open
 * WebSocket, and for each new connection). A fixed JWT the server refuses (4001, or 401 over HTTP)
 * ends the client (state "closed", after an `error` event); a function is asked again on the next
 * attempt, with backoff. */
export type TokenSource = string | (() => string | Promise<string>);

/** Where offsets, epochs and unsent publishes are kept across page reloads (sessionStorage by default). */
export type ClientStorage = Pick<Storage, "getItem" | "setItem">;

export interface SwitchboardOptions {
  /** The server's WebSocket URL; default `ws(s)://<this page's host>/ws`. */
  url?: string;
  /** Several nodes of one cluster: each reconnect goes to the next one. */
  urls?: string[];
  /** Rooms joined at once (and kept across reconnects). */
  rooms?: string[];
  /** Display name; default "Anonymous". */
  name?: string;
  token?: TokenSource | null;
  /** How long before the token's expiry a function token is asked for a fresh one; default 30000. */
  refreshMarginMs?: number;
  /** Reconnect backoff: full jitter from `minBackoffMs` (default 250) doubling up to `maxBackoffMs` (default 10000). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
  /** `null` keeps everything in memory only. */
  storage?: ClientStorage | null;
  /** Key of the client's entry in `storage`; default "switchboard". */
  storageKey?: string;
  /** Default `["websocket", "sse", "longpoll"]`: the next one after a transport never opened. */
  transports?: Transport[];
  /** On a fallback transport, when to first try WebSocket again, in ms (default 30000; then less
   * often while it fails, up to every 5 minutes). When a probe opens, the client moves back. */
  upgradeProbeMs?: number;
  /** Over WebSocket: after this many ms without a word from the server a `ping` goes out, and when
   * `heartbeatTimeoutMs` (default 10000) more bring nothing the connection is replaced; default
   * 25000, 0 turns it off. */
  heartbeatMs?: number;
  heartbeatTimeoutMs?: number;
  /** How long a long poll waits on the server, in seconds; default 25. */
  pollWaitSecs?: number;
}

/** A chat message, once per offset per room. */
export interface ChatMessage {
  room: string;
  /** Its place in the room: 1, 2, 3... within one epoch. */
  offset: number;
  /** The publisher's idempotency id, or null. */
  id: string | null;
  name: string;
  message: string;
  /** The server's local wall-clock time, HH:MM:SS, as the seed chat showed it. */
  time: string;
  /** The same time in milliseconds since the Unix epoch. */
  ts: number;
}

export interface Member {
  id: string;
  name: string;
}

export interface PresenceDetail {
  room: string;
  members: Member[];
}

/** History that could not be recovered on a resume (another epoch, or past retention). */
export interface GapDetail {
  room: string;
  /** The last offset the client had seen. */
  since: number;
  /** The first offset the server still has, when it says. */
  first?: number;
}

/** A server error envelope, or one of the client's own (`protocol`, `token`, `unauthorized`, `forbidden`, `not_allowed`). */
export interface ErrorDetail {
  type?: "error";
  code: string;
  message: string;
  req?: unknown;
  /** The close code, when the error ended the connection. */
  close?: number;
}

export interface AuthedDetail {
  sub: string;
  /** The token's expiry, in seconds since the Unix epoch. */
  exp: number;
}

/** The server's acknowledgement of a publish: stored at `offset` (once, even if sent again). */
export interface Ack {
  room: string;
  offset: number;
  duplicate: boolean;
}

export interface SwitchboardEventMap {
  message: CustomEvent<ChatMessage>;
  presence: CustomEvent<PresenceDetail>;
  state: CustomEvent<ConnectionState>;
  gap: CustomEvent<GapDetail>;
  error: CustomEvent<ErrorDetail>;
  authed: CustomEvent<AuthedDetail>;
}

export type SwitchboardListener<K extends keyof SwitchboardEventMap> = (
  this: SwitchboardClient,
  event: SwitchboardEventMap[K],
) => void;

/** A chat client: connects at once, reconnects and resumes by itself until `close()`. */
export declare class SwitchboardClient extends EventTarget {
  constructor(options: SwitchboardOptions);
  /** The options in effect, the defaults filled in. */
  readonly options: Readonly<SwitchboardOptions>;
  readonly state: ConnectionState;
  /** The transport in use or being tried. */
  readonly transport: Transport;
  /** The display name used for joins and publishes. */
  readonly name: string;
  readonly rooms: ReadonlySet<string>;
  /** Joins a room (and keeps it across reconnects). */
  join(room: string): void;
  leave(room: string): void;
  /** Renames in every joined room and for later publishes. */
  setName(name: string): void;
  /**
   * Publishes a message. Resolves with the ack once the server stored it; kept and sent again across
   * reconnects (and page reloads, with storage) until then. Rejects with the server's error when it
   * refused the publish outright.
   */
  publish(room: string, message: string): Promise<Ack>;
  /** Members currently in a room. */
  presence(room: string): Member[];
  /** Closes for good: no reconnect. */
  close(): void;

  addEventListener<K extends keyof SwitchboardEventMap>(
    type: K,
    listener: SwitchboardListener<K>,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof SwitchboardEventMap>(
    type: K,
    listener: SwitchboardListener<K>,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}
