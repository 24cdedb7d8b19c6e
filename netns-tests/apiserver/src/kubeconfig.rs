//! Writes a kubeconfig that kube-rs (`Config::from_custom_kubeconfig`, `KUBECONFIG`) accepts for
//! this plain-HTTP server.

use std::path::Path;

use anyhow::Context as _;

/// Cluster, context and user name used in the kubeconfig.
pub const NAME: &str = "wgmesh-apiserver";

/// The bearer token written by default (the server accepts any token, or none).
pub const DEFAULT_TOKEN: &str = "wgmesh-apiserver-token";

/// Quotes a string as a YAML double-quoted scalar (JSON string syntax is valid YAML).
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// The kubeconfig text for `server_url` (e.g. `http://192.0.2.1:6443`) and a bearer token.
pub fn render(server_url: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {NAME}\n\
         \x20 cluster:\n\
         \x20   server: {server}\n\
         users:\n\
         - name: {NAME}\n\
         \x20 user:\n\
         \x20   token: {token}\n\
         contexts:\n\
         - name: {NAME}\n\
         \x20 context:\n\
         \x20   cluster: {NAME}\n\
         \x20   user: {NAME}\n\
         current-context: {NAME}\n",
        server = quote(server_url),
        token = quote(token),
    )
}

/// Writes the kubeconfig atomically (temporary file in the same directory, then rename).
pub fn write(path: &Path, server_url: &str, token: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kubeconfig".into())
    ));
    std::fs::write(&tmp, render(server_url, token))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_expected_yaml() {
        let y = render("http://192.0.2.1:6443", "tok");
        assert!(y.contains("current-context: wgmesh-apiserver\n"));
        assert!(y.contains("    server: \"http://192.0.2.1:6443\"\n"));
        assert!(y.contains("    token: \"tok\"\n"));
    }
}
