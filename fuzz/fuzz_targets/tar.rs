//! The tar stream a `pg_basebackup` sends, ingested into a repository (in memory) as
//! a file tree: hostile names, links, sizes and depths.
#![no_main]
use std::sync::Arc;

use cairn_engine::backup::archive::{backup_tar, ArchiveBackupOptions};
use cairn_engine::config::Config;
use cairn_engine::crypto::Encryption;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::progress::Progress;
use cairn_engine::repository::OpenOptions;
use cairn_engine::store::sim::SimFs;
use cairn_engine::store::LocalBackend;
use cairn_engine::Repository;
use libfuzzer_sys::fuzz_target;

/// An empty repository made once; each input runs on a copy of it.
fn empty() -> &'static SimFs {
    static FS: std::sync::OnceLock<SimFs> = std::sync::OnceLock::new();
    FS.get_or_init(|| {
        let fs = SimFs::new();
        let mut config = Config::new(Encryption::None);
        config.pack_size = 1 << 20;
        Repository::init_on(backend(&fs), &OpenOptions::default(), b"", config, KdfParams::TEST_ONLY_WEAK)
            .expect("a repository in memory");
        fs
    })
}

fn backend(fs: &SimFs) -> Arc<LocalBackend> {
    Arc::new(LocalBackend::with_fs("/repo", Arc::new(fs.clone())))
}

fuzz_target!(|data: &[u8]| {
    let fs = empty().fork();
    let repo = Repository::open_with(backend(&fs), &OpenOptions::default(), &|| {
        Ok(zeroize::Zeroizing::new(Vec::new()))
    })
    .expect("the copy opens");
    let opts = ArchiveBackupOptions {
        name: "postgresql".into(),
        ..ArchiveBackupOptions::default()
    };
    if let Ok(out) = backup_tar(&repo, &opts, data, &Progress::default()) {
        // What was committed reads back.
        let _ = cairn_engine::walk::walk(
            &repo,
            &out.snapshot.manifest.root,
            std::path::Path::new("/"),
            &mut |_, _| Ok(true),
        )
        .expect("a committed snapshot walks");
    }
});
