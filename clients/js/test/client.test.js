// The client against a real fleet: ops and events, errors, cmid, heartbeat, reconnect with resume (no gap, no
// duplicate), retried sends that post once, queued ops, and a final close by the server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { SwitchyardClient, SwitchyardError, backoffDelay, newCmid } from '../src/index.js';
import { api, cut, makeClient, sleep, token, unique, until, WS, WS_OTHER } from '../test-support/fleet.js';

const msgs = (client, room) => client.events.filter((e) => e.op === 'msg' && e.room === room);

test('full-jitter backoff stays within [0, min(cap, base * 2^attempt))', () => {
  for (let attempt = 0; attempt < 12; attempt += 1) {
    const ceiling = Math.min(5_000, 100 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, 100, 5_000, () => 0), 0);
    assert.equal(backoffDelay(attempt, 100, 5_000, () => 0.999999), ceiling - 1);
    const d = backoffDelay(attempt, 100, 5_000);
    assert.ok(d >= 0 && d < ceiling, `${d} within ${ceiling}`);
  }
  assert.equal(backoffDelay(1_000, 100, 5_000, () => 0.5), 2_500, 'huge attempts stay capped');
  const a = newCmid();
  assert.match(a, /^[0-9A-Za-z]{22}$/);
  assert.notEqual(a, newCmid());
});

test('options and arguments are checked before anything is sent', async () => {
  assert.throws(() => new SwitchyardClient({ token: 't', WebSocket }), SwitchyardError);
  assert.throws(() => new SwitchyardClient({ url: WS, WebSocket }), /token/);
  const client = makeClient(unique('u'));
  await client.connect();
  await assert.rejects(client.send('no spaces', 'x'), { name: 'SwitchyardError', code: 'invalid' });
  await assert.rejects(client.join('a'.repeat(65)), { code: 'invalid' });
  await assert.rejects(client.dm('bad user', 'x'), { code: 'invalid' });
  await assert.rejects(client.send('ok-room', 42), { code: 'invalid' });
  assert.throws(() => client.typing('bad room'), { code: 'invalid' });
  assert.deepEqual(client.subscribedRooms(), [], 'invalid joins track nothing');
});

test('two clients chat: ops, events, typing, reactions, edit, delete, read, history, presence', async () => {
  const room = unique('room');
  const [aliceId, bobId] = [unique('alice'), unique('bob')];
  const alice = makeClient(aliceId);
  const bob = makeClient(bobId);
  const hello = await alice.connect();
  assert.equal(hello.user, aliceId);
  assert.equal(alice.state, 'open');
  await bob.connect();

  await alice.create(room, { title: 'Test room' });
  await assert.rejects(alice.create(room), (err) => err instanceof SwitchyardError && err.code === 'conflict');
  const joinedA = await alice.join(room);
  assert.equal(joinedA.seq, 1);
  const joinedB = await bob.join(room);
  assert.equal(joinedB.seq, 2);
  await until(() => alice.events.some((e) => e.op === 'joined' && e.user === bobId), 'alice sees bob join');

  const sent = await alice.send(room, 'hello bob', { attrs: { k: 'v' } });
  assert.equal(sent.room, room);
  assert.equal(sent.seq, 3);
  await until(() => msgs(bob, room).length === 1, 'bob gets the message');
  assert.equal(msgs(bob, room)[0].body, 'hello bob');
  assert.deepEqual(msgs(bob, room)[0].attrs, { k: 'v' });

  const typing = new Promise((resolve) => bob.on('typing', resolve));
  alice.typing(room);
  assert.equal((await typing).user, aliceId);

  const reacted = await bob.react(room, sent.seq, '👍');
  const edited = await alice.edit(room, sent.seq, 'hello, bob');
  await assert.rejects(bob.edit(room, sent.seq, 'not mine'), { code: 'forbidden' });
  const reply = await bob.send(room, 'hi', { replyTo: sent.seq });
  const deleted = await bob.deleteMessage(room, reply.seq);
  await until(() => alice.events.some((e) => e.op === 'delete' && e.seq === deleted.seq), 'alice sees the delete');
  const ops = alice.events.filter((e) => e.room === room && e.seq > 2).map((e) => [e.op, e.seq]);
  assert.deepEqual(ops, [
    ['msg', 3],
    ['reaction', reacted.seq],
    ['edit', edited.seq],
    ['msg', reply.seq],
    ['delete', deleted.seq],
  ]);

  const marker = await bob.read(room, reply.seq);
  assert.equal(marker.seq, reply.seq);
  await until(() => alice.events.some((e) => e.op === 'read' && e.user === bobId), 'alice sees the read marker');
  const { rooms } = await bob.rooms();
  const mine = rooms.find((r) => r.room === room);
  assert.equal(mine.role, 'member');
  assert.equal(mine.seq, deleted.seq);
  assert.equal(mine.read, reply.seq);
  assert.equal(mine.unread, 0, 'nothing after the marker');
  assert.equal(mine.last_message.seq, reply.seq);
  assert.equal(mine.last_message.deleted, true, 'the latest message was deleted');
  const more = await alice.send(room, 'one more');
  await alice.send(room, 'and another');
  const bobElsewhere = makeClient(bobId);
  await bobElsewhere.connect();
  const ownRead = new Promise((resolve) => bobElsewhere.on('read', (e) => e.unread != null && resolve(e)));
  await bob.read(room, more.seq);
  const told = await ownRead;
  assert.deepEqual([told.room, told.user, told.seq, told.unread], [room, bobId, more.seq, 1]);
  const listed = (await bobElsewhere.rooms()).rooms.find((r) => r.room === room);
  assert.deepEqual([listed.unread, listed.last_message.body], [1, 'and another']);
  bobElsewhere.close();

  const page = await bob.history(room, { limit: 10 });
  assert.equal(page.more, false);
  const first = page.messages.find((m) => m.seq === sent.seq);
  assert.equal(first.body, 'hello, bob');
  assert.deepEqual(first.reactions, { '👍': [bobId] });
  assert.equal(page.messages.find((m) => m.seq === reply.seq).deleted, true);

  const { members } = await alice.members(room);
  assert.deepEqual(members.map((m) => m.user).sort(), [aliceId, bobId].sort());
  const presence = await alice.presence([bobId]);
  assert.equal(presence.users[bobId].online, true);
  await alice.watch([bobId]);
  const offline = new Promise((resolve) => alice.on('presence', (e) => e.user === bobId && !e.online && resolve(e)));
  bob.close();
  assert.equal(bob.state, 'closed');
  await offline;
  await assert.rejects(bob.send(room, 'after close'), { code: 'closed' });
});

test('room admins pin and unpin, members may not; every member sees the pin; history marks it; DMs pin too', async () => {
  const room = unique('pins');
  const [aliceId, bobId] = [unique('alice'), unique('bob')];
  const alice = makeClient(aliceId);
  const bob = makeClient(bobId);
  await alice.connect();
  await bob.connect();
  await alice.join(room); // creates the room: alice is its admin
  await bob.join(room);
  const sent = await bob.send(room, 'pin me');

  await assert.rejects(bob.pin(room, sent.seq), { code: 'forbidden' });
  await assert.rejects(alice.pin(room, 1), { code: 'not_found' }); // seq 1 is alice's joined event
  await assert.rejects(alice.pin('bad room', sent.seq), { code: 'invalid' });
  const seen = new Promise((resolve) => bob.on('pin', resolve));
  const pinned = await alice.pin(room, sent.seq);
  assert.deepEqual(pinned, { room, seq: sent.seq + 1 });
  const event = await seen;
  assert.deepEqual(
    [event.op, event.room, event.seq, event.target, event.by, event.pinned],
    ['pin', room, pinned.seq, sent.seq, aliceId, true],
  );
  let page = await bob.history(room);
  assert.equal(page.messages.find((m) => m.seq === sent.seq).pinned, true);

  await assert.rejects(bob.unpin(room, sent.seq), { code: 'forbidden' });
  const unpinned = await alice.unpin(room, sent.seq);
  await until(
    () => bob.events.some((e) => e.op === 'pin' && e.seq === unpinned.seq && e.pinned === false),
    'bob sees the unpin',
  );
  page = await bob.history(room);
  assert.equal('pinned' in page.messages.find((m) => m.seq === sent.seq), false, 'unpinned: no field');

  const dm = await bob.dm(aliceId, 'pin this one');
  const dmPin = await bob.pin(dm.room, dm.seq);
  await until(() => alice.events.some((e) => e.op === 'pin' && e.room === dm.room && e.seq === dmPin.seq), 'alice sees the DM pin');
  page = await alice.history(dm.room);
  assert.equal(page.messages.find((m) => m.seq === dm.seq).pinned, true);
});

test('room admins moderate: a mute silences, slow mode says when to retry, a ban removes; members see each action', async () => {
  const room = unique('mod');
  const [aliceId, bobId] = [unique('alice'), unique('bob')];
  const alice = makeClient(aliceId);
  const bob = makeClient(bobId);
  await alice.connect();
  await bob.connect();
  await alice.join(room);
  await bob.join(room);
  await assert.rejects(bob.mute(room, aliceId), { code: 'forbidden' });
  await assert.rejects(alice.ban('bad room', bobId), { code: 'invalid' });

  await alice.mute(room, bobId, { secs: 60 });
  await until(() => bob.events.some((e) => e.op === 'moderation' && e.action === 'mute' && e.user === bobId && e.until > 0), 'bob sees his mute');
  await assert.rejects(bob.send(room, 'muted'), { code: 'forbidden' });
  await alice.unmute(room, bobId);
  await bob.send(room, 'unmuted');

  await alice.slowMode(room, 30);
  await bob.send(room, 'first');
  // A plain request: `send` itself would wait out `retry_after_ms` and try again.
  await assert.rejects(
    bob.request({ op: 'send', room, body: 'too soon' }),
    (error) => error.code === 'rate_limited' && error.retryAfterMs > 20_000,
  );
  await alice.slowMode(room, 0);
  await alice.freeze(room);
  await assert.rejects(bob.send(room, 'frozen'), { code: 'forbidden' });
  await alice.unfreeze(room);

  await alice.ban(room, bobId);
  await until(() => bob.events.some((e) => e.op === 'left' && e.user === bobId && e.by === aliceId), 'bob is removed');
  await assert.rejects(bob.join(room), { code: 'forbidden' });
  await alice.unban(room, bobId);
  await bob.join(room);
  const actions = alice.events.filter((e) => e.op === 'moderation' && e.room === room).map((e) => e.action);
  assert.deepEqual(actions, ['mute', 'unmute', 'slow_mode', 'slow_mode', 'freeze', 'unfreeze', 'ban', 'unban']);
});

test('a thread is paged like history and its parent counts its replies', async () => {
  const room = unique('thread');
  const alice = makeClient(unique('alice'));
  await alice.connect();
  await alice.join(room);
  const parent = await alice.send(room, 'parent');
  const replies = [];
  for (let i = 0; i < 3; i += 1) replies.push((await alice.send(room, `reply ${i}`, { replyTo: parent.seq })).seq);
  await alice.send(room, 'not in the thread');
  const page = await alice.history(room, { thread: parent.seq, limit: 2 });
  assert.deepEqual(page.messages.map((m) => m.seq), replies.slice(1));
  assert.equal(page.more, true);
  const older = await alice.history(room, { thread: parent.seq, before: replies[1] });
  assert.deepEqual(older.messages.map((m) => m.seq), replies.slice(0, 1));
  const all = await alice.history(room);
  assert.equal(all.messages.find((m) => m.seq === parent.seq).reply_count, 3);
  assert.equal('reply_count' in all.messages.find((m) => m.seq === replies[0]), false);
});

test('a room the backend deletes is announced, no longer resumed, and its name is free again', async () => {
  const room = unique('attic');
  const alice = makeClient(unique('alice'));
  await alice.connect();
  await alice.create(room);
  await alice.join(room);
  await alice.send(room, 'soon gone');
  const deletedEvent = new Promise((resolve) => alice.on('room_deleted', resolve));
  const { status, body } = await api('DELETE', `/v1/rooms/${room}`);
  assert.equal(status, 200);
  const event = await deletedEvent;
  assert.deepEqual([event.room, event.seq], [room, body.seq]);
  assert.equal(alice.lastSeq(room), undefined, 'the client stops tracking the room');
  await assert.rejects(alice.history(room), { code: 'not_found' });
  assert.equal((await api('POST', '/v1/rooms', { room })).status, 201, 'the name is free');
  const { messages } = await alice.history(room);
  assert.deepEqual(messages, [], 'the new room starts empty');
  alice.close();
});

test('a DM is delivered without joining and is resumed like a room', async () => {
  const [aliceId, bobId] = [unique('alice'), unique('bob')];
  const alice = makeClient(aliceId);
  const bob = makeClient(bobId);
  await alice.connect();
  await bob.connect();
  const first = await alice.dm(bobId, 'psst');
  const room = aliceId < bobId ? `dm:${aliceId}:${bobId}` : `dm:${bobId}:${aliceId}`;
  assert.equal(first.room, room);
  await until(() => msgs(bob, room).length === 1, 'bob gets the DM');
  assert.ok(bob.subscribedRooms().includes(room), 'the DM room is tracked for resume');

  cut(bob);
  await until(() => bob.state === 'reconnecting', 'bob notices the drop');
  await alice.dm(bobId, 'while you were away');
  await until(() => msgs(bob, room).length === 2, 'bob gets the DM sent while he was away');
  assert.deepEqual(
    msgs(bob, room).map((m) => m.body),
    ['psst', 'while you were away'],
  );
});

test('after a dropped socket every room resumes with no gap and no duplicate', async () => {
  const rooms = [unique('r1'), unique('r2')];
  const alice = makeClient(unique('alice'));
  // Bob waits ~1.5 s before reconnecting, so messages are sent while he is away.
  const bob = makeClient(unique('bob'), { backoffBaseMs: 1_500, backoffCapMs: 1_500, random: () => 0.999 });
  await alice.connect();
  await bob.connect();
  for (const room of rooms) {
    await alice.join(room);
    await bob.join(room);
  }
  for (let i = 0; i < 5; i += 1) for (const room of rooms) await alice.send(room, `before ${i}`);
  await until(() => rooms.every((room) => msgs(bob, room).length === 5), 'bob gets the first messages');
  const resumed = [];
  bob.on('resumed', (r) => resumed.push(r));

  cut(bob);
  await until(() => bob.state === 'reconnecting', 'bob notices the drop');
  for (let i = 0; i < 20; i += 1) for (const room of rooms) await alice.send(room, `away ${i}`);
  await until(() => rooms.every((room) => msgs(bob, room).length === 25), 'bob catches up', 20_000);
  await sleep(300); // anything duplicated would arrive by now
  for (const room of rooms) {
    const got = msgs(bob, room);
    assert.equal(got.length, 25, `${room}: every message once`);
    const seqs = got.map((m) => m.seq);
    for (let i = 1; i < seqs.length; i += 1) assert.equal(seqs[i], seqs[i - 1] + 1, `${room}: no gap at ${seqs[i]}`);
    assert.deepEqual(
      got.map((m) => m.body),
      [...Array.from({ length: 5 }, (_, i) => `before ${i}`), ...Array.from({ length: 20 }, (_, i) => `away ${i}`)],
    );
  }
  assert.deepEqual(resumed.map((r) => r.room).sort(), [...rooms].sort());
  for (const r of resumed) assert.equal(typeof r.from, 'number', 'resumed with since');
  const reconnecting = bob.states.find((s) => s.state === 'reconnecting');
  assert.ok(reconnecting.delayMs >= 1_000 && reconnecting.delayMs < 1_500, `jittered delay ${reconnecting.delayMs}`);
  assert.equal(bob.state, 'open');
  assert.ok(bob.tokenCalls() >= 2, 'the token function is asked again for the reconnect');
});

test('a send whose socket drops before the reply is retried with its cmid and posts exactly once', async () => {
  const room = unique('room');
  const alice = makeClient(unique('alice'));
  const bob = makeClient(unique('bob'));
  await alice.connect();
  await bob.connect();
  await alice.join(room);
  await bob.join(room);
  const results = [];
  for (let i = 0; i < 5; i += 1) {
    const pending = alice.send(room, `racy ${i}`);
    cut(alice); // the frame may or may not have reached the server
    results.push(await pending);
  }
  // And a repeated cmid from the application returns the first result.
  const cmid = newCmid();
  const once = await alice.send(room, 'same cmid', { cmid });
  const again = await alice.send(room, 'same cmid', { cmid });
  assert.deepEqual(again, once);

  await until(() => msgs(bob, room).length >= 6, 'bob gets the messages');
  await sleep(500);
  assert.deepEqual(
    msgs(bob, room).map((m) => m.body),
    ['racy 0', 'racy 1', 'racy 2', 'racy 3', 'racy 4', 'same cmid'],
  );
  assert.deepEqual(
    results.map((r) => r.seq),
    msgs(bob, room).slice(0, 5).map((m) => m.seq),
  );
});

test('ops issued while disconnected wait and run after the resume', async () => {
  const room = unique('room');
  const alice = makeClient(unique('alice'), { backoffBaseMs: 800, backoffCapMs: 800, random: () => 0.999 });
  const bob = makeClient(unique('bob'));
  await alice.connect();
  await bob.connect();
  await alice.join(room);
  await bob.join(room);
  cut(alice);
  await until(() => alice.state === 'reconnecting', 'alice notices the drop');
  const queued = [alice.send(room, 'queued 1'), alice.send(room, 'queued 2'), alice.history(room)];
  const [one, two, page] = await Promise.all(queued);
  assert.equal(two.seq, one.seq + 1, 'queued sends keep their order');
  assert.ok(Array.isArray(page.messages));
  await until(() => msgs(bob, room).length === 2, 'bob gets the queued messages');
});

test('heartbeat pings are answered, so an idle session stays open', async () => {
  // The test fleet pings every second and closes a session that stays silent for two intervals.
  const client = makeClient(unique('idle'));
  const hello = await client.connect();
  assert.ok(hello.heartbeat_ms <= 2_000, `test fleet heartbeat ${hello.heartbeat_ms}`);
  await sleep(hello.heartbeat_ms * 4);
  assert.equal(client.state, 'open');
  assert.equal(client.states.filter((s) => s.state === 'reconnecting').length, 0, 'never dropped');
  const pong = await client.ping();
  assert.deepEqual(pong, {});
});

test('the client works across gateways: a message sent on one reaches a session on another', async () => {
  const room = unique('room');
  const alice = makeClient(unique('alice'), { url: WS_OTHER });
  const bob = makeClient(unique('bob'));
  await alice.connect();
  await bob.connect();
  await alice.join(room);
  await bob.join(room);
  await alice.send(room, 'across');
  await until(() => msgs(bob, room).length === 1, 'bob gets it');
});

test('errors carry the server code, and rate limits say when to retry', async () => {
  const client = makeClient(unique('u'), { sendRetries: 0 });
  await client.connect();
  const room = unique('private');
  const owner = makeClient(unique('owner'));
  await owner.connect();
  await owner.create(room, { private: true });
  const err = await client.join(room).catch((e) => e);
  assert.ok(err instanceof SwitchyardError);
  assert.equal(err.code, 'forbidden');
  assert.equal(err.op, 'join');
  assert.match(err.message, /private/);
  const raw = await client.request({ op: 'join', room: unique('r'), bogus: 1 }).catch((e) => e);
  assert.equal(raw.code, 'bad_request');

  // 20 ops/s with a burst of 40 per connection: a burst of ops runs into the limit (but stays under the abuse
  // limit of 40 refusals, which would close the socket).
  const results = await Promise.allSettled(Array.from({ length: 60 }, () => client.request({ op: 'rooms' })));
  const limited = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
  assert.ok(limited.length > 0, 'some ops were rate limited');
  for (const e of limited) {
    assert.equal(e.code, 'rate_limited');
    assert.ok(e.retryAfterMs > 0, 'retry_after_ms is surfaced');
  }
});

test('a revoked session ends for good: no reconnect, waiting ops fail with closed', async () => {
  const user = unique('revoked');
  const client = makeClient(user);
  await client.connect();
  const closed = new Promise((resolve) => client.on('close', resolve));
  const { status } = await api('DELETE', `/v1/users/${user}/sessions`);
  assert.equal(status, 204);
  const { close, error } = await closed;
  assert.equal(close.code, 4003);
  assert.equal(error.code, 'closed');
  assert.equal(client.state, 'closed');
  await assert.rejects(client.rooms(), { code: 'closed' });
  await sleep(500);
  assert.equal(client.states.at(-1).state, 'closed', 'no reconnect after 4003');
});

test('a fixed token that stops working ends the session: 4003 on revocation, 4001 on connect', async () => {
  const user = unique('tok');
  const stale = await token(user);
  // Revoke the token itself; the client, holding only that string, cannot authenticate again.
  const client = makeClient(user, { token: stale });
  await client.connect();
  const closed = new Promise((resolve) => client.on('close', resolve));
  await api('DELETE', `/v1/tokens/${stale}`);
  const { close } = await closed;
  assert.equal(close.code, 4003);

  const unknown = makeClient(user, { token: 'sytok_00000000000000000000000000000000' });
  await assert.rejects(unknown.connect(), { code: 'closed', closeCode: 4001 });
});
