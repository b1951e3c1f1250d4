//! Tree blobs (CBOR directory listings), with their extent lists taken from the rest of
//! the input.
#![no_main]
use cairn_engine::id::{BlobId, Id};
use cairn_engine::tree::Tree;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (tree, lists) = data.split_at(split);
    let id = BlobId(Id::default());
    if let Ok(mut t) = Tree::decode(tree, &id) {
        let list = lists.to_vec();
        let _ = t.fill_content(&id, |_| Ok(&list));
        // What decoded encodes and decodes to itself.
        if t.nodes.iter().all(|n| n.content_lists.is_empty()) {
            let again = Tree::decode(&t.encode(), &id).expect("a decoded tree re-encodes");
            assert_eq!(again.nodes.len(), t.nodes.len());
        }
    }
});
