//! The container images, checked without a container engine.
//!
//! `e2e/image/build.sh` assembles the Dockerfile's two images as OCI image
//! layouts from the release binaries and Debian's packages; these tests open
//! them as a runtime would (index → manifest → config and layers, every blob's
//! digest verified) and check what a pod would get: the entrypoint, a
//! non-root user, nothing beyond the binary and what it needs to run (no
//! shell), every shared library the binary loads taken from the image itself.
//! A second test keeps the image names and tags in line with the chart, the
//! CRD's default gateway image, the Dockerfile and the kind script.
//!
//! The release binaries come from `cargo build --release --locked -p
//! kubechat-gateway -p kubechat-operator` (e2e/test.sh runs it).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest, Sha256};

const NONROOT: &str = "65532:65532";

fn repo_root() -> PathBuf {
    kubechat_e2e::repo_root()
}

fn read(path: &str) -> String {
    let full = repo_root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// `appVersion` of the chart: the tag of both images.
fn app_version() -> String {
    let chart: serde_yaml::Value = serde_yaml::from_str(&read("charts/kubechat/Chart.yaml")).expect("Chart.yaml");
    chart["appVersion"].as_str().expect("appVersion in Chart.yaml").to_string()
}

fn release_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").ok().filter(|v| !v.is_empty()).map(PathBuf::from);
    target.unwrap_or_else(|| repo_root().join("target")).join("release")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// One entry of an image's file system, after all layers are applied.
#[derive(Debug, Clone)]
struct FileEntry {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<String>,
    contents: Vec<u8>,
}

/// An OCI image layout read and verified: the config and the merged file system.
struct Image {
    config: Value,
    layer_sizes: Vec<u64>,
    files: BTreeMap<String, FileEntry>,
}

impl Image {
    /// Opens the image tagged `tag` in the layout at `dir`, checking that every
    /// blob matches its digest and every layer its diff id.
    fn open(dir: &Path, tag: &str) -> Self {
        let blob = |digest: &str| -> Vec<u8> {
            let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
            let path = dir.join("blobs/sha256").join(hex);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read blob {}: {e}", path.display()));
            assert_eq!(sha256_hex(&bytes), hex, "blob {} does not match its digest", path.display());
            bytes
        };
        let layout: Value = serde_json::from_slice(&std::fs::read(dir.join("oci-layout")).expect("oci-layout"))
            .expect("oci-layout JSON");
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json")).expect("index JSON");
        let manifests = index["manifests"].as_array().expect("index.manifests");
        let tags: Vec<&str> =
            manifests.iter().filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str()).collect();
        assert_eq!(tags, [tag], "{}: the layout holds exactly the tag {tag}", dir.display());
        let descriptor = &manifests[0];
        assert_eq!(descriptor["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        let manifest: Value =
            serde_json::from_slice(&blob(descriptor["digest"].as_str().expect("digest"))).expect("manifest JSON");
        let config: Value =
            serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().expect("config digest")))
                .expect("config JSON");
        let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
            .as_array()
            .expect("rootfs.diff_ids")
            .iter()
            .map(|d| d.as_str().expect("diff id"))
            .collect();
        let layers = manifest["layers"].as_array().expect("manifest.layers");
        assert_eq!(layers.len(), diff_ids.len(), "one diff id per layer");

        let mut files = BTreeMap::new();
        let mut layer_sizes = Vec::new();
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            assert_eq!(layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
            let compressed = blob(layer["digest"].as_str().expect("layer digest"));
            layer_sizes.push(compressed.len() as u64);
            let mut tar_bytes = Vec::new();
            flate2::read::GzDecoder::new(&compressed[..]).read_to_end(&mut tar_bytes).expect("gunzip layer");
            assert_eq!(format!("sha256:{}", sha256_hex(&tar_bytes)), diff_id, "layer does not match its diff id");
            apply_layer(&tar_bytes, &mut files);
        }
        Self { config, layer_sizes, files }
    }

    /// Writes the file system out (regular files, directories, symlinks).
    fn unpack(&self, root: &Path) {
        for (path, entry) in &self.files {
            let target = root.join(path);
            match entry.kind {
                tar::EntryType::Directory => std::fs::create_dir_all(&target).expect("mkdir"),
                tar::EntryType::Regular => {
                    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
                    std::fs::write(&target, &entry.contents).expect("write file");
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(entry.mode & 0o777))
                        .expect("chmod");
                }
                tar::EntryType::Symlink => {
                    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
                    // Absolute links point into the image, not the host.
                    let link = entry.link.as_deref().expect("link target");
                    let resolved = match link.strip_prefix('/') {
                        Some(inside) => root.join(inside),
                        None => PathBuf::from(link),
                    };
                    std::os::unix::fs::symlink(resolved, &target).expect("symlink");
                }
                other => panic!("{path}: unexpected entry type {other:?}"),
            }
        }
    }
}

/// Applies one layer's tar to the merged file system (no whiteouts expected:
/// these images only ever add files).
fn apply_layer(tar_bytes: &[u8], files: &mut BTreeMap<String, FileEntry>) {
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let raw = entry.path().expect("entry path").to_string_lossy().into_owned();
        let path = raw.trim_start_matches("./").trim_end_matches('/').to_string();
        assert!(!path.rsplit('/').next().unwrap_or("").starts_with(".wh."), "whiteout in a layer: {path}");
        if path.is_empty() {
            continue;
        }
        let header = entry.header().clone();
        let link = entry.link_name().expect("link name").map(|l| l.to_string_lossy().into_owned());
        let mut contents = Vec::new();
        entry.read_to_end(&mut contents).expect("read entry");
        files.insert(
            path,
            FileEntry {
                kind: header.entry_type(),
                mode: header.mode().expect("mode"),
                uid: header.uid().expect("uid"),
                gid: header.gid().expect("gid"),
                link,
                contents,
            },
        );
    }
}

/// Paths an image may hold besides its own binary: what the binary needs to
/// run (the loader, glibc, libgcc_s), the CA bundle, the `nonroot` account,
/// and the packages' copyright notices.
fn allowed_base_path(path: &str) -> bool {
    const EXACT: &[&str] = &[
        "etc",
        "etc/group",
        "etc/passwd",
        "etc/nsswitch.conf",
        "etc/ssl",
        "etc/ssl/certs",
        "etc/ssl/certs/ca-certificates.crt",
        "home",
        "home/nonroot",
        "lib",
        "lib/x86_64-linux-gnu",
        "lib64",
        "lib64/ld-linux-x86-64.so.2",
        "tmp",
        "usr",
        "usr/local",
        "usr/local/bin",
        "usr/share",
        "usr/share/doc",
        "usr/share/doc/ca-certificates",
        "usr/share/doc/ca-certificates/copyright",
        "usr/share/doc/gcc-12-base",
        "usr/share/doc/gcc-12-base/copyright",
        "usr/share/doc/libc6",
        "usr/share/doc/libc6/copyright",
    ];
    if EXACT.contains(&path) {
        return true;
    }
    // glibc's and libgcc's shared objects, nothing else in the library folder.
    path.strip_prefix("lib/x86_64-linux-gnu/")
        .is_some_and(|name| !name.contains('/') && name.starts_with("l") && name.contains(".so"))
}

fn run(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Checks one image; returns its compressed size in bytes.
fn check_image(layouts: &Path, name: &str, binary: &str, other_binary: &str) -> u64 {
    let version = app_version();
    let image = Image::open(&layouts.join(name), &version);
    let config = &image.config;
    let entrypoint = format!("/usr/local/bin/{binary}");

    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!([entrypoint]), "{name}: entrypoint");
    assert!(config["config"]["Cmd"].is_null(), "{name}: no default arguments (the pod spec says which mode)");
    assert_eq!(config["config"]["User"], NONROOT, "{name}: runs as the nonroot user, not root");
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version.as_str(), "{name}: version label");
    assert_eq!(labels["org.opencontainers.image.title"], name, "{name}: title label");

    // Nothing but the binary and what it needs.
    let extra: Vec<&String> = image
        .files
        .keys()
        .filter(|p| !allowed_base_path(p) && p.as_str() != entrypoint.trim_start_matches('/'))
        .collect();
    assert!(extra.is_empty(), "{name}: files that do not belong in the image: {extra:?}");
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(!image.files.contains_key(shell), "{name}: has a shell ({shell})");
    }
    assert!(
        !image.files.contains_key(&format!("usr/local/bin/{other_binary}")),
        "{name}: carries {other_binary}, which belongs to the other image"
    );
    for required in ["etc/passwd", "etc/group", "etc/ssl/certs/ca-certificates.crt", "lib64/ld-linux-x86-64.so.2"] {
        assert!(image.files.contains_key(required), "{name}: {required} is missing");
    }
    let passwd = String::from_utf8_lossy(&image.files["etc/passwd"].contents).into_owned();
    assert!(passwd.lines().any(|l| l.starts_with("nonroot:x:65532:65532:")), "{name}: no nonroot user: {passwd}");

    // Ownership and modes: root owns everything but nonroot's home; no
    // set-id bits; nothing world-writable but /tmp (sticky).
    for (path, entry) in &image.files {
        if path == "home/nonroot" {
            assert_eq!((entry.uid, entry.gid), (65532, 65532), "{name}: /home/nonroot belongs to nonroot");
        } else {
            assert_eq!((entry.uid, entry.gid), (0, 0), "{name}: {path} is not owned by root");
        }
        assert_eq!(entry.mode & 0o6000, 0, "{name}: {path} is set-uid or set-gid");
        let world_writable = entry.mode & 0o002 != 0 && entry.kind != tar::EntryType::Symlink;
        if path == "tmp" {
            assert_eq!(entry.mode & 0o7777, 0o1777, "{name}: /tmp is sticky and world-writable");
        } else {
            assert!(!world_writable, "{name}: {path} is world-writable");
        }
    }
    let bin = &image.files[entrypoint.trim_start_matches('/')];
    assert_eq!(bin.kind, tar::EntryType::Regular, "{name}: the entrypoint is a regular file");
    assert_eq!(bin.mode & 0o777, 0o755, "{name}: the entrypoint's mode");
    assert_eq!(&bin.contents[..4], b"\x7fELF", "{name}: the entrypoint is an ELF executable");
    let built = release_dir().join(binary);
    let in_image = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(in_image.path(), &bin.contents).expect("write");
    let build_id = |path: &Path| {
        let notes = run(Path::new("/usr/bin/readelf"), &["--notes", path.to_str().expect("utf-8 path")]);
        notes.lines().find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_string))
    };
    let id = build_id(in_image.path());
    assert!(id.is_some(), "{name}: the image's {binary} has no build id");
    assert_eq!(id, build_id(&built), "{name}: the image's {binary} is not the release build {}", built.display());
    let sections =
        run(Path::new("/usr/bin/readelf"), &["--section-headers", "--wide", in_image.path().to_str().expect("utf-8")]);
    // (.debug_gdb_scripts is loaded with the program, not debug information.)
    let debug: Vec<&str> =
        sections.lines().filter(|l| l.contains(" .debug_") && !l.contains(".debug_gdb_scripts")).collect();
    assert!(debug.is_empty(), "{name}: {binary} still carries debug sections: {debug:?}");

    // The binary runs from the image's own loader and libraries: every
    // library it needs resolves inside the unpacked image, none on the host.
    let root = tempfile::tempdir().expect("tempdir");
    image.unpack(root.path());
    let libs = root.path().join("lib/x86_64-linux-gnu");
    let loader = root.path().join("lib64/ld-linux-x86-64.so.2");
    let exe = root.path().join(entrypoint.trim_start_matches('/'));
    let lib_path = libs.to_str().expect("utf-8 path");
    let root_path = root.path().to_str().expect("utf-8 path");
    let exe_path = exe.to_str().expect("utf-8 path");
    let listed = run(&loader, &["--inhibit-cache", "--library-path", lib_path, "--list", exe_path]);
    let resolved: Vec<&str> = listed.lines().filter_map(|l| l.split("=> ").nth(1)).collect();
    assert!(!resolved.is_empty(), "{name}: the loader listed no library: {listed}");
    for line in &resolved {
        assert!(line.starts_with(root_path), "{name}: a library comes from outside the image: {line}\n{listed}");
    }
    let printed = run(&loader, &["--inhibit-cache", "--library-path", lib_path, exe_path, "--version"]);
    assert_eq!(printed.trim(), format!("{binary} {version}"), "{name}: --version from inside the image");

    image.layer_sizes.iter().sum()
}

#[test]
fn images_hold_the_binary_its_libraries_and_nothing_else() {
    let layouts = tempfile::tempdir().expect("tempdir");
    let script = repo_root().join("e2e/image/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(layouts.path())
        .arg(release_dir())
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(status.success(), "{} failed (its output above says why)", script.display());

    let gateway = check_image(layouts.path(), "kubechat", "kubechat-gateway", "kubechat-operator");
    let operator = check_image(layouts.path(), "kubechat-operator", "kubechat-operator", "kubechat-gateway");
    println!(
        "compressed image sizes: kubechat {:.1} MiB, kubechat-operator {:.1} MiB",
        gateway as f64 / 1048576.0,
        operator as f64 / 1048576.0
    );
}

#[test]
fn image_names_and_tags_line_up_with_the_chart_and_the_crd() {
    let version = app_version();
    // Every crate takes the workspace's version, this one included.
    assert_eq!(env!("CARGO_PKG_VERSION"), version, "the workspace version (Cargo.toml) is the chart's appVersion");

    let gateway_ref = format!("ghcr.io/kubechat/kubechat:{version}");
    let operator_ref = format!("ghcr.io/kubechat/kubechat-operator:{version}");
    assert_eq!(kubechat_crds::DEFAULT_GATEWAY_IMAGE, gateway_ref, "the CRD's default gateway image");

    let values: serde_yaml::Value = serde_yaml::from_str(&read("charts/kubechat/values.yaml")).expect("values.yaml");
    let tag = values["image"]["tag"].as_str().unwrap_or("");
    let tag = if tag.is_empty() { version.as_str() } else { tag };
    let repository = values["image"]["repository"].as_str().expect("image.repository");
    assert_eq!(format!("{repository}:{tag}"), operator_ref, "the chart's operator image");

    let dockerfile = read("Dockerfile");
    for (target, reference, binary) in
        [("gateway", &gateway_ref, "kubechat-gateway"), ("operator", &operator_ref, "kubechat-operator")]
    {
        assert!(
            dockerfile.contains(&format!("--target {target} ")) && dockerfile.contains(&format!(" -t {reference} ")),
            "the Dockerfile's header shows how to build {reference} (--target {target})"
        );
        let stage = dockerfile
            .split("\nFROM ")
            .find(|s| s.lines().next().is_some_and(|l| l.ends_with(&format!(" AS {target}"))))
            .unwrap_or_else(|| panic!("the Dockerfile has no stage {target}"));
        assert!(stage.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")), "stage {target}: entrypoint");
        assert!(stage.contains("USER 65532:65532"), "stage {target}: non-root user");
        assert!(stage.contains(&format!("ARG VERSION={version}")), "stage {target}: version label");
    }
    // The build stage stubs every workspace member (cargo needs them all to
    // read the workspace), and copies the sources of those the binaries use.
    let manifest = read("Cargo.toml");
    let members: Vec<&str> = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = ["))
        .and_then(|l| l.strip_suffix(']'))
        .expect("a one-line `members = [...]` in Cargo.toml")
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .collect();
    assert!(members.len() >= 8, "{members:?}");
    for member in &members {
        assert!(
            dockerfile.contains(&format!("COPY {member}/Cargo.toml {member}/")),
            "the Dockerfile copies {member}/Cargo.toml"
        );
    }
    for used in ["config", "crds", "redis", "push", "operator", "gateway"] {
        assert!(dockerfile.contains(&format!("COPY {used}/ {used}/")), "the Dockerfile copies the sources of {used}");
    }
}
