//! Reading the five registry files of a config directory.
//!
//! A registry is `<name>.yaml`, optionally completed (or replaced) by fragments in
//! `<name>.d/*.yaml` that are merged into it: named entries are added (a name defined
//! twice is an error naming both places), lists are appended, and any other section may
//! be set by one file only. Every merged node remembers the file it came from, so
//! diagnostics point at the right file and line.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::diag::{Diagnostic, Location};
use crate::yaml::{self, Span, SpanIndex, escape_segment};

/// Largest registry file read (a registry never needs more).
pub const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// The five registries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegistryKind {
    /// `automation_registry.yaml`.
    Automation,
    /// `pipeline_registry.yaml`.
    Pipeline,
    /// `orchestration_registry.yaml`.
    Orchestration,
    /// `monitoring_registry.yaml`.
    Monitoring,
    /// `security_registry.yaml`.
    Security,
}

impl RegistryKind {
    /// All five, in the order they are loaded and reported.
    pub const ALL: [RegistryKind; 5] = [
        RegistryKind::Automation,
        RegistryKind::Pipeline,
        RegistryKind::Orchestration,
        RegistryKind::Monitoring,
        RegistryKind::Security,
    ];

    /// `automation_registry`…
    pub fn stem(self) -> &'static str {
        match self {
            RegistryKind::Automation => "automation_registry",
            RegistryKind::Pipeline => "pipeline_registry",
            RegistryKind::Orchestration => "orchestration_registry",
            RegistryKind::Monitoring => "monitoring_registry",
            RegistryKind::Security => "security_registry",
        }
    }

    /// `automation_registry.yaml`…
    pub fn file_name(self) -> String {
        format!("{}.yaml", self.stem())
    }

    /// `automation_registry.schema.json`…
    pub fn schema_file_name(self) -> String {
        format!("{}.schema.json", self.stem())
    }
}

impl fmt::Display for RegistryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stem())
    }
}

/// One source file, kept for positions and snippets.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path as given (relative to the working directory when the config dir was).
    pub path: PathBuf,
    /// Contents.
    pub text: Arc<str>,
    line_starts: Vec<usize>,
}

impl SourceFile {
    /// A source file from its text.
    pub fn new(path: PathBuf, text: Arc<str>) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        SourceFile { path, text, line_starts }
    }

    /// The location of `span` (character columns converted to byte offsets).
    pub fn location(&self, span: Span) -> Location {
        let line_index = (span.start.line.max(1) as usize - 1).min(self.line_starts.len() - 1);
        let line_start = self.line_starts[line_index];
        let line_end = self.text[line_start..].find('\n').map_or(self.text.len(), |i| line_start + i);
        let line_text = self.text[line_start..line_end].trim_end_matches('\r');
        let byte_col =
            |col: u32| line_text.char_indices().nth(col.saturating_sub(1) as usize).map_or(line_text.len(), |(i, _)| i);
        let start = byte_col(span.start.col);
        let length = if span.end.line == span.start.line && span.end.col > span.start.col {
            byte_col(span.end.col) - start
        } else {
            line_text.len().saturating_sub(start)
        };
        Location {
            file: self.path.clone(),
            line: line_index as u32 + 1,
            column: span.start.col.max(1),
            offset: line_start + start,
            length: length.max(1),
            snippet: line_text.to_owned(),
        }
    }

    /// The location of a byte offset (for errors that give offsets, such as UTF-8 errors).
    pub fn location_of_offset(&self, offset: usize) -> Location {
        let line_index = self.line_starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let line_start = self.line_starts[line_index];
        let prefix =
            String::from_utf8_lossy(&self.text.as_bytes()[line_start..offset.min(self.text.len())]).into_owned();
        let col = prefix.chars().count() as u32 + 1;
        let line = line_index as u32 + 1;
        let span = Span { start: yaml::Pos { line, col }, end: yaml::Pos { line, col: col + 1 } };
        self.location(span)
    }
}

/// Where a subtree of a merged registry was written.
#[derive(Debug, Clone)]
struct Origin {
    file: usize,
    file_pointer: String,
}

/// A registry after reading and merging its files.
#[derive(Debug, Clone)]
pub struct RegistryDoc {
    /// Which registry.
    pub kind: RegistryKind,
    /// The merged JSON form.
    pub value: Value,
    /// Merged pointer prefix → where that subtree was written.
    origins: HashMap<String, Origin>,
}

/// Every file read and the registries built from them.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The files, indexed by position.
    pub files: Vec<SourceFile>,
    spans: Vec<SpanIndex>,
}

impl Sources {
    /// The location of the node at `pointer` of `doc` (its key when `key` is set).
    pub fn locate(&self, doc: &RegistryDoc, pointer: &str, key: bool) -> Option<Location> {
        let mut prefix = pointer;
        let origin = loop {
            if let Some(o) = doc.origins.get(prefix) {
                break o;
            }
            prefix = &prefix[..prefix.rfind('/')?];
        };
        let file_pointer = format!("{}{}", origin.file_pointer, &pointer[prefix.len()..]);
        let spans = &self.spans[origin.file];
        let span = if key { spans.key(&file_pointer) } else { spans.value(&file_pointer) };
        // An empty document has no node: point at its first line.
        let span = span.unwrap_or_default();
        Some(self.files[origin.file].location(span))
    }

    /// The location of a whole file (its first line).
    pub fn file_location(&self, file: usize) -> Location {
        self.files[file].location(Span::default())
    }

    fn add(&mut self, file: SourceFile) -> usize {
        self.files.push(file);
        self.spans.push(SpanIndex::default());
        self.files.len() - 1
    }
}

/// Reads the five registries of `dir`. Problems become diagnostics; a registry that
/// could not be read is absent from the result.
pub fn load_dir(dir: &Path) -> (Sources, Vec<RegistryDoc>, Vec<Diagnostic>) {
    let mut sources = Sources::default();
    let mut docs = Vec::new();
    let mut diags = Vec::new();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            diags.push(
                Diagnostic::error("nexus::config_dir", format!("`{}` is not a directory", dir.display()))
                    .help("pass the directory holding the five registry files with `--config DIR`"),
            );
            return (sources, docs, diags);
        }
        Err(e) => {
            diags.push(
                Diagnostic::error("nexus::config_dir", format!("cannot read config directory `{}`: {e}", dir.display()))
                    .help("pass the directory holding the five registry files with `--config DIR`, or create one with `nexus init DIR`"),
            );
            return (sources, docs, diags);
        }
    }
    // The registries are independent until they are merged here, so they are read and
    // parsed in parallel (parsing dominates the time of `nexus validate`).
    let loaded: Vec<(Sources, Option<RegistryDoc>, Vec<Diagnostic>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = RegistryKind::ALL
            .iter()
            .map(|&kind| {
                scope.spawn(move || {
                    let mut own_sources = Sources::default();
                    let mut own_diags = Vec::new();
                    let doc = load_registry(dir, kind, &mut own_sources, &mut own_diags);
                    (own_sources, doc, own_diags)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a registry loader panicked")).collect()
    });
    for (own_sources, doc, own_diags) in loaded {
        let offset = sources.files.len();
        sources.files.extend(own_sources.files);
        sources.spans.extend(own_sources.spans);
        if let Some(mut doc) = doc {
            for origin in doc.origins.values_mut() {
                origin.file += offset;
            }
            docs.push(doc);
        }
        diags.extend(own_diags);
    }
    (sources, docs, diags)
}

/// Where registry `kind` lives in `dir`: its main file (which may not exist) and its
/// `<stem>.d/*.yaml` (or `.yml`) fragments, in file-name order.
pub fn registry_files(dir: &Path, kind: RegistryKind) -> (PathBuf, Vec<PathBuf>) {
    let fragment_dir = dir.join(format!("{}.d", kind.stem()));
    let mut fragments: Vec<PathBuf> = match std::fs::read_dir(&fragment_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect(),
        Err(_) => Vec::new(),
    };
    fragments.sort();
    (dir.join(kind.file_name()), fragments)
}

fn load_registry(
    dir: &Path,
    kind: RegistryKind,
    sources: &mut Sources,
    diags: &mut Vec<Diagnostic>,
) -> Option<RegistryDoc> {
    let (main_path, fragments) = registry_files(dir, kind);
    let main_exists = std::fs::symlink_metadata(&main_path).is_ok();
    if !main_exists && fragments.is_empty() {
        diags.push(
            Diagnostic::error("nexus::missing_file", format!("missing `{}` in `{}`", kind.file_name(), dir.display()))
                .help(format!(
                    "create it (`nexus init DIR` writes a starter set), or split it into `{}.d/*.yaml`",
                    kind.stem()
                )),
        );
        return None;
    }
    let mut doc = RegistryDoc { kind, value: Value::Object(Default::default()), origins: HashMap::new() };
    let mut ok = true;
    let paths = main_exists.then_some(main_path).into_iter().chain(fragments);
    for (index, path) in paths.enumerate() {
        let Some((file, value)) = read_file(&path, sources, diags) else {
            ok = false;
            continue;
        };
        if index == 0 {
            doc.value = value;
            doc.origins.insert(String::new(), Origin { file, file_pointer: String::new() });
        } else {
            merge(&mut doc, file, value, sources, diags);
        }
    }
    ok.then_some(doc)
}

/// Reads and parses one file, reporting why it cannot be used.
fn read_file(path: &Path, sources: &mut Sources, diags: &mut Vec<Diagnostic>) -> Option<(usize, Value)> {
    let bare = |message: String, help: &str| Diagnostic::error("nexus::unreadable_file", message).help(help.to_owned());
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            diags.push(bare(
                format!("cannot read `{}`: {e}", path.display()),
                "check that the file exists and is readable",
            ));
            return None;
        }
    };
    if meta.is_dir() {
        diags.push(bare(
            format!("`{}` is a directory, but a registry file belongs here", path.display()),
            "remove or rename the directory; fragments go in `<registry>.d/`",
        ));
        return None;
    }
    if meta.len() > MAX_FILE_BYTES {
        diags.push(bare(
            format!(
                "`{}` is {} bytes, more than the {MAX_FILE_BYTES} bytes a registry may have",
                path.display(),
                meta.len()
            ),
            "split it into fragments in `<registry>.d/`",
        ));
        return None;
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            diags.push(bare(format!("cannot read `{}`: {e}", path.display()), "check the file's permissions"));
            return None;
        }
    };
    let text: Arc<str> = match String::from_utf8(bytes) {
        Ok(t) => t.into(),
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            let lossy: Arc<str> = String::from_utf8_lossy(e.as_bytes()).into_owned().into();
            let file = SourceFile::new(path.to_owned(), lossy);
            // The lossy text has the same bytes up to the first invalid one.
            let location = file.location_of_offset(offset);
            diags.push(
                Diagnostic::error("nexus::not_utf8", format!("`{}` is not valid UTF-8", path.display()))
                    .at(Some(location))
                    .expected("UTF-8 text")
                    .help("save the file as UTF-8"),
            );
            return None;
        }
    };
    let file = sources.add(SourceFile::new(path.to_owned(), text.clone()));
    match yaml::parse(&text) {
        Ok((Value::Null, _)) => {
            let what = if text.trim().is_empty() { "is empty" } else { "holds no value, only comments" };
            diags.push(
                Diagnostic::error("nexus::empty_file", format!("`{}` {what}", path.display()))
                    .at(Some(sources.file_location(file)))
                    .expected("a mapping starting with `version: 1`")
                    .help("write at least `version: 1`, or run `nexus init` for a commented starter file"),
            );
            None
        }
        Ok((value, spans)) => {
            sources.spans[file] = spans;
            Some((file, value))
        }
        Err(e) => {
            let span = Span { start: e.pos, end: yaml::Pos { line: e.pos.line, col: e.pos.col + 1 } };
            let syntax = e.message.starts_with("invalid YAML");
            diags.push(Diagnostic::error("nexus::yaml", e.message).at(Some(sources.files[file].location(span))).help(
                if syntax {
                    "fix the YAML syntax at this position"
                } else {
                    "registries are plain YAML: unique keys, no tags, aliases only to share small blocks"
                },
            ));
            None
        }
    }
}

/// Merges a fragment into a registry.
fn merge(doc: &mut RegistryDoc, file: usize, value: Value, sources: &Sources, diags: &mut Vec<Diagnostic>) {
    let Value::Object(fragment) = value else {
        diags.push(
            Diagnostic::error("nexus::type", "a registry fragment must be a mapping")
                .at(Some(sources.file_location(file)))
                .expected("a mapping such as `automations: {...}`"),
        );
        return;
    };
    let Value::Object(target) = &mut doc.value else {
        return;
    };
    for (section, part) in fragment {
        let section_ptr = format!("/{}", escape_segment(&section));
        let here = |ptr: &str, key: bool| {
            let spans = &sources.spans[file];
            let span = if key { spans.key(ptr) } else { spans.value(ptr) };
            sources.files[file].location(span.unwrap_or_default())
        };
        match (target.get_mut(&section), part) {
            (Some(existing), new) if section == "version" => {
                if *existing != new {
                    diags.push(
                        Diagnostic::error("nexus::version", format!("fragment declares `version: {new}`, but the registry is `version: {existing}`"))
                            .at(Some(here(&section_ptr, false)))
                            .help("every file of a registry has the same version; remove `version` from the fragment or fix it"),
                    );
                }
            }
            (None, part) => {
                if section == "version" {
                    continue;
                }
                target.insert(section.clone(), part);
                doc.origins.insert(section_ptr.clone(), Origin { file, file_pointer: section_ptr });
            }
            (Some(Value::Object(entries)), Value::Object(new_entries)) if is_named_section(&section) => {
                for (name, entry) in new_entries {
                    let entry_ptr = format!("{section_ptr}/{}", escape_segment(&name));
                    if entries.contains_key(&name) {
                        let first = doc
                            .origins
                            .get(&entry_ptr)
                            .or_else(|| doc.origins.get(&section_ptr))
                            .or_else(|| doc.origins.get(""))
                            .map(|o| sources.files[o.file].path.display().to_string())
                            .unwrap_or_default();
                        diags.push(
                            Diagnostic::error(
                                "nexus::duplicate_name",
                                format!("`{name}` is defined twice in `{section}`"),
                            )
                            .at(Some(here(&entry_ptr, true)))
                            .expected("a name not used elsewhere in the registry")
                            .help(format!("it is also defined in {first}; rename or remove one of them")),
                        );
                        continue;
                    }
                    entries.insert(name, entry);
                    doc.origins.insert(entry_ptr.clone(), Origin { file, file_pointer: entry_ptr });
                }
            }
            (Some(Value::Array(items)), Value::Array(new_items)) => {
                for (i, item) in new_items.into_iter().enumerate() {
                    let merged_ptr = format!("{section_ptr}/{}", items.len());
                    doc.origins.insert(merged_ptr, Origin { file, file_pointer: format!("{section_ptr}/{i}") });
                    items.push(item);
                }
            }
            (Some(_), _) => {
                diags.push(
                    Diagnostic::error(
                        "nexus::duplicate_section",
                        format!("section `{section}` is set in more than one file"),
                    )
                    .at(Some(here(&section_ptr, true)))
                    .help("set it in one file only; only named entries and lists are merged across fragments"),
                );
            }
        }
    }
}

/// Sections whose entries are merged by name across fragments.
fn is_named_section(section: &str) -> bool {
    !matches!(section, "defaults" | "limits" | "state" | "plugins" | "redaction" | "audit")
}
