//! YAML to JSON with positions.
//!
//! The registries are parsed with `saphyr-parser` (events with spans) into a
//! `serde_json::Value` plus a [`SpanIndex`] mapping every node's JSON pointer to where it
//! was written. Schema errors (instance paths) and semantic errors are mapped back to
//! file, line and column through it.
//!
//! Hostile input is refused early: aliases may not expand past [`MAX_NODES`] nodes in
//! total (the "billion laughs" bomb), nesting may not exceed [`MAX_DEPTH`], keys must be
//! unique, and only the YAML 1.2 core schema's tags are understood.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span as YamlSpan, Tag};
use serde_json::{Map, Number, Value};

/// Most nodes a document may expand to, aliases included.
pub const MAX_NODES: usize = 1_000_000;
/// Most nodes that aliases may add in total: far more than sharing a few blocks needs,
/// far less than an alias bomb wants.
pub const MAX_ALIAS_NODES: usize = 100_000;
/// Deepest nesting of mappings and sequences.
pub const MAX_DEPTH: usize = 64;

/// A position in a source file: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, counted in characters.
    pub col: u32,
}

/// A range of a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// First character.
    pub start: Pos,
    /// Just past the last character (on the same line for scalars).
    pub end: Pos,
}

impl Span {
    fn from_yaml(span: YamlSpan) -> Self {
        let pos = |m: saphyr_parser::Marker| Pos { line: m.line() as u32, col: m.col() as u32 + 1 };
        Span { start: pos(span.start), end: pos(span.end) }
    }
}

/// Where each node of a parsed document was written.
///
/// A tree parallel to the document, built without hashing or formatting anything, so
/// parsing stays close to the parser's own speed; it is only searched (by JSON
/// pointer) when a diagnostic needs a position.
#[derive(Debug, Clone, Default)]
pub struct SpanIndex {
    root: Option<SpanNode>,
}

#[derive(Debug, Clone)]
enum SpanNode {
    /// A scalar, or an alias (whose expanded content has no positions of its own).
    Leaf(Span),
    Seq(Span, Vec<SpanNode>),
    Map(Span, Vec<(String, Span, SpanNode)>),
}

impl SpanNode {
    fn span(&self) -> Span {
        match self {
            SpanNode::Leaf(s) | SpanNode::Seq(s, _) | SpanNode::Map(s, _) => *s,
        }
    }
}

impl SpanIndex {
    /// Walks `pointer`: the deepest node reached, and the key span of the last step
    /// when it went through a mapping and reached the end.
    fn walk(&self, pointer: &str) -> Option<(Span, Option<Span>)> {
        let mut node = self.root.as_ref()?;
        let mut key_span = None;
        for raw in pointer.split('/').skip(1) {
            let segment = unescape_segment(raw);
            let next = match node {
                SpanNode::Map(_, entries) => {
                    entries.iter().find(|(k, _, _)| *k == segment).map(|(_, ks, child)| (Some(*ks), child))
                }
                SpanNode::Seq(_, items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)).map(|c| (None, c)),
                SpanNode::Leaf(_) => None,
            };
            match next {
                Some((ks, child)) => {
                    key_span = ks;
                    node = child;
                }
                None => return Some((node.span(), None)),
            }
        }
        Some((node.span(), key_span))
    }

    /// The span of the value at `pointer`, or of its nearest ancestor that has one
    /// (nodes reached through an alias have the alias's span).
    pub fn value(&self, pointer: &str) -> Option<Span> {
        self.walk(pointer).map(|(value, _)| value)
    }

    /// The span of the mapping key whose value is at `pointer`, falling back to the
    /// value's span.
    pub fn key(&self, pointer: &str) -> Option<Span> {
        self.walk(pointer).map(|(value, key)| key.unwrap_or(value))
    }
}

fn unescape_segment(segment: &str) -> std::borrow::Cow<'_, str> {
    if segment.contains('~') { segment.replace("~1", "/").replace("~0", "~").into() } else { segment.into() }
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// Where.
    pub pos: Pos,
    /// What, and what to do.
    pub message: String,
}

/// Escapes one JSON-pointer segment (RFC 6901).
pub fn escape_segment(segment: &str) -> std::borrow::Cow<'_, str> {
    if segment.contains(['~', '/']) { segment.replace('~', "~0").replace('/', "~1").into() } else { segment.into() }
}

enum Frame {
    Seq {
        items: Vec<Value>,
        spans: Vec<SpanNode>,
        span: Span,
        anchor: usize,
        start_nodes: usize,
        /// Greatest nesting depth among the items.
        child_height: usize,
    },
    Map {
        map: Map<String, Value>,
        spans: Vec<(String, Span, SpanNode)>,
        /// The key just read, waiting for its value.
        key: Option<(String, Span)>,
        span: Span,
        anchor: usize,
        start_nodes: usize,
        /// Greatest nesting depth among the values.
        child_height: usize,
    },
}

struct Builder {
    stack: Vec<Frame>,
    /// Anchored values with their size in nodes and their nesting depth, so an alias is
    /// charged for what it expands to.
    anchors: HashMap<usize, (Value, usize, usize)>,
    root: Option<(Value, SpanNode)>,
    nodes: usize,
    alias_nodes: usize,
    documents: usize,
}

/// Parses one YAML document into JSON and the positions of its nodes.
/// An empty document gives `Value::Null`.
pub fn parse(text: &str) -> Result<(Value, SpanIndex), YamlError> {
    let mut b =
        Builder { stack: Vec::new(), anchors: HashMap::new(), root: None, nodes: 0, alias_nodes: 0, documents: 0 };
    for next in Parser::new_from_str(text) {
        let (event, span) = next.map_err(|e| YamlError {
            pos: Pos { line: e.marker().line() as u32, col: e.marker().col() as u32 + 1 },
            message: format!("invalid YAML: {}", e.info()),
        })?;
        b.event(event, Span::from_yaml(span))?;
    }
    Ok(match b.root {
        Some((value, spans)) => (value, SpanIndex { root: Some(spans) }),
        None => (Value::Null, SpanIndex::default()),
    })
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), YamlError> {
        let err = |message: String| YamlError { pos: span.start, message };
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(err(
                        "a registry file holds one YAML document; remove the second `---` or move it to its own file"
                            .into(),
                    ));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                if let Some(Frame::Map { key: key @ None, map, .. }) = self.stack.last_mut() {
                    let key_text = text.into_owned();
                    if map.contains_key(&key_text) {
                        return Err(err(format!("duplicate key `{key_text}`; each key may appear once in a mapping")));
                    }
                    *key = Some((key_text, span));
                    return Ok(());
                }
                let value = scalar(&text, style, tag.as_deref()).map_err(err)?;
                self.push_value(value, span, anchor, 1, 0)?;
            }
            Event::Alias(id) => {
                let (value, size, height) =
                    self.anchors.get(&id).cloned().ok_or_else(|| err("alias to an unknown anchor".into()))?;
                if self.key_expected() {
                    return Err(err("an alias cannot be used as a mapping key".into()));
                }
                self.alias_nodes += size;
                if self.alias_nodes > MAX_ALIAS_NODES {
                    return Err(err(format!(
                        "aliases expand to more than {MAX_ALIAS_NODES} nodes (an alias bomb?); refusing to expand them further"
                    )));
                }
                if self.stack.len() + height > MAX_DEPTH {
                    return Err(err(format!(
                        "this alias expands to nesting deeper than {MAX_DEPTH} levels; a registry never needs this, flatten the structure"
                    )));
                }
                self.push_value(value, span, 0, size, height)?;
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.key_expected() => {
                return Err(err("complex mapping keys are not supported; use a plain string key".into()));
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_deref(), "seq").map_err(err)?;
                self.open(span)?;
                let start_nodes = self.nodes;
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    spans: Vec::new(),
                    span,
                    anchor,
                    start_nodes,
                    child_height: 0,
                });
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_deref(), "map").map_err(err)?;
                self.open(span)?;
                let start_nodes = self.nodes;
                self.stack.push(Frame::Map {
                    map: Map::new(),
                    spans: Vec::new(),
                    key: None,
                    span,
                    anchor,
                    start_nodes,
                    child_height: 0,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, node, anchor, start_nodes, child_height) = match self.stack.pop() {
                    Some(Frame::Seq { items, spans, span, anchor, start_nodes, child_height }) => {
                        (Value::Array(items), SpanNode::Seq(span, spans), anchor, start_nodes, child_height)
                    }
                    Some(Frame::Map { map, spans, span, anchor, start_nodes, child_height, .. }) => {
                        (Value::Object(map), SpanNode::Map(span, spans), anchor, start_nodes, child_height)
                    }
                    None => return Err(err("unbalanced collection end".into())),
                };
                let size = self.nodes - start_nodes + 1;
                let height = child_height + 1;
                if anchor != 0 {
                    self.anchors.insert(anchor, (value.clone(), size, height));
                }
                self.attach(value, node, height);
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        Ok(())
    }

    fn key_expected(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }

    fn open(&mut self, span: Span) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(YamlError {
                pos: span.start,
                message: format!(
                    "nesting deeper than {MAX_DEPTH} levels; a registry never needs this, flatten the structure"
                ),
            });
        }
        self.count(1, span)
    }

    fn count(&mut self, size: usize, span: Span) -> Result<(), YamlError> {
        self.nodes += size;
        if self.nodes > MAX_NODES {
            return Err(YamlError {
                pos: span.start,
                message: format!(
                    "document expands to more than {MAX_NODES} nodes (an alias bomb?); refusing to expand aliases further"
                ),
            });
        }
        Ok(())
    }

    fn push_value(
        &mut self,
        value: Value,
        span: Span,
        anchor: usize,
        size: usize,
        height: usize,
    ) -> Result<(), YamlError> {
        // Check the budget before the (possibly huge) aliased value is attached.
        self.count(size, span)?;
        if anchor != 0 {
            self.anchors.insert(anchor, (value.clone(), size, height));
        }
        self.attach(value, SpanNode::Leaf(span), height);
        Ok(())
    }

    fn attach(&mut self, value: Value, node: SpanNode, height: usize) {
        match self.stack.last_mut() {
            None => self.root = Some((value, node)),
            Some(Frame::Seq { items, spans, child_height, .. }) => {
                *child_height = (*child_height).max(height);
                items.push(value);
                spans.push(node);
            }
            Some(Frame::Map { map, spans, key, child_height, .. }) => {
                *child_height = (*child_height).max(height);
                if let Some((k, key_span)) = key.take() {
                    spans.push((k.clone(), key_span, node));
                    map.insert(k, value);
                }
            }
        }
    }
}

fn check_collection_tag(tag: Option<&Tag>, expected: &str) -> Result<(), String> {
    match tag {
        None => Ok(()),
        Some(t) if t.is_yaml_core_schema() && t.suffix == expected => Ok(()),
        Some(t) => Err(format!("unsupported tag `{}{}`; registries use plain YAML without tags", t.handle, t.suffix)),
    }
}

/// Resolves a scalar with the YAML 1.2 core schema.
fn scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    if let Some(tag) = tag {
        if !tag.is_yaml_core_schema() {
            return Err(format!(
                "unsupported tag `{}{}`; registries use plain YAML without tags",
                tag.handle, tag.suffix
            ));
        }
        return match tag.suffix.as_str() {
            "str" => Ok(Value::String(text.to_owned())),
            "null" | "bool" | "int" | "float" => match plain(text) {
                v @ Value::Null if tag.suffix == "null" => Ok(v),
                v @ Value::Bool(_) if tag.suffix == "bool" => Ok(v),
                Value::Number(n) if tag.suffix == "float" => Ok(Value::Number(n)),
                Value::Number(n) if tag.suffix == "int" && (n.is_i64() || n.is_u64()) => Ok(Value::Number(n)),
                _ => Err(format!("`{text}` is not a valid !!{}", tag.suffix)),
            },
            other => Err(format!("unsupported tag `!!{other}`")),
        };
    }
    if style != ScalarStyle::Plain {
        return Ok(Value::String(text.to_owned()));
    }
    Ok(plain(text))
}

fn plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let first = text.as_bytes()[0];
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return Value::String(text.to_owned());
    }
    let unsigned = text.trim_start_matches('+');
    if let Some(hex) = unsigned.strip_prefix("0x") {
        if let Ok(n) = i64::from_str_radix(hex, 16) {
            return Value::Number(n.into());
        }
    } else if let Some(oct) = unsigned.strip_prefix("0o") {
        if let Ok(n) = i64::from_str_radix(oct, 8) {
            return Value::Number(n.into());
        }
    } else if unsigned.bytes().enumerate().all(|(i, c)| c.is_ascii_digit() || (i == 0 && c == b'-')) {
        if let Ok(n) = unsigned.parse::<i64>() {
            return Value::Number(n.into());
        }
        if let Ok(n) = unsigned.parse::<u64>() {
            return Value::Number(n.into());
        }
    }
    let is_float = unsigned.bytes().all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'-' | b'+'))
        && unsigned.bytes().any(|c| c.is_ascii_digit());
    if is_float && let Some(n) = unsigned.parse::<f64>().ok().and_then(Number::from_f64) {
        return Value::Number(n);
    }
    Value::String(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_follow_the_core_schema() {
        let (v, _) =
            parse("a: 1\nb: 1.5\nc: true\nd: ~\ne: '1'\nf: 0x1f\ng: hello\nh: -3\ni: 1e3\nj: 1.2.3\nk:\n").unwrap();
        assert_eq!(
            v,
            json!({"a": 1, "b": 1.5, "c": true, "d": null, "e": "1", "f": 31, "g": "hello", "h": -3, "i": 1000.0, "j": "1.2.3", "k": null})
        );
    }

    #[test]
    fn spans_point_at_keys_and_values() {
        let (_, spans) = parse("top:\n  items:\n    - name: x\n      value: 3\n").unwrap();
        assert_eq!(spans.value("/top/items/0/value").unwrap().start, Pos { line: 4, col: 14 });
        assert_eq!(spans.key("/top/items/0/value").unwrap().start, Pos { line: 4, col: 7 });
        assert_eq!(spans.value("/top/items/0/missing").unwrap().start, Pos { line: 3, col: 7 });
    }

    #[test]
    fn aliases_expand_and_keep_the_alias_position() {
        let (v, spans) = parse("a: &x {k: 1}\nb: *x\n").unwrap();
        assert_eq!(v, json!({"a": {"k": 1}, "b": {"k": 1}}));
        assert_eq!(spans.value("/b/k").unwrap().start, Pos { line: 2, col: 4 });
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos.line, 3);
        assert!(e.message.contains("duplicate key `a`"));
    }

    #[test]
    fn billion_laughs_is_refused_quickly() {
        let mut doc = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            doc.push_str(&format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 10].join(", ")));
        }
        let e = parse(&doc).unwrap_err();
        assert!(e.message.contains("alias bomb"), "{}", e.message);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let doc = "[".repeat(10_000);
        assert!(parse(&doc).is_err());
        let doc = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(parse(&doc).unwrap_err().message.contains("nesting deeper"));
    }

    #[test]
    fn aliases_cannot_nest_past_the_depth_limit() {
        let mut doc = String::from("a0: &a0 [[[[[[[[1]]]]]]]]\n");
        for i in 1..12 {
            doc.push_str(&format!("a{i}: &a{i} [[[[[[[[*a{}]]]]]]]]\n", i - 1));
        }
        let e = parse(&doc).unwrap_err();
        assert!(e.message.contains("alias expands to nesting deeper"), "{}", e.message);
    }

    #[test]
    fn second_document_and_tags_are_refused() {
        assert!(parse("a: 1\n---\nb: 2\n").unwrap_err().message.contains("one YAML document"));
        assert!(parse("a: !custom 1\n").unwrap_err().message.contains("unsupported tag"));
        assert_eq!(parse("a: !!str 1\n").unwrap().0, json!({"a": "1"}));
    }
}
