// The chat page over https with HTTP/2: Chromium loads the page over HTTP/2 and opens its
// WebSocket on the same connection (RFC 8441, which Chromium uses when the server enables extended
// CONNECT). Checked twice: Chromium's DevTools protocol reports the handshake's status (200 over
// HTTP/2, where HTTP/1.1 has 101), and the server counts its handshakes by HTTP version.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { useBrowser, freePort, startServer, stop } from "./helpers.mjs";

const getBrowser = useBrowser();

/** A self-signed certificate for localhost (Chromium is told to accept it). */
function certificate() {
  const dir = mkdtempSync(join(tmpdir(), "sb-h2-"));
  const [cert, key] = [join(dir, "cert.pem"), join(dir, "key.pem")];
  const made = spawnSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    "-keyout", key, "-out", cert], { stdio: ["ignore", "ignore", "pipe"] });
  assert.equal(made.status, 0, `openssl: ${made.stderr}`);
  return { cert, key, dir };
}

test("over https the page and its WebSocket share one HTTP/2 connection, and two pages chat", async () => {
  const port = await freePort();
  const { cert, key, dir } = certificate();
  const server = await startServer(port, join(dir, "chat.db"), ["--tls-cert", cert, "--tls-key", key]);
  try {
    const context = await getBrowser().newContext({ ignoreHTTPSErrors: true });
    const handshakes = [];
    const open = async (name) => {
      const page = await context.newPage();
      page.on("pageerror", (error) => { throw error; });
      const cdp = await context.newCDPSession(page);
      await cdp.send("Network.enable");
      cdp.on("Network.webSocketHandshakeResponseReceived", ({ response }) => handshakes.push(response.status));
      await page.goto(`https://localhost:${port}/`);
      await page.fill("#name", name);
      await page.dispatchEvent("#name", "change");
      await page.waitForSelector("#state.open");
      return page;
    };
    const ann = await open("Ann");
    const bob = await open("Bob");
    const protocol = await ann.evaluate(() => performance.getEntriesByType("navigation")[0].nextHopProtocol);
    assert.equal(protocol, "h2", "the page itself came over HTTP/2");
    assert.equal(await ann.evaluate(() => window.switchboard.transport), "websocket");

    await ann.fill("#message", "hello over h2");
    await ann.click("#send");
    await bob.waitForFunction(() => [...document.querySelectorAll("#messages li .text")].some((li) => li.textContent === "hello over h2"));

    assert.deepEqual(handshakes, [200, 200], "both WebSocket handshakes answered 200, as RFC 8441 has it (101 is HTTP/1.1)");
    const metrics = await (await ann.request.get(`https://localhost:${port}/metrics`)).text();
    const count = (version) => Number(metrics.match(new RegExp(`switchboard_websocket_handshakes_total\\{http="${version}"\\} (\\d+)`))?.[1]);
    assert.equal(count("2"), 2, metrics);
    assert.equal(count("1.1"), 0, metrics);
  } finally {
    await stop(server);
  }
});
