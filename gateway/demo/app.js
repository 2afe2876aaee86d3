// The demo chat page: signs in through the demo-only session endpoint, then does everything over one
// SwitchyardClient (the published client library): rooms with unread counts, DMs, live messages, typing, read
// markers, reactions, edit and delete, presence, history on scroll, and the connection state.
//
// It keeps no state on the server and nothing beyond the user name (per tab, in sessionStorage) in the browser.

import { SwitchyardClient, SwitchyardError } from '/demo/switchyard-client.js';

const $ = (id) => document.getElementById(id);
const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
const PAGE = 50;
const REACTIONS = ['👍', '❤️', '😂'];

const state = {
  me: null,
  client: null,
  rooms: new Map(), // room -> {seq, read, unread, loaded, messages: Map<seq, msg>, oldest, more, loading, readers: Map<user, seq>}
  current: null,
  online: new Map(), // user -> bool
  typing: new Map(), // room -> Map<user, timeout>
  readTimer: null,
  lastTyping: 0,
  thread: null, // {room, parent} of the open thread panel
};

// ---------- sign-in ----------

async function fetchToken(user) {
  const response = await fetch('/demo/v1/session', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user_id: user }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new SwitchyardError(body.code ?? 'unavailable', body.message ?? `HTTP ${response.status}`);
  return body.token;
}

function showSignin(message = '') {
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message;
  $('signin-user').focus();
}

$('signin-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const user = $('signin-user').value.trim();
  if (!ID_RE.test(user)) {
    $('signin-error').textContent = 'Use 1 to 64 letters, digits, _ or -.';
    return;
  }
  $('signin-error').textContent = '';
  try {
    await fetchToken(user); // fail here, on the form, when the demo is unreachable
  } catch (err) {
    $('signin-error').textContent = `Cannot sign in: ${err.message}`;
    return;
  }
  sessionStorage.setItem('switchyard-demo-user', user);
  start(user);
});

$('signout').addEventListener('click', () => {
  sessionStorage.removeItem('switchyard-demo-user');
  state.client?.close();
  location.reload();
});

// ---------- connection ----------

function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/v1/ws`;
}

function setConn(text, key) {
  const el = $('conn');
  el.textContent = text;
  el.dataset.state = key;
}

async function start(user) {
  state.me = user;
  $('signin').hidden = true;
  $('app').hidden = false;
  $('me').textContent = user;
  const client = new SwitchyardClient({ url: wsUrl(), token: () => fetchToken(user) });
  state.client = client;

  let countdown = null;
  client.on('state', ({ state: s, delayMs, close }) => {
    clearInterval(countdown);
    if (s === 'open') setConn('Connected', 'open');
    else if (s === 'connecting') setConn('Connecting…', 'connecting');
    else if (s === 'closed') setConn(`Disconnected${close ? ` (${close.code})` : ''}`, 'closed');
    else if (s === 'reconnecting') {
      const until = Date.now() + (delayMs ?? 0);
      const tick = () => {
        const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
        setConn(left > 0 ? `Reconnecting in ${left} s…` : 'Reconnecting…', 'reconnecting');
      };
      tick();
      countdown = setInterval(tick, 500);
    }
  });
  client.on('msg', onMsg);
  client.on('edit', (e) => {
    patchMessage(e.room, e.target, (m) => ((m.body = e.body), (m.edited_ts = e.ts)));
    patchPreview(e.room, e.target, (last) => (last.body = e.body));
  });
  client.on('delete', (e) => {
    patchMessage(e.room, e.target, (m) => ((m.deleted = true), delete m.body));
    patchPreview(e.room, e.target, (last) => (last.deleted = true));
  });
  client.on('reaction', onReaction);
  client.on('typing', onTyping);
  client.on('read', onRead);
  client.on('presence', (e) => setOnline(e.user, e.online));
  client.on('joined', (e) => {
    bumpSeq(e.room, e.seq);
    if (e.room === state.current) loadMembers(e.room);
  });
  client.on('left', (e) => {
    bumpSeq(e.room, e.seq);
    if (e.room === state.current) loadMembers(e.room);
  });
  client.on('moderation', onModeration);
  client.on('room_deleted', onRoomDeleted);
  // A user was erased: their messages are tombstones now, and they are no member any more.
  client.on('erased', (e) => {
    bumpSeq(e.room, e.seq);
    if (e.room === state.current) reloadRoom(e.room);
  });
  client.on('gap', ({ room }) => reloadRoom(room));
  client.on('error', (err) => console.warn('switchyard:', err));

  // The browser knows about network changes before a socket times out.
  addEventListener('offline', () => client.reconnectNow());
  addEventListener('online', () => client.reconnectNow());

  try {
    await client.connect();
  } catch (err) {
    showSignin(`Cannot connect: ${err.message}`);
    return;
  }
  await loadRooms();
  const first = location.hash.slice(1);
  if (first && state.rooms.has(decodeURIComponent(first))) openRoom(decodeURIComponent(first));
  else if (state.rooms.has('general')) openRoom('general');
  else if (state.rooms.size > 0) openRoom([...state.rooms.keys()][0]);
}

// ---------- rooms ----------

function roomState(room) {
  let r = state.rooms.get(room);
  if (!r) {
    r = { seq: 0, read: 0, unread: 0, loaded: false, messages: new Map(), oldest: null, more: true, loading: false, readers: new Map() };
    state.rooms.set(room, r);
  }
  return r;
}

function dmPeer(room) {
  if (!room.startsWith('dm:')) return null;
  const [, a, b] = room.split(':');
  return a === state.me ? b : a;
}

function roomLabel(room) {
  const peer = dmPeer(room);
  return peer ? `@${peer}` : `#${room}`;
}

async function loadRooms() {
  const { rooms } = await state.client.rooms();
  takeSummaries(rooms);
  if (rooms.length === 0) await joinRoom('general', false);
  // Subscribe to every room so unread counts and DMs stay live.
  await Promise.all(rooms.map((r) => state.client.join(r.room).catch((err) => console.warn(r.room, err))));
  const peers = [...state.rooms.keys()].map(dmPeer).filter(Boolean);
  if (peers.length) await watchUsers(peers);
  renderRooms();
}

/** The server's unread count and latest message of each room (`rooms`), the same on every device. */
function takeSummaries(rooms) {
  for (const r of rooms) {
    const rs = roomState(r.room);
    rs.seq = Math.max(rs.seq, r.seq);
    rs.read = r.read ?? 0;
    rs.unread = r.room === state.current && document.visibilityState === 'visible' ? 0 : r.unread ?? 0;
    rs.last = r.last_message ?? rs.last ?? null;
  }
}

/** Ask `rooms` again shortly (a read elsewhere moved a marker to somewhere before the end). */
function refreshUnread() {
  clearTimeout(state.unreadTimer);
  state.unreadTimer = setTimeout(async () => {
    try {
      takeSummaries((await state.client.rooms()).rooms);
      renderRooms();
    } catch (err) {
      console.warn('rooms', err);
    }
  }, 300);
}

/** An edit or deletion of a room's latest message changes its preview. */
function patchPreview(room, target, change) {
  const last = state.rooms.get(room)?.last;
  if (!last || last.seq !== target) return;
  change(last);
  renderRooms();
}

/** One line for a room's latest message. */
function previewText(last) {
  if (!last) return '';
  return last.deleted ? `${last.from}: message deleted` : `${last.from}: ${last.body}`;
}

function renderRooms() {
  const list = $('rooms');
  list.replaceChildren();
  const names = [...state.rooms.keys()].sort((a, b) => roomLabel(a).localeCompare(roomLabel(b)));
  for (const room of names) {
    const rs = state.rooms.get(room);
    const li = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'room';
    button.dataset.room = room;
    if (room === state.current) button.setAttribute('aria-current', 'true');
    const peer = dmPeer(room);
    if (peer) button.append(dot(peer));
    const name = document.createElement('span');
    name.className = 'room-name';
    name.textContent = roomLabel(room);
    const preview = previewText(rs.last);
    if (preview) {
      const line = document.createElement('span');
      line.className = 'room-preview';
      line.textContent = preview;
      name.append(line);
    }
    button.append(name);
    if (rs.unread > 0) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = String(rs.unread);
      badge.setAttribute('aria-label', `${badge.textContent} unread`);
      button.append(badge);
    }
    button.addEventListener('click', () => {
      closeDrawer();
      openRoom(room);
    });
    li.append(button);
    list.append(li);
  }
}

function dot(user) {
  const d = document.createElement('span');
  const online = state.online.get(user) === true;
  d.className = `dot ${online ? 'online' : 'offline'}`;
  d.dataset.user = user;
  d.setAttribute('role', 'img');
  d.setAttribute('aria-label', online ? `${user} is online` : `${user} is offline`);
  return d;
}

function setOnline(user, online) {
  state.online.set(user, online);
  for (const d of document.querySelectorAll(`.dot[data-user="${CSS.escape(user)}"]`)) {
    d.className = `dot ${online ? 'online' : 'offline'}`;
    d.setAttribute('aria-label', online ? `${user} is online` : `${user} is offline`);
  }
}

async function watchUsers(users) {
  const fresh = users.filter((u) => u !== state.me);
  if (!fresh.length) return;
  try {
    await state.client.watch(fresh);
    const { users: now } = await state.client.presence(fresh);
    for (const [user, p] of Object.entries(now)) setOnline(user, p.online);
  } catch (err) {
    console.warn('presence', err);
  }
}

async function joinRoom(room, open = true) {
  await state.client.join(room);
  roomState(room);
  renderRooms();
  if (open) await openRoom(room);
}

$('join-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const room = $('join-room').value.trim();
  $('side-error').textContent = '';
  if (!ID_RE.test(room)) {
    $('side-error').textContent = 'A room name is 1 to 64 letters, digits, _ or -.';
    return;
  }
  try {
    closeDrawer();
    await joinRoom(room);
    $('join-room').value = '';
  } catch (err) {
    $('side-error').textContent = `Cannot join ${room}: ${err.message}`;
  }
});

$('dm-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const user = $('dm-user').value.trim();
  $('side-error').textContent = '';
  if (!ID_RE.test(user) || user === state.me) {
    $('side-error').textContent = user === state.me ? 'Pick someone else.' : 'A user name is 1 to 64 letters, digits, _ or -.';
    return;
  }
  const room = state.me < user ? `dm:${state.me}:${user}` : `dm:${user}:${state.me}`;
  $('dm-user').value = '';
  closeDrawer();
  roomState(room);
  await watchUsers([user]);
  renderRooms();
  openRoom(room);
});

// ---------- one room ----------

async function openRoom(room) {
  closeThread();
  state.current = room;
  history.replaceState(null, '', `#${encodeURIComponent(room)}`);
  $('room-title').textContent = roomLabel(room);
  $('messages').replaceChildren();
  $('typing').textContent = '';
  $('compose').disabled = false;
  $('send').disabled = false;
  renderRooms();
  const rs = roomState(room);
  // A DM room exists only once its first message is sent; until then there is nothing to read.
  const fresh = dmPeer(room) && rs.seq === 0 && rs.messages.size === 0;
  if (!rs.loaded && !fresh) await loadOlder(room, true);
  else renderAll(room);
  if (!dmPeer(room)) loadMembers(room);
  else $('members').replaceChildren(memberItem(dmPeer(room)));
  markRead();
  $('compose').focus();
}

async function reloadRoom(room) {
  const rs = roomState(room);
  rs.messages.clear();
  rs.loaded = false;
  rs.more = true;
  rs.oldest = null;
  if (room === state.current) openRoom(room);
}

async function loadMembers(room) {
  try {
    const { members } = await state.client.members(room);
    for (const m of members) state.online.set(m.user, m.online);
    if (room !== state.current) return;
    const admin = members.some((m) => m.user === state.me && m.role === 'admin');
    $('members').replaceChildren(...members.map((m) => memberItem(m.user, admin && m.user !== state.me && m.role !== 'admin' ? room : null, m.role)));
    await watchUsers(members.map((m) => m.user));
  } catch (err) {
    console.warn('members', err);
  }
}

/** A member with their presence; with `moderated` (a room this user is an admin of), mute and ban buttons. */
function memberItem(user, moderated = null, role = null) {
  const li = document.createElement('li');
  li.append(dot(user), document.createTextNode(user));
  if (role === 'admin') {
    const badge = document.createElement('span');
    badge.className = 'role';
    badge.textContent = 'admin';
    li.append(badge);
  }
  if (moderated) {
    for (const [label, run] of [
      ['Mute', () => state.client.mute(moderated, user)],
      ['Ban', () => state.client.ban(moderated, user)],
    ]) {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'mod';
      button.textContent = label;
      button.setAttribute('aria-label', `${label} ${user}`);
      button.addEventListener('click', () => act(run));
      li.append(button);
    }
  }
  return li;
}

const MODERATION_TEXT = {
  ban: (e) => `${e.user} was banned`,
  unban: (e) => `${e.user} may come back`,
  mute: (e) => `${e.user} was muted`,
  unmute: (e) => `${e.user} may speak again`,
  slow_mode: (e) => (e.secs ? `Slow mode: one message per ${e.secs} s` : 'Slow mode is off'),
  freeze: () => 'The room is frozen',
  unfreeze: () => 'The room is open again',
};

/** A moderation event: a line in the conversation, the members list again, and what it means for this user. */
function onModeration(e) {
  bumpSeq(e.room, e.seq);
  if (e.room !== state.current) return;
  const li = document.createElement('li');
  li.className = 'notice';
  li.dataset.seq = String(e.seq);
  li.textContent = `${(MODERATION_TEXT[e.action] ?? (() => e.action))(e)}${e.by ? ` by ${e.by}` : ''}`;
  insertInOrder(li, e.seq);
  if (e.user === state.me && e.action === 'ban') {
    $('compose').disabled = true;
    $('send').disabled = true;
    $('composer-error').textContent = `You were banned from ${roomLabel(e.room)}.`;
    return;
  }
  loadMembers(e.room);
}

/** The backend deleted a room: it leaves the list; an open one says so and takes no more messages. */
function onRoomDeleted(e) {
  state.rooms.delete(e.room);
  renderRooms();
  if (e.room !== state.current) return;
  $('messages').replaceChildren();
  $('members').replaceChildren();
  $('compose').disabled = true;
  $('send').disabled = true;
  $('composer-error').textContent = `${roomLabel(e.room)} was deleted.`;
}

/** One page of history: the latest one first, older ones as the list scrolls to its top. */
async function loadOlder(room, first = false) {
  const rs = roomState(room);
  if (rs.loading || (!first && !rs.more)) return;
  rs.loading = true;
  $('history-state').textContent = 'Loading…';
  const scroller = $('scroller');
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  try {
    const page = await state.client.history(room, first ? { limit: PAGE } : { before: rs.oldest, limit: PAGE });
    for (const m of page.messages) if (!rs.messages.has(m.seq)) rs.messages.set(m.seq, { ...m, room });
    rs.more = page.more;
    if (page.messages.length) rs.oldest = Math.min(rs.oldest ?? Infinity, page.messages[0].seq);
    rs.loaded = true;
    if (room === state.current) {
      renderAll(room);
      scroller.scrollTop = first ? scroller.scrollHeight : scroller.scrollHeight - fromBottom;
    }
  } catch (err) {
    if (err.code !== 'not_found') $('composer-error').textContent = `Cannot load history: ${err.message}`;
    rs.loaded = true;
    rs.more = false;
  } finally {
    rs.loading = false;
    $('history-state').textContent = rs.more ? '' : 'Start of the conversation';
  }
  // A page too short to scroll could never ask for the next one.
  if (room === state.current && rs.more && scroller.scrollHeight <= scroller.clientHeight) loadOlder(room);
}

$('scroller').addEventListener('scroll', () => {
  if ($('scroller').scrollTop < 80 && state.current) loadOlder(state.current);
});

function renderAll(room) {
  const rs = roomState(room);
  const list = $('messages');
  list.replaceChildren(...[...rs.messages.values()].sort((a, b) => a.seq - b.seq).map(renderMessage));
  renderReaders(room);
}

function renderMessage(m) {
  const li = document.createElement('li');
  li.className = `msg${m.from === state.me ? ' mine' : ''}${m.deleted ? ' deleted' : ''}`;
  li.dataset.seq = String(m.seq);
  li.dataset.from = m.from ?? '';
  const head = document.createElement('div');
  head.className = 'msg-head';
  const who = document.createElement('strong');
  who.textContent = m.from ?? 'erased user';
  const when = document.createElement('time');
  when.dateTime = new Date(m.ts).toISOString();
  when.textContent = new Date(m.ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  head.append(who, ' ', when);
  if (m.edited_ts && !m.deleted) head.append(' ', Object.assign(document.createElement('span'), { className: 'edited', textContent: '(edited)' }));
  const body = document.createElement('p');
  body.className = 'body';
  body.textContent = m.deleted ? 'Message deleted' : m.body;
  li.append(head, body);

  if (!m.deleted) {
    const reactions = document.createElement('div');
    reactions.className = 'reactions';
    const counts = m.reactions ?? {};
    for (const emoji of new Set([...REACTIONS, ...Object.keys(counts)])) {
      const users = counts[emoji] ?? [];
      const mine = users.includes(state.me);
      const b = document.createElement('button');
      b.type = 'button';
      b.className = `reaction${mine ? ' on' : ''}${users.length ? '' : ' empty'}`;
      b.textContent = users.length ? `${emoji} ${users.length}` : emoji;
      b.setAttribute('aria-pressed', String(mine));
      b.setAttribute('aria-label', `${emoji} reaction${users.length ? ` by ${users.join(', ')}` : ''}`);
      b.addEventListener('click', () => act(() => state.client.react(m.room, m.seq, emoji, { remove: mine })));
      reactions.append(b);
    }
    li.append(reactions);
    const thread = Object.assign(document.createElement('button'), { type: 'button', className: 'thread' });
    const count = m.reply_count ?? 0;
    thread.textContent = count === 0 ? 'Reply' : `${count} ${count === 1 ? 'reply' : 'replies'}`;
    thread.setAttribute('aria-label', `Thread of message ${m.seq}`);
    thread.addEventListener('click', () => openThread(m.room, m.seq));
    li.append(thread);
    if (m.from === state.me) {
      const tools = document.createElement('div');
      tools.className = 'tools';
      const edit = Object.assign(document.createElement('button'), { type: 'button', textContent: 'Edit', className: 'edit' });
      edit.setAttribute('aria-label', `Edit message ${m.seq}`);
      edit.addEventListener('click', () => startEdit(li, m));
      const del = Object.assign(document.createElement('button'), { type: 'button', textContent: 'Delete', className: 'delete' });
      del.setAttribute('aria-label', `Delete message ${m.seq}`);
      del.addEventListener('click', () => {
        if (confirm('Delete this message?')) act(() => state.client.deleteMessage(m.room, m.seq));
      });
      tools.append(edit, del);
      li.append(tools);
    }
  }
  const seen = document.createElement('p');
  seen.className = 'seen';
  li.append(seen);
  return li;
}

// ---------- threads ----------

/** Open the thread panel on the replies to message `parent`: the latest page, then live replies. */
async function openThread(room, parent) {
  state.thread = { room, parent };
  const panel = $('thread');
  panel.hidden = false;
  $('thread-error').textContent = '';
  const source = roomState(room).messages.get(parent);
  $('thread-title').textContent = source ? `Thread: ${source.deleted ? 'Message deleted' : source.body}` : `Thread of message ${parent}`;
  $('thread-replies').replaceChildren();
  try {
    const page = await state.client.history(room, { thread: parent, limit: PAGE });
    if (state.thread?.parent !== parent || state.thread?.room !== room) return;
    for (const m of page.messages) addThreadReply({ ...m, room });
    if (page.more) $('thread-error').textContent = `Showing the latest ${page.messages.length} replies.`;
  } catch (err) {
    $('thread-error').textContent = err.message;
  }
  $('thread-input').focus();
}

function addThreadReply(m) {
  const list = $('thread-replies');
  if (list.querySelector(`li[data-seq="${m.seq}"]`)) return;
  const li = document.createElement('li');
  li.dataset.seq = String(m.seq);
  const who = document.createElement('strong');
  who.textContent = m.from ?? 'erased user';
  li.append(who, ' ', m.deleted ? 'Message deleted' : m.body);
  // In seq order, whether it came from the page or live while the page loaded.
  const next = [...list.children].find((other) => Number(other.dataset.seq) > m.seq);
  list.insertBefore(li, next ?? null);
}

function closeThread() {
  state.thread = null;
  $('thread').hidden = true;
}

/** A live reply: into the open thread, and one more on its parent's count. */
function onReply(e) {
  if (state.thread && state.thread.room === e.room && state.thread.parent === e.reply_to) addThreadReply(e);
  patchMessage(e.room, e.reply_to, (m) => (m.reply_count = (m.reply_count ?? 0) + 1));
}

$('thread-close').addEventListener('click', closeThread);

$('thread-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const text = $('thread-input').value.trim();
  if (!text || !state.thread) return;
  $('thread-error').textContent = '';
  try {
    await state.client.send(state.thread.room, text, { replyTo: state.thread.parent });
    $('thread-input').value = '';
  } catch (err) {
    $('thread-error').textContent = err.message;
  }
});

function startEdit(li, m) {
  const form = document.createElement('form');
  form.className = 'edit-form';
  const label = Object.assign(document.createElement('label'), { textContent: 'New text', className: 'visually-hidden' });
  const input = document.createElement('textarea');
  input.id = `edit-${m.seq}`;
  label.htmlFor = input.id;
  input.value = m.body;
  input.maxLength = 16384;
  const save = Object.assign(document.createElement('button'), { type: 'submit', textContent: 'Save' });
  const cancel = Object.assign(document.createElement('button'), { type: 'button', textContent: 'Cancel' });
  form.append(label, input, save, cancel);
  const body = li.querySelector('.body');
  body.replaceWith(form);
  input.focus();
  const done = () => form.replaceWith(body);
  cancel.addEventListener('click', done);
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') done();
    if (ev.key === 'Enter' && !ev.shiftKey) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (text && text !== m.body) act(() => state.client.edit(m.room, m.seq, text));
    done();
  });
}

async function act(fn) {
  $('composer-error').textContent = '';
  try {
    await fn();
  } catch (err) {
    $('composer-error').textContent = err.message;
  }
}

function patchMessage(room, seq, change) {
  bumpSeqFromEvent(room);
  const rs = roomState(room);
  const m = rs.messages.get(seq);
  if (!m) return;
  change(m);
  if (room !== state.current) return;
  const old = $('messages').querySelector(`li.msg[data-seq="${seq}"]`);
  if (old) old.replaceWith(renderMessage(m));
  renderReaders(room);
}

function bumpSeq(room, seq) {
  const rs = roomState(room);
  if (seq > rs.seq) rs.seq = seq;
}

function bumpSeqFromEvent(room) {
  const seq = state.client.lastSeq(room);
  if (seq != null) bumpSeq(room, seq);
}

function onMsg(e) {
  if (e.reply_to != null) onReply(e);
  const isNew = !state.rooms.has(e.room);
  const rs = roomState(e.room);
  bumpSeq(e.room, e.seq);
  if (rs.messages.has(e.seq)) return;
  rs.last = { seq: e.seq, from: e.from, body: e.body };
  const m = { seq: e.seq, id: e.id, from: e.from, body: e.body, attrs: e.attrs, reply_to: e.reply_to, ts: e.ts, room: e.room };
  if (rs.loaded || e.room === state.current) rs.messages.set(e.seq, m);
  clearTyping(e.room, e.from);
  if (e.room === state.current && document.visibilityState === 'visible') {
    const scroller = $('scroller');
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
    insertInOrder(renderMessage(m), e.seq);
    if (atBottom || e.from === state.me) scroller.scrollTop = scroller.scrollHeight;
    markRead();
  } else if (e.from !== state.me) {
    rs.unread += 1;
    if (e.room === state.current) insertInOrder(renderMessage(m), e.seq);
  }
  if (isNew) {
    const peer = dmPeer(e.room);
    if (peer) watchUsers([peer]);
  }
  renderRooms();
}

function insertInOrder(li, seq) {
  const list = $('messages');
  for (const other of list.children) {
    if (Number(other.dataset.seq) > seq) {
      list.insertBefore(li, other);
      return;
    }
  }
  list.append(li);
}

function onReaction(e) {
  patchMessage(e.room, e.target, (m) => {
    const reactions = (m.reactions ??= {});
    const users = new Set(reactions[e.emoji] ?? []);
    if (e.removed) users.delete(e.user);
    else users.add(e.user);
    if (users.size) reactions[e.emoji] = [...users];
    else delete reactions[e.emoji];
  });
}

// ---------- typing ----------

function onTyping(e) {
  if (e.user === state.me) return;
  let users = state.typing.get(e.room);
  if (!users) state.typing.set(e.room, (users = new Map()));
  clearTimeout(users.get(e.user));
  users.set(e.user, setTimeout(() => clearTyping(e.room, e.user), 4000));
  renderTyping();
}

function clearTyping(room, user) {
  const users = state.typing.get(room);
  if (!users?.has(user)) return;
  clearTimeout(users.get(user));
  users.delete(user);
  renderTyping();
}

function renderTyping() {
  const users = [...(state.typing.get(state.current)?.keys() ?? [])];
  $('typing').textContent = users.length === 0 ? '' : `${users.join(', ')} ${users.length === 1 ? 'is' : 'are'} typing…`;
}

// ---------- read markers ----------

function markRead() {
  clearTimeout(state.readTimer);
  state.readTimer = setTimeout(async () => {
    const room = state.current;
    if (!room || document.visibilityState !== 'visible') return;
    const rs = roomState(room);
    const seq = state.client.lastSeq(room) ?? rs.seq;
    if (!seq || seq <= rs.read) {
      rs.unread = 0;
      renderRooms();
      return;
    }
    try {
      const ok = await state.client.read(room, seq);
      rs.read = ok.seq;
      rs.unread = 0;
      renderRooms();
    } catch (err) {
      console.warn('read', err);
    }
  }, 300);
}

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') markRead();
});

function onRead(e) {
  const rs = roomState(e.room);
  if (e.user === state.me) {
    // Another of my sessions read: it says what is left unread, or (from the room) where the marker is now.
    if (e.seq > rs.read) rs.read = e.seq;
    if (e.unread != null) rs.unread = e.unread;
    else if (e.seq >= rs.seq) rs.unread = 0;
    else refreshUnread();
    renderRooms();
    return;
  }
  rs.readers.set(e.user, e.seq);
  if (e.room === state.current) renderReaders(e.room);
}

/** "Seen by …" under the newest message each other reader has read. */
function renderReaders(room) {
  const rs = roomState(room);
  const list = $('messages');
  for (const p of list.querySelectorAll('.seen')) p.textContent = '';
  const bySeq = new Map();
  const seqs = [...rs.messages.keys()].sort((a, b) => a - b);
  for (const [user, seq] of rs.readers) {
    let target = null;
    for (const s of seqs) if (s <= seq) target = s;
    if (target == null) continue;
    if (!bySeq.has(target)) bySeq.set(target, []);
    bySeq.get(target).push(user);
  }
  for (const [seq, users] of bySeq) {
    const p = list.querySelector(`li.msg[data-seq="${seq}"] .seen`);
    if (p) p.textContent = `Seen by ${users.join(', ')}`;
  }
}

// ---------- composing ----------

$('compose').addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey) {
    ev.preventDefault();
    $('composer').requestSubmit();
  }
});

$('compose').addEventListener('input', () => {
  const room = state.current;
  if (!room || state.client?.state !== 'open' || !roomState(room).seq) return;
  if (Date.now() - state.lastTyping > 2000) {
    state.lastTyping = Date.now();
    state.client.typing(room);
  }
});

$('composer').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const room = state.current;
  const body = $('compose').value;
  if (!room || !body.trim()) return;
  $('compose').value = '';
  state.lastTyping = 0;
  await act(async () => {
    const peer = dmPeer(room);
    // A DM goes out with `dm` (which creates the conversation); the client resumes it like any room.
    const ok = peer ? await state.client.dm(peer, body) : await state.client.send(room, body);
    bumpSeq(room, ok.seq);
    markRead();
  });
});

/** On a phone the room list is a drawer over the conversation; choosing a room closes it. */
function closeDrawer() {
  document.body.classList.remove('rooms-open');
  $('show-rooms').setAttribute('aria-expanded', 'false');
}

$('show-rooms').addEventListener('click', () => {
  const open = document.body.classList.toggle('rooms-open');
  $('show-rooms').setAttribute('aria-expanded', String(open));
});

// ---------- start ----------

const saved = sessionStorage.getItem('switchyard-demo-user');
if (saved && ID_RE.test(saved)) start(saved);
else showSignin();
