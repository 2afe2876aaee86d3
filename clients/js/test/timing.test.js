// The client's reconnect timing, without a server: a scripted WebSocket stands in for the socket so the test can
// send a `bye` with `reconnect_after_ms`, go silent, or close with chosen codes. What a real fleet does is covered
// by client.test.js; this file covers the decisions the client makes from those frames.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { SwitchyardClient } from '../src/index.js';

/** A socket whose server side the test plays. */
class ScriptedSocket {
  static all = [];
  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.sent = [];
    this.closed = false;
    ScriptedSocket.all.push(this);
    setTimeout(() => this.onopen?.(), 0);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close() {
    this.closed = true;
  }
  /** The server sends a frame. */
  frame(object) {
    this.onmessage?.({ data: JSON.stringify(object) });
  }
  /** The server closes. */
  serverClose(code, reason = '') {
    this.onclose?.({ code, reason });
  }
  hello(heartbeat = 25_000) {
    this.frame({ op: 'hello', session: 's', user: 'u', project_id: 'pj_x', heartbeat_ms: heartbeat, max_frame: 65536 });
  }
}

const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));

/** Wait until socket `n` exists and has sent its auth frame (timers run late on a busy machine). */
async function opened(n = 0) {
  const deadline = Date.now() + 5_000;
  while (!(ScriptedSocket.all[n]?.sent.length > 0)) {
    if (Date.now() > deadline) throw new Error(`socket ${n} never opened`);
    await tick(2);
  }
  return ScriptedSocket.all[n];
}

const made = [];
// A client left open (a failed assertion) would keep its timers, and the test process, alive.
after(() => made.forEach((c) => c.close()));

function client(options = {}) {
  ScriptedSocket.all = [];
  const c = new SwitchyardClient({ url: 'ws://test/v1/ws', token: 'tok', WebSocket: ScriptedSocket, ...options });
  c.states = [];
  c.on('state', (s) => c.states.push(s));
  made.push(c);
  return c;
}

test('authenticates with a first frame and the JSON subprotocol', async () => {
  const c = client();
  const connected = c.connect();
  const socket = await opened();
  assert.equal(socket.protocol, 'switchyard.v1.json');
  assert.deepEqual(socket.sent[0], { op: 'auth', token: 'tok' });
  socket.hello();
  assert.equal((await connected).user, 'u');
  socket.frame({ op: 'ping' });
  assert.deepEqual(socket.sent.at(-1), { op: 'pong' }, 'heartbeat pings are answered');
  c.close();
});

test("a draining gateway's bye.reconnect_after_ms sets the wait, then full jitter takes over", async () => {
  const c = client({ backoffBaseMs: 1_000, backoffCapMs: 8_000, random: () => 0.5 });
  const connected = c.connect();
  (await opened()).hello();
  await connected;
  const first = ScriptedSocket.all[0];
  first.frame({ op: 'bye', code: 1001, reason: 'draining', reconnect_after_ms: 1_234 });
  first.serverClose(1001, 'draining');
  const drained = c.states.at(-1);
  assert.equal(drained.state, 'reconnecting');
  assert.equal(drained.delayMs, 1_234);
  assert.equal(drained.close.bye.reconnect_after_ms, 1_234);
  c.close();

  const d = client({ backoffBaseMs: 1_000, backoffCapMs: 8_000, random: () => 0.5 });
  const ready = d.connect();
  (await opened()).hello();
  await ready;
  ScriptedSocket.all[0].serverClose(1006);
  assert.equal(d.states.at(-1).delayMs, 500, 'attempt 0: half of 1 s');
  d.close();
});

test('a silent socket is declared dead after two heartbeats (plus 5 s) and replaced', async () => {
  const c = client({ backoffBaseMs: 10, backoffCapMs: 10 });
  const connected = c.connect();
  (await opened()).hello(100); // silence allowed: 2 x 100 ms + 5 s
  await connected;
  await tick(4_500);
  assert.equal(c.state, 'open', 'still trusted before the limit');
  await tick(1_200);
  const dropped = c.states.find((s) => s.state === 'reconnecting');
  assert.ok(dropped, 'declared dead');
  assert.equal(dropped.close.code, 4010);
  assert.ok(ScriptedSocket.all[0].closed, 'the dead socket is closed');
  await opened(1); // a new socket replaces it
  c.close();
});

test('4003 ends the session for good; other closes reconnect and resend what can be repeated', async () => {
  for (const [code, final] of [
    [4003, true],
    [4009, false],
    [4010, false],
    [4008, false],
  ]) {
    const c = client({ backoffBaseMs: 20, backoffCapMs: 20 });
    const connected = c.connect();
    (await opened()).hello();
    await connected;
    const edit = c.request({ op: 'edit', room: 'r', seq: 1, body: 'x' });
    const rooms = c.request({ op: 'rooms' });
    ScriptedSocket.all[0].serverClose(code, 'test');
    const editErr = await edit.catch((e) => e);
    assert.equal(editErr.code, 'connection_lost', `close ${code}: an unanswered edit is not repeated`);
    if (final) {
      assert.equal(c.state, 'closed', `close ${code}`);
      assert.equal((await rooms.catch((e) => e)).code, 'closed');
      await tick(50);
      assert.equal(ScriptedSocket.all.length, 1, 'no reconnect');
    } else {
      assert.equal(c.state, 'reconnecting', `close ${code}`);
      const next = await opened(1);
      next.hello();
      await tick();
      const resent = next.sent.find((f) => f.op === 'rooms');
      assert.ok(resent, `close ${code}: the rooms request is sent again`);
      next.frame({ op: 'ok', rid: resent.rid, rooms: [] });
      assert.deepEqual(await rooms, { rooms: [] });
      assert.equal(next.sent.filter((f) => f.op === 'edit').length, 0);
    }
    c.close();
  }
});
