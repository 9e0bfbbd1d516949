// Shared by the browser tests: Chromium with the flags this network needs, and port helpers.

import { before, after } from "node:test";
import { createServer, connect } from "node:net";
import { chromium } from "playwright-core";

/** Launches headless Chromium for the file's tests and closes it after them; returns a getter. */
export function useBrowser() {
  let browser;
  before(async () => {
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
      // Without the background-networking flags Chromium keeps dialing out, and this network refuses.
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
  });
  after(async () => { await browser?.close(); });
  return () => browser;
}

/** True when something accepts TCP connections on 127.0.0.1:port. */
export function listening(port) {
  return new Promise((done) => {
    const socket = connect(port, "127.0.0.1");
    socket.on("connect", () => { socket.destroy(); done(true); });
    socket.on("error", () => done(false));
  });
}

/** A port nothing listens on right now. */
export function freePort() {
  return new Promise((done) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => { const { port } = server.address(); server.close(() => done(port)); });
  });
}

/** Polls until `port` accepts connections (10 s at most). */
export async function waitListening(port) {
  for (let i = 0; i < 200; i++) {
    if (await listening(port)) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}
