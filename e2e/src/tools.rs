//! The pinned command-line tools built by `e2e/local/control-plane.sh install`.

use std::path::PathBuf;
use std::process::Command;

/// Path of a tool in the kubechat cache (`$KUBECHAT_CACHE/bin`), falling back
/// to `PATH` so a developer's own install also works.
pub fn tool_path(name: &str) -> PathBuf {
    let cache = std::env::var("KUBECHAT_CACHE").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cache/kubechat")
    });
    let cached = PathBuf::from(cache).join("bin").join(name);
    if cached.exists() { cached } else { PathBuf::from(name) }
}

/// Output of a finished tool run.
pub struct ToolOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `name args…` against the local control plane's kubeconfig; panics
/// with the tool's name when it cannot be started at all.
pub fn run_tool(name: &str, args: &[&str]) -> ToolOutput {
    let path = tool_path(name);
    let output =
        Command::new(&path).args(args).env("KUBECONFIG", crate::components::kubeconfig_path()).output().unwrap_or_else(
            |e| panic!("cannot run {} ({e}); build it with `e2e/local/control-plane.sh install`", path.display()),
        );
    ToolOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
