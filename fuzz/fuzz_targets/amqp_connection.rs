//! Drives the AMQP server connection with arbitrary bytes, in chunks, with time moving, and an
//! application that accepts SASL and every link (granting credit) and sends on every link it
//! has credit for. Nothing may panic; the connection holds no more than one frame's limit of
//! input; once closed it stays closed.

#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use roost_amqp::{Config, Connection, DeliveryState, Event};

fuzz_target!(|data: &[u8]| {
    let Some((&choices, data)) = data.split_first() else { return };
    let config = Config {
        max_frame_size: 4096,
        max_message_size: 8192,
        channel_max: 3,
        handle_max: 7,
        ..Config::default()
    };
    let limit = config.max_frame_size.max(config.pre_open_frame_size) as usize;
    let mut now = Instant::now();
    let mut c = Connection::new(config, now);
    // Chunks of 1..=64 bytes, as a socket might deliver them.
    let step = usize::from(choices % 64) + 1;
    for chunk in data.chunks(step) {
        c.handle_bytes(now, chunk);
        assert!(c.buffered() <= limit + 8, "{} bytes held", c.buffered());
        while let Some(e) = c.poll_event() {
            match e {
                Event::SaslInit { .. } => c.sasl_outcome(choices & 0x40 == 0),
                Event::Attach { link, attach } => match choices & 0x80 {
                    0 => c.accept_attach(link, &attach, 3),
                    _ => c.refuse_attach(link, &attach, roost_amqp::AmqpError::new("amqp:unauthorized-access", "no")),
                },
                Event::Credit { link, .. } => {
                    // A peer may grant billions: sending stops at the session window, or here.
                    for _ in 0..64 {
                        if c.credit(link) == 0
                            || c.send(link, Bytes::from_static(b"t"), Bytes::from(vec![1u8; 600]), true).is_err()
                        {
                            break;
                        }
                    }
                }
                Event::Delivery { link, delivery_id, .. } => {
                    c.disposition(link.channel, delivery_id, delivery_id, true, DeliveryState::Accepted)
                }
                _ => {}
            }
        }
        let _ = c.poll_transmit();
        if choices & 0x20 != 0 {
            now += Duration::from_secs(7);
            c.handle_timeout(now);
        }
    }
    if c.is_closed() {
        c.handle_bytes(now, b"\0\0\0\x08\x02\0\0\0");
        assert!(c.is_closed());
    }
});
