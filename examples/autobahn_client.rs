//! The Autobahn client testee: echoes every case of wstest's fuzzing server.
//!
//! `autobahn_client ws://127.0.0.1:9001 switchboard` (or `AB_FUZZ_URL` / `AB_AGENT` in the environment).

use switchboard_ws::proto::deflate::DeflateConfig;
use switchboard_ws::{ClientBuilder, Config, Message};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let base = args.next().or_else(|| std::env::var("AB_FUZZ_URL").ok()).unwrap_or("ws://127.0.0.1:9001".into());
    let agent = args.next().or_else(|| std::env::var("AB_AGENT").ok()).unwrap_or("switchboard".into());
    let config =
        Config::default().max_message_size(64 << 20).max_frame_size(64 << 20).compression(DeflateConfig::default());

    let (mut ws, _) = switchboard_ws::connect(&format!("{base}/getCaseCount")).await?;
    let count: u32 = match ws.recv().await {
        Some(Ok(Message::Text(text))) => text.parse()?,
        other => anyhow::bail!("expected the case count, got {other:?}"),
    };
    while ws.recv().await.is_some() {}

    for case in 1..=count {
        let url = format!("{base}/runCase?case={case}&agent={agent}");
        match ClientBuilder::new(url).config(config.clone()).connect().await {
            Ok((mut ws, _)) => {
                while let Some(message) = ws.recv().await {
                    match message {
                        Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                            if ws.feed(message).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {} // the engine already answered with the right close code
                    }
                }
            }
            Err(error) => eprintln!("case {case}: {error}"),
        }
    }

    let (mut ws, _) = switchboard_ws::connect(&format!("{base}/updateReports?agent={agent}")).await?;
    while ws.recv().await.is_some() {}
    println!("ran {count} cases");
    Ok(())
}
