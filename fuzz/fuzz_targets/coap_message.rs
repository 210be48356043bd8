//! The CoAP endpoint's datagram reader (`outpost_codec::coap`, on top of
//! `coap-lite`) on arbitrary bytes: classification (request, Reset, ignore), then every option
//! reader a request goes through (critical options, proxying, Uri-Path and Uri-Query,
//! Content-Format, Block1 with its offset), then the answer. No panic; a Block1 value re-encodes
//! to the same option; every Reset and answer the endpoint would send is itself a well-formed
//! CoAP message with the request's message id and token.

#![no_main]

use coap_lite::{MessageType, Packet, ResponseType};
use libfuzzer_sys::fuzz_target;
use outpost_codec::coap::{self as message, BLOCK1, Block, CONTENT_FORMAT, Inbound, Response};

fuzz_target!(|data: &[u8]| {
    let packet = match message::classify(data) {
        Inbound::Ignore { why, .. } => {
            assert!(!why.is_empty());
            return;
        }
        Inbound::Reset { message_id, .. } => {
            let reset = Packet::from_bytes(&message::reset(message_id)).expect("a Reset parses");
            assert_eq!(reset.header.message_id, message_id);
            assert_eq!(reset.header.get_type(), MessageType::Reset);
            return;
        }
        Inbound::Answer { .. } => return,
        Inbound::Request(packet) => packet,
    };
    let _ = message::unrecognized_critical(&packet);
    let _ = message::wants_proxy(&packet);
    let _ = message::uri_path(&packet);
    let _ = message::uri_query(&packet);
    let _ = message::uint_option(&packet, CONTENT_FORMAT, "Content-Format", 2);
    let mut response = Response::error(ResponseType::BadRequest, "fuzz");
    if let Ok(Some(block)) = Block::from_request(&packet, BLOCK1, "Block1") {
        assert!(block.szx < 7 && (16..=1024).contains(&block.size()));
        let _ = block.offset();
        let encoded = block.encode();
        let value = encoded
            .iter()
            .fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        assert_eq!(value >> 4, block.num);
        assert_eq!(value & 0x8 != 0, block.more);
        assert_eq!((value & 0x7) as u8, block.szx);
        response = Response::new(ResponseType::Continue).with_block1(block);
    }
    let token = packet.get_token().to_vec();
    let answer = response.encode(
        MessageType::Acknowledgement,
        packet.header.message_id,
        &token,
    );
    let parsed = Packet::from_bytes(&answer).expect("an answer parses");
    assert_eq!(parsed.header.message_id, packet.header.message_id);
    assert_eq!(parsed.get_token(), token.as_slice());
});
