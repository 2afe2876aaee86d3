// Shared by the client tests (test/): the fleet's URLs from the environment (set by gateway/tests/e2e_js.rs), tokens from
// the tenant API, clients that close themselves after each test, and waiting helpers.

import { after } from 'node:test';
import WebSocket from 'ws';
import { SwitchyardClient } from '../src/index.js';

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: these tests run against a real fleet; run them with \`cargo xtask test\` (gateway/tests/e2e_js.rs)`);
  }
  return value;
}

export const HTTP = required('SWITCHYARD_TEST_HTTP');
export const WS = required('SWITCHYARD_TEST_WS');
export const WS_OTHER = process.env.SWITCHYARD_TEST_WS_OTHER ?? WS;
const API_KEY = required('SWITCHYARD_TEST_API_KEY');

let counter = 0;
/** A user or room name unique to this run. */
export function unique(prefix) {
  counter += 1;
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${counter}`;
}

/** Call the tenant backend API; resolves with {status, body}. */
export async function api(method, path, body) {
  const response = await fetch(`${HTTP}${path}`, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

export async function token(user) {
  const { status, body } = await api('POST', '/v1/tokens', { user_id: user, ttl_secs: 600 });
  if (status !== 201) throw new Error(`token for ${user}: ${status} ${JSON.stringify(body)}`);
  return body.token;
}

const open = new Set();
after(() => {
  for (const c of open) c.close();
});

/** A client for `user` that records every event it delivers; closed after the test file. */
export function makeClient(user, options = {}) {
  let calls = 0;
  const client = new SwitchyardClient({
    url: WS,
    token: () => {
      calls += 1;
      return token(user);
    },
    WebSocket,
    backoffBaseMs: 100,
    backoffCapMs: 1_000,
    requestTimeoutMs: 10_000,
    ...options,
  });
  client.tokenCalls = () => calls;
  client.events = [];
  client.states = [];
  client.on('event', (e) => client.events.push(e));
  client.on('state', (s) => client.states.push(s));
  open.add(client);
  return client;
}

/** Wait until `predicate()` is true, polling; fails with `what` after `ms`. */
export async function until(predicate, what, ms = 15_000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Cut the client's socket abruptly, as a network failure would (no close frame). */
export function cut(client) {
  client._ws.terminate();
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
