// Shared by the browser tests: Chromium with the flags this network needs, the server under test,
// and port helpers.

import { before, after } from "node:test";
import { createServer, connect } from "node:net";
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

/** The repository's root. */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
/** The `switchboard` binary under test (SWITCHBOARD_BIN, default target/debug/switchboard). */
export const BIN = process.env.SWITCHBOARD_BIN ?? join(ROOT, "target/debug/switchboard");

/** A database path in a fresh directory. */
export function tempDb() {
  return join(mkdtempSync(join(tmpdir(), "sb-")), "chat.db");
}

/** `switchboard serve` on 127.0.0.1:port with its history in `db`, once it listens. */
export async function startServer(port, db, extra = []) {
  const child = spawn(BIN, ["serve", "--listen", `127.0.0.1:${port}`, "--db", db, ...extra], { stdio: ["ignore", "ignore", "inherit"] });
  if (await waitListening(port)) return child;
  child.kill("SIGKILL");
  throw new Error(`switchboard serve did not listen on ${port}`);
}

/** Sends `child` a signal; resolves once it has exited. */
export function stop(child, signal = "SIGKILL") {
  return new Promise((done) => { child.once("exit", done); child.kill(signal); });
}

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

/** Debian's nginx on 127.0.0.1:port in front of 127.0.0.1:backendPort, in a fresh prefix: `http` is
 * what goes into the `http` block beside the server (maps), `location` the proxying directives
 * after `proxy_pass`. Stop it with SIGTERM. */
export async function startNginx(port, backendPort, { http = "", location }) {
  const prefix = mkdtempSync(join(tmpdir(), "sb-nginx-"));
  const conf = `worker_processes 1;
daemon off;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path ${prefix}/body;
  proxy_temp_path ${prefix}/proxy;
  fastcgi_temp_path ${prefix}/fastcgi;
  uwsgi_temp_path ${prefix}/uwsgi;
  scgi_temp_path ${prefix}/scgi;
  ${http}
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://127.0.0.1:${backendPort};
      ${location}
    }
  }
}
`;
  writeFileSync(join(prefix, "nginx.conf"), conf);
  const child = spawn("nginx", ["-p", prefix, "-c", join(prefix, "nginx.conf")], { stdio: ["ignore", "ignore", "inherit"] });
  if (await waitListening(port)) return child;
  child.kill("SIGKILL");
  throw new Error(`nginx did not listen on ${port}`);
}
