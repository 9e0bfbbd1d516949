// The Socket.IO peer of benches/cluster.sh: one node of a Socket.IO 4 cluster on Redis, written as
// the @socket.io/redis-adapter README sets it up (a `redis` client and its duplicate for pub/sub,
// `createAdapter(pubClient, subClient)`), with a chat of rooms on top: `join` puts the socket in a
// room, `publish` emits `message` to the room on every node.
//
// Differences from the README, for the benchmark: the port and Redis URL come from the command line
// (PORT REDIS_URL), and `transports: ["websocket"]` (the load generator speaks the WebSocket
// transport directly, as a browser client with that option does). No logging per message.
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const [port, redisUrl] = [Number(process.argv[2]), process.argv[3]];
const pubClient = createClient({ url: redisUrl });
const subClient = pubClient.duplicate();

Promise.all([pubClient.connect(), subClient.connect()]).then(() => {
  const io = new Server({ adapter: createAdapter(pubClient, subClient), transports: ["websocket"] });
  io.on("connection", (socket) => {
    socket.on("join", (room) => socket.join(room));
    socket.on("publish", (msg) => io.to(msg.room).emit("message", msg));
  });
  io.listen(port);
  console.error(`socket.io node listening on ${port}`);
});
