//! `repo serve`: the daemon (`cairn_server::daemon`), its API tokens and dashboard users.

use anyhow::{Context, Result};
use serde_json::json;

use crate::args::{Global, ServeArgs, ServeCommand, TokenCommand, UserCommand};
use crate::exit;
use crate::format;
use crate::open::Settings;

pub fn run(s: &Settings, g: &Global, a: &ServeArgs) -> Result<u8> {
    match &a.command {
        Some(ServeCommand::Token(t)) => token(s, g, a, t),
        Some(ServeCommand::User(u)) => user(s, g, a, u),
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

fn new_password(from_stdin: bool) -> Result<zeroize::Zeroizing<String>> {
    if from_stdin {
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let trimmed = line.trim_end_matches(['\n', '\r']).to_owned();
        return Ok(zeroize::Zeroizing::new(trimmed));
    }
    let p = crate::open::prompt("Password: ", true)?;
    Ok(zeroize::Zeroizing::new(
        String::from_utf8(p.to_vec()).context("the password is not UTF-8")?,
    ))
}

fn user(s: &Settings, g: &Global, a: &ServeArgs, u: &UserCommand) -> Result<u8> {
    let site = super::jobs::open_site(s, &a.site, false)?;
    match u {
        UserCommand::Add {
            name,
            read_only,
            password_stdin,
        } => {
            let password = new_password(*password_stdin)?;
            cairn_server::login::add_user(&site.state, name, &password, *read_only)?;
            if !g.quiet {
                eprintln!(
                    "user {name} added{}: they log in to the dashboard with this password",
                    if *read_only { " (read-only)" } else { "" }
                );
            }
        }
        UserCommand::List => {
            let users = site.state.users()?;
            if g.json {
                format::print_json(&json!(users));
            } else {
                for u in users {
                    println!(
                        "{:<20} {:<10} created {}",
                        u.name,
                        if u.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        },
                        u.created.format("%Y-%m-%d %H:%M")
                    );
                }
            }
        }
        UserCommand::Remove { name } => {
            cairn_server::login::remove_user(&site.state, name)?;
            if !g.quiet {
                println!("user {name} removed");
            }
        }
    }
    Ok(exit::OK)
}
