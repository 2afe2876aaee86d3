// @switchyard/client: a browser and Node client for Switchyard's WebSocket API (JSON subprotocol).
//
// It keeps one session alive: it reconnects with full-jitter exponential backoff (or after the server's
// `bye.reconnect_after_ms`), authenticates again, resumes every room it saw with `join {since}`, drops events it
// has already delivered (by seq), and retries unanswered `send`/`dm` with the same `cmid`, so a retry never creates
// a second message. It answers the server's heartbeat pings and treats a silent socket as dead.
//
// It does not speak MessagePack, keep history, or talk to the HTTP API.

/** The subprotocol this client speaks. */
export const SUBPROTOCOL = 'switchyard.v1.json';

/** Events the server puts in a room's sequence (and that `join {since}` replays). */
const SEQUENCED = new Set(['msg', 'edit', 'delete', 'reaction', 'pin', 'joined', 'left', 'moderation', 'room_deleted', 'erased']);
/** Server events delivered to `on(...)` listeners. */
const EVENTS = new Set([...SEQUENCED, 'typing', 'read', 'presence']);
/** Ops whose effect is the same when sent twice, so they are sent again when a connection drops unanswered. */
const REPEATABLE = new Set(['ping', 'join', 'history', 'members', 'rooms', 'presence', 'read', 'watch', 'unwatch']);
/** Ops made repeatable by their `cmid`. */
const WITH_CMID = new Set(['send', 'dm']);
/** Close codes after which reconnecting cannot help. */
const FATAL_CLOSES = new Set([4003]);
/** `err` codes worth retrying for a `send`/`dm` (with the same `cmid`). */
const RETRY_CODES = new Set(['unavailable', 'rate_limited']);
const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

/**
 * An error from the server (`err` frame) or from the client itself. `code` is one of the protocol's error codes
 * (`bad_request`, `forbidden`, `rate_limited`, ...) or one of the client's: `timeout` (no reply in time),
 * `connection_lost` (the socket closed before an op that cannot be repeated was answered; its effect is unknown),
 * `closed` (the client was closed, or the server ended the session for good), `invalid` (bad arguments, caught
 * before sending).
 */
export class SwitchyardError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'SwitchyardError';
    this.code = code;
    if (extra.retryAfterMs !== undefined) this.retryAfterMs = extra.retryAfterMs;
    if (extra.op !== undefined) this.op = extra.op;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
  }
}

/** Full-jitter exponential backoff: a uniformly random delay in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt, baseMs, capMs, random = Math.random) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** A fresh client message id: 22 random base62 characters. */
export function newCmid() {
  const alphabet = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
  const bytes = new Uint8Array(22);
  if (globalThis.crypto?.getRandomValues) {
    globalThis.crypto.getRandomValues(bytes);
  } else {
    // Node 18 has no global Web Crypto; a cmid needs uniqueness per user for minutes, not secrecy.
    for (let i = 0; i < bytes.length; i += 1) bytes[i] = Math.floor(Math.random() * 256);
  }
  let out = '';
  for (const b of bytes) out += alphabet[b % 62];
  return out;
}

function checkId(kind, value) {
  if (typeof value !== 'string' || !ID_RE.test(value)) {
    throw new SwitchyardError('invalid', `${kind} must match ^[A-Za-z0-9_-]{1,64}$ (got ${JSON.stringify(value)})`);
  }
}

function checkRoom(room) {
  // A direct-message room is dm:<a>:<b>; the server checks that the caller is one of the two.
  if (typeof room === 'string' && room.startsWith('dm:')) {
    const parts = room.split(':');
    if (parts.length === 3 && ID_RE.test(parts[1]) && ID_RE.test(parts[2])) return;
  }
  checkId('room', room);
}

/**
 * One logical session over as many sockets as it takes.
 *
 * ```js
 * const client = new SwitchyardClient({ url: 'ws://127.0.0.1:8080/v1/ws', token: () => fetchToken() });
 * client.on('msg', (m) => console.log(m.room, m.seq, m.from, m.body));
 * await client.connect();
 * await client.join('general');
 * await client.send('general', 'hello');
 * ```
 */
export class SwitchyardClient {
  /**
   * @param {object} options see `index.d.ts` (`ClientOptions`).
   */
  constructor(options) {
    if (!options || typeof options.url !== 'string') throw new SwitchyardError('invalid', 'options.url is required');
    if (options.token === undefined) throw new SwitchyardError('invalid', 'options.token is required');
    this.url = options.url;
    this._token = options.token;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new SwitchyardError('invalid', 'no WebSocket implementation: pass options.WebSocket (e.g. from the ws package)');
    }
    this._baseMs = options.backoffBaseMs ?? 500;
    this._capMs = options.backoffCapMs ?? 30_000;
    this._requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this._connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this._sendRetries = options.sendRetries ?? 3;
    this._random = options.random ?? Math.random;
    this._maxQueue = options.maxQueue ?? 1_000;

    /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
    this.state = 'idle';
    /** The latest `hello`, once connected. */
    this.hello = null;
    /** How the last socket closed: `{code, reason, bye}`. */
    this.lastClose = null;

    this._ws = null;
    this._listeners = new Map();
    this._rooms = new Map(); // room -> {lastSeq: number|null}
    this._watched = new Set();
    this._pending = new Map(); // rid -> request
    this._queue = []; // requests waiting for an open session
    this._nextRid = 1;
    this._attempt = 0;
    this._retryTimer = null;
    this._liveTimer = null;
    this._closedByUser = false;
    this._firstHello = null;
    this._bye = null;
    this._generation = 0;
  }

  // ---- listeners ----

  /**
   * Listen for `type`: a server event (`msg`, `edit`, `delete`, `reaction`, `pin`, `joined`, `left`, `moderation`, `room_deleted`, `erased`, `typing`,
   * `read`, `presence`), `event` (every server event), or a client event: `state`, `hello`, `resumed`, `gap`,
   * `error`, `close`. Returns a function that removes the listener.
   */
  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this._listeners.get(type)?.delete(listener);
  }

  _emit(type, payload) {
    for (const listener of [...(this._listeners.get(type) ?? [])]) {
      try {
        listener(payload);
      } catch (err) {
        // A listener's bug must not break the session; report it where it can be seen.
        if (type !== 'error') this._emit('error', err);
        else console.error(err);
      }
    }
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit('state', { state, ...detail });
  }

  // ---- lifecycle ----

  /** Open the session; resolves with the first `hello`. Later drops reconnect on their own. */
  connect() {
    if (this.state === 'closed') return Promise.reject(new SwitchyardError('closed', 'the client is closed'));
    if (!this._firstHello) {
      this._firstHello = {};
      this._firstHello.promise = new Promise((resolve, reject) => {
        this._firstHello.resolve = resolve;
        this._firstHello.reject = reject;
      });
      this._open();
    }
    return this._firstHello.promise;
  }

  /** Close for good: the socket closes with 1000, waiting ops fail with `closed`, no reconnect follows. */
  close() {
    if (this.state === 'closed') return;
    this._closedByUser = true;
    clearTimeout(this._retryTimer);
    clearTimeout(this._liveTimer);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, 'client closed');
      } catch {
        // already closing
      }
    }
    this._finish(new SwitchyardError('closed', 'the client was closed'));
  }

  /**
   * Drop the current socket and reconnect at once (for example when the browser reports that it is online
   * again). Resumes like any other reconnect.
   */
  reconnectNow() {
    if (this.state === 'closed' || this.state === 'idle') return;
    clearTimeout(this._retryTimer);
    if (this._ws) {
      const ws = this._ws;
      this._dropSocket(ws, { code: 4999, reason: 'reconnect requested', bye: null }, 0);
    } else {
      this._attempt = 0;
      this._open();
    }
  }

  /** The last seq seen in `room` (null when the room is tracked but nothing is known yet; undefined if not tracked). */
  lastSeq(room) {
    return this._rooms.get(room)?.lastSeq;
  }

  /** The rooms this client resumes after a reconnect. */
  subscribedRooms() {
    return [...this._rooms.keys()];
  }

  async _resolveToken() {
    const token = typeof this._token === 'function' ? await this._token() : this._token;
    if (typeof token !== 'string' || token === '') throw new SwitchyardError('unauthorized', 'no token to authenticate with');
    return token;
  }

  _open() {
    if (this.state === 'idle') this._setState('connecting', { attempt: 0 });
    // Only the latest attempt may open a socket (reconnectNow can start one while another awaits its token).
    const attempt = ++this._generation;
    this._resolveToken().then(
      (token) => {
        if (this.state === 'closed' || attempt !== this._generation) return;
        let ws;
        try {
          ws = new this._WebSocket(this.url, SUBPROTOCOL);
        } catch (err) {
          this._scheduleReconnect({ code: 1006, reason: `cannot open: ${err.message}`, bye: null });
          return;
        }
        this._ws = ws;
        this._bye = null;
        this._armLiveness(this._connectTimeoutMs);
        ws.onopen = () => ws.send(JSON.stringify({ op: 'auth', token }));
        ws.onmessage = (ev) => this._onFrame(ws, ev.data);
        ws.onerror = () => {}; // the close event that follows says what happened
        ws.onclose = (ev) => {
          if (this._ws !== ws) return;
          this._dropSocket(ws, { code: ev.code || 1006, reason: ev.reason || '', bye: this._bye });
        };
      },
      (err) => {
        if (this.state === 'closed' || attempt !== this._generation) return;
        this._emit('error', err);
        this._scheduleReconnect({ code: 4001, reason: err.message, bye: null });
      },
    );
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = null;
    ws.onerror = () => {};
  }

  /** No frame for `ms`: the socket is dead (a half-open TCP connection, a network that went away). */
  _armLiveness(ms) {
    clearTimeout(this._liveTimer);
    const ws = this._ws;
    this._liveTimer = setTimeout(() => {
      if (this._ws === ws && ws) this._dropSocket(ws, { code: 4010, reason: 'no frame from the server in time', bye: null });
    }, ms);
  }

  _dropSocket(ws, close, delayOverride) {
    if (this._ws !== ws) return;
    this._ws = null;
    clearTimeout(this._liveTimer);
    this._detach(ws);
    try {
      ws.close(1000);
    } catch {
      // already closed
    }
    this._scheduleReconnect(close, delayOverride);
  }

  _scheduleReconnect(close, delayOverride) {
    this.lastClose = close;
    this._failInFlight();
    if (this._closedByUser || this.state === 'closed') return;
    // 4003 (revoked, kicked out, tenant disabled) is final; so is 4001 when there is no way to get a new token.
    if (FATAL_CLOSES.has(close.code) || (close.code === 4001 && typeof this._token !== 'function')) {
      const err = new SwitchyardError('closed', `the server ended the session: ${close.code} ${close.reason}`, {
        closeCode: close.code,
      });
      this._emit('error', err);
      this._finish(err);
      return;
    }
    const fromBye = close.bye?.reconnect_after_ms;
    const delay =
      delayOverride ?? (typeof fromBye === 'number' ? fromBye : backoffDelay(this._attempt, this._baseMs, this._capMs, this._random));
    this._attempt += 1;
    this._setState('reconnecting', { attempt: this._attempt, delayMs: delay, close });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  /** Requests written to the dropped socket: repeatable ones go back to the queue, the others fail. */
  _failInFlight() {
    const requeue = [];
    for (const request of this._pending.values()) {
      clearTimeout(request.timer);
      if (request.internal) {
        // A resume step: the next connection resumes from scratch.
        request.reject(new SwitchyardError('connection_lost', 'the connection dropped during the resume', { op: request.frame.op }));
      } else if (REPEATABLE.has(request.frame.op) || WITH_CMID.has(request.frame.op)) {
        requeue.push(request);
      } else {
        request.reject(
          new SwitchyardError('connection_lost', `the connection dropped before "${request.frame.op}" was answered; its effect is unknown`, {
            op: request.frame.op,
          }),
        );
      }
    }
    this._pending.clear();
    requeue.sort((a, b) => a.seqNo - b.seqNo);
    this._queue = [...requeue, ...this._queue];
  }

  _finish(err) {
    this._setState('closed', { close: this.lastClose });
    for (const request of [...this._pending.values(), ...this._queue]) {
      clearTimeout(request.timer);
      request.reject(err);
    }
    this._pending.clear();
    this._queue = [];
    if (this._firstHello && !this.hello) this._firstHello.reject(err);
    this._emit('close', { close: this.lastClose, error: err });
  }

  // ---- frames ----

  _onFrame(ws, data) {
    if (this._ws !== ws) return;
    if (this.hello) this._armLiveness(this.hello.heartbeat_ms * 2 + 5_000);
    let frame;
    try {
      frame = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      this._emit('error', new SwitchyardError('internal', 'the server sent a frame that is not JSON'));
      return;
    }
    switch (frame.op) {
      case 'hello':
        this._onHello(ws, frame);
        return;
      case 'ping':
        ws.send(JSON.stringify({ op: 'pong' }));
        return;
      case 'bye':
        this._bye = frame;
        return;
      case 'ok':
      case 'pong':
      case 'err':
        this._onReply(frame);
        return;
      default:
        if (EVENTS.has(frame.op)) this._onEvent(frame);
    }
  }

  _onHello(ws, hello) {
    this.hello = hello;
    this._armLiveness(hello.heartbeat_ms * 2 + 5_000);
    this._emit('hello', hello);
    this._resume(ws).then(
      () => {
        if (this._ws !== ws) return;
        this._attempt = 0;
        this._setState('open');
        this._flush();
        if (this._firstHello && this._firstHello.resolve) {
          this._firstHello.resolve(hello);
          this._firstHello.resolve = null;
        }
      },
      (err) => {
        // The socket dropped during the resume: the reconnect that follows resumes again. Any other failure
        // (a join refused with `unavailable`, a timeout) drops this socket and tries again the same way.
        if (err?.code === 'connection_lost' || err?.code === 'closed') return;
        this._emit('error', err);
        if (this._ws === ws) this._dropSocket(ws, { code: 4000, reason: `resume failed: ${err?.message}`, bye: null });
      },
    );
  }

  /** Re-join every room with `since` and re-watch every watched user, before anything queued is sent. */
  async _resume(ws) {
    const joins = [...this._rooms.entries()].map(async ([room, state]) => {
      const from = state.lastSeq;
      try {
        const ok = await this._write(ws, { op: 'join', room, ...(from != null ? { since: from } : {}) }, true);
        this._advance(room, ok.seq);
        this._emit('resumed', { room, from, to: ok.seq });
      } catch (err) {
        if (err.code === 'resume_gap') {
          // Too much was missed: start again from the room's present; the application reloads history.
          const ok = await this._write(ws, { op: 'join', room }, true);
          this._rooms.set(room, { lastSeq: ok.seq });
          this._emit('gap', { room, from, to: ok.seq });
        } else if (err.code === 'forbidden' || err.code === 'not_found') {
          // Kicked or the room is gone while away: stop resuming it.
          this._rooms.delete(room);
          this._emit('error', err);
        } else {
          throw err;
        }
      }
    });
    if (this._watched.size > 0) joins.push(this._write(ws, { op: 'watch', users: [...this._watched] }, true));
    await Promise.all(joins);
  }

  _advance(room, seq) {
    const state = this._rooms.get(room);
    if (!state) return;
    if (typeof seq === 'number' && (state.lastSeq == null || seq > state.lastSeq)) state.lastSeq = seq;
  }

  _onEvent(event) {
    if (SEQUENCED.has(event.op)) {
      let state = this._rooms.get(event.room);
      if (!state) {
        // A DM arrives without a join; track it so a reconnect resumes it too.
        state = { lastSeq: null };
        this._rooms.set(event.room, state);
      }
      if (state.lastSeq != null && event.seq <= state.lastSeq) return; // already delivered
      state.lastSeq = event.seq;
      // A deleted room is not resumed: a join would create a new room under its name.
      if (event.op === 'room_deleted') this._rooms.delete(event.room);
    }
    this._emit(event.op, event);
    this._emit('event', event);
  }

  _onReply(frame) {
    const request = this._pending.get(frame.rid);
    if (!request) return; // a reply to a request that timed out
    this._pending.delete(frame.rid);
    clearTimeout(request.timer);
    if (frame.op === 'err') {
      request.reject(
        new SwitchyardError(frame.code, frame.message, { retryAfterMs: frame.retry_after_ms, op: request.frame.op }),
      );
    } else {
      const { op: _op, rid: _rid, ...result } = frame;
      request.resolve(result);
    }
  }

  // ---- requests ----

  _makeRequest(frame, internal) {
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    return { frame, resolve, reject, promise, internal, seqNo: this._nextRid, timer: null };
  }

  /** Write now on `ws` (used by the resume, which must run before the queue). */
  _write(ws, frame, internal) {
    const request = this._makeRequest(frame, internal);
    this._transmit(ws, request);
    return request.promise;
  }

  _transmit(ws, request) {
    const rid = this._nextRid++;
    request.seqNo = rid;
    this._pending.set(rid, request);
    request.timer = setTimeout(() => {
      if (this._pending.get(rid) === request) {
        this._pending.delete(rid);
        request.reject(new SwitchyardError('timeout', `no reply to "${request.frame.op}" within ${this._requestTimeoutMs} ms`, { op: request.frame.op }));
      }
    }, this._requestTimeoutMs);
    try {
      ws.send(JSON.stringify({ ...request.frame, rid }));
    } catch (err) {
      // The socket is closing; its close event requeues or fails this request.
      void err;
    }
  }

  _flush() {
    const ws = this._ws;
    while (this.state === 'open' && ws && this._queue.length > 0) this._transmit(ws, this._queue.shift());
  }

  /** Send any op (`{op, ...fields}`) and resolve with the `ok` fields; rejects with a `SwitchyardError`. */
  request(frame) {
    if (this.state === 'closed') return Promise.reject(new SwitchyardError('closed', 'the client is closed'));
    if (!frame || typeof frame.op !== 'string') return Promise.reject(new SwitchyardError('invalid', 'a frame needs an op'));
    const request = this._makeRequest(frame, false);
    if (this.state === 'open' && this._ws) {
      this._transmit(this._ws, request);
    } else if (this._queue.length >= this._maxQueue) {
      return Promise.reject(new SwitchyardError('unavailable', `${this._maxQueue} ops are already waiting for the connection`));
    } else {
      this._queue.push(request);
    }
    return request.promise;
  }

  _safe(fn) {
    try {
      return fn();
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** A request that is retried (same frame, same cmid) after `unavailable` or `rate_limited`. */
  async _requestWithRetry(frame) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        return await this.request(frame);
      } catch (err) {
        if (!RETRY_CODES.has(err.code) || attempt >= this._sendRetries) throw err;
        const wait = err.retryAfterMs ?? backoffDelay(attempt, this._baseMs, this._capMs, this._random);
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  // ---- typed ops ----

  ping() {
    return this.request({ op: 'ping' });
  }

  create(room, { private: isPrivate, title } = {}) {
    return this._safe(() => {
      checkId('room', room);
      return this.request({ op: 'create', room, ...(isPrivate ? { private: true } : {}), ...(title ? { title } : {}) });
    });
  }

  /** Join and subscribe; the room is resumed after every reconnect from then on. */
  join(room, { since } = {}) {
    return this._safe(async () => {
      checkRoom(room);
      if (!this._rooms.has(room)) this._rooms.set(room, { lastSeq: since ?? null });
      const ok = await this.request({ op: 'join', room, ...(since != null ? { since } : {}) });
      this._advance(room, ok.seq);
      return ok;
    });
  }

  leave(room) {
    return this._safe(async () => {
      checkRoom(room);
      const ok = await this.request({ op: 'leave', room });
      this._rooms.delete(room);
      return ok;
    });
  }

  invite(room, user) {
    return this._safe(() => {
      checkRoom(room);
      checkId('user', user);
      return this.request({ op: 'invite', room, user });
    });
  }

  kick(room, user) {
    return this._safe(() => {
      checkRoom(room);
      checkId('user', user);
      return this.request({ op: 'kick', room, user });
    });
  }

  /** Post to a room. Carries a `cmid` (generated unless given), so however often it is retried it posts once. */
  send(room, body, { attrs, replyTo, cmid } = {}) {
    return this._safe(() => {
      checkRoom(room);
      if (typeof body !== 'string') throw new SwitchyardError('invalid', 'body must be a string');
      const frame = { op: 'send', room, body, cmid: cmid ?? newCmid() };
      if (attrs !== undefined) frame.attrs = attrs;
      if (replyTo !== undefined) frame.reply_to = replyTo;
      return this._requestWithRetry(frame);
    });
  }

  /** A direct message to `to`; resolves with `{room, id, seq, ts}` (room is `dm:<a>:<b>`). */
  dm(to, body, { attrs, cmid } = {}) {
    return this._safe(async () => {
      checkId('user', to);
      if (typeof body !== 'string') throw new SwitchyardError('invalid', 'body must be a string');
      const frame = { op: 'dm', to, body, cmid: cmid ?? newCmid() };
      if (attrs !== undefined) frame.attrs = attrs;
      const ok = await this._requestWithRetry(frame);
      if (!this._rooms.has(ok.room)) this._rooms.set(ok.room, { lastSeq: null });
      return ok;
    });
  }

  /** Tell the room's other sessions that this user is typing. Not answered; dropped while disconnected. */
  typing(room) {
    checkRoom(room);
    if (this.state === 'open' && this._ws) {
      try {
        this._ws.send(JSON.stringify({ op: 'typing', room }));
      } catch {
        // closing: a typing signal is not worth keeping
      }
    }
  }

  read(room, seq) {
    return this._safe(() => {
      checkRoom(room);
      return this.request({ op: 'read', room, seq });
    });
  }

  react(room, seq, emoji, { remove } = {}) {
    return this._safe(() => {
      checkRoom(room);
      return this.request({ op: 'react', room, seq, emoji, ...(remove ? { remove: true } : {}) });
    });
  }

  edit(room, seq, body) {
    return this._safe(() => {
      checkRoom(room);
      return this.request({ op: 'edit', room, seq, body });
    });
  }

  /** Pin a message: a room admin, or either participant of a direct-message room. */
  pin(room, seq) {
    return this._safe(() => {
      checkRoom(room);
      return this.request({ op: 'pin', room, seq });
    });
  }

  /** Unpin a message (who may pin may unpin); the event is a `pin` with `pinned: false`. */
  unpin(room, seq) {
    return this._safe(() => {
      checkRoom(room);
      return this.request({ op: 'unpin', room, seq });
    });
  }

  /**
   * Ban `user` from a room (room admins): their membership ends and they may not join, be invited or read it, for
   * `secs` seconds or, without it, until `unban`. Like every moderation op it is not repeated after a drop.
   */
  ban(room, user, { secs } = {}) {
    return this._moderate({ op: 'ban', room, user, ...(secs === undefined ? {} : { secs }) });
  }

  unban(room, user) {
    return this._moderate({ op: 'unban', room, user });
  }

  /** Mute `user` in a room (room admins): they may read but not send, edit or react, for `secs` or until `unmute`. */
  mute(room, user, { secs } = {}) {
    return this._moderate({ op: 'mute', room, user, ...(secs === undefined ? {} : { secs }) });
  }

  unmute(room, user) {
    return this._moderate({ op: 'unmute', room, user });
  }

  /** Members other than admins may send one message per `secs` seconds; 0 turns slow mode off (room admins). */
  slowMode(room, secs) {
    return this._moderate({ op: 'slow_mode', room, secs });
  }

  /** Make a room read-only for every user (room admins). */
  freeze(room) {
    return this._moderate({ op: 'freeze', room });
  }

  unfreeze(room) {
    return this._moderate({ op: 'unfreeze', room });
  }

  _moderate(frame) {
    return this._safe(() => {
      checkRoom(frame.room);
      return this.request(frame);
    });
  }

  /** Delete a message (`delete` is a reserved word in some contexts, hence the name). */
  deleteMessage(room, seq) {
    return this._safe(() => {
      checkRoom(room);
      return this.request({ op: 'delete', room, seq });
    });
  }

  /** A page of history; with `thread`, of the replies to that message only. Messages carry `reply_count`. */
  history(room, { before, after, limit, thread } = {}) {
    return this._safe(() => {
      checkRoom(room);
      const frame = { op: 'history', room };
      if (before != null) frame.before = before;
      if (after != null) frame.after = after;
      if (limit != null) frame.limit = limit;
      if (thread != null) frame.thread = thread;
      return this.request(frame);
    });
  }

  members(room) {
    return this._safe(() => {
      checkRoom(room);
      return this.request({ op: 'members', room });
    });
  }

  rooms() {
    return this.request({ op: 'rooms' });
  }

  presence(users) {
    return this.request({ op: 'presence', users });
  }

  /** Watch users' presence; the watch is renewed after every reconnect. */
  async watch(users) {
    const ok = await this.request({ op: 'watch', users });
    for (const u of users) this._watched.add(u);
    return ok;
  }

  async unwatch(users) {
    for (const u of users) this._watched.delete(u);
    return this.request({ op: 'unwatch', users });
  }
}
