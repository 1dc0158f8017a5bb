//! luo-vmm: a small KVM virtual machine monitor that runs Linux guests through Live
//! Update (LUO over KHO) handovers and observes them from outside.
//!
//! The binary parses [`config::options::Cli`] and hands its command to [`commands::run`].
//! The public surface is that, and the typed [`report`] that `--json` writes and the tests
//! read back; everything else is the crate's own.
//!
//! The folders, each importing only the ones listed before it (docs/architecture.md):
//! [`machine`] (the VM on /dev/kvm), [`config`] (what the user asked for), [`run`] (one
//! guest run), [`watch`] (observers of a running guest), [`judge`] (verdicts),
//! [`report`] (the typed report, its text, table and statistics), [`trial`] (one
//! scheduled scenario run), [`explore`] (the search for LUO bugs), [`commands`].

pub mod bench;
pub mod commands;
pub mod config;
pub(crate) mod explore;
pub(crate) mod judge;
pub(crate) mod machine;
pub mod report;
pub(crate) mod run;
pub(crate) mod trial;
pub(crate) mod watch;
