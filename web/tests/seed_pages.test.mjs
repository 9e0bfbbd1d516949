// The seeds' own browser pages, as printed (read from the seed documents), in Chromium against their
// counterparts in examples/: seed 001's client.html against `echo_http`, seed 002's page against
// `connection_manager`.
// The pages hard-code their port (8080, 8000); each test uses that port when it is free, so the page
// runs byte for byte, and otherwise rewrites only the port and says so.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { useBrowser, listening, freePort, waitListening } from "./helpers.mjs";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const EXAMPLES = process.env.SWITCHBOARD_EXAMPLES ?? join(ROOT, "target/debug/examples");
// The seed documents live beside the project (../shared/seeds), not in it: the pages are read from
// there at test time, exactly as printed.
const SEEDS = process.env.SWITCHBOARD_SEEDS ?? join(ROOT, "../shared/seeds");

/** Seed NUMBER's page as printed: from its `<!DOCTYPE html>` to the closing `</html>`. */
function seedPage(number, url) {
  const file = existsSync(SEEDS) && readdirSync(SEEDS).find((name) => name.startsWith(`${number}_`));
  assert.ok(file, `seed ${number} is not in ${SEEDS} (set SWITCHBOARD_SEEDS to the seeds' folder)`);
  const text = readFileSync(join(SEEDS, file), "utf8");
  const start = text.indexOf("<!DOCTYPE html>");
  const end = text.indexOf("</html>", start);
  assert.ok(start >= 0 && end > start, `seed ${number} prints no HTML page`);
  const page = text.slice(start, end + "</html>".length);
  assert.ok(page.includes(url), `seed ${number}'s page connects to ${url}`);
  return page;
}

const getBrowser = useBrowser();

async function runExample(name, seedPort) {
  const port = (await listening(seedPort)) ? await freePort() : seedPort;
  if (port !== seedPort) console.log(`# port ${seedPort} is busy: the page is pointed at ${port} instead`);
  const child = spawn(join(EXAMPLES, name), [`127.0.0.1:${port}`], { stdio: "ignore" });
  await waitListening(port);
  return { port, stop: () => new Promise((done) => { child.once("exit", done); child.kill(); }) };
}

test("seed 001's client.html against examples/echo_http", async () => {
  const server = await runExample("echo_http", 8080);
  try {
    const page = await (await getBrowser().newContext()).newPage();
    const seed = seedPage("001", "ws://localhost:8080/");
    await page.setContent(seed.replace("ws://localhost:8080/", `ws://localhost:${server.port}/`));
    await new Promise((r) => setTimeout(r, 300));
    await page.fill("#message", "Hello from seed 001");
    await page.click("#sendButton");
    await page.waitForFunction(() => document.querySelectorAll("#messages div").length === 1, null, { timeout: 10000 });
    assert.equal(await page.$eval("#messages div", (d) => d.textContent), "You sent: Hello from seed 001");
  } finally {
    await server.stop();
  }
});

test("seed 002's page against examples/connection_manager", async () => {
  const server = await runExample("connection_manager", 8000);
  try {
    const context = await getBrowser().newContext();
    const seed = seedPage("002", "ws://localhost:8000/");
    const pages = [];
    for (let i = 0; i < 2; i++) {
      const page = await context.newPage();
      await page.setContent(seed.replace("ws://localhost:8000/", `ws://localhost:${server.port}/`));
      pages.push(page);
      await new Promise((r) => setTimeout(r, 30)); // distinct Date.now() client ids
    }
    await new Promise((r) => setTimeout(r, 300));
    const [one, two] = pages;
    const id = await one.$eval("#ws-id", (s) => s.textContent);
    await one.fill("#messageText", "hi there");
    await one.press("#messageText", "Enter");
    await one.waitForFunction(() => document.querySelectorAll("#messages li").length === 2, null, { timeout: 10000 });
    const mine = await one.$$eval("#messages li", (items) => items.map((li) => li.textContent).sort());
    assert.deepEqual(mine, [`Client #${id} says: hi there`, "You wrote: hi there"]);
    await two.waitForFunction(() => document.querySelectorAll("#messages li").length === 1);
    await one.close();
    await two.waitForFunction(() => document.querySelectorAll("#messages li").length === 2, null, { timeout: 10000 });
    assert.equal(await two.$eval("#messages li:last-child", (li) => li.textContent), `Client #${id} left the chat`);
  } finally {
    await server.stop();
  }
});
