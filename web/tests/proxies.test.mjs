// The browser module behind Debian's nginx with its documented WebSocket configuration and a short
// `proxy_read_timeout` (3 s): the server's keepalive pings hold a quiet connection open for 10 s;
// without keepalive nginx drops it, and the module reconnects and resumes, missing nothing and
// getting nothing twice.

import { test } from "node:test";
import assert from "node:assert/strict";
import { useBrowser, freePort, startNginx, tempDb, startServer, stop } from "./helpers.mjs";

const API_KEY = "proxies-test-key";

const getBrowser = useBrowser();

function startChatServer(port, keepaliveSecs) {
  return startServer(port, tempDb(), ["--api-key", API_KEY, "--keepalive-secs", String(keepaliveSecs)]);
}

// nginx's WebSocket proxying as its documentation has it (Upgrade and Connection passed on, HTTP/1.1
// to the backend), with a 3 s read timeout so an idle connection is dropped quickly.
function startWebSocketNginx(port, backendPort) {
  return startNginx(port, backendPort, {
    http: "map $http_upgrade $connection_upgrade { default upgrade; '' close; }",
    location: `proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 3s;
      proxy_send_timeout 3s;`,
  });
}

/** A page running the module against the proxy, recording its states and messages. Jitter is off
 * and the first reconnect waits 1.5 s, so a message published in that gap must come by resuming. */
async function listener(proxyPort) {
  const page = await (await getBrowser().newContext()).newPage();
  page.on("pageerror", (error) => { throw error; });
  await page.goto(`http://127.0.0.1:${proxyPort}/healthz`);
  await page.evaluate(async () => {
    const { SwitchboardClient } = await import("/switchboard.js");
    Math.random = () => 1;
    window.states = [];
    window.got = [];
    const client = new SwitchboardClient({ name: "Ann", rooms: ["lobby"], minBackoffMs: 1500, maxBackoffMs: 1500, storage: null });
    client.addEventListener("state", (e) => window.states.push(e.detail));
    client.addEventListener("message", (e) => window.got.push(e.detail.message));
    window.client = client;
  });
  await page.waitForFunction(() => window.client.state === "open");
  assert.equal(await page.evaluate(() => window.client.transport), "websocket", "nginx passes the WebSocket");
  return page;
}

async function publish(port, message) {
  const response = await fetch(`http://127.0.0.1:${port}/api/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ room: "lobby", message, name: "Bob" }),
  });
  assert.equal(response.status, 200, await response.text());
}

const got = (page) => page.evaluate(() => window.got);
const states = (page) => page.evaluate(() => window.states);

test("behind nginx (proxy_read_timeout 3s) keepalive pings hold a quiet page open for 10 s", async () => {
  const [port, proxyPort] = [await freePort(), await freePort()];
  const server = await startChatServer(port, 1);
  const nginx = await startWebSocketNginx(proxyPort, port);
  try {
    const page = await listener(proxyPort);
    await publish(port, "first");
    await page.waitForFunction(() => window.got.includes("first"));
    const before = (await states(page)).length;
    await new Promise((r) => setTimeout(r, 10_000));
    assert.deepEqual((await states(page)).slice(before), [], "no reconnect in 10 quiet seconds");
    await publish(port, "after ten seconds");
    await page.waitForFunction(() => window.got.includes("after ten seconds"));
    assert.deepEqual(await got(page), ["first", "after ten seconds"]);
  } finally {
    await stop(nginx, "SIGTERM");
    await stop(server);
  }
});

test("behind nginx without keepalive the quiet page is dropped, reconnects and resumes", async () => {
  const [port, proxyPort] = [await freePort(), await freePort()];
  const server = await startChatServer(port, 0);
  const nginx = await startWebSocketNginx(proxyPort, port);
  try {
    const page = await listener(proxyPort);
    await publish(port, "before the drop");
    await page.waitForFunction(() => window.got.includes("before the drop"));
    const droppedAt = Date.now();
    await page.waitForFunction(() => window.states.includes("reconnecting"), null, { timeout: 10_000 });
    const quiet = Date.now() - droppedAt;
    assert.ok(quiet >= 2000, `dropped by nginx's 3 s read timeout, not at once (${quiet} ms)`);
    // Published while the page waits 1.5 s to reconnect: it can only arrive by resuming.
    await publish(port, "while away");
    assert.equal(await page.evaluate(() => window.client.state), "reconnecting", "published inside the gap");
    await page.waitForFunction(() => window.got.includes("while away"), null, { timeout: 10_000 });
    await publish(port, "after");
    await page.waitForFunction(() => window.got.includes("after"));
    assert.deepEqual(await got(page), ["before the drop", "while away", "after"], "each once, in order");
  } finally {
    await stop(nginx, "SIGTERM");
    await stop(server);
  }
});
