// The seeds' own browser pages, as printed, in Chromium against their counterparts in examples/:
// seed 001's client.html against `echo_http`, seed 002's page against `connection_manager`.
// The pages hard-code their port (8080, 8000); each test uses that port when it is free, so the page
// runs byte for byte, and otherwise rewrites only the port and says so.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { useBrowser, listening, freePort, waitListening } from "./helpers.mjs";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const EXAMPLES = process.env.SWITCHBOARD_EXAMPLES ?? join(ROOT, "target/debug/examples");

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
    await page.setContent(SEED_001_CLIENT.replace("ws://localhost:8080/", `ws://localhost:${server.port}/`));
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
    const pages = [];
    for (let i = 0; i < 2; i++) {
      const page = await context.newPage();
      await page.setContent(SEED_002_PAGE.replace("ws://localhost:8000/", `ws://localhost:${server.port}/`));
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

// Seed 001's client.html, as printed.
const SEED_001_CLIENT = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>WebSocket Chat</title>
</head>
<body>
<div id="chat">
<input type="text" id="message" placeholder="Type your message">
<button id="sendButton">Send</button>
<div id="messages"></div>
</div>
<script>
const socket = new WebSocket("ws://localhost:8080/chat"); // Replace with your WebSocket URL
const messagesDiv = document.getElementById("messages");
const messageInput = document.getElementById("message");
const sendButton = document.getElementById("sendButton");
socket.addEventListener("open", event => {
console.log("WebSocket connection is open.");
});
socket.addEventListener("message", event => {
const message = document.createElement("div");
message.textContent = event.data;
messagesDiv.appendChild(message);
});
socket.addEventListener("error", event => {
console.error("WebSocket error:", event);
});
socket.addEventListener("close", event => {
console.log("WebSocket connection is closed:", event);
});
sendButton.addEventListener("click", () => {
const messageText = messageInput.value;
socket.send(messageText);
messageInput.value = "";
});
</script>
</body>
</html>`;

// Seed 002's page, as printed.
const SEED_002_PAGE = `<!DOCTYPE html>
<html>
    <head>
        <title>Chat</title>
    </head>
    <body>
        <h1>WebSocket Chat</h1>
        <h2>Your ID: <span id="ws-id"></span></h2>
        <form action="" onsubmit="sendMessage(event)">
            <input type="text" id="messageText" autocomplete="off"/>
            <button>Send</button>
        </form>
        <ul id='messages'>
        </ul>
        <script>
            var client_id = Date.now()
            document.querySelector("#ws-id").textContent = client_id;
            var ws = new WebSocket(\`ws://localhost:8000/ws/\${client_id}\`);
            ws.onmessage = function(event) {
                var messages = document.getElementById('messages')
                var message = document.createElement('li')
                var content = document.createTextNode(event.data)
                message.appendChild(content)
                messages.appendChild(message)
            };
            function sendMessage(event) {
                var input = document.getElementById("messageText")
                ws.send(input.value)
                input.value = ''
                event.preventDefault()
            }
        </script>
    </body>
</html>
`;
