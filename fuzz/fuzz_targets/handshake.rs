//! The opening handshake parsers, both roles: any bytes give a head, a request for more, or an error
//! with an HTTP status; a request that validates gets a 101 that the client side accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_proto::handshake::{self, ClientRequest, ServerSettings};

const MAX_HEAD: usize = 8 * 1024;

fuzz_target!(|data: &[u8]| {
    match handshake::parse_request(data, MAX_HEAD) {
        Ok(Some((head, used))) => {
            assert!(used <= data.len());
            match handshake::validate_request(head) {
                Ok(request) => {
                    let _ = (request.path(), request.query(), request.origin(), request.host());
                    let key = request.offer.key.clone().expect("a valid HTTP/1.1 request has a key");
                    let negotiated = handshake::negotiate(&request.offer, &ServerSettings::default())
                        .expect("a validated offer negotiates");
                    let response = negotiated.http1_response().to_http1();
                    let (head, _) = handshake::parse_response(&response, MAX_HEAD)
                        .expect("our own 101 parses")
                        .expect("our own 101 is complete");
                    let client = ClientRequest { key, ..ClientRequest::new("h", "/") };
                    handshake::verify_response(&client, head).expect("a client accepts our answer to its key");
                }
                Err(error) => assert!((400..500).contains(&error.status()), "{error:?}"),
            }
        }
        Ok(None) => {}
        Err(error) => assert!((400..500).contains(&error.status()), "{error:?}"),
    }
    let request = ClientRequest::new("example.com", "/chat");
    if let Ok(Some((head, used))) = handshake::parse_response(data, MAX_HEAD) {
        assert!(used <= data.len());
        let _ = handshake::verify_response(&request, head);
    }
});
