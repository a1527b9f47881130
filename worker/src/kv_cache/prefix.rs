//! Prefix hashing: a full block is identified by its tokens and the hash of the block before
//! it, so equal hashes mean equal prefixes up to and including the block.

use std::hash::{Hash, Hasher};

/// Chain hash of the block before the first one.
pub const ROOT: u64 = 0x6b69_6c6e; // "kiln"

pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// A well-spread 64-bit value of `key` and `index` (splitmix64 of their combination).
pub fn mix(key: u64, index: u64) -> u64 {
    let mut z = key ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// (hash, parent hash) of each full block of `tokens`.
pub fn chain(tokens: &[u32], block_size: usize) -> Vec<(u64, u64)> {
    let mut parent = ROOT;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let h = block_hash(parent, block);
            let out = (h, parent);
            parent = h;
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_depend_on_the_whole_prefix() {
        let a = chain(&[1, 2, 3, 4, 5], 2);
        let b = chain(&[1, 2, 3, 4], 2);
        let c = chain(&[9, 2, 3, 4], 2);
        assert_eq!(a.len(), 2);
        assert_eq!(a, b);
        assert_ne!(a[1].0, c[1].0, "same block after a different prefix hashes differently");
        assert_eq!(a[1].1, a[0].0);
    }
}
