//! Every message a server decodes from a peer or a client: none may panic, whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use wire::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let _ = pb::ClientMessage::decode(data);
    let _ = pb::ServerMessage::decode(data);
    let _ = pb::PutChunk::decode(data);
    let _ = pb::StripeWrite::decode(data);
    let _ = pb::WriteRequest::decode(data);
    let _ = pb::NameChange::decode(data);
    let _ = pb::FenceRequest::decode(data);
    let _ = pb::ErrorDetail::decode(data);
    if let Ok(m) = pb::ClientMessage::decode(data) {
        // What decodes re-encodes to something that decodes the same.
        let again = pb::ClientMessage::decode(m.encode_to_vec().as_slice()).expect("re-decodes");
        assert_eq!(again, m);
    }
});
