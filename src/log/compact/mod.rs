//! Compaction of `cleanup.policy=compact` topics: sealed segment objects rewritten to keep
//! the newest record per key, every survivor at its original offset.

pub(crate) mod filter;
pub(crate) mod job;
pub(crate) mod keymap;
pub(crate) mod plan;
pub(crate) mod swap;
pub(crate) mod throttle;
