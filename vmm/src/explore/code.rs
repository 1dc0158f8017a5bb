//! The code `explore` searches: the functions of the guest kernel's LUO and KHO code
//! (`kernel/liveupdate/*.c`, `mm/memfd_luo.c`), as the image build records them beside the
//! kernel (guest-images/build.sh, `liveupdate_code`): `liveupdate/functions` (one
//! `FILE FUNCTION` line per text symbol of those object files, from `nm`) and a copy of
//! each file's source, whose definitions say which functions return an error code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Largest `functions` file or source file read (the real ones are tens of KiB).
const MAX_FILE: u64 = 4 << 20;

/// Errors of reading a kernel's LUO/KHO code list.
#[derive(Debug, Error)]
pub enum CodeError {
    /// The kernel was built without the list (not by this luo-vmm's build script).
    #[error("{0}: no list of the kernel's LUO/KHO functions beside it (built by an older luo-vmm, or not by `luo-vmm image build`): rebuild the image, or give --points FILE")]
    Missing(PathBuf),
    /// A file that cannot be read.
    #[error("cannot read {path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A line that is not `FILE FUNCTION`.
    #[error("{path}:{line}: not `FILE FUNCTION`")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
}

/// One function of the LUO/KHO code.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CodeFunction {
    /// Its source file, relative to the kernel tree (`kernel/liveupdate/luo_file.c`).
    pub file: String,
    /// Its symbol.
    pub name: String,
    /// Its definition returns an error code (`int`, `long`, `ssize_t`) that someone reads
    /// (not a `.release` handler, [`is_release_handler`]): `fail` mode makes it return
    /// -EIO.
    pub fallible: bool,
}

/// Parses `liveupdate/functions`: `FILE FUNCTION` per line; names sorted and unique per
/// file (a static function of one name in two files is two functions).
pub(crate) fn parse_functions(text: &str, path: &Path) -> Result<Vec<(String, String)>, CodeError> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(file), Some(name), None) = (words.next(), words.next(), words.next()) else {
            return Err(CodeError::Syntax {
                path: path.to_owned(),
                line: i + 1,
            });
        };
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        };
        if !ident(name) || !file.ends_with(".c") {
            return Err(CodeError::Syntax {
                path: path.to_owned(),
                line: i + 1,
            });
        }
        out.insert((file.to_owned(), name.to_owned()));
    }
    Ok(out.into_iter().collect())
}

/// The return type of `name`'s definition or declaration in C `source` (kernel style:
/// the type before the name on its line, or alone on the line before), with storage
/// classes and attributes dropped; `None` when the name is never declared at the start of
/// a line.
pub(crate) fn return_type(source: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        // Definitions and declarations start at column 0; calls are indented.
        if line.starts_with(|c: char| c.is_whitespace()) || line.starts_with('#') {
            continue;
        }
        let Some(at) = find_call(line, name) else {
            continue;
        };
        let before = line[..at].trim();
        let ty = if before.is_empty() {
            // `static int\nname(...)`
            lines.get(i.checked_sub(1)?)?.trim()
        } else {
            before
        };
        let words: Vec<&str> = ty
            .split_whitespace()
            .filter(|w| {
                !matches!(
                    *w,
                    "static"
                        | "inline"
                        | "extern"
                        | "noinline"
                        | "notrace"
                        | "__init"
                        | "__exit"
                        | "__maybe_unused"
                        | "__must_check"
                        | "__always_inline"
                        | "__cold"
                )
            })
            .collect();
        if words.is_empty() {
            continue;
        }
        return Some(words.join(" "));
    }
    None
}

/// Where `name(` starts in `line` as a whole word.
fn find_call(line: &str, name: &str) -> Option<usize> {
    let pat = format!("{name}(");
    let mut from = 0;
    while let Some(k) = line[from..].find(&pat) {
        let at = from + k;
        let prev = line[..at].chars().next_back();
        if prev.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
            return Some(at);
        }
        from = at + pat.len();
    }
    None
}

/// Whether a function of return type `ty` returns an error code (0 or -errno): `int`,
/// `long`, `ssize_t` and their `signed` spellings; not pointers, `void`, `bool`, unsigned.
pub(crate) fn is_error_code(ty: &str) -> bool {
    !ty.contains('*')
        && matches!(
            ty,
            "int" | "long" | "ssize_t" | "signed int" | "long int" | "signed long"
        )
}

/// Whether `source` installs `name` as a `.release` handler (`.release = name,` in an
/// operations table). The VFS ignores what a `file_operations.release` returns
/// (`__fput()`, fs/file_table.c) and its work is not optional, so making it return an
/// error at entry is no failure the kernel can have: it only skips the release (the
/// luo_session_release trials of a reference exploration, docs/explore.md).
pub(crate) fn is_release_handler(source: &str, name: &str) -> bool {
    source.match_indices(".release").any(|(at, field)| {
        let rest = &source[at + field.len()..];
        let Some(value) = rest.trim_start().strip_prefix('=') else {
            return false;
        };
        let value = value.trim_start();
        let end = value
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(value.len());
        &value[..end] == name
    })
}

/// The LUO/KHO functions of the kernel whose build directory (`kernels/<key>/`, where its
/// vmlinux is) is `kernel_dir`.
pub(crate) fn read_code(kernel_dir: &Path) -> Result<Vec<CodeFunction>, CodeError> {
    let dir = kernel_dir.join("liveupdate");
    let list = dir.join("functions");
    if !list.is_file() {
        return Err(CodeError::Missing(kernel_dir.to_owned()));
    }
    let functions = parse_functions(&read_small(&list)?, &list)?;
    let mut sources: std::collections::BTreeMap<String, String> = Default::default();
    let mut out = Vec::with_capacity(functions.len());
    for (file, name) in functions {
        if !sources.contains_key(&file) {
            // The list names files relative to the tree; nothing outside `dir` is read.
            if file.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(CodeError::Read {
                    path: list.clone(),
                    why: format!("{file:?} is not a path inside the kernel tree"),
                });
            }
            let text = read_small(&dir.join(&file))?;
            sources.insert(file.clone(), text);
        }
        let fallible = sources.get(&file).is_some_and(|src| {
            return_type(src, &name).is_some_and(|ty| is_error_code(&ty))
                && !is_release_handler(src, &name)
        });
        out.push(CodeFunction {
            file,
            name,
            fallible,
        });
    }
    Ok(out)
}

fn read_small(path: &Path) -> Result<String, CodeError> {
    let err = |why: String| CodeError::Read {
        path: path.to_owned(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_FILE {
        return Err(err(format!("larger than {MAX_FILE} bytes")));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"
static int luo_session_insert(struct luo_session_header *sh,
			      struct luo_session *session)
{
	return luo_session_insert_one(sh, session);
}

static struct luo_session *luo_session_alloc(const char *name)
{
	return NULL;
}

int luo_session_serialize(void)
{
	int err = luo_session_insert(NULL, NULL);
	return err;
}

static void
luo_session_remove(struct luo_session *session)
{
}

static long
memfd_luo_retrieve(struct liveupdate_file_op_args *args)
{
	return 0;
}

bool luo_session_quiesce(void);
static int __init luo_session_setup_outgoing(void *fdt_out)
{
	return 0;
}
"#;

    #[test]
    fn return_types_come_from_definitions_not_calls() {
        assert_eq!(
            return_type(SOURCE, "luo_session_insert").as_deref(),
            Some("int")
        );
        assert_eq!(
            return_type(SOURCE, "luo_session_alloc").as_deref(),
            Some("struct luo_session *")
        );
        assert_eq!(
            return_type(SOURCE, "luo_session_remove").as_deref(),
            Some("void")
        );
        assert_eq!(
            return_type(SOURCE, "memfd_luo_retrieve").as_deref(),
            Some("long")
        );
        assert_eq!(
            return_type(SOURCE, "luo_session_setup_outgoing").as_deref(),
            Some("int")
        );
        assert_eq!(
            return_type(SOURCE, "luo_session_quiesce").as_deref(),
            Some("bool")
        );
        // Only called (indented), never defined here.
        assert_eq!(return_type(SOURCE, "luo_session_insert_one"), None);
        // A longer name that ends with this one is not this one.
        assert_eq!(return_type("int xluo_a(void)\n", "luo_a"), None);
    }

    #[test]
    fn error_codes_are_signed_integers() {
        for ty in ["int", "long", "ssize_t"] {
            assert!(is_error_code(ty), "{ty}");
        }
        for ty in [
            "void",
            "bool",
            "struct luo_session *",
            "int *",
            "u64",
            "unsigned long",
        ] {
            assert!(!is_error_code(ty), "{ty}");
        }
    }

    #[test]
    fn the_function_list_parses_and_refuses_junk() {
        let p = Path::new("functions");
        let got = parse_functions(
            "kernel/liveupdate/luo_file.c luo_file_freeze\n\nmm/memfd_luo.c memfd_luo_preserve\nkernel/liveupdate/luo_file.c luo_file_freeze\n",
            p,
        )
        .unwrap();
        assert_eq!(
            got,
            [
                (
                    "kernel/liveupdate/luo_file.c".into(),
                    "luo_file_freeze".into()
                ),
                ("mm/memfd_luo.c".into(), "memfd_luo_preserve".into()),
            ]
        );
        for bad in [
            "luo_file_freeze",
            "a.c b c",
            "a.o luo_file_freeze",
            "a.c x;y",
        ] {
            assert!(
                matches!(
                    parse_functions(bad, p),
                    Err(CodeError::Syntax { line: 1, .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn release_handlers_are_found_in_operations_tables() {
        let src = "static const struct file_operations fops = {\n\t.owner = THIS_MODULE,\n\
                   \t.release\t= luo_release,\n\t.unlocked_ioctl = luo_ioctl,\n};\n\
                   static struct x y = { .release = other_release };\n";
        assert!(is_release_handler(src, "luo_release"));
        assert!(!is_release_handler(src, "luo_ioctl"));
        assert!(!is_release_handler(src, "luo_rel"));
        assert!(is_release_handler(src, "other_release"));
        // `.release_x = f` is another field.
        assert!(!is_release_handler(".release_x = f,", "f"));
    }

    #[test]
    fn a_kernel_without_the_list_is_named() {
        let dir = std::env::temp_dir().join(format!("luo-code-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("liveupdate/kernel")).unwrap();
        assert!(matches!(read_code(&dir), Err(CodeError::Missing(_))));
        std::fs::write(
            dir.join("liveupdate/functions"),
            "kernel/a.c f\nkernel/a.c g\nkernel/a.c h_release\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("liveupdate/kernel/a.c"),
            "int f(void)\n{\n}\nvoid g(void)\n{\n}\nstatic int h_release(struct inode *i, struct file *f)\n{\n}\n\
             static const struct file_operations h_fops = {\n\t.release\t= h_release,\n};\n",
        )
        .unwrap();
        let code = read_code(&dir).unwrap();
        assert_eq!(
            code.iter()
                .map(|f| (f.name.as_str(), f.fallible))
                .collect::<Vec<_>>(),
            [("f", true), ("g", false), ("h_release", false)]
        );
        std::fs::write(dir.join("liveupdate/functions"), "../etc/passwd.c f\n").unwrap();
        assert!(matches!(read_code(&dir), Err(CodeError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
