//! Extent-list blobs (format 2): CBOR arrays of extents, filled into a file's node.
#![no_main]
use cairn_engine::id::{BlobId, Id};
use cairn_engine::tree::{Node, NodeKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lists = data.first().map_or(1, |&b| 1 + (b as usize % 4));
    let size = data.get(1..9).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let body = data.get(9..).unwrap_or_default().to_vec();
    let mut node = Node {
        size,
        content_lists: (0..lists)
            .map(|i| BlobId(Id::from_bytes([i as u8; 32])))
            .collect(),
        ..Node::new(b"f".to_vec(), NodeKind::File)
    };
    let _ = node.fill_content(&BlobId(Id::default()), |_| Ok(&body));
});
