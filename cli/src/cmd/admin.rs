//! Repository administration: `init`, `key ...`, `index rebuild`.

use anyhow::{bail, Context, Result};
use cairn_engine::crypto::Encryption;
use cairn_engine::id::KeyId;
use cairn_engine::lock::LockKind;
use cairn_engine::Repository;
use serde_json::json;
use zeroize::Zeroizing;

use crate::args::{EncryptionArg, Global, IndexCommand, KeyCommand};
use crate::exit;
use crate::format;
use crate::open::{self, Settings};

/// What `repo init` was asked for.
pub struct InitOptions {
    pub encryption: EncryptionArg,
    pub pack_size: Option<u64>,
    pub compression: Option<i32>,
    pub chunk_sizes: Option<[u64; 3]>,
    pub image_chunk_size: Option<u64>,
    pub format_version: Option<u32>,
    pub copy_chunker_params_from: Option<String>,
}

pub fn init(s: &Settings, g: &Global, o: &InitOptions) -> Result<u8> {
    let encryption = match o.encryption {
        EncryptionArg::Aes256Gcm => Encryption::Aes256Gcm,
        EncryptionArg::None => Encryption::None,
    };
    let mut config = cairn_engine::config::Config::new(encryption);
    if let Some(size) = o.pack_size {
        config.pack_size = u32::try_from(size)
            .ok()
            .filter(|s| (1 << 20..=1 << 30).contains(s))
            .context("--pack-size must be between 1M and 1G")?;
    }
    if let Some(level) = o.compression {
        config.compression_level = level;
    }
    if let Some([min, avg, max]) = o.chunk_sizes {
        let size = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        config.chunker = cairn_engine::chunker::ChunkerParams {
            min_size: size(min),
            avg_size: size(avg),
            max_size: size(max),
        };
        config.chunker.validate().map_err(|_| {
            anyhow::anyhow!(
                "--chunk-sizes: need MIN <= AVG <= MAX with MIN from 64 to 1M, AVG from 256 to 4M \
                 and MAX from 1K to 16M"
            )
        })?;
    }
    if let Some(size) = o.image_chunk_size {
        if !cairn_engine::config::valid_image_chunk(size) {
            anyhow::bail!("--image-chunk-size must be a power of two from 64K to 16M");
        }
        config.image_chunk_size = u32::try_from(size)?;
    }
    if let Some(v) = o.format_version {
        config.version = v;
    }
    if let Some(other) = &o.copy_chunker_params_from {
        let theirs = s
            .other(other, Zeroizing::new(Vec::new()))?
            .peek_config()
            .with_context(|| format!("--copy-chunker-params-from {other}"))?;
        theirs
            .chunker
            .validate()
            .with_context(|| format!("{other}: its chunker parameters"))?;
        config.chunker = theirs.chunker;
        config.image_chunk_size = theirs.image_chunk_size;
    }
    let pw = match encryption {
        Encryption::None => Zeroizing::new(Vec::new()),
        Encryption::Aes256Gcm => s.password(true)?,
    };
    let (backend, opts) = s.location()?;
    let repo = match s.url.as_local() {
        Some(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            Repository::init_local(path, backend, &opts, &pw, config, open::kdf_params())?
        }
        None => Repository::init_on(backend, &opts, &pw, config, open::kdf_params())?,
    };
    if g.json {
        format::print_json(&json!({
            "id": repo.config().id.to_hex(),
            "path": repo.location(),
            "encryption": encryption,
            "format_version": repo.config().version,
            "key_fingerprint": cairn_engine::trust::KeyFingerprint::of(repo.crypto().master_key()).to_string(),
        }));
    } else if !g.quiet {
        println!(
            "created repository {} at {}",
            repo.config().id.short(),
            repo.location()
        );
        if encryption == Encryption::Aes256Gcm {
            println!("keep the password safe: without it the data cannot be read");
        }
    }
    Ok(exit::OK)
}

fn new_password(file: Option<&std::path::Path>) -> Result<Zeroizing<Vec<u8>>> {
    match file {
        Some(f) => open::read_password_file(f),
        None => open::prompt("New password: ", true),
    }
}

pub fn key(s: &Settings, g: &Global, k: KeyCommand) -> Result<u8> {
    let mut repo = s.open()?;
    match k {
        KeyCommand::List => {
            let keys = repo.keys()?;
            if g.json {
                format::print_json(&json!(keys
                    .iter()
                    .map(|(id, kf)| json!({
                        "id": id.to_hex(), "current": *id == repo.key_id(),
                        "created": kf.created.to_rfc3339(), "host": kf.host, "user": kf.user,
                    }))
                    .collect::<Vec<_>>()));
            } else {
                for (id, kf) in &keys {
                    let cur = if *id == repo.key_id() { "*" } else { " " };
                    println!(
                        "{cur} {}  {}  {}@{}",
                        id.short(),
                        kf.created.format("%Y-%m-%d %H:%M:%S"),
                        kf.user,
                        kf.host
                    );
                }
            }
        }
        KeyCommand::Add { new_password_file } => {
            let pw = new_password(new_password_file.as_deref())?;
            let id = repo.add_key(&pw, open::kdf_params())?;
            if g.json {
                format::print_json(&json!({ "id": id.to_hex() }));
            } else {
                println!("added key {}", id.short());
            }
        }
        KeyCommand::Remove { id } => {
            let keys = repo.keys()?;
            let matching: Vec<KeyId> = keys
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| k.to_hex().starts_with(&id.to_ascii_lowercase()))
                .collect();
            let key = match matching.as_slice() {
                [one] => *one,
                [] => bail!("no key {id}"),
                _ => bail!("key prefix {id} is ambiguous"),
            };
            repo.remove_key(&key)?;
            if !g.quiet {
                println!("removed key {}", key.short());
            }
        }
        KeyCommand::Passwd { new_password_file } => {
            let pw = new_password(new_password_file.as_deref())?;
            let id = repo.change_password(&pw, open::kdf_params())?;
            if !g.quiet {
                println!("password changed (key {})", id.short());
            }
        }
    }
    Ok(exit::OK)
}

pub fn index(s: &Settings, g: &Global, i: IndexCommand) -> Result<u8> {
    match i {
        IndexCommand::Rebuild => {
            let repo = s.open_locked(LockKind::Exclusive, "index rebuild")?;
            let (added, _) = repo.rebuild_index()?;
            let t = repo.index().totals()?;
            if g.json {
                format::print_json(&json!({ "packs": added, "blobs": t.blobs }));
            } else if !g.quiet {
                println!("index rebuilt: {added} packs, {} blobs", t.blobs);
            }
        }
    }
    Ok(exit::OK)
}

pub fn upgrade(s: &Settings, g: &Global) -> Result<u8> {
    let mut repo = s.open_locked(LockKind::Exclusive, "upgrade")?;
    let (from, to) = repo.upgrade_format()?;
    if g.json {
        format::print_json(&json!({ "from": from, "to": to, "upgraded": from != to }));
    } else if !g.quiet {
        if from == to {
            println!("repository is already format {to}: nothing to do");
        } else {
            println!(
                "repository upgraded from format {from} to {to}: programs that know only \
                 format {from} can no longer open it"
            );
        }
    }
    Ok(exit::OK)
}

pub fn check(s: &Settings, g: &Global, read_data: bool, subset: Option<(u32, u32)>) -> Result<u8> {
    let repo = s.open_for_reading("check")?;
    let opts = cairn_engine::check::CheckOptions {
        read_data: read_data || subset.is_some(),
        subset,
    };
    let progress = std::sync::Arc::new(cairn_engine::progress::Progress::default());
    let display = crate::progress::Display::start(progress.clone(), "check", !g.quiet && !g.json);
    let report = cairn_engine::check::check(&repo, &opts, &progress);
    display.finish();
    let report = report?;
    if g.json {
        format::print_json(&json!({
            "ok": report.ok(),
            "snapshots": report.snapshots,
            "trees": report.trees,
            "blobs_referenced": report.blobs_referenced,
            "packs": report.packs,
            "packs_read": report.packs_read,
            "bytes_read": report.bytes_read,
            "problems": report.problems,
            "snapshots_marked_damaged": report.snapshots_marked_damaged,
            "affected": report.affected.iter().map(|a| json!({
                "snapshot": a.snapshot.to_hex(), "path": format::json_path(&a.path), "blob": a.blob.to_hex(),
                "recorded_by_repair": a.recorded,
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "checked {} snapshots, {} trees, {} referenced blobs, {} packs{}",
            report.snapshots,
            report.trees,
            report.blobs_referenced,
            report.packs,
            if opts.read_data {
                format!(
                    " ({} read, {})",
                    report.packs_read,
                    format::bytes(report.bytes_read)
                )
            } else {
                String::new()
            }
        );
        for p in &report.problems {
            println!("damaged: {}: {}", p.object, p.message);
        }
        for a in &report.affected {
            println!(
                "affected: snapshot {} {} (blob {}){}",
                a.snapshot.short(),
                format::path(&a.path),
                a.blob.short(),
                if a.recorded {
                    " [loss recorded by repair]"
                } else {
                    ""
                }
            );
        }
        if !report.affected.is_empty() && report.affected.iter().all(|a| a.recorded) {
            println!(
                "every affected snapshot carries the damage mark of `repo repair`: the loss is known; \
                 back the files up again (the snapshots heal) or forget those snapshots"
            );
        }
        if report.ok() {
            println!("no problems found");
        }
    }
    Ok(if report.ok() { exit::OK } else { exit::DAMAGED })
}

/// `repo trust`: the repository's identity against this host's record.
pub fn trust(s: &Settings, g: &Global, accept: bool, list: bool) -> Result<u8> {
    let known = cairn_engine::trust::KnownRepositories::of_this_host();
    if list {
        let all = known.list()?;
        if g.json {
            format::print_json(&json!(all));
        } else {
            for k in &all {
                println!(
                    "{}  id {}  {}  key {}  since {}",
                    k.location,
                    k.identity.id.short(),
                    encryption_name(k.identity.encryption),
                    k.identity.key,
                    k.first_seen.format("%Y-%m-%d %H:%M UTC")
                );
            }
            if all.is_empty() && !g.quiet {
                println!("no known repositories in {}", known.path().display());
            }
        }
        return Ok(exit::OK);
    }
    let repo = s.open_trusting(false)?;
    let identity = repo.identity();
    let location = repo.location().to_owned();
    if accept {
        let replaced = known.accept(&location, &identity)?;
        if g.json {
            format::print_json(&json!({ "accepted": identity, "replaced": replaced }));
        } else if !g.quiet {
            for k in &replaced {
                if k.identity != identity || k.location != location {
                    println!(
                        "forgot: {} id {} {} key {}",
                        k.location,
                        k.identity.id.short(),
                        encryption_name(k.identity.encryption),
                        k.identity.key
                    );
                }
            }
            println!(
                "accepted: {location} id {} {} key {}",
                identity.id.short(),
                encryption_name(identity.encryption),
                identity.key
            );
        }
        return Ok(exit::OK);
    }
    let recorded: Vec<_> = known
        .list()?
        .into_iter()
        .filter(|k| k.location == location || k.identity.id == identity.id)
        .collect();
    let changed = recorded.iter().any(|k| k.identity != identity);
    if g.json {
        format::print_json(&json!({
            "location": location,
            "identity": identity,
            "known": recorded,
            "changed": changed,
        }));
    } else {
        println!("repository {location}");
        println!("  id          {}", identity.id);
        println!("  encryption  {}", encryption_name(identity.encryption));
        println!("  master key  {}", identity.key);
        if recorded.is_empty() {
            println!("not known on this host yet: the next command records it");
        }
        for k in &recorded {
            if k.identity == identity {
                println!(
                    "known on this host since {} (at {}): unchanged",
                    k.first_seen.format("%Y-%m-%d %H:%M UTC"),
                    k.location
                );
            } else {
                println!(
                    "CHANGED: this host knew {} as id {} {} key {}; if that change is yours, \
                     run `repo trust --accept`",
                    k.location,
                    k.identity.id.short(),
                    encryption_name(k.identity.encryption),
                    k.identity.key
                );
            }
        }
    }
    Ok(if changed {
        exit::IDENTITY_CHANGED
    } else {
        exit::OK
    })
}

fn encryption_name(e: Encryption) -> &'static str {
    match e {
        Encryption::Aes256Gcm => "aes-256-gcm",
        Encryption::None => "none",
    }
}
