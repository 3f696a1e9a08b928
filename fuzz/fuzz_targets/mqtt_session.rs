//! The MQTT server session state machine: any sequence of frames (framed as a connection would
//! frame them, with the 8 KiB limit before CONNECT), with CONNECT accepted or refused and time
//! moving on, never panics, and a closed session stays closed.

#![no_main]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use roost_mqtt::{check, Event, QoS, ServerSession, SessionConfig, State, Str, SubackCode};

fuzz_target!(|data: &[u8]| {
    let Some((&choices, stream)) = data.split_first() else { return };
    let t0 = Instant::now();
    let mut s = ServerSession::new(t0, SessionConfig::default());
    let mut now = t0;
    let mut rest = stream;
    let mut out = BytesMut::new();
    loop {
        let len = match check(rest, s.limits()) {
            Ok(Some(len)) => len,
            Ok(None) => break,
            Err(e) => {
                s.handle_decode_error(e);
                break;
            }
        };
        let frame = Bytes::copy_from_slice(&rest[..len]);
        rest = &rest[len..];
        now += Duration::from_millis(u64::from(choices) * 10);
        if s.handle_frame(now, frame).is_err() {
            assert_eq!(s.state(), State::Closed);
            break;
        }
        while let Some(event) = s.poll_event() {
            match event {
                Event::Connect(_) if choices & 1 == 0 => s.accept(choices & 2 != 0),
                Event::Connect(_) => s.refuse(roost_mqtt::ConnectReturnCode::NotAuthorized),
                Event::Publish(p) if p.qos == QoS::AtLeastOnce => s.ack_publish(p.pkid),
                Event::Subscribe(sub) => {
                    let codes: Vec<SubackCode> = sub
                        .filters
                        .iter()
                        .map(|(_, q)| SubackCode::Granted(*q))
                        .collect();
                    s.grant_subscribe(sub.pkid, &codes);
                }
                Event::Unsubscribe(u) => s.ack_unsubscribe(u.pkid),
                _ => {}
            }
        }
        if s.state() == State::Connected && choices & 4 != 0 {
            let _ = s.send_publish(Str::from_static("devices/d1/messages/devicebound/"), Bytes::from_static(b"x"), QoS::AtLeastOnce, false);
        }
        s.poll_transmit(&mut out);
        out.clear();
        if s.state() == State::Closed {
            break;
        }
    }
    let _ = s.handle_timeout(now + Duration::from_secs(u64::from(choices) * 20));
});
