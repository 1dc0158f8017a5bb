//! `--source DIR`: the cache key of a kernel developer's tree (guest-images/build.sh
//! `--print-key`), and the refusals made before anything is built. Runs on small fake
//! trees (a Makefile that knows `kernelversion`, a `kernel/` folder); builds and boots
//! nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{luo_vmm, text};

/// guest-images/build.sh of this source tree.
fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/build.sh")
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("luo-source-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tree that passes for a kernel tree as far as the key goes.
fn fake_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("kernel")).unwrap();
    std::fs::write(
        dir.join("Makefile"),
        "kernelversion:\n\t@echo 6.99.0-fake\n",
    )
    .unwrap();
    std::fs::write(dir.join("kernel/fork.c"), "int fork;\n").unwrap();
}

/// Runs the build script with `args` (and a private, empty cache).
fn script(cache: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(build_script())
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .expect("cannot run build.sh")
}

/// The key of `tree` (`build.sh --source TREE --print-key`).
fn key(cache: &Path, tree: &Path) -> String {
    let out = script(cache, &["--source", tree.to_str().unwrap(), "--print-key"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "--print-key failed: {stderr}");
    let key = stdout.trim().to_owned();
    assert!(key.starts_with("6.99.0-fake-src-"), "{key}");
    key
}

fn git(tree: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t", "-C"])
        .arg(tree)
        .args(args)
        .output()
        .expect("cannot run git")
        .status
        .success();
    assert!(ok, "git {args:?} failed");
}

#[test]
fn key_of_a_plain_tree_follows_paths_sizes_and_mtimes() {
    let dir = scratch("plain");
    let (cache, tree) = (dir.join("cache"), dir.join("linux"));
    fake_tree(&tree);
    let k1 = key(&cache, &tree);
    assert_eq!(key(&cache, &tree), k1, "same state, same key");
    // A touch is a change for a tree without git: make would rebuild too.
    let f = tree.join("kernel/fork.c");
    let ok = Command::new("touch")
        .args(["-d", "2001-01-01"])
        .arg(&f)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let k2 = key(&cache, &tree);
    assert_ne!(k2, k1);
    std::fs::write(tree.join("kernel/new.c"), "x").unwrap();
    assert_ne!(key(&cache, &tree), k2, "a new file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn key_of_a_git_tree_follows_head_diff_and_untracked_files() {
    if Command::new("git").arg("--version").output().is_err() {
        eprintln!("no git: skipped");
        return;
    }
    let dir = scratch("git");
    let (cache, tree) = (dir.join("cache"), dir.join("linux"));
    fake_tree(&tree);
    std::fs::write(tree.join(".gitignore"), "*.o\n").unwrap();
    git(&tree, &["init", "-q"]);
    git(&tree, &["add", "-A"]);
    git(&tree, &["commit", "-q", "-m", "base"]);
    let k1 = key(&cache, &tree);
    let f = tree.join("kernel/fork.c");
    let ok = Command::new("touch").arg(&f).status().unwrap().success();
    assert!(ok);
    assert_eq!(key(&cache, &tree), k1, "a touch changes no content");
    std::fs::write(tree.join("kernel/fork.o"), "ignored").unwrap();
    assert_eq!(key(&cache, &tree), k1, "an ignored file is no source");
    std::fs::write(&f, "int fork = 1;\n").unwrap();
    let k2 = key(&cache, &tree);
    assert_ne!(k2, k1, "an edit of a tracked file");
    std::fs::write(tree.join("kernel/new.c"), "a").unwrap();
    let k3 = key(&cache, &tree);
    assert_ne!(k3, k2, "an untracked file");
    std::fs::write(tree.join("kernel/new.c"), "b").unwrap();
    assert_ne!(key(&cache, &tree), k3, "an untracked file's content");
    std::fs::remove_file(tree.join("kernel/new.c")).unwrap();
    std::fs::write(&f, "int fork;\n").unwrap();
    assert_eq!(key(&cache, &tree), k1, "back to the committed state");
    git(&tree, &["commit", "-q", "--allow-empty", "-m", "next"]);
    assert_ne!(key(&cache, &tree), k1, "another HEAD");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn trees_that_cannot_be_built_are_refused_with_a_reason() {
    let dir = scratch("refused");
    let (cache, tree) = (dir.join("cache"), dir.join("linux"));
    fake_tree(&tree);
    let t = tree.to_str().unwrap();

    // Configured in place: kbuild would refuse the out-of-tree build.
    std::fs::write(tree.join(".config"), "CONFIG_X=y\n").unwrap();
    let out = script(&cache, &["--source", t]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("is not clean for an out-of-tree build (it has .config)"));
    assert!(
        stderr.contains(&format!("make -C {t} mrproper")),
        "{stderr}"
    );
    std::fs::remove_file(tree.join(".config")).unwrap();

    // A variant's patches never go into the user's tree.
    let out = script(
        &cache,
        &[
            "--source",
            t,
            "--variant",
            "luo-reboot-unlocked",
            "--print-key",
        ],
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("carries patches"), "{stderr}");
    assert!(stderr.contains("Only a variant's config fragment applies"));

    // No kernel tree at all: luo-vmm says so before running the script.
    let out = luo_vmm(&["image", "build", "--source", dir.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("not a kernel source tree (no Makefile at its top)"));
    let out = luo_vmm(&["boot", "--source", "/nonexistent/linux"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--source /nonexistent/linux: no such directory"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
