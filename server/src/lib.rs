//! # cairn-server: `repo serve`, the control plane
//!
//! The daemon a site runs: jobs (backup templates) on schedules, every run recorded with
//! its figures and log, a REST API with tokens, Prometheus metrics and notifications. It
//! is an ordinary user of the library operations (`cairn_agent::source`,
//! `cairn_engine::forget`, `prune`, `check`); engine work runs on threads of its own,
//! never on the async runtime's workers.
//!
//! - [`config`] reads `serve.toml`;
//! - [`job`] holds job definitions, [`schedule`] schedule expressions and the clock,
//!   [`scheduler`] decides what is due and what was missed;
//! - [`state`] is the host state database (jobs, schedules, runs, tokens, audit);
//! - [`repos`] opens the repositories jobs name; [`execute`] runs a job once;
//!   [`runner`] queues runs, limits them and records them;
//! - [`operations`] are what the API runs beside jobs: recovery sessions, the
//!   hypervisor's domains, check, prune and repair;
//! - [`api`] serves all of it over HTTP, with its OpenAPI document.

pub mod api;
pub mod auth;
pub mod browse;
pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod directory;
pub mod execute;
pub mod job;
pub mod login;
pub mod mcp;
pub mod metrics;
pub mod notify;
pub mod operations;
pub mod repos;
pub mod runner;
pub mod schedule;
pub mod scheduler;
pub mod site;
pub mod state;
pub mod storage;
pub mod verification;
