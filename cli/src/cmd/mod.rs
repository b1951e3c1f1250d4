//! One module per group of commands; [`run`] dispatches.

mod admin;
mod backup;
mod browse;
mod copy;
mod forget;
mod jobs;
mod maint;
mod mcp;
mod mount;
mod recover;
mod restore;
mod serve;
mod verify;
mod vm;

use anyhow::Result;

use crate::args::{Cli, Command, Filter};
use crate::open::Settings;
use cairn_engine::snapshot::{self, Snapshot, SnapshotFilter};
use cairn_engine::Repository;

pub fn run(cli: Cli) -> Result<u8> {
    let g = &cli.global;
    let settings = Settings::new(g)?;
    match cli.command {
        Command::Init {
            encryption,
            pack_size,
            compression,
            chunk_sizes,
            image_chunk_size,
            format_version,
            copy_chunker_params_from,
        } => admin::init(
            &settings,
            g,
            &admin::InitOptions {
                encryption,
                pack_size,
                compression,
                chunk_sizes,
                image_chunk_size,
                format_version,
                copy_chunker_params_from,
            },
        ),
        Command::Backup(a) => backup::run(&settings, g, &a),
        Command::Snapshots { filter } => browse::snapshots(&settings, g, &filter),
        Command::Ls {
            snapshot,
            path,
            long,
            filter,
        } => browse::ls(&settings, g, &snapshot, path.as_deref(), long, &filter),
        Command::Cat {
            snapshot,
            path,
            filter,
        } => browse::cat(&settings, &snapshot, path.as_deref(), &filter),
        Command::Diff {
            first,
            second,
            filter,
        } => browse::diff(&settings, g, &first, &second, &filter),
        Command::Restore {
            snapshot,
            target,
            include,
            format,
            no_sync,
            vm,
            to,
            network,
            connect,
            hosts,
            tags,
            paths,
            source,
            name,
        } => {
            if vm {
                let filter = Filter {
                    hosts,
                    tags,
                    paths,
                    name: source,
                };
                return vm::clone(
                    &settings,
                    g,
                    &snapshot,
                    &filter,
                    name,
                    to,
                    &network,
                    connect.as_deref(),
                );
            }
            let filter = Filter {
                hosts,
                tags,
                paths,
                name: source.or(name),
            };
            let target = target.unwrap_or_default();
            let req = restore::Request {
                spec: &snapshot,
                target: &target,
                include: &include,
                format: format.as_deref(),
                no_sync,
            };
            restore::run(&settings, g, &req, &filter)
        }
        Command::Stats { snapshot, filter } => {
            browse::stats(&settings, g, snapshot.as_deref(), &filter)
        }
        Command::Mount {
            mountpoint,
            daemon,
            allow_other,
            private,
            cache_size,
            threads,
            direct_io_from,
            owner,
            writable_layer,
            snapshot,
            layer_path,
            chunk_size,
        } => {
            let allow_other = allow_other || (!private && nix::unistd::geteuid().is_root());
            let writable = match (writable_layer, snapshot) {
                (Some(dir), Some(snapshot)) => Some(mount::Writable {
                    dir,
                    snapshot,
                    path: layer_path.unwrap_or_default(),
                    chunk: chunk_size,
                }),
                _ => None,
            };
            let req = mount::Request {
                daemon,
                allow_other,
                cache_size,
                threads,
                direct_io_from: direct_io_from.map(|d| d.0),
                owner: owner.as_deref().map(mount::parse_owner).transpose()?,
                writable,
            };
            mount::mount(&settings, g, &mountpoint, &req)
        }
        Command::Umount { mountpoint } => mount::umount(&mountpoint),
        Command::Check {
            read_data,
            read_data_subset,
        } => admin::check(&settings, g, read_data, read_data_subset),
        Command::Forget(a) => forget::run(&settings, g, &a),
        Command::Copy(a) => copy::run(&settings, g, &a),
        Command::Recover(r) => recover::run(&settings, g, r),
        Command::Prune(a) => maint::prune(&settings, g, &a.options, a.dry_run),
        Command::Repair { no_read_data } => maint::repair(&settings, g, no_read_data),
        Command::Locks => maint::locks(&settings, g),
        Command::Unlock { all } => maint::unlock(&settings, g, all),
        Command::Key(k) => admin::key(&settings, g, k),
        Command::Index(i) => admin::index(&settings, g, i),
        Command::Upgrade => admin::upgrade(&settings, g),
        Command::Trust { accept, list } => admin::trust(&settings, g, accept, list),
        Command::Verify(v) => verify::run(&settings, g, v),
        Command::Vm(v) => vm::run(&settings, g, v),
        Command::Job(j) => jobs::job(&settings, g, &j.site, &j.command),
        Command::Schedule(c) => jobs::schedule(&settings, g, &c.site, &c.command),
        Command::Serve(a) => serve::run(&settings, g, &a),
        Command::Mcp(a) => mcp::run(&settings, &a),
    }
}

pub fn engine_filter(f: &Filter) -> SnapshotFilter {
    SnapshotFilter {
        hosts: f.hosts.clone(),
        tags: f.tags.clone(),
        paths: f.paths.clone(),
        name: f.name.clone(),
    }
}

/// Finds one snapshot by `latest` or id prefix.
pub fn find_snapshot(repo: &Repository, spec: &str, f: &Filter) -> Result<Snapshot> {
    let all = repo.snapshots()?;
    Ok(snapshot::select(&all, spec, &engine_filter(f))?.clone())
}
