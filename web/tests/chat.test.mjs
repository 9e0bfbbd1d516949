// The chat page in a real browser: Debian's Chromium driven by playwright-core, against the real
// `switchboard serve` binary (SWITCHBOARD_BIN, default target/debug/switchboard).
//
// Run: (cd web && npm install && npm test). Screenshots land in target/browser-artifacts/.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { useBrowser, listening, freePort, waitListening, startNginx, ROOT, BIN, tempDb, startServer, stop } from "./helpers.mjs";

const ARTIFACTS = join(ROOT, "target/browser-artifacts");
mkdirSync(ARTIFACTS, { recursive: true });

const getBrowser = useBrowser();

/** `page` publishes `${prefix} 1` to `${prefix} ${total}` to the lobby through the module, one every
 * `everyMs`; resolves with their offsets once every one is acknowledged. */
function publishEach(page, prefix, total, everyMs) {
  return page.evaluate(async ([prefix, total, everyMs]) => {
    const acks = [];
    for (let i = 1; i <= total; i++) {
      acks.push(window.switchboard.publish("lobby", `${prefix} ${i}`));
      await new Promise((r) => setTimeout(r, everyMs));
    }
    return (await Promise.all(acks)).map((a) => a.offset);
  }, [prefix, total, everyMs]);
}

/** After `afterMs`, kill -9 of `server`; after `downMs` more, the server again on the same port and
 * database. */
async function killAndRestart(server, port, db, afterMs, downMs) {
  await new Promise((r) => setTimeout(r, afterMs));
  await stop(server, "SIGKILL");
  await new Promise((r) => setTimeout(r, downMs));
  return startServer(port, db);
}

async function openChat(url, name) {
  const context = await getBrowser().newContext();
  const page = await context.newPage();
  page.on("pageerror", (error) => { throw error; });
  await page.goto(url);
  await page.fill("#name", name);
  await page.dispatchEvent("#name", "change");
  await page.waitForSelector("#state.open");
  return page;
}

async function say(page, text) {
  await page.fill("#message", text);
  await page.click("#send");
}

const texts = (page) => page.$$eval("#messages li .text", (items) => items.map((li) => li.textContent));

async function waitForTexts(page, expected, timeout = 15000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const got = await texts(page);
    if (expected.every((t) => got.includes(t))) return got;
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${JSON.stringify(expected)}; page shows ${JSON.stringify(got)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test("two pages chat with each other, with names, times and presence", async () => {
  const port = await freePort();
  const server = await startServer(port, tempDb());
  try {
    const url = `http://127.0.0.1:${port}/`;
    const ann = await openChat(url, "Ann");
    const bob = await openChat(url, "Bob");
    await say(ann, "hello from Ann");
    await waitForTexts(bob, ["hello from Ann"]);
    await say(bob, "hi Ann, Bob here");
    await waitForTexts(ann, ["hello from Ann", "hi Ann, Bob here"]);
    const line = await ann.$eval("#messages li:last-child", (li) => ({
      time: li.querySelector(".time").textContent, name: li.querySelector(".name").textContent,
    }));
    assert.equal(line.name, "Bob");
    assert.match(line.time, /^\d\d:\d\d:\d\d$/);
    // Presence shows the names people chose, not the name they had when the page opened.
    await ann.waitForFunction(() => [...document.querySelectorAll("#online li")].map((li) => li.textContent).sort().join() === "Ann,Bob");
    await ann.setViewportSize({ width: 1000, height: 640 });
    await ann.screenshot({ path: join(ARTIFACTS, "chat-desktop.png") });
    await bob.setViewportSize({ width: 390, height: 780 });
    await bob.screenshot({ path: join(ARTIFACTS, "chat-phone.png") });
    const overflow = await bob.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `no horizontal scrolling at phone width (overflow ${overflow}px)`);
  } finally {
    await stop(server);
  }
});

test("a message containing HTML is shown as text and never runs", async () => {
  const port = await freePort();
  const server = await startServer(port, tempDb());
  try {
    const url = `http://127.0.0.1:${port}/`;
    const ann = await openChat(url, "<i>Ann</i>");
    const bob = await openChat(url, "Bob");
    const attack = `<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>`;
    await say(ann, attack);
    await waitForTexts(bob, [attack]);
    assert.equal(await bob.evaluate(() => window.pwned), undefined);
    assert.equal(await bob.$$eval("#messages img, #messages script, #messages i", (n) => n.length), 0);
    assert.equal(await bob.$eval("#messages li:last-child .name", (n) => n.textContent), "<i>Ann</i>");
  } finally {
    await stop(server);
  }
});

test("killing and restarting the server while a third client publishes loses and duplicates nothing", async () => {
  const port = await freePort();
  const db = tempDb();
  let server = await startServer(port, db);
  const url = `http://127.0.0.1:${port}/`;
  const ann = await openChat(url, "Ann");
  const bob = await openChat(url, "Bob");
  const publisher = await openChat(url, "Pub");
  const total = 60;
  // publish() keeps each message until the server acknowledges it, across reconnects.
  const done = publishEach(publisher, "msg", total, 25);
  server = await killAndRestart(server, port, db, 500, 700);
  try {
    const offsets = await done;
    assert.equal(new Set(offsets).size, total, "every publish was acknowledged with its own offset");
    const expected = Array.from({ length: total }, (_, i) => `msg ${i + 1}`);
    for (const page of [ann, bob]) {
      await waitForTexts(page, expected, 30000);
      const got = (await texts(page)).filter((t) => t.startsWith("msg "));
      assert.deepEqual(got, expected, "complete, in order, no duplicates");
    }
    // A reload restores the same list from the page's storage and the server's offsets, once.
    await bob.reload();
    await bob.waitForSelector("#state.open");
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual((await texts(bob)).filter((t) => t.startsWith("msg ")), expected);
    await bob.screenshot({ path: join(ARTIFACTS, "chat-after-restart.png") });
  } finally {
    await stop(server);
  }
});

test("after the server loses its history (a new database), the page shows the new messages", async () => {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "sb-"));
  let server = await startServer(port, join(dir, "first.db"));
  const url = `http://127.0.0.1:${port}/`;
  const ann = await openChat(url, "Ann");
  try {
    for (const text of ["old 1", "old 2", "old 3"]) await say(ann, text);
    await waitForTexts(ann, ["old 1", "old 2", "old 3"]);
    const epoch = await ann.evaluate(() => window.switchboard.epochs.lobby);
    assert.ok(epoch, "the page keeps the epoch of its offsets");
    await stop(server);
    // Same port, empty history: offsets start at 1 again, under a new epoch.
    server = await startServer(port, join(dir, "second.db"));
    await ann.waitForSelector("#state.open", { timeout: 15000 });
    const bob = await openChat(url, "Bob");
    await say(bob, "new 1");
    await waitForTexts(ann, ["new 1"]);
    assert.notEqual(await ann.evaluate(() => window.switchboard.epochs.lobby), epoch);
  } finally {
    await stop(server);
  }
});

test("the seed page from seed 000, unmodified, chats through the server", async () => {
  // The seed hard-codes ws://localhost:8000/ws: serve there when the port is free, so the page runs
  // byte for byte as printed; otherwise point it at our port (the only change) and say so.
  const seedPort = 8000;
  const port = (await listening(seedPort)) ? await freePort() : seedPort;
  if (port !== seedPort) console.log(`# port ${seedPort} is busy: the seed page is pointed at ${port} instead`);
  const server = await startServer(port, tempDb());
  try {
    const seedPage = SEED_000_PAGE.replace("ws://localhost:8000/ws", `ws://localhost:${port}/ws`);
    // Served from another origin (about:blank), as "served from anywhere" asks.
    const context = await getBrowser().newContext();
    const one = await context.newPage();
    const two = await context.newPage();
    for (const page of [one, two]) {
      await page.setContent(seedPage);
      await page.waitForFunction(() => document.readyState === "complete");
    }
    await new Promise((r) => setTimeout(r, 300));
    await one.fill("#name", "Seed One");
    await one.fill("#message", "hello from the seed page");
    await one.click("#button");
    for (const page of [one, two]) {
      await page.waitForFunction(() => document.querySelectorAll("#messages li").length >= 1, null, { timeout: 10000 });
      const line = await page.$eval("#messages li", (li) => li.innerText);
      assert.match(line, /^\[\d\d:\d\d:\d\d\] Seed One: hello from the seed page$/);
    }
  } finally {
    await stop(server);
  }
});

// The page of seed 000 ("Chatting with WebSockets"), as the seed prints it.
const SEED_000_PAGE = `<!DOCTYPE html>
<html lang="en">
<title>Chatting with WebSockets</title>
<style>
    input, textarea, button {
        width: 100%;
        max-width: 300px;
        box-sizing: border-box;
    }
</style>
<h1>Chat</h1>
<input type="text" placeholder="Your name" value="Anonymous" id="name" /><br>
<textarea id="message" autocomplete="off" autofocus rows="4"></textarea><br>
<button id="button">Send</button>
<ul id='messages'></ul>
<script>
    document.addEventListener("DOMContentLoaded", initialize);
    function initialize() {
        const ws = new WebSocket(\`ws://localhost:8000/ws\`);
        ws.onmessage = function(event) {
            const messages = document.getElementById('messages');
            const message = document.createElement('li');
            const msg = JSON.parse(event.data);
            message.innerText = \`[\${msg.time}] \${msg.name}: \${msg.message}\`;
            messages.appendChild(message)
        };
        document.querySelector("#button").onclick = event => {
            const nameInput = document.querySelector("#name");
            const messageInput = document.querySelector("#message");
            ws.send(JSON.stringify({
                name: nameInput.value,
                message: messageInput.value
            }));
            messageInput.value = ""
            messageInput.focus();
        };
    }
</script>
`;

test("the module authenticates with a token function and renews the token before it expires", async () => {
  const port = await freePort();
  const server = await startServer(port, tempDb(), ["--jwt-secret", "s3cret"]);
  try {
    const page = await (await getBrowser().newContext()).newPage();
    page.on("pageerror", (error) => { throw error; });
    let minted = 0;
    // Tokens live 4 s; the page asks for a new one each time it needs one.
    await page.exposeFunction("mintToken", () => {
      minted += 1;
      const out = spawnSync(BIN, ["token", "--sub", "ann", "--room", "lobby", "--secret", "s3cret", "--ttl-secs", "4"]);
      return out.stdout.toString().trim();
    });
    await page.goto(`http://127.0.0.1:${port}/healthz`);
    const result = await page.evaluate(async (port) => {
      const { SwitchboardClient } = await import(`http://127.0.0.1:${port}/switchboard.js`);
      const states = [];
      let authed = 0;
      const client = new SwitchboardClient({
        url: `ws://127.0.0.1:${port}/ws`, rooms: ["lobby"], name: "typed", storage: null,
        token: () => window.mintToken(), refreshMarginMs: 2500,
      });
      client.addEventListener("state", (e) => states.push(e.detail));
      client.addEventListener("authed", () => { authed += 1; });
      const received = new Promise((done) => client.addEventListener("message", (e) => done(e.detail)));
      await new Promise((r) => setTimeout(r, 7000));
      const ack = await client.publish("lobby", "still signed in");
      const message = await received;
      client.close();
      return { states, authed, ack, message };
    }, port);
    assert.deepEqual(result.states, ["connecting", "open", "closed"], "never dropped, although each token lived 4 s");
    assert.ok(result.authed >= 3, `renewed on the open connection (${result.authed} authed)`);
    assert.ok(minted >= 3);
    assert.equal(result.ack.offset, 1);
    assert.equal(result.message.name, "ann", "the token's name, not the typed one");
  } finally {
    await stop(server);
  }
});

test("two pages on different cluster nodes chat; when one node is killed its page carries on through the other", async () => {
  const redisPort = await freePort();
  const redisDir = mkdtempSync(join(tmpdir(), "sb-redis-"));
  const redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--dir", redisDir, "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  assert.ok(await waitListening(redisPort), "redis-server listens");
  const [portA, portB] = [await freePort(), await freePort()];
  const cluster = ["--redis", `redis://127.0.0.1:${redisPort}/`, "--presence-lease-secs", "2"];
  const nodeA = await startServer(portA, join(redisDir, "a.db"), cluster);
  const nodeB = await startServer(portB, join(redisDir, "b.db"), cluster);
  try {
    const servers = (first, second) => `servers=ws://127.0.0.1:${first}/ws,ws://127.0.0.1:${second}/ws`;
    const ann = await openChat(`http://127.0.0.1:${portA}/?${servers(portA, portB)}`, "Ann");
    const bob = await openChat(`http://127.0.0.1:${portB}/?${servers(portB, portA)}`, "Bob");
    await say(ann, "Ann on node A");
    await say(bob, "Bob on node B");
    await waitForTexts(bob, ["Ann on node A", "Bob on node B"]);
    await waitForTexts(ann, ["Ann on node A", "Bob on node B"]);
    await ann.waitForFunction(() => [...document.querySelectorAll("#online li")].map((li) => li.textContent).sort().join() === "Ann,Bob");

    await stop(nodeA, "SIGKILL");
    // Bob keeps talking while Ann's page moves to node B; it publishes as soon as it can.
    await say(bob, "Bob while A is down");
    await ann.waitForSelector("#state.open", { timeout: 15000 });
    await say(ann, "Ann through node B");
    const expected = ["Ann on node A", "Bob on node B", "Bob while A is down", "Ann through node B"];
    const annSees = await waitForTexts(ann, expected);
    const bobSees = await waitForTexts(bob, expected);
    assert.deepEqual(annSees, bobSees, "both pages show the same list, once each, in the same order");
    assert.equal(await ann.evaluate(() => window.switchboard.urls[window.switchboard.urlIndex]), `ws://127.0.0.1:${portB}/ws`);
    // Ann's old session on the dead node leaves once its lease runs out; Ann herself stays listed.
    await bob.waitForFunction(() => [...document.querySelectorAll("#online li")].map((li) => li.textContent).sort().join() === "Ann,Bob", null, { timeout: 15000 });
    await ann.screenshot({ path: join(ARTIFACTS, "chat-cluster-failover.png") });
  } finally {
    await stop(nodeB);
    await stop(redis);
  }
});

async function openChatWithout(url, name, missing) {
  const context = await getBrowser().newContext();
  const page = await context.newPage();
  page.on("pageerror", (error) => { throw error; });
  // Before any script of the page runs: the browser has no such API, as behind a proxy that strips it.
  await page.addInitScript((names) => { for (const n of names) window[n] = undefined; }, missing);
  await page.goto(url);
  await page.fill("#name", name);
  await page.dispatchEvent("#name", "change");
  await page.waitForSelector("#state.open", { timeout: 15000 });
  return page;
}

test("without WebSocket the page chats over SSE, and without EventSource too, over long polling", async () => {
  const port = await freePort();
  const server = await startServer(port, tempDb());
  try {
    const url = `http://127.0.0.1:${port}/`;
    const ann = await openChat(url, "Ann");
    const sam = await openChatWithout(url, "Sam", ["WebSocket"]);
    const pat = await openChatWithout(url, "Pat", ["WebSocket", "EventSource"]);
    assert.equal(await ann.evaluate(() => window.switchboard.transport), "websocket");
    assert.equal(await sam.evaluate(() => window.switchboard.transport), "sse");
    assert.equal(await pat.evaluate(() => window.switchboard.transport), "longpoll");
    assert.match(await sam.textContent("#state"), /sse/, "the page shows its transport");
    await say(ann, "from Ann over WebSocket");
    await say(sam, "from Sam over SSE");
    await say(pat, "from Pat over long polling");
    const all = ["from Ann over WebSocket", "from Sam over SSE", "from Pat over long polling"];
    const seen = [];
    for (const page of [ann, sam, pat]) seen.push(await waitForTexts(page, all));
    for (const list of seen) assert.deepEqual(list.filter((t) => all.includes(t)).sort(), [...all].sort(), "each once");
    // An SSE listener counts as present, and so does a long-polling page between its polls.
    await ann.waitForFunction(() => {
      const online = [...document.querySelectorAll("#online li")].map((li) => li.textContent);
      return online.includes("Sam") && online.includes("Pat");
    });
    await sam.screenshot({ path: join(ARTIFACTS, "chat-over-sse.png") });
  } finally {
    await stop(server);
  }
});

test("a page listening over SSE ends with the same complete list as a WebSocket page after kill -9 and restart", async () => {
  const port = await freePort();
  const db = tempDb();
  let server = await startServer(port, db);
  const url = `http://127.0.0.1:${port}/`;
  const ann = await openChat(url, "Ann");
  const sam = await openChatWithout(url, "Sam", ["WebSocket"]);
  const total = 30;
  const done = publishEach(ann, "sse", total, 30);
  server = await killAndRestart(server, port, db, 400, 500);
  try {
    const offsets = await done;
    assert.equal(new Set(offsets).size, total);
    const expected = Array.from({ length: total }, (_, i) => `sse ${i + 1}`);
    for (const page of [ann, sam]) {
      await waitForTexts(page, expected, 30000);
      assert.deepEqual((await texts(page)).filter((t) => t.startsWith("sse ")), expected, "complete, in order, once");
    }
    assert.equal(await sam.evaluate(() => window.switchboard.transport), "sse");
  } finally {
    await stop(server);
  }
});

test("a page that comes back where WebSocket cannot go keeps its place and its unacknowledged publish over SSE", async () => {
  const port = await freePort();
  const server = await startServer(port, tempDb());
  try {
    const url = `http://127.0.0.1:${port}/`;
    const ann = await openChat(url, "Ann");
    const bob = await openChat(url, "Bob");
    const before = ["m1", "m2", "m3"];
    for (const text of before) await say(bob, text);
    await waitForTexts(ann, before);
    // Ann's next publish never leaves her socket, so it stays unacknowledged (and saved with her place).
    await ann.evaluate(() => { window.switchboard.socket.send = () => {}; });
    await say(ann, "Ann's, sent before the switch");
    await ann.waitForFunction(() => window.switchboard.pending.length === 1);
    const meanwhile = ["m4", "m5"];
    for (const text of meanwhile) await say(bob, text);
    await waitForTexts(bob, meanwhile);
    // Reloaded where the browser has no WebSocket (as behind a proxy that strips it): SSE, from her cursor.
    await ann.addInitScript(() => { window.WebSocket = undefined; });
    await ann.reload();
    await ann.waitForSelector("#state.open", { timeout: 15000 });
    assert.equal(await ann.evaluate(() => window.switchboard.transport), "sse");
    const all = [...before, ...meanwhile, "Ann's, sent before the switch"];
    await waitForTexts(ann, all);
    await waitForTexts(bob, ["Ann's, sent before the switch"]);
    await ann.waitForFunction(() => window.switchboard.pending.length === 0);
    await new Promise((r) => setTimeout(r, 500)); // room for a repeat to show up
    for (const page of [ann, bob]) {
      const shown = (await texts(page)).filter((t) => all.includes(t));
      assert.deepEqual(shown, all, "every message once, in order, the publish made before the switch included");
    }
  } finally {
    await stop(server);
  }
});

// nginx from Debian in front, configured as a plain HTTP proxy that does not forward `Upgrade`
// (what breaks WebSockets behind many proxies): the page falls back to SSE through it.
function startPlainNginx(port, backendPort) {
  return startNginx(port, backendPort, { location: "proxy_http_version 1.1;\n      proxy_read_timeout 60s;" });
}

test("behind nginx that does not forward Upgrade, the page chats over SSE", async () => {
  const [port, proxyPort] = [await freePort(), await freePort()];
  const server = await startServer(port, tempDb());
  const nginx = await startPlainNginx(proxyPort, port);
  try {
    const direct = await openChat(`http://127.0.0.1:${port}/`, "Ann");
    const proxied = await openChat(`http://127.0.0.1:${proxyPort}/`, "Pia");
    assert.equal(await proxied.evaluate(() => window.switchboard.transport), "sse", "WebSocket could not pass nginx");
    await say(proxied, "Pia through nginx");
    await say(direct, "Ann direct");
    const both = ["Pia through nginx", "Ann direct"];
    await waitForTexts(direct, both);
    await waitForTexts(proxied, both);
  } finally {
    await stop(nginx, "SIGTERM");
    await stop(server);
  }
});
