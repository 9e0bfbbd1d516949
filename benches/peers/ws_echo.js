// The echo server of the `ws` README ("Simple server"), with the received message sent back (the
// README's handler logs it and sends "something"). Node has one event loop: the runtime flavour is
// a single thread. Differences, for the benchmark only: the address from the first argument, and
// no console.log per message.
const { WebSocketServer } = require("ws");

const [host, port] = (process.argv[2] || "127.0.0.1:9005").split(":");
const wss = new WebSocketServer({ host, port: Number(port) });
wss.on("connection", (ws) => {
  ws.on("error", console.error);
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
});
