// The demo page in headless Chromium: two users in two browser contexts chat (messages, typing, reactions, edit,
// delete, a DM with an unread count); a room admin mutes and bans a member; a reply in a thread; one goes offline while the other sends, comes back, and sees every message
// exactly once and in order. Screenshots (desktop and phone-sized) go to $SWITCHYARD_TEST_ARTIFACTS.

import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { chromium } from 'playwright-core';

const HTTP = process.env.SWITCHYARD_TEST_HTTP;
const API_KEY = process.env.SWITCHYARD_TEST_API_KEY;
const EXECUTABLE = process.env.SWITCHYARD_TEST_CHROMIUM;
const ARTIFACTS = process.env.SWITCHYARD_TEST_ARTIFACTS;
if (!HTTP || !API_KEY || !EXECUTABLE || !ARTIFACTS) {
  throw new Error(
    'SWITCHYARD_TEST_HTTP, SWITCHYARD_TEST_API_KEY, SWITCHYARD_TEST_CHROMIUM and SWITCHYARD_TEST_ARTIFACTS must be set: run with `cargo xtask test`',
  );
}
const WAIT = 15_000;
const stamp = Date.now().toString(36);
const ALICE = `alice-${stamp}`;
const BOB = `bob-${stamp}`;
const ROOM = `lobby-${stamp}`;

let browser;
before(async () => {
  browser = await chromium.launch({ executablePath: EXECUTABLE, headless: true, args: ['--no-sandbox'] });
});
after(async () => {
  await browser?.close();
});

async function shot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: false });
}

async function signIn(context, user) {
  const page = await context.newPage();
  page.on('pageerror', (err) => console.error(`[${user}] page error:`, err));
  page.on('console', (msg) => console.log(`[${user}] console.${msg.type()}: ${msg.text()}`));
  await page.goto(HTTP);
  await page.getByLabel('User name').fill(user);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#conn[data-state="open"]').waitFor({ timeout: WAIT });
  return page;
}

async function joinRoom(page, room) {
  await page.getByLabel('Join or create a room').fill(room);
  await page.getByRole('button', { name: 'Join', exact: true }).click();
  await page.locator('#room-title', { hasText: `#${room}` }).waitFor({ timeout: WAIT });
}

async function say(page, text) {
  const box = page.getByLabel('Message', { exact: true });
  await box.fill(text);
  await box.press('Enter');
}

const message = (page, text) => page.locator('#messages li.msg', { has: page.locator('.body', { hasText: text }) });

/** The bodies and seqs of the messages on screen, top to bottom. */
async function onScreen(page) {
  return page.locator('#messages li.msg').evaluateAll((items) =>
    items.map((li) => ({ seq: Number(li.dataset.seq), body: li.querySelector('.body').textContent })),
  );
}

test('two users chat, one goes offline and comes back to every message once, in order', async () => {
  const contextA = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const contextB = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  try {
    const alice = await signIn(contextA, ALICE);
    const bob = await signIn(contextB, BOB);
    await joinRoom(alice, ROOM);
    await joinRoom(bob, ROOM);

    // Live messages both ways.
    await say(alice, 'hello from alice');
    await message(bob, 'hello from alice').waitFor({ timeout: WAIT });
    // Typing (the server passes on one typing signal per user and room every 2 s: this is bob's first).
    await bob.getByLabel('Message', { exact: true }).pressSequentially('hi');
    await alice.locator('#typing', { hasText: `${BOB} is typing` }).waitFor({ timeout: WAIT });
    await bob.getByLabel('Message', { exact: true }).fill('');
    await say(bob, 'hi alice');
    // The message clears the typing line.
    await alice.locator('#typing', { hasText: /^$/ }).waitFor({ timeout: WAIT });
    await message(alice, 'hi alice').waitFor({ timeout: WAIT });

    // A reaction from bob shows on alice's message for both.
    await message(bob, 'hello from alice').getByRole('button', { name: /^👍 reaction/ }).click();
    await message(alice, 'hello from alice').locator('.reaction', { hasText: '👍 1' }).waitFor({ timeout: WAIT });

    // Alice edits her message.
    await message(alice, 'hello from alice').getByRole('button', { name: /^Edit message/ }).click();
    const editor = alice.getByLabel('New text', { exact: true });
    await editor.fill('hello from alice (edited here)');
    await editor.press('Enter');
    await message(bob, 'hello from alice (edited here)').locator('.edited').waitFor({ timeout: WAIT });

    // Read marker: alice sees that bob has seen her messages.
    await alice.locator('#messages .seen', { hasText: `Seen by ${BOB}` }).first().waitFor({ timeout: WAIT });
    await shot(alice, 'desktop-alice-chatting');

    // Bob goes offline; the page shows it is reconnecting.
    await contextB.setOffline(true);
    await bob.locator('#conn[data-state="reconnecting"]').waitFor({ timeout: WAIT });
    const away = Array.from({ length: 6 }, (_, i) => `sent while bob was away ${i + 1}`);
    for (const text of away) {
      await say(alice, text);
      await message(alice, text).waitFor({ timeout: WAIT });
    }
    await shot(bob, 'desktop-bob-offline');
    assert.equal(await message(bob, 'sent while bob was away').count(), 0, 'nothing reaches bob while he is offline');

    // Back online: the client reconnects and resumes the room from the last seq it saw.
    await contextB.setOffline(false);
    await bob.locator('#conn[data-state="open"]').waitFor({ timeout: 30_000 });
    await message(bob, away.at(-1)).waitFor({ timeout: WAIT });
    await bob.waitForTimeout(500); // a duplicate would have arrived by now
    const seen = await onScreen(bob);
    assert.deepEqual(
      seen.map((m) => m.body),
      ['hello from alice (edited here)', 'hi alice', ...away],
      'every message exactly once, in order',
    );
    for (let i = 1; i < seen.length; i += 1) assert.ok(seen[i].seq > seen[i - 1].seq, 'ascending seq');
    await shot(bob, 'desktop-bob-resumed');

    // Deleting shows a tombstone on both sides.
    alice.once('dialog', (dialog) => dialog.accept());
    await message(alice, away[0]).getByRole('button', { name: /^Delete message/ }).click();
    await bob.locator('#messages li.msg.deleted').first().waitFor({ timeout: WAIT });

    // A DM from bob appears in alice's room list with an unread count and a presence dot.
    await bob.getByLabel('Message a user').fill(ALICE);
    await bob.getByRole('button', { name: 'Open' }).click();
    await bob.locator('#room-title', { hasText: `@${ALICE}` }).waitFor({ timeout: WAIT });
    await say(bob, 'a private word');
    await message(bob, 'a private word').waitFor({ timeout: WAIT });
    const dm = alice.locator('#rooms button.room', { hasText: `@${BOB}` });
    await dm.locator('.unread', { hasText: '1' }).waitFor({ timeout: WAIT });
    await dm.locator(`.dot.online[data-user="${BOB}"]`).waitFor({ timeout: WAIT });
    await shot(alice, 'desktop-alice-dm-unread');
    await dm.click();
    await message(alice, 'a private word').waitFor({ timeout: WAIT });
    await alice.locator('#rooms button.room', { hasText: `@${BOB}` }).locator('.unread').waitFor({ state: 'detached', timeout: WAIT });

    // With another room open, two more DMs show as 2 unread with the latest as the preview; after a reload the
    // server's count and preview say the same.
    await alice.locator('#rooms button.room', { hasText: `#${ROOM}` }).click();
    await say(bob, 'second word');
    await say(bob, 'third word');
    await dm.locator('.unread', { hasText: '2' }).waitFor({ timeout: WAIT });
    await alice.reload();
    await alice.locator('#conn[data-state="open"]').waitFor({ timeout: WAIT });
    const again = alice.locator('#rooms button.room', { hasText: `@${BOB}` });
    await again.locator('.room-preview', { hasText: `${BOB}: third word` }).waitFor({ timeout: WAIT });
    await again.locator('.unread', { hasText: '2' }).waitFor({ timeout: WAIT });
    await shot(alice, 'desktop-alice-unread-after-reload');
  } finally {
    await contextA.close();
    await contextB.close();
  }
});

test('a room admin mutes and bans a member from the members list; the member is told and cannot rejoin', async () => {
  const contextA = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const contextB = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const room = `mod-${stamp}`;
  const [admin, member] = [`ada-${stamp}`, `max-${stamp}`];
  try {
    const ada = await signIn(contextA, admin);
    const max = await signIn(contextB, member);
    await joinRoom(ada, room); // creates the room: ada is its admin
    await joinRoom(max, room);
    // Only an admin sees the buttons, and only beside other members.
    await ada.getByRole('button', { name: `Ban ${member}` }).waitFor({ timeout: WAIT });
    assert.equal(await max.getByRole('button', { name: `Ban ${admin}` }).count(), 0);
    assert.equal(await ada.getByRole('button', { name: `Ban ${admin}` }).count(), 0);

    await ada.getByRole('button', { name: `Mute ${member}` }).click();
    await max.locator('#messages li.notice', { hasText: `${member} was muted by ${admin}` }).waitFor({ timeout: WAIT });
    await say(max, 'can anyone hear me');
    await max.locator('#composer-error', { hasText: 'muted' }).waitFor({ timeout: WAIT });

    await ada.getByRole('button', { name: `Ban ${member}` }).click();
    await max.locator('#composer-error', { hasText: `You were banned from #${room}` }).waitFor({ timeout: WAIT });
    assert.equal(await max.locator('#compose').isDisabled(), true);
    await ada.locator('#messages li.notice', { hasText: `${member} was banned by ${admin}` }).waitFor({ timeout: WAIT });
    await ada.getByRole('button', { name: `Ban ${member}` }).waitFor({ state: 'detached', timeout: WAIT });
    await shot(ada, 'desktop-ada-banned-max');
    await max.getByLabel('Join or create a room').fill(room);
    await max.getByRole('button', { name: 'Join', exact: true }).click();
    await max.locator('#side-error', { hasText: 'banned' }).waitFor({ timeout: WAIT });
  } finally {
    await contextA.close();
    await contextB.close();
  }
});

test('a reply in a thread shows in the thread panel and counts on its parent for both users', async () => {
  const contextA = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const contextB = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const room = `threads-${stamp}`;
  try {
    const ana = await signIn(contextA, `ana-${stamp}`);
    const ben = await signIn(contextB, `ben-${stamp}`);
    await joinRoom(ana, room);
    await joinRoom(ben, room);
    await say(ana, 'where shall we meet?');
    const parent = message(ben, 'where shall we meet?');
    await parent.waitFor({ timeout: WAIT });
    await parent.getByRole('button', { name: /^Thread of message/ }).click();
    await ben.locator('#thread-title', { hasText: 'where shall we meet?' }).waitFor({ timeout: WAIT });
    await ben.getByLabel('Reply in thread').fill('at the station');
    await ben.getByRole('button', { name: 'Reply', exact: true }).click();
    await ben.locator('#thread-replies li', { hasText: 'at the station' }).waitFor({ timeout: WAIT });
    // Ana sees the count on her message, and the reply when she opens the thread.
    const hers = message(ana, 'where shall we meet?').getByRole('button', { name: /^Thread of message/ });
    await ana.locator('button.thread', { hasText: '1 reply' }).waitFor({ timeout: WAIT });
    await hers.click();
    await ana.locator('#thread-replies li', { hasText: 'at the station' }).waitFor({ timeout: WAIT });
    await shot(ana, 'desktop-ana-thread');
    // After a reload the count comes from history.
    await ana.reload();
    await ana.locator('#conn[data-state="open"]').waitFor({ timeout: WAIT });
    await ana.locator('#rooms button.room', { hasText: `#${room}` }).click();
    await ana.locator('button.thread', { hasText: '1 reply' }).waitFor({ timeout: WAIT });
  } finally {
    await contextA.close();
    await contextB.close();
  }
});

test('the page works on a phone-sized screen and by keyboard', async () => {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  try {
    const page = await context.newPage();
    await page.goto(HTTP);
    // Keyboard only: type the name, Enter submits.
    await page.getByLabel('User name').focus();
    await page.keyboard.type(`carol-${stamp}`);
    await page.keyboard.press('Enter');
    await page.locator('#conn[data-state="open"]').waitFor({ timeout: WAIT });
    await page.locator('#room-title', { hasText: '#general' }).waitFor({ timeout: WAIT });
    await page.getByRole('button', { name: 'Rooms' }).click();
    await page.getByLabel('Join or create a room').fill(ROOM);
    await page.getByLabel('Join or create a room').press('Enter');
    await page.locator('#room-title', { hasText: `#${ROOM}` }).waitFor({ timeout: WAIT });
    // History loads: the earlier conversation is there.
    await message(page, 'hi alice').waitFor({ timeout: WAIT });
    await say(page, 'hello from a phone');
    await message(page, 'hello from a phone').waitFor({ timeout: WAIT });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `no horizontal scrolling on a phone (${overflow}px too wide)`);
    await shot(page, 'phone-conversation');
    await page.getByRole('button', { name: 'Rooms' }).click();
    await page.locator('#rooms').waitFor({ state: 'visible' });
    await shot(page, 'phone-rooms');
  } finally {
    await context.close();
  }
});

test('older messages load as the conversation scrolls up', async () => {
  // 70 messages posted by the tenant's backend: more than the page's first history page of 50.
  const room = `archive-${stamp}`;
  const backend = (method, path, body) =>
    fetch(`${HTTP}${path}`, {
      method,
      headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
  let response = await backend('POST', '/v1/rooms', { room });
  assert.equal(response.status, 201, await response.text());
  response = await backend('PUT', `/v1/rooms/${room}/members/archivist`, { role: 'member' });
  assert.equal(response.status, 204, await response.text());
  for (let i = 1; i <= 70; i += 1) {
    response = await backend('POST', `/v1/rooms/${room}/messages`, { from: 'archivist', body: `archived ${i}` });
    assert.equal(response.status, 201, await response.text());
  }
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  try {
    const page = await signIn(context, `dave-${stamp}`);
    await joinRoom(page, room);
    await message(page, 'archived 70').waitFor({ timeout: WAIT });
    assert.equal(await page.locator('#messages li.msg').count(), 50, 'the latest page first');
    await page.locator('#scroller').evaluate((el) => {
      el.scrollTop = 0;
    });
    await message(page, 'archived 1').first().waitFor({ timeout: WAIT });
    await page.locator('#history-state', { hasText: 'Start of the conversation' }).waitFor({ timeout: WAIT });
    const bodies = (await onScreen(page)).map((m) => m.body);
    assert.deepEqual(
      bodies,
      Array.from({ length: 70 }, (_, i) => `archived ${i + 1}`),
      'every message once, in order',
    );
  } finally {
    await context.close();
  }
});
