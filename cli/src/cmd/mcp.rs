//! `repo mcp`: the MCP server on stdio (`cairn_server::mcp`). Standard output is the
//! protocol's: logs go to standard error, nothing else is printed.

use anyhow::Result;

use crate::args::McpArgs;
use crate::exit;
use crate::open::Settings;

pub fn run(s: &Settings, a: &McpArgs) -> Result<u8> {
    let site = super::jobs::open_site(s, &a.site, true)?;
    cairn_server::mcp::serve_stdio(site, a.allow_changes)?;
    Ok(exit::OK)
}
