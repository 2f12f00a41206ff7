//! Prints the ChatCluster CRD as YAML, or with `--write` refreshes the
//! checked-in copies under `crds/` and the Helm chart.

use std::process::ExitCode;

use kubechat_crds::generate::{CHECKED_IN_PATHS, crd_yaml, workspace_root};

fn main() -> ExitCode {
    let yaml = match crd_yaml() {
        Ok(yaml) => yaml,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    match std::env::args().nth(1).as_deref() {
        None => print!("{yaml}"),
        Some("--write") => {
            for path in CHECKED_IN_PATHS {
                let full = workspace_root().join(path);
                let written =
                    full.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&full, &yaml));
                if let Err(e) = written {
                    eprintln!("crdgen: cannot write {}: {e}", full.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("crdgen: wrote {path}");
            }
        }
        Some(other) => {
            eprintln!("crdgen: unknown argument {other:?}; usage: crdgen [--write]");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
