//! The code `explore` searches: the functions of the guest kernel's LUO and KHO code
//! (`kernel/liveupdate/*.c`, `mm/memfd_luo.c`), as the image build records them beside the
//! kernel (guest-images/build.sh, `liveupdate_code`): `liveupdate/functions` (one
//! `FILE FUNCTION` line per text symbol of those object files, from `nm`) and a copy of
//! each file's source, whose definitions say which functions return an error code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
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
    /// How `fail` mode makes it fail ([`failure`]); `None`: it has no failure a caller
    /// reads.
    pub failure: Option<Failure>,
    /// Its definition is `__init`: it runs only while a kernel boots (in a handover, in the
    /// next kernel's boot, before user space).
    pub init: bool,
}

/// -EIO, what a function made to fail returns (as an error code or inside `ERR_PTR`).
pub const EIO: i64 = -5;

/// How a function made to fail returns to its caller (`rax`, as the kernel's
/// `override_function_with_return`), read from its definition ([`failure`]).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// `-EIO` from a function returning an error code (`int`, `long`, `ssize_t`).
    #[default]
    ErrorCode,
    /// `ERR_PTR(-EIO)` from a pointer function whose failures are `ERR_PTR`s (its callers
    /// test `IS_ERR()`).
    ErrPtr,
    /// `NULL` from a pointer function that fails with `NULL`.
    Null,
}

impl Failure {
    /// The value in `rax`: -5 for `-EIO` and `ERR_PTR(-EIO)`, 0 for `NULL`.
    pub fn ret(self) -> i64 {
        match self {
            Failure::ErrorCode | Failure::ErrPtr => EIO,
            Failure::Null => 0,
        }
    }

    /// As C writes it: `-EIO`, `ERR_PTR(-EIO)`, `NULL`.
    pub fn c(self) -> &'static str {
        match self {
            Failure::ErrorCode => "-EIO",
            Failure::ErrPtr => "ERR_PTR(-EIO)",
            Failure::Null => "NULL",
        }
    }

    /// Whether it is the default (serde leaves it out of a trial).
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    pub(crate) fn is_error_code(&self) -> bool {
        *self == Failure::ErrorCode
    }
}

/// A function `fail` mode makes fail, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallible {
    /// Its symbol.
    pub name: String,
    /// What it returns when made to fail.
    pub failure: Failure,
    /// `__init`: made to fail in the next kernel's boot ([`CodeFunction::init`]).
    pub init: bool,
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

/// Storage classes and attributes a declaration's return type is written with.
const NOT_THE_TYPE: [&str; 11] = [
    "static",
    "inline",
    "extern",
    "noinline",
    "notrace",
    "__init",
    "__exit",
    "__maybe_unused",
    "__must_check",
    "__always_inline",
    "__cold",
];

/// The declarations of `name` in C `source` (kernel style: at column 0, the type before
/// the name on its line or alone on the line before).
fn declarations<'a>(lines: &'a [&'a str], name: &'a str) -> impl Iterator<Item = Declaration> + 'a {
    lines.iter().enumerate().filter_map(move |(i, line)| {
        // Definitions and declarations start at column 0; calls are indented.
        if line.starts_with(|c: char| c.is_whitespace()) || line.starts_with('#') {
            return None;
        }
        let at = find_call(line, name)?;
        let before = line[..at].trim();
        let ty = if before.is_empty() {
            // `static int\nname(...)`
            lines.get(i.checked_sub(1)?)?.trim()
        } else {
            before
        };
        // `struct page *__init name(`: the star is the type's, the attribute is not.
        let spaced = ty.replace('*', " * ");
        let words: Vec<&str> = spaced
            .split_whitespace()
            .filter(|w| !NOT_THE_TYPE.contains(w))
            .collect();
        let init = spaced.split_whitespace().any(|w| w == "__init");
        (!words.is_empty()).then(|| Declaration {
            line: i,
            ty: words.join(" ").replace("* *", "**"),
            init,
        })
    })
}

/// One declaration or definition of a function, as [`declarations`] finds it.
struct Declaration {
    /// The index of the line its name is on.
    line: usize,
    /// Its return type, storage classes and attributes dropped.
    ty: String,
    /// Marked `__init`: it runs only while the kernel boots (its text is freed after).
    init: bool,
}

/// The return type of `name`'s definition or declaration in C `source` (kernel style:
/// the type before the name on its line, or alone on the line before), with storage
/// classes and attributes dropped; `None` when the name is never declared at the start of
/// a line.
pub(crate) fn return_type(source: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    let first = declarations(&lines, name).next();
    first.map(|d| d.ty)
}

/// `name`'s definition in `source`, kernel style.
pub(crate) struct Definition<'a> {
    /// Marked `__init`.
    pub(crate) init: bool,
    /// Its parameter list (with what precedes it on its lines).
    pub(crate) params: String,
    /// Its body, from the `{` at column 0 to before the `}` at column 0.
    pub(crate) body: Vec<&'a str>,
    /// The `Return:` section of its kernel-doc comment (`/** ... */` right above it), or
    /// empty.
    pub(crate) doc_return: String,
}

/// The `Return:` section of the kernel-doc comment that ends on the line before
/// `lines[at]` (the comment's lines from `Return:` to its end, joined by spaces).
fn doc_return(lines: &[&str], at: usize) -> String {
    let Some(end) = at.checked_sub(1).filter(|&e| lines[e].trim() == "*/") else {
        return String::new();
    };
    let Some(start) = lines[..end]
        .iter()
        .rposition(|l| l.trim_start().starts_with("/**"))
    else {
        return String::new();
    };
    let doc: Vec<&str> = lines[start..end]
        .iter()
        .map(|l| l.trim().trim_start_matches(['/', '*']).trim())
        .collect();
    doc.iter()
        .position(|l| l.starts_with("Return:"))
        .map(|k| doc[k..].join(" "))
        .unwrap_or_default()
}

/// `name`'s definition in `source` (kernel style: the body from a `{` to a `}` at column
/// 0), or `None` when `source` only declares it.
pub(crate) fn definition<'a>(source: &'a str, name: &str) -> Option<Definition<'a>> {
    let lines: Vec<&str> = source.lines().collect();
    for Declaration { line: i, init, .. } in declarations(&lines, name) {
        // The type may be alone on the line before the name's.
        let first = if lines[i].starts_with(|c: char| c.is_ascii_alphabetic())
            && find_call(lines[i], name) == Some(0)
        {
            i.saturating_sub(1)
        } else {
            i
        };
        let mut params = String::new();
        for (j, line) in lines.iter().enumerate().skip(i) {
            if line.starts_with('{') {
                let end = lines[j..].iter().position(|l| l.starts_with('}'))?;
                return Some(Definition {
                    init,
                    params,
                    body: lines[j..j + end].to_vec(),
                    doc_return: doc_return(&lines, first),
                });
            }
            params.push_str(line.trim());
            params.push(' ');
            if line.trim_end().ends_with(';') {
                // A prototype: look for the definition further on.
                break;
            }
        }
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

/// What a pointer function's definition says of its failures: its kernel-doc `Return:`
/// naming `ERR_PTR` or "NULL on failure/error", else its body: `ERR_PTR(...)` or
/// `ERR_CAST(...)` returned, `NULL` returned, or the result of a call to `callee`
/// returned as it is (then what that callee's failures are), in that order.
fn pointer_failure(
    def: &Definition<'_>,
    callee: &dyn Fn(&str) -> Option<Failure>,
) -> Option<Failure> {
    let doc = def.doc_return.to_ascii_lowercase();
    if doc.contains("err_ptr") {
        return Some(Failure::ErrPtr);
    }
    if doc.contains("null") && (doc.contains("fail") || doc.contains("error")) {
        return Some(Failure::Null);
    }
    let returns: Vec<&str> = def
        .body
        .iter()
        .filter_map(|l| l.trim().strip_prefix("return "))
        .collect();
    if returns
        .iter()
        .any(|r| r.starts_with("ERR_PTR(") || r.starts_with("ERR_CAST("))
    {
        return Some(Failure::ErrPtr);
    }
    if returns.iter().any(|r| r.trim_end() == "NULL;") {
        return Some(Failure::Null);
    }
    returns.iter().find_map(|r| {
        let end = r.find('(')?;
        let name = &r[..end];
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            .then(|| callee(name))
            .flatten()
    })
}

/// How `fail` mode makes each of `functions` (`(name, source of its file)`) fail:
///
/// - a function returning an error code (`int`, `long`, `ssize_t`: [`is_error_code`])
///   returns -EIO, unless it is a `.release` handler ([`is_release_handler`]);
/// - a pointer function returns `ERR_PTR(-EIO)` or `NULL` as its kernel-doc says it
///   fails (`Return: ... NULL on failure`), else `ERR_PTR(-EIO)` when its body returns
///   `ERR_PTR`s, else `NULL` when it returns `NULL` (`return NULL;`), else what a
///   function whose result it returns as it is does (`return kho_alloc_preserve(...)`:
///   `ERR_PTR`), followed through the whole code;
/// - not an iterator (a pointer function with a `*_it *` parameter: `NULL` is where its
///   iteration ends, not a failure), nor anything else (`void`, `bool`, unsigned).
pub(crate) fn failures<'a>(functions: &[(&'a str, &'a str)]) -> BTreeMap<&'a str, Failure> {
    let mut out = BTreeMap::new();
    let mut pointers: Vec<(&str, Definition<'a>)> = Vec::new();
    for &(name, src) in functions {
        let Some(ty) = return_type(src, name) else {
            continue;
        };
        if is_error_code(&ty) {
            if !is_release_handler(src, name) {
                out.insert(name, Failure::ErrorCode);
            }
        } else if ty.ends_with('*') {
            if let Some(def) = definition(src, name) {
                if !def.params.contains("_it *") {
                    pointers.push((name, def));
                }
            }
        }
    }
    // `return f(...)` takes f's failure: repeat until nothing changes (each round adds a
    // function or ends, so at most one round per function).
    loop {
        let mut added = false;
        for (name, def) in &pointers {
            if out.contains_key(name) {
                continue;
            }
            let known = out.clone();
            if let Some(f) = pointer_failure(def, &|c| known.get(c).copied()) {
                out.insert(*name, f);
                added = true;
            }
        }
        if !added {
            return out;
        }
    }
}

/// The messages LUO panics with on purpose: the format strings of its
/// `luo_restore_fail(...)` calls in `source` (kernel/liveupdate/luo_internal.h: a failed
/// deserialization panics, "continuing the boot process after a failure is dangerous
/// because it could lead to leaks of private data"), each up to its first conversion
/// (`%`), trimmed.
pub(crate) fn restore_fail_messages(source: &str) -> Vec<String> {
    source
        .match_indices("luo_restore_fail(")
        .filter_map(|(at, call)| {
            let rest = source[at + call.len()..].trim_start().strip_prefix('"')?;
            let end = rest.find(['"', '%']).unwrap_or(rest.len());
            let text = rest[..end].trim();
            (!text.is_empty()).then(|| text.to_owned())
        })
        .collect()
}

/// [`restore_fail_messages`] of every source the kernel's list names (none when it has no
/// list).
pub(crate) fn read_restore_fail_messages(kernel_dir: &Path) -> Vec<String> {
    let Ok((_, sources)) = read_sources(kernel_dir) else {
        return vec![];
    };
    let messages: BTreeSet<String> = sources
        .values()
        .flat_map(|src| restore_fail_messages(src))
        .collect();
    messages.into_iter().collect()
}

/// The kernel's list of LUO/KHO functions, `(file, function)`, and the source of each file
/// it names, by path.
type Sources = (Vec<(String, String)>, BTreeMap<String, String>);

/// The kernel's [`Sources`], as its build recorded them; nothing outside the recorded tree
/// is read.
fn read_sources(kernel_dir: &Path) -> Result<Sources, CodeError> {
    let dir = kernel_dir.join("liveupdate");
    let list = dir.join("functions");
    if !list.is_file() {
        return Err(CodeError::Missing(kernel_dir.to_owned()));
    }
    let functions = parse_functions(&read_small(&list)?, &list)?;
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for (file, _) in &functions {
        if !sources.contains_key(file) {
            // The list names files relative to the tree; nothing outside `dir` is read.
            if file.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(CodeError::Read {
                    path: list.clone(),
                    why: format!("{file:?} is not a path inside the kernel tree"),
                });
            }
            let text = read_small(&dir.join(file))?;
            sources.insert(file.clone(), text);
        }
    }
    Ok((functions, sources))
}

/// The LUO/KHO functions of the kernel whose build directory (`kernels/<key>/`, where its
/// vmlinux is) is `kernel_dir`.
pub(crate) fn read_code(kernel_dir: &Path) -> Result<Vec<CodeFunction>, CodeError> {
    let (functions, sources) = read_sources(kernel_dir)?;
    let with_source: Vec<(&str, &str)> = functions
        .iter()
        .filter_map(|(file, name)| Some((name.as_str(), sources.get(file)?.as_str())))
        .collect();
    let failure = failures(&with_source);
    Ok(functions
        .iter()
        .map(|(file, name)| CodeFunction {
            file: file.clone(),
            name: name.clone(),
            failure: failure.get(name.as_str()).copied(),
            init: sources
                .get(file)
                .and_then(|src| definition(src, name))
                .is_some_and(|d| d.init),
        })
        .collect())
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
        // `__init` is an attribute, also when glued to the star; it marks a boot function.
        let glued = "static struct page *__init kho_get_preserved_page(phys_addr_t phys)\n{\n}\n";
        assert_eq!(
            return_type(glued, "kho_get_preserved_page").as_deref(),
            Some("struct page *")
        );
        assert!(definition(glued, "kho_get_preserved_page").unwrap().init);
        assert!(
            definition(SOURCE, "luo_session_setup_outgoing")
                .unwrap()
                .init
        );
        assert!(!definition(SOURCE, "luo_session_serialize").unwrap().init);
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

    const POINTERS: &str = r#"
static struct luo_session *luo_session_alloc(const char *name);

static struct luo_session *luo_session_alloc(const char *name)
{
	struct luo_session *session = kzalloc(sizeof(*session), GFP_KERNEL);

	if (!session)
		return ERR_PTR(-ENOMEM);
	return session;
}

/**
 * kho_restore_folio - recreates the folio from the preserved memory.
 * @phys: physical address of the folio.
 *
 * Return: pointer to the struct folio on success, NULL on failure.
 */
struct folio *kho_restore_folio(phys_addr_t phys)
{
	struct page *page = kho_restore_page(phys, true);

	return page ? page_folio(page) : NULL;
}

static struct page *
kho_restore_page(phys_addr_t phys, bool is_folio)
{
	if (!pfn_valid(PHYS_PFN(phys)))
		return NULL;
	return pfn_to_page(PHYS_PFN(phys));
}

static struct kho_block_header_ser *kho_block_alloc_ser(struct kho_block_set *bs)
{
	return luo_session_alloc(NULL);
}

void *kho_block_set_it_read_entry(struct kho_block_set_it *it)
{
	if (!it->block)
		return NULL;
	return kho_block_entry(it, it->i++);
}

static void *kho_block_entries(struct kho_block *block)
{
	return (void *)(block->ser + 1);
}

static const void *kho_get_fdt(void)
{
	return kho_in.fdt_phys ? phys_to_virt(kho_in.fdt_phys) : NULL;
}

int luo_release(struct inode *inode, struct file *file)
{
	return 0;
}

long luo_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	return -ENOTTY;
}

static const struct file_operations fops = {
	.release = luo_release,
};
"#;

    #[test]
    fn pointer_functions_fail_the_way_their_bodies_do() {
        let names = [
            "luo_session_alloc",
            "kho_restore_folio",
            "kho_restore_page",
            "kho_block_alloc_ser",
            "kho_block_set_it_read_entry",
            "kho_block_entries",
            "kho_get_fdt",
            "luo_release",
            "luo_ioctl",
        ];
        let functions: Vec<(&str, &str)> = names.iter().map(|n| (*n, POINTERS)).collect();
        let got = failures(&functions);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [
                // Its result, returned as it is, is luo_session_alloc's.
                ("kho_block_alloc_ser", Failure::ErrPtr),
                // From its kernel-doc: its body's NULL is in a conditional.
                ("kho_restore_folio", Failure::Null),
                ("kho_restore_page", Failure::Null),
                ("luo_ioctl", Failure::ErrorCode),
                ("luo_session_alloc", Failure::ErrPtr),
            ]
        );
        assert_eq!(Failure::ErrPtr.ret(), -5);
        assert_eq!(Failure::Null.ret(), 0);
        assert_eq!(Failure::ErrorCode.c(), "-EIO");
        // The prototype is skipped for the definition.
        let def = definition(POINTERS, "luo_session_alloc").unwrap();
        assert_eq!(
            def.params.trim(),
            "static struct luo_session *luo_session_alloc(const char *name)"
        );
        assert!(def.body.iter().any(|l| l.contains("ERR_PTR(-ENOMEM)")));
        assert!(def.doc_return.is_empty());
        let doc = definition(POINTERS, "kho_restore_folio")
            .unwrap()
            .doc_return;
        assert_eq!(
            doc,
            "Return: pointer to the struct folio on success, NULL on failure."
        );
        assert!(definition("int f(void);\n", "f").is_none());
        // An unterminated body is no definition.
        assert!(definition("int f(void)\n{\n\treturn 0;\n", "f").is_none());
    }

    #[test]
    fn deliberate_restore_panics_are_read_from_the_source() {
        let src = "\terr = luo_early_startup();\n\tif (err) {\n\t\tluo_restore_fail(\"The incoming tree failed to initialize properly [%pe], disabling live update\\n\",\n\t\t\t\t ERR_PTR(err));\n\t}\n#define luo_restore_fail(__fmt, ...) panic(__fmt, ##__VA_ARGS__)\n";
        assert_eq!(
            restore_fail_messages(src),
            ["The incoming tree failed to initialize properly ["]
        );
        assert!(restore_fail_messages("luo_restore_fail(\"%s\", x)").is_empty());
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
                .map(|f| (f.name.as_str(), f.failure))
                .collect::<Vec<_>>(),
            [
                ("f", Some(Failure::ErrorCode)),
                ("g", None),
                ("h_release", None)
            ]
        );
        std::fs::write(dir.join("liveupdate/functions"), "../etc/passwd.c f\n").unwrap();
        assert!(matches!(read_code(&dir), Err(CodeError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
