//! End-to-end tests: they drive the built `repo` binary against real directories,
//! real files (sparse, hard-linked, with xattrs, owned by other users) and, where the
//! test needs it, a real tmpfs. Tests that need root check for it and fail in CI
//! (`CI` set) rather than pass without running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod browse;
mod check;
mod dashboard;
mod database;
mod dbserver;
mod dedup;
mod extent_lists;
mod forget;
mod garage;
mod images;
mod keys;
mod layer;
mod maintenance;
mod mcp;
mod mount;
mod mutations;
mod roundtrip;
mod s3;
mod serve;
mod support;
mod verify;
mod vm;
mod webdriver;
