//! `luo-vmm explore`'s search (docs/explore.md): the kernel code it searches
//! ([`code`]) and the lock sites inside it ([`sites`]), the space of trials and each trial's scenario ([`space`]), the results
//! kept on disk for `--resume` ([`store`]), and the findings and the report ([`findings`]).

pub(crate) mod code;
pub(crate) mod findings;
pub(crate) mod merge;
pub(crate) mod sites;
pub(crate) mod space;
pub(crate) mod store;
