//! Opening a repository lists only the pack shards whose stamp (directory mtime) changed
//! since the index last reconciled them; a pack the index lacks is still found: through a
//! changed stamp, or, when a read misses, by one full listing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use cairn_engine::blob::BlobKind;
use cairn_engine::config::Config;
use cairn_engine::crypto::Encryption;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::saver::BlobSaver;
use cairn_engine::Repository;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use zeroize::Zeroizing;

fn open(path: &Path) -> Repository {
    let pw = || Ok(Zeroizing::new(b"pw".to_vec()));
    Repository::open(path, &pw).unwrap()
}

/// Sets a directory's mtime to `sec` seconds after the epoch (long settled).
fn set_mtime(dir: &Path, sec: i64) {
    let t = TimeSpec::new(sec, 0);
    utimensat(None, dir, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
}

fn shards(repo: &Path) -> Vec<std::path::PathBuf> {
    fs::read_dir(repo.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn only_changed_shards_are_listed_and_a_missed_pack_is_found_on_read() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("repo");
    let mut config = Config::new(Encryption::Aes256Gcm);
    config.pack_size = 1 << 20;
    let repo = Repository::init_with(&path, b"pw", config, KdfParams::TEST_ONLY_WEAK).unwrap();
    let saver = BlobSaver::new(&repo);
    let blob = b"a blob that lands in some pack".to_vec();
    let (id, _) = saver.save(BlobKind::Data, &blob).unwrap();
    saver.flush().unwrap();
    let pack = repo.index().lookup(&id).unwrap().unwrap().pack;
    drop(saver);
    drop(repo);

    // Settle every shard's stamp, then open: the stamps are recorded.
    for s in shards(&path) {
        set_mtime(&s, 1_600_000_000);
    }
    let repo = open(&path);
    let stamps = repo.index().shard_stamps().unwrap();
    assert_eq!(stamps.len(), shards(&path).len());
    assert!(stamps.values().all(|v| *v == 1_600_000_000 * 1_000_000_000));

    // The index loses the pack (as if its writer had been killed before indexing it):
    // an open with unchanged stamps does not list the shard, so the pack stays unknown...
    repo.index().remove_pack(&pack).unwrap();
    drop(repo);
    let repo = open(&path);
    assert_eq!(repo.index().lookup(&id).unwrap(), None);
    // ...until a read misses: one full listing finds it, and the blob reads.
    assert_eq!(repo.read_blob(&id).unwrap(), blob);
    assert!(repo.index().lookup(&id).unwrap().is_some());

    // A changed stamp makes the next open list that shard and index the pack.
    repo.index().remove_pack(&pack).unwrap();
    drop(repo);
    let shard = path.join("data").join(&pack.to_hex()[..2]);
    set_mtime(&shard, 1_600_000_100);
    let repo = open(&path);
    assert!(repo.index().lookup(&id).unwrap().is_some());
    assert_eq!(
        repo.index().shard_stamps().unwrap()[&pack.to_hex()[..2]],
        1_600_000_100 * 1_000_000_000
    );

    // A pack deleted behind the index's back leaves it when its shard is next listed.
    let file = shard.join(pack.to_hex());
    let kept = fs::read(&file).unwrap();
    fs::remove_file(&file).unwrap();
    set_mtime(&shard, 1_600_000_200);
    drop(repo);
    let repo = open(&path);
    assert_eq!(repo.index().lookup(&id).unwrap(), None);

    // A shard changed within the last seconds is listed, but its stamp is not kept (a
    // change in the same clock tick would not move it): the next open lists it again.
    fs::write(&file, &kept).unwrap();
    drop(repo);
    let repo = open(&path);
    assert!(repo.index().lookup(&id).unwrap().is_some());
    assert!(!repo
        .index()
        .shard_stamps()
        .unwrap()
        .contains_key(&pack.to_hex()[..2]));
}
