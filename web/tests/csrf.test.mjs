// The token cookie in a real browser (Chromium). A page of the server's own origin publishes with the
// cookie alone. Another site's page can make the browser send a request there, which the browser
// marks `Sec-Fetch-Site: cross-site` (the server then does not take the cookie; this Chromium does
// not even attach a third-party cookie), and nothing is published. A page of an origin the server
// lets in by name listens and publishes across origins (CORS).

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { spawnSync } from "node:child_process";
import { useBrowser, freePort, BIN, tempDb, startServer, stop } from "./helpers.mjs";

const getBrowser = useBrowser();

/** The room's messages, read by a poll with the token in its query (as any client may). */
async function messages(port, token) {
  const answer = await fetch(`http://127.0.0.1:${port}/poll?room=r&wait=0&token=${token}`);
  assert.equal(answer.status, 200);
  return (await answer.json()).messages.map((m) => m.message);
}

test("the server's own page publishes with the cookie alone; another site's page publishes nothing", async () => {
  const port = await freePort();
  const server = await startServer(port, tempDb(), ["--jwt-secret", "s3cret", "--allow-anonymous", "false"]);
  after(() => stop(server));
  const minted = spawnSync(BIN, ["token", "--sub", "ann", "--secret", "s3cret"], { encoding: "utf8" });
  const token = minted.stdout.trim();
  assert.ok(token.length > 20, minted.stderr);
  const context = await getBrowser().newContext();
  await context.addCookies([{ name: "switchboard_token", value: token, domain: "localhost", path: "/", sameSite: "Lax" }]);
  const page = await context.newPage();

  // The server's own page: the browser says `same-origin`, and the cookie counts.
  await page.goto(`http://localhost:${port}/`);
  const status = await page.evaluate(async (body) => {
    const answer = await fetch("/publish", { method: "POST", headers: { "Content-Type": "application/json" }, body });
    return answer.status;
  }, JSON.stringify({ room: "r", message: "mine" }));
  assert.equal(status, 200);
  assert.deepEqual(await messages(port, token), ["mine"]);

  // Another site (127.0.0.1 is not the same site as localhost): it serves a page, and records what
  // the browser sends to it as localhost, as the browser would send it to the server.
  const seen = [];
  const foreign = createServer((request, response) => {
    if (request.url === "/probe") seen.push(request.headers);
    response.setHeader("Content-Type", "text/html");
    response.end("<!DOCTYPE html><title>elsewhere</title>");
  });
  await new Promise((done) => foreign.listen(0, "127.0.0.1", done));
  after(() => foreign.close());
  const foreignPort = foreign.address().port;
  await page.goto(`http://127.0.0.1:${foreignPort}/`);
  await page.evaluate(async ([probe, target, body]) => {
    const post = { method: "POST", mode: "no-cors", credentials: "include", body };
    await fetch(probe, post);
    await fetch(target, post).catch(() => {});
  }, [`http://localhost:${foreignPort}/probe`, `http://localhost:${port}/publish`, JSON.stringify({ room: "r", message: "forged" })]);
  assert.equal(seen.length, 1);
  assert.equal(seen[0]["sec-fetch-site"], "cross-site", "the browser marks what the server looks at");
  assert.deepEqual(await messages(port, token), ["mine"], "the forged publish stored nothing");
  await context.close();
});

test("a page of an allowed origin listens and publishes across origins (CORS)", async () => {
  // The other origin's page, served first: the server is told to let its origin in by name.
  const foreign = createServer((request, response) => {
    response.setHeader("Content-Type", "text/html");
    response.end("<!DOCTYPE html><title>elsewhere</title>");
  });
  await new Promise((done) => foreign.listen(0, "127.0.0.1", done));
  after(() => foreign.close());
  const origin = `http://127.0.0.1:${foreign.address().port}`;
  const port = await freePort();
  const server = await startServer(port, tempDb(), ["--allowed-origins", origin]);
  after(() => stop(server));
  const context = await getBrowser().newContext();
  const page = await context.newPage();
  await page.goto(`${origin}/`);
  const outcome = await page.evaluate(async (base) => {
    const stream = new EventSource(`${base}/sse?room=c`, { withCredentials: true });
    const joined = await new Promise((resolve, reject) => {
      stream.addEventListener("joined", (event) => resolve(JSON.parse(event.data)));
      stream.onerror = () => reject(new Error("the stream failed (CORS?)"));
      setTimeout(() => reject(new Error("no joined event")), 5000);
    });
    const heard = new Promise((resolve, reject) => {
      stream.addEventListener("message", (event) => resolve(JSON.parse(event.data)));
      setTimeout(() => reject(new Error("the message did not come")), 5000);
    });
    const answer = await fetch(`${base}/publish`, {
      method: "POST",
      credentials: "include",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ room: "c", message: "across origins" }),
    });
    const ack = await answer.json();
    const message = await heard;
    stream.close();
    return { room: joined.room, status: answer.status, acks: ack.acks.length, heard: message.message };
  }, `http://localhost:${port}`);
  assert.deepEqual(outcome, { room: "c", status: 200, acks: 1, heard: "across origins" });
  await context.close();
});
