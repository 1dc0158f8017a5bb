//! LUO sessions and the memfds preserved in them, as the agent's workloads (the handover
//! workload's [`Memfds`](crate::workload::Memfds), a scenario's
//! [`script`](crate::script)) number and name them: their bounds, a memfd's LUO token, a
//! session's LUO name, and the size syntax (`1M`).

use std::fmt;

/// Most LUO sessions a handover workload may ask for.
pub const MAX_SESSIONS: u32 = 1000;
/// A memfd's token is `session * TOKENS_PER_SESSION + file`.
pub const TOKENS_PER_SESSION: u64 = 1000;
/// Most memfds per session (tokens must not collide between sessions).
pub const MAX_FILES: u32 = 999;
/// Largest memfd in bytes (the largest guest luo-vmm runs).
pub const MAX_MEMFD_SIZE: u64 = 1 << 40;
/// Longest LUO session name in bytes (`LIVEUPDATE_SESSION_NAME_LENGTH` less its NUL).
pub const MAX_SESSION_NAME: usize = 63;

/// The LUO token of memfd `file` of session `session`.
pub fn token(session: u32, file: u32) -> u64 {
    u64::from(session) * TOKENS_PER_SESSION + u64::from(file)
}

/// A LUO session name: 1 to [`MAX_SESSION_NAME`] bytes of UTF-8 without NUL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionName(pub(crate) String);

impl SessionName {
    /// Checks `name`.
    pub fn new(name: &str) -> Option<SessionName> {
        (!name.is_empty() && name.len() <= MAX_SESSION_NAME && !name.contains('\0'))
            .then(|| SessionName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `512M`, `8G`, `1048576`, `64K`, `2T` (binary units) into bytes; `None` when it
/// is not a size or overflows.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.as_bytes().last()? {
        b'k' | b'K' => (&t[..t.len() - 1], 10),
        b'm' | b'M' => (&t[..t.len() - 1], 20),
        b'g' | b'G' => (&t[..t.len() - 1], 30),
        b't' | b'T' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("1Q"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }
}
