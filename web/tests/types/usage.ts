// Compiled by `tsc --strict --noEmit` in the web tests (npm test): a TypeScript project's use of
// switchboard.js, every export and event. The `@ts-expect-error` lines must fail to compile: they
// prove the declarations are strict, not `any`.

import { PROTOCOL, SwitchboardClient } from "../../switchboard.js";
import type { Ack, ChatMessage, ConnectionState, ErrorDetail, Member, SwitchboardOptions, Transport } from "../../switchboard.js";

const protocol: "switchboard.v1" = PROTOCOL;

const options: SwitchboardOptions = {
  urls: ["wss://node1.example/ws", "wss://node2.example/ws"],
  rooms: ["lobby"],
  name: "Ann",
  token: async () => "a.jwt.token",
  transports: ["websocket", "sse", "longpoll"],
  storage: null,
};
const client = new SwitchboardClient(options);

client.addEventListener("message", (event) => {
  const message: ChatMessage = event.detail;
  const offset: number = message.offset;
  const id: string | null = message.id;
  console.log(message.room, offset, id, message.name, message.message, message.time, message.ts);
});
client.addEventListener("presence", (event) => {
  const members: Member[] = event.detail.members;
  console.log(event.detail.room, members.map((m) => m.name));
});
client.addEventListener("state", (event) => {
  const state: ConnectionState = event.detail;
  console.log(state, client.state, protocol);
});
client.addEventListener("gap", (event) => console.log(event.detail.room, event.detail.since, event.detail.first));
client.addEventListener("error", (event) => {
  const error: ErrorDetail = event.detail;
  console.log(error.code, error.message);
});
client.addEventListener("authed", (event) => console.log(event.detail.sub, event.detail.exp));

async function chat(): Promise<number> {
  const ack: Ack = await client.publish("lobby", "hello");
  const duplicate: boolean = ack.duplicate;
  console.log(duplicate);
  client.join("other");
  client.setName("Ann B.");
  const transport: Transport = client.transport;
  console.log(transport, client.presence("lobby"), client.rooms.has("other"));
  client.leave("other");
  client.close();
  return ack.offset;
}
void chat();

// @ts-expect-error a room is a string
client.join(42);
// @ts-expect-error a message is text
void client.publish("lobby", { text: "hi" });
// @ts-expect-error no such transport
const wrong: SwitchboardOptions = { transports: ["carrier-pigeon"] };
client.addEventListener("message", (event) => {
  // @ts-expect-error a message's offset is a number
  const text: string = event.detail.offset;
  console.log(text, wrong);
});
// @ts-expect-error the state is read-only
client.state = "open";
