//! The whole engine fed arbitrary bytes in arbitrary pieces, in either role: it must never panic, and
//! how the input is split must not change what comes out (messages, errors, bytes to send, close
//! state).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_proto::{CloseState, Config, Connection, Message, ProtocolError, Role};

type Outcome = (Vec<Result<Message, ProtocolError>>, Vec<u8>, CloseState);

fn run(role: Role, bytes: &[u8], cuts: &[usize]) -> Outcome {
    // A fixed mask key: a client masks its close frame, and fresh random keys would differ per run.
    let config = Config {
        max_message_size: 1 << 16,
        max_frame_size: 1 << 15,
        fixed_mask_key: Some([1, 2, 3, 4]),
        ..Config::default()
    };
    let mut conn = Connection::new(role, config);
    let mut events = Vec::new();
    let mut start = 0;
    let mut failed = false;
    for end in cuts.iter().copied().chain([bytes.len()]) {
        let end = end.clamp(start, bytes.len());
        conn.receive_data(&bytes[start..end]);
        start = end;
        while !failed {
            match conn.next_message() {
                Ok(Some(message)) => events.push(Ok(message)),
                Ok(None) => break,
                Err(error) => {
                    events.push(Err(error));
                    failed = true;
                }
            }
        }
    }
    (events, conn.take_output(), conn.close_state())
}

fuzz_target!(|data: &[u8]| {
    let &[control, ref rest @ ..] = data else { return };
    let role = if control & 1 == 0 { Role::Server } else { Role::Client };
    // The cut points come from the input too, so the fuzzer steers the split as well as the bytes.
    let step = usize::from(control >> 1) + 1;
    let cuts: Vec<usize> = (step..rest.len()).step_by(step).collect();
    let whole = run(role, rest, &[]);
    assert_eq!(whole, run(role, rest, &cuts));
    let byte_by_byte: Vec<usize> = (1..rest.len()).collect();
    assert_eq!(whole, run(role, rest, &byte_by_byte));
});
