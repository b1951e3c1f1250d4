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
        TokenCommand::Create {
            name,
            read_only,
            repository: Some(repository),
            append_only,
            quota,
        } => {
            use cairn_server::state::StorageMode;
            if site.repos.config(repository).is_none() {
                anyhow::bail!(
                    "no repository {repository:?} in {} (known: {})",
                    site.config_origin,
                    site.repos.names().join(", ")
                );
            }
            let mode = match (read_only, append_only) {
                (true, true) => anyhow::bail!("--read-only or --append-only, not both"),
                (true, false) => StorageMode::Read,
                (false, true) => StorageMode::AppendOnly,
                (false, false) => StorageMode::Full,
            };
            let secret =
                cairn_server::auth::create_storage(&site.state, name, repository, mode, *quota)?;
            if g.json {
                format::print_json(&json!({
                    "name": name, "repository": repository, "mode": mode,
                    "quota": quota, "token": secret
                }));
            } else {
                println!("{secret}");
                if !g.quiet {
                    eprintln!(
                        "storage token {name} created for repository {repository} ({}): shown \
                         this once; on the other host, REPO_TOKEN=<token> repo -r \
                         https://THIS-HOST:PORT/repo/{repository} …",
                        mode.as_str()
                    );
                }
            }
        }
        TokenCommand::Create {
            name, read_only, ..
        } => {
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
            let storage = site.state.storage_tokens()?;
            if g.json {
                format::print_json(&json!({ "api": tokens, "storage": storage }));
            } else {
                for t in &storage {
                    println!(
                        "{:<20} {:<10} repository {}  {} used{}",
                        t.name,
                        t.mode.as_str(),
                        t.repository,
                        format::bytes(t.used),
                        t.quota
                            .map_or_else(String::new, |q| format!(" of {}", format::bytes(q)))
                    );
                }
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
