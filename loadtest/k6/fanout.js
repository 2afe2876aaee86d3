// Room fan-out for k6, speaking Switchyard's JSON subprotocol (switchyard.v1.json).
//
// Every virtual user holds one socket, joins one of ROOMS rooms and sends a message every SEND_EVERY_MS for
// DURATION_S seconds; every member counts the messages it receives, checks their seq order and records the
// end-to-end latency from the send time written in the body. Loopback targets only.
//
//   cargo xtask up
//   k6 run loadtest/k6/fanout.js                                    # 100 users, 4 rooms, 30 s
//   VUS=400 ROOMS=8 SEND_EVERY_MS=500 k6 run loadtest/k6/fanout.js
//
// Environment: SWITCHYARD_FLEET (default .dev/fleet.json, as written by `cargo xtask up`), VUS, ROOMS,
// SEND_EVERY_MS, DURATION_S, P99_MS. Thresholds fail the run on any error, duplicate or reordering, and on a
// delivery p99 above P99_MS (default 25, the design target). k6 runs JavaScript per message: past a few thousand
// deliveries/s on two cores, k6 itself is the bottleneck and its latency is its own queue (see BENCHMARKS.md).

import http from 'k6/http';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { setInterval, clearInterval, setTimeout } from 'k6/timers';
import { WebSocket } from 'k6/websockets';

const fleet = JSON.parse(open(__ENV.SWITCHYARD_FLEET || '../../.dev/fleet.json'));
const VUS = parseInt(__ENV.VUS || '100', 10);
const ROOMS = parseInt(__ENV.ROOMS || '4', 10);
const SEND_EVERY_MS = parseInt(__ENV.SEND_EVERY_MS || '1000', 10);
const DURATION_S = parseInt(__ENV.DURATION_S || '30', 10);
const P99_MS = parseInt(__ENV.P99_MS || '25', 10);

for (const url of [fleet.http, fleet.ws]) {
  const host = url.split('://')[1].split(/[/:]/)[0];
  if (host !== 'localhost' && !/^127\.\d+\.\d+\.\d+$/.test(host)) {
    throw new Error(`refusing to load ${url}: only loopback targets are allowed`);
  }
}

const deliveryMs = new Trend('switchyard_delivery_ms', true);
const ackMs = new Trend('switchyard_ack_ms', true);
const delivered = new Counter('switchyard_deliveries');
const acked = new Counter('switchyard_sends_acked');
const outOfOrder = new Counter('switchyard_duplicated_or_out_of_order');
const errors = new Counter('switchyard_errors');

export const options = {
  scenarios: {
    fanout: { executor: 'per-vu-iterations', vus: VUS, iterations: 1, maxDuration: `${DURATION_S + 60}s` },
  },
  thresholds: {
    switchyard_delivery_ms: [`p(99)<${P99_MS}`],
    switchyard_errors: ['count==0'],
    switchyard_duplicated_or_out_of_order: ['count==0'],
  },
};

// One token per user, minted with the tenant's API key.
export function setup() {
  const runId = `${Date.now().toString(36)}`;
  const tokens = [];
  for (let i = 0; i < VUS; i++) {
    const res = http.post(`${fleet.http}/v1/tokens`, JSON.stringify({ user_id: `k6-${runId}-${i}`, ttl_secs: 3600 }), {
      headers: { Authorization: `Bearer ${fleet.api_key}`, 'Content-Type': 'application/json' },
    });
    check(res, { 'token minted': (r) => r.status === 201 });
    tokens.push(res.json('token'));
  }
  return { runId, tokens };
}

export default function (data) {
  const me = __VU - 1;
  const room = `k6-${data.runId}-${me % ROOMS}`;
  const ws = new WebSocket(`${fleet.ws}?token=${data.tokens[me]}`, 'switchyard.v1.json');
  let rid = 0;
  let joinRid = 0;
  let lastSeq = 0;
  let starter = null;
  let sender = null;
  const sentAt = {};

  ws.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    switch (frame.op) {
      case 'hello':
        joinRid = ++rid;
        ws.send(JSON.stringify({ op: 'join', rid: joinRid, room }));
        break;
      case 'ok':
        if (frame.rid === joinRid) {
          // Members that joined later are `joined` events with higher seqs; messages come after them.
          lastSeq = frame.seq;
          // Each user starts at a random point of the period, so the load is even rather than every user
          // sending in the same millisecond (which measures a burst's queue, not the latency of a steady rate).
          starter = setTimeout(() => {
            starter = null;
            sender = setInterval(() => {
              const r = ++rid;
              sentAt[r] = Date.now();
              ws.send(JSON.stringify({ op: 'send', rid: r, room, body: `${Date.now()} k6`, cmid: `k6-${me}-${r}` }));
            }, SEND_EVERY_MS);
          }, Math.random() * SEND_EVERY_MS);
        } else if (sentAt[frame.rid] !== undefined) {
          acked.add(1);
          ackMs.add(Date.now() - sentAt[frame.rid]);
          delete sentAt[frame.rid];
        }
        break;
      case 'msg':
        if (frame.seq <= lastSeq) {
          outOfOrder.add(1);
        }
        lastSeq = Math.max(lastSeq, frame.seq);
        delivered.add(1);
        deliveryMs.add(Date.now() - parseInt(frame.body.split(' ')[0], 10));
        break;
      case 'joined':
      case 'left':
        lastSeq = Math.max(lastSeq, frame.seq);
        break;
      case 'ping':
        ws.send(JSON.stringify({ op: 'pong' }));
        break;
      case 'err':
        errors.add(1, { code: frame.code });
        break;
      default:
        break;
    }
  };
  ws.onerror = () => errors.add(1, { code: 'socket' });

  setTimeout(() => {
    if (starter !== null) {
      clearTimeout(starter);
    }
    if (sender !== null) {
      clearInterval(sender);
    }
    // Leave a moment for the last messages to arrive before closing.
    setTimeout(() => ws.close(), 2000);
  }, DURATION_S * 1000);
}
