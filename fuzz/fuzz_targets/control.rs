#![no_main]
//! Any bytes as a control request line: `proto::decode` never panics, and a decoded call
//! re-serialises into a request that decodes to the same call with the same id.

use libfuzzer_sys::fuzz_target;
use serde_json::{json, to_value, Value};
use switchyard_control::proto::{self, Call, VERSION};

/// The method and parameters that make `call`. A call added to the protocol and not here yet
/// is skipped (the wildcard arm): add it.
fn encode(call: &Call) -> Option<(&'static str, Value)> {
    Some(match call {
        Call::Version => ("version", Value::Null),
        Call::NetworkCreate(p) => ("network.create", v(p)),
        Call::NetworkLs => ("network.ls", Value::Null),
        Call::NetworkInspect(p) => ("network.inspect", v(p)),
        Call::NetworkRm(p) => ("network.rm", v(p)),
        Call::Connect(p) => ("endpoint.connect", v(p)),
        Call::Disconnect(p) => ("endpoint.disconnect", v(p)),
        Call::Publish(p) => ("port.publish", v(p)),
        Call::Unpublish(p) => ("port.unpublish", v(p)),
        Call::PortList(p) => ("port.list", v(p)),
        Call::Macs(p) => ("macs", v(p)),
        Call::Stats => ("stats", Value::Null),
        Call::Conntrack => ("conntrack", Value::Null),
        Call::Capture(p) => ("capture", v(p)),
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

fn v<T: serde::Serialize>(params: &T) -> Value {
    to_value(params).expect("parameters serialise")
}

fuzz_target!(|data: &[u8]| {
    let (id, decoded) = proto::decode(data);
    let Ok(call) = decoded else {
        return;
    };
    let Some((method, params)) = encode(&call) else {
        return;
    };
    let line = json!({"v": VERSION, "id": id, "method": method, "params": params}).to_string();
    let (id2, again) = proto::decode(line.as_bytes());
    assert_eq!(id, id2);
    match again {
        Ok(call2) => assert_eq!(format!("{call:?}"), format!("{call2:?}"), "{line}"),
        Err(e) => panic!("{call:?} re-serialised as {line} does not decode: {e}"),
    }
});
