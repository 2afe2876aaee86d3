// Types of @switchyard/client (src/index.js), following Switchyard's wire contract v1 (JSON subprotocol).

export declare const SUBPROTOCOL: 'switchyard.v1.json';

/** Error codes of the protocol, plus the client's own. */
export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'conflict'
  | 'too_large'
  | 'rate_limited'
  | 'resume_gap'
  | 'unavailable'
  | 'internal'
  /** No reply within `requestTimeoutMs`. */
  | 'timeout'
  /** The socket closed before an op that cannot be repeated was answered: its effect is unknown. */
  | 'connection_lost'
  /** The client was closed, or the server ended the session for good (4003, or 4001 with a fixed token). */
  | 'closed'
  /** Bad arguments, refused before anything was sent. */
  | 'invalid';

export declare class SwitchyardError extends Error {
  name: 'SwitchyardError';
  code: ErrorCode;
  /** For `rate_limited`: how long to wait. */
  retryAfterMs?: number;
  /** The op that failed. */
  op?: string;
  /** For `closed` caused by the server: the WebSocket close code. */
  closeCode?: number;
}

export interface ClientOptions {
  /** The WebSocket URL, e.g. `ws://127.0.0.1:8080/v1/ws`. */
  url: string;
  /**
   * A token (`sytok_...` or a JWT), or a function returning one. A function is called before every connection
   * attempt, so a reconnect can use a fresh token; with a fixed string, a 4001 close is final.
   */
  token: string | (() => string | Promise<string>);
  /** A WebSocket constructor; defaults to `globalThis.WebSocket` (browsers, Node 22+). In Node 18/20 pass `ws`. */
  WebSocket?: unknown;
  /** Full-jitter backoff: the n-th retry waits a random time below min(backoffCapMs, backoffBaseMs * 2^n). */
  backoffBaseMs?: number; // default 500
  backoffCapMs?: number; // default 30000
  /** How long an op waits for its reply once written. Default 10000. */
  requestTimeoutMs?: number;
  /** How long a connection attempt may take to reach `hello`. Default 10000. */
  connectTimeoutMs?: number;
  /** How often `send`/`dm` are retried (same cmid) after `unavailable` or `rate_limited`. Default 3. */
  sendRetries?: number;
  /** Most ops kept while disconnected. Default 1000. */
  maxQueue?: number;
  /** The random source of the backoff jitter, in [0, 1). Default Math.random. */
  random?: () => number;
}

export type State = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface Close {
  code: number;
  reason: string;
  bye: Bye | null;
}

export interface Hello {
  op: 'hello';
  session: string;
  user: string;
  project_id: string;
  heartbeat_ms: number;
  max_frame: number;
}

export interface Bye {
  op: 'bye';
  code: number;
  reason: string;
  reconnect_after_ms?: number;
}

export type Attrs = Record<string, unknown>;

export interface MsgEvent { op: 'msg'; room: string; seq: number; id: string; from: string; body: string; attrs?: Attrs; reply_to?: number; ts: number }
export interface EditEvent { op: 'edit'; room: string; seq: number; target: number; from: string; body: string; ts: number }
export interface DeleteEvent { op: 'delete'; room: string; seq: number; target: number; by: string; ts: number }
export interface ReactionEvent { op: 'reaction'; room: string; seq: number; target: number; user: string; emoji: string; removed: boolean; ts: number }
/** A message was pinned (`pinned: true`) or unpinned by `by`. */
export interface PinEvent { op: 'pin'; room: string; seq: number; target: number; by: string; pinned: boolean; ts: number }
export interface JoinedEvent { op: 'joined'; room: string; seq: number; user: string; ts: number }
export interface LeftEvent { op: 'left'; room: string; seq: number; user: string; by?: string; ts: number }
/**
 * A moderation action: `user` for bans and mutes, `until` (unix ms) for those with an end, `secs` for slow mode;
 * `by` is absent when the tenant's backend took it.
 */
export interface ModerationEvent {
  op: 'moderation';
  room: string;
  seq: number;
  action: 'ban' | 'unban' | 'mute' | 'unmute' | 'slow_mode' | 'freeze' | 'unfreeze';
  user?: string;
  until?: number;
  secs?: number;
  by?: string;
  ts: number;
}
/** The tenant's backend deleted the room: its history is gone and nobody receives it any more. */
export interface RoomDeletedEvent { op: 'room_deleted'; room: string; seq: number; ts: number }
/** Something at `seq` was erased with a user (the erasure, or a replayed event of the erased user); names nobody. */
export interface ErasedEvent { op: 'erased'; room: string; seq: number }
export interface TypingEvent { op: 'typing'; room: string; user: string }
/** `unread` only on the reader's own sessions that do not receive the room: what is left unread after it. */
export interface ReadEvent { op: 'read'; room: string; user: string; seq: number; unread?: number }
export interface PresenceEvent { op: 'presence'; user: string; online: boolean; ts: number }
/** The start of a room's latest message (up to 200 bytes of its body; empty once deleted). */
export interface MessagePreview { seq: number; id: string; from: string; body: string; ts: number; edited?: boolean; deleted?: boolean }
export interface RoomSummary {
  room: string;
  role: 'member' | 'admin';
  seq: number;
  read: number;
  /** Messages after the read marker, or after the join when that is later; the user's own included until read. */
  unread: number;
  last_message?: MessagePreview;
}
export type ServerEvent =
  | MsgEvent | EditEvent | DeleteEvent | ReactionEvent | PinEvent | JoinedEvent | LeftEvent | ModerationEvent
  | RoomDeletedEvent | ErasedEvent | TypingEvent | ReadEvent | PresenceEvent;

export interface Message {
  seq: number;
  id: string;
  /** Absent from the tombstone of an erased user's message. */
  from?: string;
  body?: string;
  attrs?: Attrs;
  reply_to?: number;
  ts: number;
  edited_ts?: number;
  deleted?: boolean;
  reactions?: Record<string, string[]>;
  /** Present (true) only while the last pin event for the message pinned it and it is not deleted. */
  pinned?: boolean;
  /** How many messages reply to this one (present when not 0). */
  reply_count?: number;
}

export interface ClientEvents {
  msg: MsgEvent;
  edit: EditEvent;
  delete: DeleteEvent;
  reaction: ReactionEvent;
  pin: PinEvent;
  joined: JoinedEvent;
  left: LeftEvent;
  moderation: ModerationEvent;
  room_deleted: RoomDeletedEvent;
  erased: ErasedEvent;
  typing: TypingEvent;
  read: ReadEvent;
  presence: PresenceEvent;
  /** Every server event above, once each. */
  event: ServerEvent;
  /** The connection state changed; `delayMs` is the wait before the next attempt. */
  state: { state: State; attempt?: number; delayMs?: number; close?: Close | null };
  hello: Hello;
  /** A room was re-joined after a reconnect, replaying every event after `from`. */
  resumed: { room: string; from: number | null; to: number };
  /** Too much was missed to replay (`resume_gap`): the room was re-joined at `to`; reload its history. */
  gap: { room: string; from: number | null; to: number };
  /** Something went wrong outside any op (a listener threw, a resume failed, the session ended). */
  error: SwitchyardError | Error;
  /** The client is closed for good. */
  close: { close: Close | null; error: SwitchyardError };
}

export interface Sent { room: string; id: string; seq: number; ts: number }

export declare class SwitchyardClient {
  constructor(options: ClientOptions);
  readonly url: string;
  readonly state: State;
  readonly hello: Hello | null;
  readonly lastClose: Close | null;

  on<K extends keyof ClientEvents>(type: K, listener: (payload: ClientEvents[K]) => void): () => void;

  /** Resolves with the first `hello` (after retrying as long as it takes); later drops reconnect on their own. */
  connect(): Promise<Hello>;
  /** Close for good (1000); waiting ops fail with `closed`. */
  close(): void;
  /** Drop the socket and reconnect now (e.g. on the browser's `online` event). */
  reconnectNow(): void;
  /** The last seq delivered in `room`; undefined when the room is not tracked. */
  lastSeq(room: string): number | null | undefined;
  /** The rooms resumed after a reconnect. */
  subscribedRooms(): string[];

  /** Any op; resolves with the `ok` fields (without `op`/`rid`). */
  request(frame: { op: string; [field: string]: unknown }): Promise<Record<string, unknown>>;

  ping(): Promise<Record<string, never>>;
  create(room: string, options?: { private?: boolean; title?: string }): Promise<{ room: string }>;
  join(room: string, options?: { since?: number }): Promise<{ room: string; seq: number }>;
  leave(room: string): Promise<{ room: string }>;
  invite(room: string, user: string): Promise<{ room: string }>;
  kick(room: string, user: string): Promise<{ room: string }>;
  send(room: string, body: string, options?: { attrs?: Attrs; replyTo?: number; cmid?: string }): Promise<Sent>;
  dm(to: string, body: string, options?: { attrs?: Attrs; cmid?: string }): Promise<Sent>;
  typing(room: string): void;
  read(room: string, seq: number): Promise<{ room: string; seq: number }>;
  react(room: string, seq: number, emoji: string, options?: { remove?: boolean }): Promise<{ room: string; seq: number }>;
  edit(room: string, seq: number, body: string): Promise<{ room: string; seq: number }>;
  /** Pin a message (room admins; either participant of a direct-message room); `seq` is the new `pin` event's. */
  pin(room: string, seq: number): Promise<{ room: string; seq: number }>;
  /** Unpin a message; `seq` is the new `pin` event's (with `pinned: false`). */
  unpin(room: string, seq: number): Promise<{ room: string; seq: number }>;
  /** Moderation ops of room admins; `seq` is the room's last seq after the `moderation` event (if any). */
  ban(room: string, user: string, options?: { secs?: number }): Promise<{ room: string; seq: number }>;
  unban(room: string, user: string): Promise<{ room: string; seq: number }>;
  mute(room: string, user: string, options?: { secs?: number }): Promise<{ room: string; seq: number }>;
  unmute(room: string, user: string): Promise<{ room: string; seq: number }>;
  slowMode(room: string, secs: number): Promise<{ room: string; seq: number }>;
  freeze(room: string): Promise<{ room: string; seq: number }>;
  unfreeze(room: string): Promise<{ room: string; seq: number }>;
  deleteMessage(room: string, seq: number): Promise<{ room: string; seq: number }>;
  /** With `thread`, a page of the replies to that message only. */
  history(room: string, options?: { before?: number; after?: number; limit?: number; thread?: number }): Promise<{ room: string; messages: Message[]; more: boolean }>;
  members(room: string): Promise<{ members: { user: string; role: 'member' | 'admin'; online: boolean }[] }>;
  /** Each room with its last seq, the read marker, the messages unread after it and the latest message. */
  rooms(): Promise<{ rooms: RoomSummary[] }>;
  presence(users: string[]): Promise<{ users: Record<string, { online: boolean; last_seen?: number }> }>;
  watch(users: string[]): Promise<Record<string, never>>;
  unwatch(users: string[]): Promise<Record<string, never>>;
}

/** Full-jitter exponential backoff: a uniformly random delay in [0, min(capMs, baseMs * 2^attempt)). */
export declare function backoffDelay(attempt: number, baseMs: number, capMs: number, random?: () => number): number;
/** A fresh client message id. */
export declare function newCmid(): string;
