//! The content of the preserved memfds: every byte is a function of (round, session, file,
//! offset), so stage 2 can check each byte and name the first one that differs.
//!
//! Words of 8 bytes are a SplitMix64-style hash of the word index, seeded by
//! (round, session, file): a few multiplications and shifts per 8 bytes, cheap even under an
//! instruction emulator, and a stale page from another file or round never matches.

/// The seed of one memfd.
pub fn seed(round: u32, session: u32, file: u32) -> u64 {
    (u64::from(round) << 48) ^ (u64::from(session) << 24) ^ u64::from(file) ^ 0x4c55_4f2d_564d_4d00
}

/// The 8-byte word at word index `index` of the memfd with seed `seed`.
#[inline]
pub fn word(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_4476_d1ce_4e5b);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The expected byte at `offset`.
#[cfg(test)]
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Fills `buf` with the pattern of bytes `offset..offset + buf.len()`.
/// `offset` must be a multiple of 8.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    debug_assert_eq!(offset % 8, 0);
    let first = offset / 8;
    for (k, chunk) in buf.chunks_mut(8).enumerate() {
        let w = word(seed, first + k as u64).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// A byte that is not what the pattern says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Offset in the memfd.
    pub offset: u64,
    /// What the pattern says.
    pub expected: u8,
    /// What was read.
    pub got: u8,
}

/// Checks `buf`, which holds bytes `offset..offset + buf.len()`; returns the first wrong byte.
/// `offset` must be a multiple of 8.
pub fn check(seed: u64, offset: u64, buf: &[u8]) -> Option<Mismatch> {
    debug_assert_eq!(offset % 8, 0);
    let first = offset / 8;
    for (k, chunk) in buf.chunks(8).enumerate() {
        let w = word(seed, first + k as u64).to_le_bytes();
        if chunk != &w[..chunk.len()] {
            let i = chunk.iter().zip(w).position(|(g, e)| *g != e)?;
            return Some(Mismatch {
                offset: offset + (k * 8 + i) as u64,
                expected: w[i],
                got: chunk[i],
            });
        }
    }
    None
}

/// Page size the memfds' pages are matched in.
const PAGE: u64 = 4096;

/// Whose bytes `page` (one 4 KiB page read from a memfd) holds: the memfd pattern of
/// some round in `rounds`, session below `sessions`, file below `files` and page offset
/// below `size` whose whole page matches, or zeros, or neither. One hash per candidate
/// page for the first word, then a full compare of the one that matches:
/// O(rounds x sessions x files x size / 4 KiB).
pub fn whose(
    page: &[u8],
    rounds: std::ops::RangeInclusive<u32>,
    sessions: u32,
    files: u32,
    size: u64,
) -> luo_protocol::Whose {
    use luo_protocol::Whose;
    if page.iter().all(|&b| b == 0) {
        return Whose::Zeros;
    }
    let Some(first) = page.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return Whose::Unknown;
    };
    let first = u64::from_le_bytes(first);
    for round in rounds {
        for session in 0..sessions {
            for file in 0..files {
                let seed = seed(round, session, file);
                let mut offset = 0;
                while offset < size {
                    if word(seed, offset / 8) == first && check(seed, offset, page).is_none() {
                        return Whose::Pattern {
                            round,
                            session,
                            file,
                            offset,
                        };
                    }
                    offset += PAGE;
                }
            }
        }
    }
    Whose::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whose_names_the_memfd_and_offset_a_page_came_from() {
        use luo_protocol::Whose;
        let mut page = vec![0u8; 4096];
        assert_eq!(whose(&page, 1..=1, 2, 2, 1 << 20), Whose::Zeros);
        fill(seed(1, 1, 0), 0x3000, &mut page);
        assert_eq!(
            whose(&page, 0..=2, 2, 2, 1 << 20),
            Whose::Pattern {
                round: 1,
                session: 1,
                file: 0,
                offset: 0x3000
            }
        );
        // Beyond the memfds' size, or a round not asked about: nobody's.
        assert_eq!(whose(&page, 0..=2, 2, 2, 0x3000), Whose::Unknown);
        assert_eq!(whose(&page, 2..=3, 2, 2, 1 << 20), Whose::Unknown);
        page[100] ^= 1;
        assert_eq!(whose(&page, 0..=2, 2, 2, 1 << 20), Whose::Unknown);
    }

    #[test]
    fn fill_then_check_passes() {
        let s = seed(0, 1, 2);
        let mut buf = vec![0u8; 4096 + 5];
        fill(s, 8192, &mut buf);
        assert_eq!(check(s, 8192, &buf), None);
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(*b, byte_at(s, 8192 + i as u64));
        }
    }

    #[test]
    fn chunked_fill_equals_whole_fill() {
        let s = seed(3, 0, 0);
        let mut whole = vec![0u8; 256];
        fill(s, 0, &mut whole);
        let mut parts = vec![0u8; 256];
        let (a, b) = parts.split_at_mut(64);
        fill(s, 0, a);
        fill(s, 64, b);
        assert_eq!(whole, parts);
    }

    #[test]
    fn reports_first_mismatch() {
        let s = seed(0, 0, 0);
        let mut buf = vec![0u8; 1024];
        fill(s, 0, &mut buf);
        buf[77] ^= 0x40;
        buf[900] ^= 1;
        let m = check(s, 4096, &buf[..]);
        // Checked at the wrong offset: the very first byte is already wrong.
        assert_eq!(m.map(|m| m.offset), Some(4096));
        let m = check(s, 0, &buf).unwrap();
        assert_eq!(m.offset, 77);
        assert_eq!(m.expected, byte_at(s, 77));
        assert_eq!(m.got, byte_at(s, 77) ^ 0x40);
    }

    #[test]
    fn files_and_rounds_differ() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill(seed(0, 0, 0), 0, &mut a);
        fill(seed(0, 0, 1), 0, &mut b);
        assert_ne!(a, b);
        fill(seed(1, 0, 0), 0, &mut b);
        assert_ne!(a, b);
        fill(seed(0, 1, 0), 0, &mut b);
        assert_ne!(a, b);
    }
}
