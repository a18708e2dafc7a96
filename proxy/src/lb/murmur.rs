//! MurmurHash2, 64-bit, as Envoy's `MurmurHash::murmurHash2` (a copy of
//! libstdc++'s `_Hash_bytes`): the ring hash's `MURMUR_HASH_2` function.

/// Envoy's `MurmurHash::STD_HASH_SEED`.
pub const STD_HASH_SEED: u64 = 0xc70f_6907;

const MUL: u64 = (0xc6a4_a793 << 32) + 0x5bd1_e995;

fn shift_mix(v: u64) -> u64 {
    v ^ (v >> 47)
}

pub fn murmur_hash2(key: &[u8], seed: u64) -> u64 {
    let mut hash = seed ^ (key.len() as u64).wrapping_mul(MUL);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let data = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        hash ^= shift_mix(data.wrapping_mul(MUL)).wrapping_mul(MUL);
        hash = hash.wrapping_mul(MUL);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // The tail as a little-endian number.
        let data = rest
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | *b as u64);
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    shift_mix(shift_mix(hash).wrapping_mul(MUL))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from libstdc++'s `std::_Hash_bytes(key, len, 0xc70f6907)`,
    /// which Envoy's implementation copies ("foo" is Envoy's own test).
    #[test]
    fn matches_libstdcxx() {
        for (k, want) in [
            ("", 6142509188972423790u64),
            ("foo", 9631199822919835226),
            ("127.0.0.1:8080_0", 16027637164591516499),
            ("abcdefgh", 8664279048047335611),
            ("abcdefghi", 13036955925923793583),
            ("10.1.2.3:443_12345", 358163978234026306),
        ] {
            assert_eq!(murmur_hash2(k.as_bytes(), STD_HASH_SEED), want, "{k:?}");
        }
    }
}
