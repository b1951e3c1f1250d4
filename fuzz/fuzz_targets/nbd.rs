//! An NBD server's bytes, as our client reads them: the handshake, then the replies
//! to a read and a block-status request.
#![no_main]
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cairn_agent::nbd::NbdClient;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (client, mut server) = UnixStream::pair().expect("socket pair");
    let script = data.to_vec();
    let peer = std::thread::spawn(move || {
        let _ = server.write_all(&script);
        // Hang up: every read past the script ends the connection.
        let _ = server.shutdown(std::net::Shutdown::Write);
        // Drain the client's requests until it goes.
        let mut sink = [0u8; 4096];
        let _ = server.set_read_timeout(Some(Duration::from_secs(2)));
        while let Ok(n) = std::io::Read::read(&mut server, &mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
    if let Ok(mut c) = NbdClient::handshake(client, "", &["base:allocation"]) {
        let mut buf = vec![0u8; (c.size() as usize).min(64 << 10)];
        let _ = c.read(0, &mut buf);
        if let Some(ctx) = c.context_id("base:allocation") {
            let len = c.size().min(1 << 20) as u32;
            let _ = c.block_status(ctx, 0, len.max(1));
        }
        c.disconnect();
    }
    let _ = peer.join();
});
