// The browser module (`switchboard.js`) on its own, in real Chromium against the real server: where
// it keeps its place, how it treats a refused token, its SSE and HTTP paths, and its way back from a
// fallback transport. Each case failed against the module before the fix it names.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { useBrowser, freePort, BIN, tempDb, startServer, stop } from "./helpers.mjs";

const getBrowser = useBrowser();

/** A page on the server's origin with the module loaded as `window.sb` and `window.log` to fill. */
async function modulePage(port) {
  const page = await (await getBrowser().newContext()).newPage();
  page.on("pageerror", (error) => { throw error; });
  await page.goto(`http://127.0.0.1:${port}/healthz`);
  await page.evaluate(async (port) => {
    window.sb = await import(`http://127.0.0.1:${port}/switchboard.js`);
    window.log = { states: [], errors: [], messages: [], tokens: 0 };
    window.watch = (client) => {
      client.addEventListener("state", (e) => window.log.states.push(e.detail));
      client.addEventListener("error", (e) => window.log.errors.push(e.detail));
      client.addEventListener("message", (e) => window.log.messages.push(`${e.detail.room}:${e.detail.message}`));
      return client;
    };
  }, port);
  return page;
}

/** A server (given `args`) on a free port and a page with the module loaded: runs `body(port, page)`,
 * then stops the server. */
async function withModulePage(args, body) {
  const port = await freePort();
  const server = await startServer(port, tempDb(), args);
  try {
    return await body(port, await modulePage(port));
  } finally {
    await stop(server);
  }
}

/** Publishes `count` messages `${prefix} i` to `room` over HTTP, as another client would. */
async function publishOverHttp(port, room, prefix, count) {
  for (let i = 1; i <= count; i++) {
    const response = await fetch(`http://127.0.0.1:${port}/publish`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ room, message: `${prefix} ${i}`, name: "other" }),
    });
    assert.equal(response.status, 200, await response.text());
  }
}

async function waitFor(page, predicate, arg, timeout = 15000) {
  await page.waitForFunction(predicate, arg, { timeout });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

for (const transport of ["websocket", "longpoll"]) {
  test(`a room joined while empty keeps its place across a restart (${transport}): everything published meanwhile arrives`, async () => {
    // Before: the place came only from messages, so an empty room had none, and the rejoin got only
    // the last 50 of the 80 published while the page was away, with no gap event.
    const port = await freePort();
    const db = tempDb();
    let server = await startServer(port, db);
    try {
      const page = await modulePage(port);
      await page.evaluate(([port, transport]) => {
        window.client = window.watch(new window.sb.SwitchboardClient({
          url: `ws://127.0.0.1:${port}/ws`, rooms: ["quiet"], storage: null, transports: [transport], pollWaitSecs: 1,
        }));
      }, [port, transport]);
      await waitFor(page, () => window.client.offsets.quiet !== undefined); // its place, from `joined`
      await stop(server);
      // Published while the page cannot reach the server: through the same database on another port.
      const elsewhere = await freePort();
      server = await startServer(elsewhere, db);
      await publishOverHttp(elsewhere, "quiet", "q", 80);
      await stop(server);
      server = await startServer(port, db);
      await waitFor(page, () => window.log.messages.length >= 80, undefined, 30000).catch(() => {});
      await sleep(300);
      const got = await page.evaluate(() => window.log.messages);
      assert.deepEqual(got, Array.from({ length: 80 }, (_, i) => `quiet:q ${i + 1}`));
      await page.evaluate(() => window.client.close());
    } finally {
      await stop(server);
    }
  });
}

test("a token function that gives a long-lived token is asked once per connection, not in a loop", async () => {
  // Before: a delay past 2^31 ms overflowed setTimeout and fired at once, thousands of times a second.
  await withModulePage(["--jwt-secret", "s3cret"], async (port, page) => {
    const long = spawnSync(BIN, ["token", "--sub", "ann", "--secret", "s3cret", "--ttl-secs", String(30 * 86400)]).stdout.toString().trim();
    const short = spawnSync(BIN, ["token", "--sub", "bob", "--secret", "s3cret", "--ttl-secs", "20"]).stdout.toString().trim();
    const counts = await page.evaluate(async ([port, long, short]) => {
      const counts = {};
      for (const [name, token] of [["long", long], ["short", short]]) {
        let asked = 0;
        // "short" gives back the same token each time, already within the renewal margin.
        const client = new window.sb.SwitchboardClient({
          url: `ws://127.0.0.1:${port}/ws`, rooms: ["lobby"], storage: null, token: () => { asked += 1; return token; },
        });
        await new Promise((r) => setTimeout(r, 3000));
        counts[name] = { asked, state: client.state };
        client.close();
      }
      return counts;
    }, [port, long, short]);
    assert.deepEqual(counts.long, { asked: 1, state: "open" });
    assert.equal(counts.short.state, "open");
    assert.ok(counts.short.asked <= 4, `a token inside the margin is renewed at most every second: ${counts.short.asked}`);
  });
});

test("a fixed token the server refuses ends the client with one error, over WebSocket and over long polling", async () => {
  // Before: every attempt opened, reset the backoff and was refused, about 8 times a second for good.
  await withModulePage(["--jwt-secret", "s3cret", "--allow-anonymous", "false"], async (port, page) => {
    for (const transport of ["websocket", "longpoll", "sse"]) {
      const log = await page.evaluate(async ([port, transport]) => {
        window.log = { states: [], errors: [], messages: [], tokens: 0 };
        const client = window.watch(new window.sb.SwitchboardClient({
          url: `ws://127.0.0.1:${port}/ws`, rooms: ["lobby"], storage: null, token: "not.a.jwt", transports: [transport],
        }));
        await new Promise((r) => setTimeout(r, 2500));
        client.close();
        return window.log;
      }, [port, transport]);
      assert.equal(log.states.at(-1), "closed", `${transport}: ${JSON.stringify(log)}`);
      assert.ok(log.states.filter((s) => s === "open").length <= 1, `${transport}: ${JSON.stringify(log.states)}`);
      assert.equal(log.errors.length, 1, `${transport}: ${JSON.stringify(log.errors)}`);
      assert.match(log.errors[0].message, /token/i, transport);
    }
  });
});

test("over SSE, joins and a new name made one after another all reach the stream", async () => {
  // Before: the second join came while the first one's new stream was opening and was dropped.
  await withModulePage([], async (port, page) => {
    await page.evaluate((port) => {
      window.client = window.watch(new window.sb.SwitchboardClient({
        url: `ws://127.0.0.1:${port}/ws`, rooms: ["lobby"], storage: null, transports: ["sse"],
      }));
    }, port);
    await waitFor(page, () => window.log.states.includes("open"));
    await page.evaluate(() => { window.client.join("a"); window.client.join("b"); window.client.setName("Annie"); });
    await waitFor(page, () => window.client.state === "open");
    await sleep(500);
    await publishOverHttp(port, "b", "hello", 1);
    await waitFor(page, () => window.log.messages.includes("b:hello 1"));
    // The stream's place in presence has the new name: a WebSocket client in room b sees it.
    const names = await page.evaluate(async (port) => {
      const other = new window.sb.SwitchboardClient({ url: `ws://127.0.0.1:${port}/ws`, rooms: ["b"], name: "Bob", storage: null });
      await new Promise((done) => other.addEventListener("presence", (e) => { if (e.detail.members.length >= 2) done(); }));
      const names = other.presence("b").map((m) => m.name).sort();
      other.close();
      return names;
    }, port);
    assert.deepEqual(names, ["Annie", "Bob"]);
    await page.evaluate(() => window.client.close());
  });
});

test("publishes over HTTP past the rate limit wait their turn instead of failing", async () => {
  // Before: a 429 rejected the publish and dropped it.
  await withModulePage(["--rate-limit", "5", "--rate-burst", "10"], async (port, page) => {
    const outcome = await page.evaluate(async (port) => {
      const client = new window.sb.SwitchboardClient({ url: `ws://127.0.0.1:${port}/ws`, rooms: ["lobby"], storage: null, transports: ["longpoll"] });
      const results = await Promise.allSettled(Array.from({ length: 20 }, (_, i) => client.publish("lobby", `m${i}`)));
      client.close();
      return results.map((r) => r.status === "fulfilled" ? r.value.offset : `rejected ${JSON.stringify(r.reason)}`);
    }, port);
    assert.deepEqual(outcome, Array.from({ length: 20 }, (_, i) => i + 1), "all stored, once, in order");
  });
});

test("a page that started during an outage on a fallback transport moves back to WebSocket once it gets through", async () => {
  // Before: two failed attempts per transport moved it on, and nothing moved it back.
  const port = await freePort();
  const db = tempDb();
  let server = await startServer(port, db);
  try {
    const page = await modulePage(port);
    await stop(server);
    server = null;
    await page.evaluate((port) => {
      window.client = window.watch(new window.sb.SwitchboardClient({
        url: `ws://127.0.0.1:${port}/ws`, rooms: ["lobby"], storage: null, minBackoffMs: 50, maxBackoffMs: 100, upgradeProbeMs: 500,
      }));
    }, port);
    await waitFor(page, () => window.client.transport !== "websocket", undefined, 10000);
    server = await startServer(port, db);
    await waitFor(page, () => window.client.state === "open" && window.client.transport === "websocket", undefined, 20000);
    await publishOverHttp(port, "lobby", "back", 1);
    await waitFor(page, () => window.log.messages.includes("lobby:back 1"));
    await page.evaluate(() => window.client.close());
  } finally {
    if (server) await stop(server);
  }
});

test("a WebSocket that goes quiet for good (no close ever comes) is noticed by its pings and replaced", async () => {
  // Before: a connection black-holed on the way (a laptop that slept, a NAT that forgot it) stayed
  // "open" for good, with nothing delivered and publishes waiting.
  const { createServer, connect } = await import("node:net");
  const port = await freePort();
  const server = await startServer(port, tempDb());
  const pairs = [];
  const relay = createServer((client) => {
    const upstream = connect(port, "127.0.0.1");
    client.pipe(upstream);
    upstream.pipe(client);
    pairs.push([client, upstream]);
    client.on("error", () => {});
    upstream.on("error", () => {});
  });
  await new Promise((r) => relay.listen(0, "127.0.0.1", r));
  const relayPort = relay.address().port;
  try {
    const page = await modulePage(port);
    await page.evaluate((relayPort) => {
      window.client = window.watch(new window.sb.SwitchboardClient({
        url: `ws://127.0.0.1:${relayPort}/ws`, rooms: ["lobby"], storage: null, heartbeatMs: 1000, heartbeatTimeoutMs: 2000,
      }));
    }, relayPort);
    await waitFor(page, () => window.log.states.includes("open"));
    await sleep(3500); // quiet, but answered: the pings keep it
    assert.deepEqual(await page.evaluate(() => window.log.states), ["connecting", "open"], "a quiet room is not a dead connection");
    // The relay stops passing bytes on the connections it has, and closes nothing.
    for (const [client, upstream] of pairs) {
      client.unpipe(upstream);
      upstream.unpipe(client);
      client.pause();
      upstream.pause();
    }
    await waitFor(page, () => window.log.states.filter((s) => s === "open").length >= 2, undefined, 15000);
    await publishOverHttp(port, "lobby", "after", 1);
    await waitFor(page, () => window.log.messages.includes("lobby:after 1"));
    await page.evaluate(() => window.client.close());
  } finally {
    for (const pair of pairs) for (const socket of pair) socket.destroy();
    relay.close();
    await stop(server);
  }
});
