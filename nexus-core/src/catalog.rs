//! The catalog: which component kinds exist, and how to check and build each.
//!
//! A value, not a global (DESIGN.md §3). Facade crates register the statically linked
//! kinds into it; the plugin loader registers foreign kinds the same way, so validation
//! and the engine cannot tell them apart.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};
use crate::traits::{MonitorAdapter, Notifier, Runner, ServiceAdapter};

/// A problem found in a component's spec by its pure validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecIssue {
    /// Path inside the spec (`["mounts", "0", "source"]`), empty for the whole spec.
    pub path: Vec<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl SpecIssue {
    /// An issue at `path` inside the spec.
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        SpecIssue { path: path.iter().map(|s| (*s).to_owned()).collect(), message: message.into() }
    }
}

/// A statically linked component kind: its spec type, pure validation and factory.
///
/// `validate` must be pure (no I/O, no network, no secrets): `nexus validate` calls it.
/// `build` does the environment-dependent work. Strings in a spec may hold templates
/// (`{{ env.vars.host }}`), so `validate` must accept them where a template can stand.
pub trait ComponentKind: 'static {
    /// The trait object this kind builds (`dyn Runner`…).
    type Trait: ?Sized;
    /// The spec: serde + schemars, `deny_unknown_fields`, documented fields.
    type Spec: DeserializeOwned + Serialize + JsonSchema;
    /// The kind's name as written in the registries.
    const KIND: &'static str;
    /// One line describing the kind.
    const DESCRIPTION: &'static str;
    /// Named actions a pipeline step may call (service adapters only).
    const ACTIONS: &'static [&'static str] = &[];
    /// A valid, representative spec (shown by `nexus init` and the docs).
    fn example() -> Self::Spec;
    /// Checks what the schema cannot (URL syntax, exclusive options…).
    fn validate(spec: &Self::Spec) -> Vec<SpecIssue> {
        let _ = spec;
        Vec::new()
    }
    /// Builds the component.
    fn build(spec: Self::Spec) -> Result<Arc<Self::Trait>>;
}

type ValidateFn = Arc<dyn Fn(&serde_json::Value) -> Vec<SpecIssue> + Send + Sync>;
type BuildFn<T> = Arc<dyn Fn(serde_json::Value) -> Result<Arc<T>> + Send + Sync>;

/// Everything the catalog knows about one kind.
pub struct KindDescriptor<T: ?Sized> {
    /// The kind's name.
    pub kind: String,
    /// One line describing it.
    pub description: String,
    /// Where it comes from: `built-in`, or the plugin library's path.
    pub origin: String,
    /// JSON Schema of its spec.
    pub spec_schema: serde_json::Value,
    /// A valid example spec.
    pub example: serde_json::Value,
    /// Named actions (service adapters).
    pub actions: Vec<String>,
    validate: ValidateFn,
    build: BuildFn<T>,
}

impl<T: ?Sized> Clone for KindDescriptor<T> {
    fn clone(&self) -> Self {
        KindDescriptor {
            kind: self.kind.clone(),
            description: self.description.clone(),
            origin: self.origin.clone(),
            spec_schema: self.spec_schema.clone(),
            example: self.example.clone(),
            actions: self.actions.clone(),
            validate: Arc::clone(&self.validate),
            build: Arc::clone(&self.build),
        }
    }
}

impl<T: ?Sized> fmt::Debug for KindDescriptor<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KindDescriptor")
            .field("kind", &self.kind)
            .field("origin", &self.origin)
            .field("actions", &self.actions)
            .finish_non_exhaustive()
    }
}

impl<T: ?Sized + 'static> KindDescriptor<T> {
    /// The descriptor of a statically linked kind.
    pub fn of<K: ComponentKind<Trait = T>>() -> Self {
        KindDescriptor {
            kind: K::KIND.to_owned(),
            description: K::DESCRIPTION.to_owned(),
            origin: "built-in".to_owned(),
            spec_schema: crate::schema::inline_schema_for::<K::Spec>(),
            example: serde_json::to_value(K::example()).unwrap_or_default(),
            actions: K::ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
            validate: Arc::new(|value| match serde_json::from_value::<K::Spec>(value.clone()) {
                Ok(spec) => K::validate(&spec),
                Err(e) => vec![SpecIssue { path: Vec::new(), message: e.to_string() }],
            }),
            build: Arc::new(|value| {
                let spec = serde_json::from_value::<K::Spec>(value)
                    .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("invalid `{}` spec: {e}", K::KIND)))?;
                K::build(spec)
            }),
        }
    }

    /// The descriptor of a kind provided by closures (used by the plugin loader).
    #[allow(clippy::too_many_arguments)]
    pub fn dynamic(
        kind: String,
        description: String,
        origin: String,
        spec_schema: serde_json::Value,
        example: serde_json::Value,
        actions: Vec<String>,
        validate: impl Fn(&serde_json::Value) -> Vec<SpecIssue> + Send + Sync + 'static,
        build: impl Fn(serde_json::Value) -> Result<Arc<T>> + Send + Sync + 'static,
    ) -> Self {
        KindDescriptor {
            kind,
            description,
            origin,
            spec_schema,
            example,
            actions,
            validate: Arc::new(validate),
            build: Arc::new(build),
        }
    }

    /// Runs the kind's pure validation on a spec that passed the schema.
    pub fn validate(&self, spec: &serde_json::Value) -> Vec<SpecIssue> {
        (self.validate)(spec)
    }

    /// Builds a component from its spec.
    pub fn build(&self, spec: serde_json::Value) -> Result<Arc<T>> {
        (self.build)(spec)
    }
}

/// The kinds of one trait, by name.
pub struct Kinds<T: ?Sized> {
    family: Family,
    by_name: BTreeMap<String, KindDescriptor<T>>,
}

impl<T: ?Sized + 'static> Kinds<T> {
    fn new(family: Family) -> Self {
        Kinds { family, by_name: BTreeMap::new() }
    }

    /// Registers a kind; a second kind with the same name is refused, naming both origins.
    pub fn register(&mut self, descriptor: KindDescriptor<T>) -> Result<()> {
        if let Some(existing) = self.by_name.get(&descriptor.kind) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{} kind `{}` from {} clashes with the one from {}; rename or remove one of them",
                    self.family, descriptor.kind, descriptor.origin, existing.origin
                ),
            )
            .with_operation("catalog.register"));
        }
        self.by_name.insert(descriptor.kind.clone(), descriptor);
        Ok(())
    }

    /// Registers a statically linked kind.
    pub fn register_kind<K: ComponentKind<Trait = T>>(&mut self) -> Result<()> {
        self.register(KindDescriptor::of::<K>())
    }

    /// The descriptor of `kind`; an unknown kind's error lists the available kinds.
    pub fn get(&self, kind: &str) -> Result<&KindDescriptor<T>> {
        self.by_name.get(kind).ok_or_else(|| {
            let mut message = format!("unknown {} kind `{kind}`", self.family);
            if let Some(near) = crate::suggest::closest(kind, self.names()) {
                message.push_str(&format!("; did you mean `{near}`?"));
            }
            message.push_str(&format!("; available: {}", self.available()));
            Error::new(ErrorKind::NotFound, message).with_operation("catalog.get")
        })
    }

    /// Names of the registered kinds, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The registered kinds, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &KindDescriptor<T>> {
        self.by_name.values()
    }

    /// The registered kinds as a comma-separated list, or `none` when empty.
    pub fn available(&self) -> String {
        if self.by_name.is_empty() {
            return "none (no kind of this family is compiled in or loaded)".to_owned();
        }
        self.names().collect::<Vec<_>>().join(", ")
    }
}

/// The four families of components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// [`Runner`]s.
    Runner,
    /// [`ServiceAdapter`]s.
    Service,
    /// [`MonitorAdapter`]s.
    Monitor,
    /// [`Notifier`]s.
    Notifier,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Runner => "runner",
            Family::Service => "service",
            Family::Monitor => "monitor",
            Family::Notifier => "notifier",
        })
    }
}

/// Every component kind known to this process.
pub struct Catalog {
    /// Runner kinds.
    pub runners: Kinds<dyn Runner>,
    /// Service adapter kinds.
    pub services: Kinds<dyn ServiceAdapter>,
    /// Monitor kinds.
    pub monitors: Kinds<dyn MonitorAdapter>,
    /// Notifier kinds.
    pub notifiers: Kinds<dyn Notifier>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::new()
    }
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Catalog {
            runners: Kinds::new(Family::Runner),
            services: Kinds::new(Family::Service),
            monitors: Kinds::new(Family::Monitor),
            notifiers: Kinds::new(Family::Notifier),
        }
    }

    /// For one family: the kinds' names, spec schemas, and validation, type-erased.
    /// Validation uses this so it handles the four families with one code path.
    pub fn family(&self, family: Family) -> Vec<KindView<'_>> {
        fn view<T: ?Sized + 'static>(kinds: &Kinds<T>) -> Vec<KindView<'_>> {
            kinds
                .iter()
                .map(|d| KindView {
                    kind: &d.kind,
                    spec_schema: &d.spec_schema,
                    actions: &d.actions,
                    validate: &*d.validate,
                })
                .collect()
        }
        match family {
            Family::Runner => view(&self.runners),
            Family::Service => view(&self.services),
            Family::Monitor => view(&self.monitors),
            Family::Notifier => view(&self.notifiers),
        }
    }
}

/// A family-independent view of a kind, for validation and schema generation.
pub struct KindView<'a> {
    /// The kind's name.
    pub kind: &'a str,
    /// JSON Schema of its spec.
    pub spec_schema: &'a serde_json::Value,
    /// Named actions.
    pub actions: &'a [String],
    validate: &'a (dyn Fn(&serde_json::Value) -> Vec<SpecIssue> + Send + Sync),
}

impl KindView<'_> {
    /// Runs the kind's pure validation.
    pub fn validate(&self, spec: &serde_json::Value) -> Vec<SpecIssue> {
        (self.validate)(spec)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::traits::{LogSink, Outcome, Task};
    use async_trait::async_trait;
    use tokio_util::sync::CancellationToken;

    /// A runner for test kinds: it refuses to run anything.
    pub(crate) struct Echo;

    #[async_trait]
    impl Runner for Echo {
        async fn run(&self, _: &Task, _: &dyn LogSink, _: CancellationToken) -> Result<Outcome> {
            Err(Error::new(ErrorKind::Unsupported, "test kind"))
        }
    }

    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct EchoSpec {
        /// A word.
        word: String,
    }

    struct EchoKind;
    impl ComponentKind for EchoKind {
        type Trait = dyn Runner;
        type Spec = EchoSpec;
        const KIND: &'static str = "echo";
        const DESCRIPTION: &'static str = "test";
        fn example() -> EchoSpec {
            EchoSpec { word: "hi".into() }
        }
        fn validate(spec: &EchoSpec) -> Vec<SpecIssue> {
            if spec.word.is_empty() { vec![SpecIssue::new(&["word"], "empty")] } else { vec![] }
        }
        fn build(_: EchoSpec) -> Result<Arc<dyn Runner>> {
            Ok(Arc::new(Echo))
        }
    }

    #[test]
    fn unregistered_kind_error_lists_available_kinds() {
        let mut catalog = Catalog::new();
        catalog.runners.register_kind::<EchoKind>().unwrap();
        let err = catalog.runners.get("ecoh").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.message().contains("did you mean `echo`?"), "{err}");
        assert!(err.message().contains("available: echo"), "{err}");
    }

    #[test]
    fn duplicate_kind_names_both_origins() {
        let mut catalog = Catalog::new();
        catalog.runners.register_kind::<EchoKind>().unwrap();
        let err = catalog.runners.register_kind::<EchoKind>().unwrap_err();
        assert!(err.message().contains("from built-in clashes with the one from built-in"), "{err}");
    }

    #[test]
    fn descriptor_validates_and_builds() {
        let d = KindDescriptor::<dyn Runner>::of::<EchoKind>();
        assert_eq!(d.spec_schema["properties"]["word"]["type"], "string");
        assert!(d.validate(&serde_json::json!({"word": "x"})).is_empty());
        assert_eq!(d.validate(&serde_json::json!({"word": ""}))[0].path, vec!["word"]);
        assert_eq!(d.validate(&serde_json::json!({"wrd": "x"})).len(), 1);
        assert!(d.build(serde_json::json!({"word": "x"})).is_ok());
    }
}
