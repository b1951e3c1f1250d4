//! `repo serve`: the daemon (`cairn_server::daemon`), and its API tokens.

use anyhow::Result;
use serde_json::json;

use crate::args::{Global, ServeArgs, ServeCommand, TokenCommand};
use crate::exit;
use crate::format;
use crate::open::Settings;

pub fn run(s: &Settings, g: &Global, a: &ServeArgs) -> Result<u8> {
    match &a.command {
        Some(ServeCommand::Token(t)) => token(s, g, a, t),
        None => {
            let site = super::jobs::open_site(s, &a.site, true)?;
            cairn_server::daemon::run(site, a.listen)?;
            Ok(exit::OK)
        }
    }
}

fn token(s: &Settings, g: &Global, a: &ServeArgs, t: &TokenCommand) -> Result<u8> {
    let site = super::jobs::open_site(s, &a.site, false)?;
    match t {
        TokenCommand::Create { name, read_only } => {
            let secret = cairn_server::auth::create(&site.state, name, *read_only)?;
            if g.json {
                format::print_json(
                    &json!({ "name": name, "read_only": read_only, "token": secret }),
                );
            } else {
                println!("{secret}");
                if !g.quiet {
                    eprintln!(
                        "token {name} created{}: it is shown this once; send it as Authorization: Bearer <token>",
                        if *read_only { " (read-only)" } else { "" }
                    );
                }
            }
        }
        TokenCommand::List => {
            let tokens = site.state.tokens()?;
            if g.json {
                format::print_json(&json!(tokens));
            } else {
                for t in tokens {
                    println!(
                        "{:<20} {:<10} created {}  last used {}",
                        t.name,
                        if t.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        },
                        t.created.format("%Y-%m-%d %H:%M"),
                        t.last_used.map_or_else(
                            || "never".into(),
                            |u| u.format("%Y-%m-%d %H:%M").to_string()
                        )
                    );
                }
            }
        }
        TokenCommand::Revoke { name } => {
            if !site.state.remove_token(name)? {
                anyhow::bail!("no token {name:?}");
            }
            if !g.quiet {
                println!("token {name} revoked");
            }
        }
    }
    Ok(exit::OK)
}
