//! Verdicts from what was seen: a cross-kernel round's (`compatible`, `rejected`, `reused`,
//! `crashed`, `accepted`), an injected round's (`crashed`, `rejected`, `accepted`,
//! `reused`), a scenario run's (`reproduced`, `not reproduced`, `inconclusive`), and the one
//! rule for "handover verified".

pub(crate) mod cross;
pub(crate) mod explore;
pub(crate) mod injection;
pub(crate) mod scenario;
pub(crate) mod verified;
