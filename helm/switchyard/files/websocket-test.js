// `helm test` of the switchyard chart (templates/tests/websocket-test.yaml runs it with `node -e`): checks the
// gateway through its Service with Node's built-in fetch and WebSocket (Node 22 or later), nothing installed.
//
//   1. GET /healthz answers 200 (retried for a while: a pod may still be starting behind the Service);
//   2. a WebSocket at /v1/ws without a token: the upgrade succeeds, a first frame that is not `auth` is answered
//      with `bye` and the socket is closed with 4001. A round trip through the Service with no tenant;
//   3. with TEST_AUTHENTICATED=true: a tenant made with the admin token, a token for one user, a socket opened with
//      it that gets `hello` and a `pong` for a `ping`; the tenant is disabled again whatever happened.
//
// Environment: GATEWAY_URL (http://service:port), TEST_AUTHENTICATED, ADMIN_TOKEN, WS_ORIGIN (sent as Origin when
// set, for gateways with allowed origins), TEST_TIMEOUT_SECONDS, TENANT_NAME. Exits 0 when every step passed.
"use strict";

const base = (process.env.GATEWAY_URL || "http://127.0.0.1:8080").replace(/\/+$/, "");
const wsBase = base.replace(/^http/, "ws");
const origin = process.env.WS_ORIGIN || "";
const authenticated = process.env.TEST_AUTHENTICATED === "true";
const timeoutMs = 1000 * Number(process.env.TEST_TIMEOUT_SECONDS || 60);
const tenantName = process.env.TENANT_NAME || "helm-test";

function log(message) {
  console.log(`${new Date().toISOString()} ${message}`);
}

// Thrown, not exited on, so that the tenant made for the test is disabled on the way out.
class TestFailure extends Error {}

function fail(message) {
  throw new TestFailure(message);
}

setTimeout(() => {
  console.error(`FAIL not done within ${timeoutMs / 1000} s`);
  process.exit(1);
}, timeoutMs).unref();

async function healthz() {
  const until = Date.now() + Math.min(30000, timeoutMs / 2);
  let last = "";
  while (Date.now() < until) {
    try {
      const response = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(5000) });
      if (response.status === 200) {
        log(`GET ${base}/healthz: 200`);
        return;
      }
      last = `status ${response.status}`;
    } catch (error) {
      last = String(error.cause || error);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  fail(`GET ${base}/healthz did not answer 200 (${last})`);
}

// A socket whose frames and close are read in order: next() resolves with the next JSON frame, or with
// {closed: code, reason} once the socket is closed.
function open(url) {
  const options = origin ? { headers: { Origin: origin } } : undefined;
  const ws = new WebSocket(url, options);
  const queue = [];
  const waiters = [];
  const push = (item) => (waiters.length ? waiters.shift()(item) : queue.push(item));
  ws.addEventListener("message", (event) => {
    try {
      push(JSON.parse(String(event.data)));
    } catch {
      push({ unparsable: String(event.data) });
    }
  });
  ws.addEventListener("close", (event) => push({ closed: event.code, reason: event.reason }));
  const opened = new Promise((resolve, reject) => {
    ws.addEventListener("open", resolve, { once: true });
    // The event says nothing of the cause; a refused Origin (403) is the likely one behind a healthy /healthz.
    const failed = `the WebSocket upgrade at ${url.split("?")[0]} failed (is the Origin ${origin || "(none)"} allowed?)`;
    ws.addEventListener("error", () => reject(new TestFailure(failed)), { once: true });
  });
  const next = (ms = 10000) =>
    queue.length
      ? Promise.resolve(queue.shift())
      : new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`no frame within ${ms} ms`)), ms);
          waiters.push((item) => {
            clearTimeout(timer);
            resolve(item);
          });
        });
  return { ws, opened, next };
}

async function anonymousRoundTrip() {
  const socket = open(`${wsBase}/v1/ws`);
  await socket.opened;
  log("WebSocket /v1/ws without a token: upgraded");
  socket.ws.send(JSON.stringify({ op: "ping", rid: 1 }));
  const bye = await socket.next();
  if (bye.op !== "bye" || bye.code !== 4001) {
    fail(`expected bye 4001 for a first frame that is not auth, got ${JSON.stringify(bye)}`);
  }
  const closed = await socket.next();
  if (closed.closed !== 4001) {
    fail(`expected close 4001, got ${JSON.stringify(closed)}`);
  }
  log(`a ping before auth: bye 4001 (${bye.reason}) and close 4001`);
}

async function call(method, path, bearer, body) {
  const response = await fetch(`${base}${path}`, {
    method,
    headers: { Authorization: `Bearer ${bearer}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(15000),
  });
  const text = await response.text();
  return { status: response.status, json: text ? JSON.parse(text) : null, text };
}

async function authenticatedRoundTrip() {
  const adminToken = process.env.ADMIN_TOKEN || "";
  if (!adminToken) {
    fail("TEST_AUTHENTICATED is true but ADMIN_TOKEN is empty");
  }
  const tenant = await call("POST", "/v1/admin/tenants", adminToken, { name: tenantName });
  if (tenant.status !== 201) {
    fail(`POST /v1/admin/tenants: ${tenant.status} ${tenant.text}`);
  }
  const project = tenant.json.project_id;
  log(`tenant ${project} created`);
  try {
    const issued = await call("POST", "/v1/tokens", tenant.json.api_key, { user_id: "helm-test", ttl_secs: 120 });
    if (issued.status !== 201) {
      fail(`POST /v1/tokens: ${issued.status} ${issued.text}`);
    }
    const socket = open(`${wsBase}/v1/ws?token=${encodeURIComponent(issued.json.token)}`);
    await socket.opened;
    const hello = await socket.next();
    if (hello.op !== "hello" || hello.user !== "helm-test" || hello.project_id !== project) {
      fail(`expected hello for helm-test in ${project}, got ${JSON.stringify(hello)}`);
    }
    log(`WebSocket with a token: hello, session ${hello.session}`);
    socket.ws.send(JSON.stringify({ op: "ping", rid: 2 }));
    const pong = await socket.next();
    if (pong.op !== "pong" || pong.rid !== 2) {
      fail(`expected pong rid 2, got ${JSON.stringify(pong)}`);
    }
    log("ping rid 2: pong rid 2");
    socket.ws.close(1000);
  } finally {
    const disabled = await call("DELETE", `/v1/admin/tenants/${project}`, adminToken);
    if (disabled.status === 204) {
      log(`tenant ${project} disabled`);
    } else {
      console.error(`warning: DELETE /v1/admin/tenants/${project}: ${disabled.status} ${disabled.text}`);
    }
  }
}

(async () => {
  await healthz();
  await anonymousRoundTrip();
  if (authenticated) {
    await authenticatedRoundTrip();
  }
  log("passed");
  process.exit(0);
})().catch((error) => {
  console.error(`FAIL ${error instanceof TestFailure ? error.message : error.stack || error}`);
  process.exit(1);
});
