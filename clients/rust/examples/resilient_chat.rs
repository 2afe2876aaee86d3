//! A terminal chat that survives network failures: it joins a room with a `ReconnectingClient`, prints every
//! event (each once, in order, across reconnects) and the session's reconnects, and sends each line typed on stdin
//! (with a `cmid`, so a line interrupted by a reconnect is still posted once).
//!
//! ```sh
//! cargo xtask up    # prints the WebSocket URL and a token for user "demo"
//! cargo run -p switchyard-client --example resilient_chat -- ws://127.0.0.1:PORT/v1/ws sytok_... general
//! ```
//!
//! Stop the gateway and start it again (or cut the network) to watch it reconnect and resume.

use std::time::Duration;
use switchyard_client::{Auth, ConnectOptions, ReconnectOptions, ReconnectingClient, ServerEvent, SessionEvent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, room] = args.as_slice() else {
        eprintln!("usage: resilient_chat <ws-url> <token> <room>");
        std::process::exit(2);
    };
    let options = ConnectOptions::new(url.clone(), Auth::Header(token.clone()));
    let reconnect = ReconnectOptions {
        backoff_base: Duration::from_millis(250),
        backoff_cap: Duration::from_secs(10),
        ..ReconnectOptions::default()
    };
    let client = std::sync::Arc::new(ReconnectingClient::connect(options, reconnect).await?);
    let joined_at = client.join(room, None).await?;
    println!("joined {room} at seq {joined_at}; type a line to send it, Ctrl-D to quit");

    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(event) = client.next_event().await {
                match event {
                    SessionEvent::Event(ServerEvent::Msg { room, seq, from, body, .. }) => {
                        println!("[{room} #{seq}] {from}: {body}")
                    }
                    SessionEvent::Event(other) => println!("{other:?}"),
                    SessionEvent::Reconnecting { attempt, delay, close } => {
                        println!("-- connection lost ({close:?}); attempt {attempt} in {delay:?}")
                    }
                    SessionEvent::Resumed { room, from, to } => println!("-- resumed {room} from {from:?} to {to}"),
                    SessionEvent::Gap { room, .. } => println!("-- {room}: too much missed, read its history"),
                    SessionEvent::Reconnected(hello) => println!("-- reconnected as {}", hello.user),
                    SessionEvent::Dropped { room, error } => println!("-- no longer in {room}: {error}"),
                    SessionEvent::Ended(close) => {
                        println!("-- session ended: {close:?}");
                        break;
                    }
                }
            }
        })
    };

    // Lines from stdin, read on a thread of their own.
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        if line.trim().is_empty() {
            continue;
        }
        match client.send(room, line).await {
            Ok(sent) => println!("-- sent as #{}", sent.seq),
            Err(error) => eprintln!("-- not sent: {error}"),
        }
    }
    client.close().await;
    reader.await?;
    Ok(())
}
