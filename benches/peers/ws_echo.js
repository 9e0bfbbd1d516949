// The echo server of the `ws` README ("Simple server" / echo): every data message back to its sender.
const { WebSocketServer } = require("ws");

const [host, port] = (process.argv[2] || "127.0.0.1:9005").split(":");
const wss = new WebSocketServer({ host, port: Number(port) });
wss.on("connection", (ws) => {
  ws.on("error", console.error);
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
});
