//! Nothing to import: the programs beside this file are cargo examples (`cargo run -p
//! switchboard-examples --example NAME`), one for each program of the seed documents:
//!
//! | example | seed | what it does |
//! |---|---|---|
//! | `echo_http` | 001 | HTTP "WebSocket Server" and WebSocket "You sent: ..." on one port |
//! | `broadcast` | 004 | each message to every other client |
//! | `json_chat` | 000, 003 | page + `/ws`: JSON `{name, message}` stamped with the time, to everyone |
//! | `connection_manager` | 002 | `/ws/{client_id}`: "You wrote", "Client #id says", "Client #id left the chat" |
//!
//! `tests/seed_programs.rs` runs each over a real socket.
