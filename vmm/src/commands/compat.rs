//! `luo-vmm compat`: every ordered pair of a list of kernels as a cross-kernel handover
//! (kernel A boots and hands over to kernel B), the N×N matrix of verdicts as text, JSON
//! and an SVG grid coloured by verdict, and the exit status 0 only when every cell gives the
//! verdict the kernels' READMEs declare.
//!
//! What a cell is expected to give is a pure function of the two kernels' ABI strings,
//! declared once per kernel (guest-images/variants/NAME/README.md, and the reference's in
//! guest-images/variants/README.md): `compat: kho=... luo=... memfd=...`. Equal ABIs must be
//! `compatible`; otherwise the first layer whose string differs, in the order the next
//! kernel reads them (KHO root, LUO header, the memfd file handler), decides, by the rule
//! `compat-mismatch: kho=V luo=V memfd=V` of guest-images/variants/README.md (the next
//! kernel's code for a state it cannot read: Linux 7.2.13's, which every variant shares).
//! A `--source` tree declares nothing: its cells are reported, not checked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use luo_protocol::workload::{Memfds, Workload};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::commands::handover::{run_workload, HandoverRunError};
use crate::config::image::{build_script, check_variant, ImageSpec, ImageSpecError, NextSpec};
use crate::config::options::{CompatArgs, GuestOptions, InterceptOptions, OptionsError, Profile};
use crate::judge::cross::CrossVerdict;
use crate::report::KernelId;
use crate::run::guest::{GuestError, ResolvedGuest};

/// Errors of `compat`.
#[derive(Debug, Error)]
pub enum CompatError {
    /// A kernel named does not exist, or the list is too short.
    #[error("--kernels: {0}")]
    Kernels(String),
    /// A variant or source tree.
    #[error(transparent)]
    Image(#[from] ImageSpecError),
    /// Bad options.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// A kernel's README has no usable `compat:` line, or the rule is missing.
    #[error("{}: {why}", path.display())]
    Declaration {
        /// The README.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Running a cell's guest.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Running a cell's handover.
    #[error(transparent)]
    Handover(#[from] HandoverRunError),
    /// Writing the JSON or the picture.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Exit status of a matrix with a cell that did not give its declared verdict.
pub const EXIT_UNEXPECTED: u8 = 5;

/// The layers of the ABI, in the order the next kernel reads them.
pub(crate) const LAYERS: [&str; 3] = ["kho", "luo", "memfd"];

/// A kernel's ABI strings, per layer (`kho`, `luo`, `memfd`).
pub(crate) type Abi = BTreeMap<String, String>;

/// The `key=value` words after `prefix` on a line of `text` (`compat: kho=kho-v4 ...`),
/// leading spaces allowed (a README shows it as a code block). `None`: no such line.
pub(crate) fn declaration(text: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// The verdict a handover from ABI `a` to ABI `b` must give: `compatible` when every layer
/// agrees, else `mismatch`'s verdict for the first layer of [`LAYERS`] that differs
/// (`None` when the rule names no verdict for it). Pure.
pub(crate) fn expected(
    a: &Abi,
    b: &Abi,
    mismatch: &BTreeMap<String, String>,
) -> Option<CrossVerdict> {
    match LAYERS.iter().find(|l| a.get(**l) != b.get(**l)) {
        None => Some(CrossVerdict::Compatible),
        Some(layer) => mismatch
            .get(*layer)
            .and_then(|v| CrossVerdict::from_name(v)),
    }
}

/// One kernel of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatKernel {
    /// How the matrix names it: `reference`, a variant's name, or `src:DIR`.
    pub name: String,
    /// Its ABI as declared (`None`: a source tree, which declares nothing).
    pub abi: Option<Abi>,
    /// Its release and cache key, once built.
    pub id: Option<KernelId>,
}

/// One cell: kernel `from` handing over to kernel `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatCell {
    /// Index of kernel A (boots).
    pub from: usize,
    /// Index of kernel B (kexec'd into).
    pub to: usize,
    /// The verdict seen (`None`: the handover never reached B, e.g. luo-vmm failed).
    pub verdict: Option<CrossVerdict>,
    /// Why (the judge's reason, or luo-vmm's error).
    pub reason: String,
    /// What the kernels' declarations expect (`None`: undeclared).
    pub expected: Option<CrossVerdict>,
    /// The leak check: pages of preserved file state watched and written (when it ran).
    pub leak: Option<(u64, u64)>,
    /// The next kernel's LUO/KHO lines, the first few.
    pub kernel: Vec<String>,
}

impl CompatCell {
    /// Whether the cell gave what was declared (an undeclared cell passes).
    pub fn as_expected(&self) -> bool {
        self.expected.is_none_or(|e| self.verdict == Some(e))
    }
}

/// The JSON of `compat --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompatMatrix {
    /// The kernels, in row (A) and column (B) order.
    pub kernels: Vec<CompatKernel>,
    /// Every ordered pair, row by row.
    pub cells: Vec<CompatCell>,
}

impl CompatMatrix {
    /// Whether every cell gave its declared verdict.
    pub fn as_expected(&self) -> bool {
        self.cells.iter().all(CompatCell::as_expected)
    }
}

/// A cell's verdict as the matrix prints it: `compatible`, `rejected*` (* = not what was
/// declared), `-` (no verdict).
fn cell_text(c: &CompatCell) -> String {
    let v = c.verdict.map_or("-", CrossVerdict::name);
    if c.as_expected() {
        v.to_owned()
    } else {
        format!("{v}*")
    }
}

/// The matrix as text: rows are A (boots), columns B (kexec'd into); `*` marks a cell
/// that did not give its declared verdict, listed below with what was expected. Pure.
pub(crate) fn matrix_text(m: &CompatMatrix) -> String {
    let names: Vec<&str> = m.kernels.iter().map(|k| k.name.as_str()).collect();
    let w0 = names
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(0)
        .max("A \\ B".len());
    let cells: Vec<String> = m.cells.iter().map(cell_text).collect();
    let w = cells
        .iter()
        .map(String::len)
        .chain(names.iter().map(|n| n.len()))
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    let _ = write!(s, "{:<w0$}", "A \\ B");
    for n in &names {
        let _ = write!(s, "  {n:<w$}");
    }
    s.push('\n');
    for (i, n) in names.iter().enumerate() {
        let _ = write!(s, "{n:<w0$}");
        for c in m.cells.iter().zip(&cells).filter(|(c, _)| c.from == i) {
            let _ = write!(s, "  {:<w$}", c.1);
        }
        s.push('\n');
    }
    for c in m.cells.iter().filter(|c| !c.as_expected()) {
        let _ = writeln!(
            s,
            "* {} -> {}: expected {}, got {} ({})",
            names[c.from],
            names[c.to],
            c.expected.map_or("-", CrossVerdict::name),
            c.verdict.map_or("-", CrossVerdict::name),
            c.reason
        );
    }
    s
}

/// The colour of a verdict in the picture.
fn colour(v: Option<CrossVerdict>) -> &'static str {
    match v {
        Some(CrossVerdict::Compatible) => "#4caf50",
        Some(CrossVerdict::Rejected) => "#ffb300",
        Some(CrossVerdict::Reused) => "#e53935",
        Some(CrossVerdict::Crashed) => "#6a1b9a",
        Some(CrossVerdict::Accepted) => "#1e88e5",
        None => "#9e9e9e",
    }
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The matrix as an SVG grid: one square per cell coloured by its verdict, named, with a
/// cross over a cell that did not give its declared verdict; a legend below. Pure.
pub(crate) fn matrix_svg(m: &CompatMatrix, title: &str) -> String {
    let n = m.kernels.len();
    let (cell, left, top) = (110usize, 150usize, 90usize);
    let width = left + n * cell + 20;
    let height = top + n * cell + 70;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"15\">{}</text>\n<text x=\"10\" y=\"{}\">A (boots) \\ B (kexec'd into)</text>\n",
        esc(title),
        top - 10
    );
    for (i, k) in m.kernels.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            left + i * cell + cell / 2,
            top - 30,
            esc(&k.name)
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 8,
            top + i * cell + cell / 2 + 4,
            esc(&k.name)
        );
    }
    for c in &m.cells {
        let (x, y) = (left + c.to * cell, top + c.from * cell);
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{}\" stroke=\"white\" stroke-width=\"3\"/>",
            cell,
            cell,
            colour(c.verdict)
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"white\">{}</text>",
            x + cell / 2,
            y + cell / 2 + 4,
            c.verdict.map_or("-", CrossVerdict::name)
        );
        if !c.as_expected() {
            let _ = writeln!(
                s,
                "<path d=\"M{} {} L{} {} M{} {} L{} {}\" stroke=\"black\" stroke-width=\"3\"/>",
                x + 8,
                y + 8,
                x + cell - 8,
                y + cell - 8,
                x + cell - 8,
                y + 8,
                x + 8,
                y + cell - 8
            );
        }
    }
    let ly = top + n * cell + 25;
    for (i, v) in CrossVerdict::ALL.iter().enumerate() {
        let x = 10 + i * 120;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"14\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            ly - 11,
            colour(Some(*v)),
            x + 18,
            ly,
            v.name()
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"{}\">a crossed cell did not give the verdict its kernels' READMEs declare</text>\n</svg>",
        ly + 25
    );
    s
}

/// The kernels of `--kernels a,b,c` (`reference` for the reference kernel) and `--source`
/// trees, checked before anything is built. Errors: an unknown variant, fewer than one
/// kernel, a name given twice.
pub(crate) fn parse_kernels(
    list: &str,
    sources: &[PathBuf],
) -> Result<Vec<ImageSpec>, CompatError> {
    let mut specs = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let spec = if name == "reference" {
            ImageSpec::default()
        } else {
            check_variant(name)?;
            ImageSpec {
                variant: Some(name.to_owned()),
                source: None,
            }
        };
        if specs.contains(&spec) {
            return Err(CompatError::Kernels(format!("{name} is named twice")));
        }
        specs.push(spec);
    }
    for dir in sources {
        let spec = ImageSpec {
            variant: None,
            source: Some(dir.clone()),
        };
        spec.check()?;
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err(CompatError::Kernels("no kernel named".to_owned()));
    }
    Ok(specs)
}

/// How the matrix names a kernel.
fn kernel_name(spec: &ImageSpec) -> String {
    match (&spec.source, &spec.variant) {
        (Some(dir), _) => format!("src:{}", dir.display()),
        (None, Some(v)) => v.clone(),
        (None, None) => "reference".to_owned(),
    }
}

/// The README declaring `spec`'s ABI (none for a source tree).
fn readme(spec: &ImageSpec) -> Option<PathBuf> {
    let variants = build_script().with_file_name("variants");
    match (&spec.source, &spec.variant) {
        (Some(_), _) => None,
        (None, Some(v)) => Some(variants.join(v).join("README.md")),
        (None, None) => Some(variants.join("README.md")),
    }
}

/// The ABI `spec` declares (`compat:` in its README; the reference's is
/// `compat-reference:` in variants/README.md), and the mismatch rule.
fn declared_abi(spec: &ImageSpec) -> Result<Option<Abi>, CompatError> {
    let Some(path) = readme(spec) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| CompatError::Declaration {
        path: path.clone(),
        why: e.to_string(),
    })?;
    let prefix = if spec.variant.is_some() {
        "compat:"
    } else {
        "compat-reference:"
    };
    let abi = declaration(&text, prefix).ok_or_else(|| CompatError::Declaration {
        path: path.clone(),
        why: format!("no `{prefix} kho=... luo=... memfd=...` line"),
    })?;
    if let Some(missing) = LAYERS.iter().find(|l| !abi.contains_key(**l)) {
        return Err(CompatError::Declaration {
            path,
            why: format!("its `{prefix}` line names no {missing}="),
        });
    }
    Ok(Some(abi))
}

/// `compat-mismatch:` of variants/README.md.
fn mismatch_rule() -> Result<BTreeMap<String, String>, CompatError> {
    let path = build_script().with_file_name("variants").join("README.md");
    let text = std::fs::read_to_string(&path).map_err(|e| CompatError::Declaration {
        path: path.clone(),
        why: e.to_string(),
    })?;
    declaration(&text, "compat-mismatch:").ok_or(CompatError::Declaration {
        path,
        why: "no `compat-mismatch: kho=... luo=... memfd=...` line".to_owned(),
    })
}

/// The guest of a cell: kernel `spec` with the default handover workload.
fn cell_guest(spec: &ImageSpec, args: &CompatArgs, log: PathBuf) -> GuestOptions {
    GuestOptions {
        kernel: None,
        initrd: None,
        cmdline: String::new(),
        mem: args.mem,
        vcpus: 1,
        timeout: Some(args.timeout),
        console_log: Some(log),
        profile: Profile::Auto,
        no_pvh: false,
        quiet: true,
        variant: spec.variant.clone(),
        source: spec.source.clone(),
    }
}

/// Runs one cell: A boots, hands over to B; its verdict from the report's round.
fn run_cell(
    from: (usize, &ImageSpec),
    to: (usize, &ImageSpec),
    args: &CompatArgs,
    expected: Option<CrossVerdict>,
    ids: &mut [Option<KernelId>],
) -> Result<CompatCell, CompatError> {
    let names = (kernel_name(from.1), kernel_name(to.1));
    let file = |n: &str| n.replace(['/', ':'], "_");
    let log = args
        .log_dir
        .join(format!("{}-to-{}.log", file(&names.0), file(&names.1)));
    let _ = std::fs::remove_file(&log);
    let opts = cell_guest(from.1, args, log);
    opts.validate()?;
    let guest = ResolvedGuest::resolve(&opts)?;
    let next = NextSpec::Image(to.1.clone());
    let workload = Workload::Handover(Memfds::default());
    let (_, report) = run_workload(
        &opts,
        &guest,
        &InterceptOptions::default(),
        Some(&next),
        workload,
    )?;
    let round = report.rounds.first();
    if let Some(k) = round.and_then(|r| r.kernels.as_ref()) {
        ids[from.0] = Some(k.from.clone());
        ids[to.0] = Some(k.to.clone());
    }
    let cross = round.and_then(|r| r.cross.as_ref());
    Ok(CompatCell {
        from: from.0,
        to: to.0,
        verdict: cross.map(|c| c.verdict),
        reason: cross.map_or_else(
            || {
                report
                    .errors
                    .first()
                    .map_or("no handover seen".to_owned(), |e| e.to_string())
            },
            |c| c.reason.clone(),
        ),
        expected,
        leak: cross
            .and_then(|c| c.evidence.leak.as_ref())
            .map(|l| (l.pages_checked, l.written)),
        kernel: cross.map_or_else(Vec::new, |c| c.evidence.kernel.clone()),
    })
}

/// `luo-vmm compat`.
pub(crate) fn run(args: &CompatArgs) -> Result<u8, CompatError> {
    let specs = parse_kernels(&args.kernels, &args.source)?;
    let rule = mismatch_rule()?;
    let abis = specs
        .iter()
        .map(declared_abi)
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&args.log_dir).map_err(|source| CompatError::Write {
        path: args.log_dir.clone(),
        source,
    })?;
    for path in [&args.json, &Some(args.svg.clone())].into_iter().flatten() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| CompatError::Write {
                path: path.clone(),
                source,
            })?;
    }
    let mut ids: Vec<Option<KernelId>> = vec![None; specs.len()];
    let mut cells = Vec::new();
    let n = specs.len();
    for (i, a) in specs.iter().enumerate() {
        for (j, b) in specs.iter().enumerate() {
            let expected = match (&abis[i], &abis[j]) {
                (Some(x), Some(y)) => expected(x, y, &rule),
                _ => None,
            };
            eprintln!(
                "luo-vmm compat: cell {} of {}: {} -> {} (expected: {})",
                i * n + j + 1,
                n * n,
                kernel_name(a),
                kernel_name(b),
                expected.map_or("-", CrossVerdict::name)
            );
            let cell = match run_cell((i, a), (j, b), args, expected, &mut ids) {
                Ok(c) => c,
                // A cell luo-vmm could not run is reported, and the others still run.
                Err(e) => CompatCell {
                    from: i,
                    to: j,
                    verdict: None,
                    reason: e.to_string(),
                    expected,
                    leak: None,
                    kernel: Vec::new(),
                },
            };
            eprintln!(
                "luo-vmm compat: {} -> {}: {} ({})",
                kernel_name(a),
                kernel_name(b),
                cell.verdict.map_or("-", CrossVerdict::name),
                cell.reason
            );
            cells.push(cell);
        }
    }
    let matrix = CompatMatrix {
        kernels: specs
            .iter()
            .zip(abis)
            .zip(ids)
            .map(|((s, abi), id)| CompatKernel {
                name: kernel_name(s),
                abi,
                id,
            })
            .collect(),
        cells,
    };
    print!("{}", matrix_text(&matrix));
    for k in &matrix.kernels {
        if let Some(id) = &k.id {
            println!("{}: {}", k.name, id.describe());
        }
    }
    write_file(
        &args.svg,
        &matrix_svg(&matrix, "luo-vmm compat: cross-kernel handovers"),
    )?;
    eprintln!("luo-vmm: picture written to {}", args.svg.display());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&matrix).unwrap_or_default();
        write_file(path, &json)?;
        eprintln!("luo-vmm: JSON written to {}", path.display());
    }
    Ok(if matrix.as_expected() {
        0
    } else {
        EXIT_UNEXPECTED
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), CompatError> {
    std::fs::write(path, text).map_err(|source| CompatError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abi(kho: &str, luo: &str, memfd: &str) -> Abi {
        declaration(
            &format!("compat: kho={kho} luo={luo} memfd={memfd}"),
            "compat:",
        )
        .unwrap()
    }

    fn rule() -> BTreeMap<String, String> {
        declaration(
            "x\n    compat-mismatch: kho=reused luo=rejected memfd=rejected\n",
            "compat-mismatch:",
        )
        .unwrap()
    }

    #[test]
    fn the_first_layer_that_differs_decides() {
        let reference = abi("kho-v4", "luo-v5", "memfd-v2");
        let granular = abi("kho-v4;radix-v1;vmalloc-v1", "luo-v5;block-v1", "memfd-v2");
        let renamed = abi("kho-v4", "luo-v5", "memfd");
        let r = rule();
        assert_eq!(
            expected(&reference, &reference, &r),
            Some(CrossVerdict::Compatible)
        );
        assert_eq!(
            expected(&reference, &granular, &r),
            Some(CrossVerdict::Reused)
        );
        assert_eq!(
            expected(&granular, &renamed, &r),
            Some(CrossVerdict::Reused)
        );
        assert_eq!(
            expected(&renamed, &reference, &r),
            Some(CrossVerdict::Rejected)
        );
        let luo_only = abi("kho-v4", "luo-v6", "memfd-v2");
        assert_eq!(
            expected(&reference, &luo_only, &r),
            Some(CrossVerdict::Rejected)
        );
        let no_rule = BTreeMap::new();
        assert_eq!(expected(&reference, &renamed, &no_rule), None);
        assert_eq!(declaration("nothing here", "compat:"), None);
    }

    fn matrix(verdicts: &[(Option<CrossVerdict>, Option<CrossVerdict>)]) -> CompatMatrix {
        let n = if verdicts.len() == 4 { 2 } else { 1 };
        CompatMatrix {
            kernels: (0..n)
                .map(|i| CompatKernel {
                    name: ["reference", "memfd-renamed"][i].to_owned(),
                    abi: None,
                    id: None,
                })
                .collect(),
            cells: verdicts
                .iter()
                .enumerate()
                .map(|(k, &(verdict, expected))| CompatCell {
                    from: k / n,
                    to: k % n,
                    verdict,
                    reason: "why".into(),
                    expected,
                    leak: None,
                    kernel: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn the_matrix_marks_what_was_not_declared() {
        use CrossVerdict::*;
        let ok = matrix(&[
            (Some(Compatible), Some(Compatible)),
            (Some(Rejected), Some(Rejected)),
            (Some(Rejected), Some(Rejected)),
            (Some(Compatible), None),
        ]);
        assert!(ok.as_expected());
        assert_eq!(
            matrix_text(&ok),
            "A \\ B          reference      memfd-renamed\n\
             reference      compatible     rejected     \n\
             memfd-renamed  rejected       compatible   \n"
        );
        let bad = matrix(&[
            (Some(Compatible), Some(Compatible)),
            (Some(Reused), Some(Rejected)),
            (None, Some(Rejected)),
            (Some(Compatible), Some(Compatible)),
        ]);
        assert!(!bad.as_expected());
        let text = matrix_text(&bad);
        assert!(text.contains("reused*"), "{text}");
        assert!(text.contains("* reference -> memfd-renamed: expected rejected, got reused (why)"));
        assert!(text.contains("* memfd-renamed -> reference: expected rejected, got - (why)"));
        let svg = matrix_svg(&bad, "t <1>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<path").count(), 2, "two crossed cells");
        assert!(svg.contains(colour(Some(Reused))) && svg.contains("t &lt;1&gt;"));
    }

    #[test]
    fn kernels_are_checked_before_anything_runs() {
        let specs = parse_kernels("reference, abi-control", &[]).unwrap();
        assert_eq!(specs[0], ImageSpec::default());
        assert_eq!(kernel_name(&specs[1]), "abi-control");
        let e = parse_kernels("reference,nope", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("no kernel variant \"nope\""), "{e}");
        let e = parse_kernels("reference,reference", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--kernels: reference is named twice");
        assert!(parse_kernels("", &[]).is_err());
        let e = parse_kernels("", &[PathBuf::from("/nonexistent")]).unwrap_err();
        assert_eq!(e.to_string(), "--source /nonexistent: no such directory");
    }

    #[test]
    fn every_variant_of_the_tree_declares_its_abi() {
        let rule = mismatch_rule().unwrap();
        assert_eq!(rule.get("kho").map(String::as_str), Some("reused"));
        let reference = declared_abi(&ImageSpec::default()).unwrap().unwrap();
        for v in ["abi-control", "abi-granular", "memfd-renamed"] {
            let spec = ImageSpec {
                variant: Some(v.into()),
                source: None,
            };
            let abi = declared_abi(&spec).unwrap().unwrap();
            let want = if v == "abi-control" {
                CrossVerdict::Compatible
            } else if v == "abi-granular" {
                CrossVerdict::Reused
            } else {
                CrossVerdict::Rejected
            };
            assert_eq!(expected(&reference, &abi, &rule), Some(want), "{v}");
            assert_eq!(expected(&abi, &abi, &rule), Some(CrossVerdict::Compatible));
        }
    }
}
