//! The trees a view decoded last, kept decoded. Looking up a name decodes its
//! directory's tree; PostgreSQL's start opens every file of a relation directory whose
//! tree, for a 20 GiB database, holds 21 one-GiB segments' extents inline (~340 000)
//! and took 11 ms to decode, once per name, before this cache. Trees are immutable by
//! id, so a kept tree is never stale; the cache only bounds memory, by an estimate of
//! each decoded tree's size.

use std::collections::VecDeque;
use std::sync::Arc;

use cairn_engine::id::BlobId;
use cairn_engine::tree::{Extent, Node, Tree};

/// Recently decoded trees, most recent first, within a byte budget.
pub struct DecodedTrees {
    kept: VecDeque<(BlobId, Arc<Tree>, usize)>,
    bytes: usize,
    budget: usize,
}

impl DecodedTrees {
    #[must_use]
    pub fn new(budget: usize) -> Self {
        Self {
            kept: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    pub fn get(&mut self, id: &BlobId) -> Option<Arc<Tree>> {
        let i = self.kept.iter().position(|(k, _, _)| k == id)?;
        let entry = self.kept.remove(i)?;
        let tree = entry.1.clone();
        self.kept.push_front(entry);
        Some(tree)
    }

    /// Keeps `tree`, dropping the least recently used beyond the budget; a tree larger
    /// than the whole budget is not kept.
    pub fn put(&mut self, id: BlobId, tree: Arc<Tree>) {
        let size = estimated_bytes(&tree);
        if size > self.budget || self.kept.iter().any(|(k, _, _)| *k == id) {
            return;
        }
        self.kept.push_front((id, tree, size));
        self.bytes += size;
        while self.bytes > self.budget {
            let Some((_, _, s)) = self.kept.pop_back() else {
                break;
            };
            self.bytes -= s;
        }
    }

    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// About what a decoded tree takes in memory: its nodes, their names and extents.
fn estimated_bytes(t: &Tree) -> usize {
    t.nodes
        .iter()
        .map(|n| {
            std::mem::size_of::<Node>()
                + n.name.len()
                + n.content.len() * std::mem::size_of::<Extent>()
                + n.xattrs.len() * 64
        })
        .sum::<usize>()
        + std::mem::size_of::<Tree>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::id::Id;
    use cairn_engine::tree::NodeKind;

    fn tree(names: usize) -> Arc<Tree> {
        let mut t = Tree::default();
        for i in 0..names {
            t.nodes
                .push(Node::new(format!("n{i}").into_bytes(), NodeKind::Dir));
        }
        Arc::new(t)
    }

    fn id(i: u8) -> BlobId {
        BlobId(Id::from_slice(&[i; 32]).unwrap())
    }

    #[test]
    fn keeps_recent_trees_within_the_budget_and_drops_the_oldest() {
        let one = estimated_bytes(&tree(10));
        let mut c = DecodedTrees::new(one * 2);
        c.put(id(1), tree(10));
        c.put(id(2), tree(10));
        assert!(c.get(&id(1)).is_some());
        // 1 was used last: 2 goes when 3 comes.
        c.put(id(3), tree(10));
        assert!(c.get(&id(2)).is_none());
        assert!(c.get(&id(1)).is_some() && c.get(&id(3)).is_some());
        assert!(c.bytes() <= one * 2);
        // Larger than the whole budget: not kept, nothing else dropped.
        c.put(id(4), tree(100));
        assert!(c.get(&id(4)).is_none());
        assert_eq!(c.get(&id(3)).unwrap().nodes.len(), 10);
    }
}
