//! The host side: finds plugin libraries, checks them, and registers their kinds into a
//! [`Catalog`] as `Foreign*` components implementing the same traits as built-in ones.
//!
//! Order of the checks, each refusing the library with an error naming the file and the
//! fix: it loads; it exports `nexus_plugin_declaration`; the frozen header has the magic,
//! this host's ABI version and a large enough size; it was built with
//! `panic = "unwind"`; its SDK version is compatible; `init` succeeds. Libraries are
//! never unloaded (refused ones included: their initializers have run).

use std::ffi::{OsStr, c_void};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_ffi::FfiFuture;
use async_trait::async_trait;
use nexus_core::traits::{
    Event, Health, LogSink, MonitorAdapter, Notification, Notifier, Outcome, Receipt, Runner, Sample, ServiceAdapter,
    Stream, Task,
};
use nexus_core::{Catalog, Error, ErrorKind, Family, KindDescriptor, Result, SpecIssue};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::abi::{self, CallContext, CallResult, Declaration, DeclarationFn, Header, HostVTable, KindDeclaration, Str};
use crate::wire;

/// One kind a plugin provides.
#[derive(Debug, Clone)]
pub struct PluginKind {
    /// Its family.
    pub family: Family,
    /// Its name.
    pub name: String,
    /// One line describing it.
    pub description: String,
}

/// A loaded, checked plugin library.
#[derive(Clone)]
pub struct Plugin {
    /// The library file.
    pub path: PathBuf,
    /// The plugin crate's name.
    pub name: String,
    /// The plugin crate's version.
    pub version: String,
    /// The ABI version it declares (equal to [`abi::ABI_VERSION`]).
    pub abi_version: u32,
    /// The `nexus-plugin` version it was built with.
    pub sdk_version: String,
    lib: Arc<Lib>,
    loaded: Arc<[LoadedKind]>,
}

/// One kind of a loaded library, decoded once, when the library is loaded.
struct LoadedKind {
    decl: &'static KindDeclaration,
    info: PluginKind,
    /// Its schema (compiled), example and actions; or why one is malformed, reported
    /// when the kind is registered.
    spec: std::result::Result<Arc<KindSpec>, String>,
}

/// What a kind declares as JSON, decoded.
struct KindSpec {
    schema: Value,
    validator: jsonschema::Validator,
    example: Value,
    actions: Vec<String>,
}

impl KindSpec {
    fn decode(kd: &'static KindDeclaration, name: &str) -> std::result::Result<Self, String> {
        // SAFETY: declaration strings are `'static` in the library.
        let (schema, example, actions) =
            unsafe { (kd.spec_schema.as_bytes(), kd.example.as_bytes(), kd.actions.as_bytes()) };
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            format!("kind `{name}` has a malformed {what}: {e}; rebuild the plugin")
        };
        let schema: Value = serde_json::from_slice(schema).map_err(|e| bad("schema", &e))?;
        let example: Value = serde_json::from_slice(example).map_err(|e| bad("example", &e))?;
        let actions: Vec<String> = serde_json::from_slice(actions).map_err(|e| bad("action list", &e))?;
        let validator = jsonschema::draft202012::new(&schema).map_err(|e| bad("schema", &e))?;
        Ok(KindSpec { schema, validator, example, actions })
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("sdk_version", &self.sdk_version)
            .field("kinds", &self.kinds().collect::<Vec<_>>())
            .finish()
    }
}

/// A library that was refused, and why.
#[derive(Debug)]
pub struct Refusal {
    /// The file (or directory) refused.
    pub path: PathBuf,
    /// Why, and what to do.
    pub error: Error,
}

/// What loading the plugin directories gave.
#[derive(Debug, Default)]
pub struct PluginSet {
    /// The directories searched, in order.
    pub dirs: Vec<PathBuf>,
    /// The libraries loaded.
    pub plugins: Vec<Plugin>,
    /// The libraries refused.
    pub refused: Vec<Refusal>,
}

impl PluginSet {
    /// Registers every loaded plugin's kinds; returns the clashes (each naming both
    /// files) and keeps registering the others.
    pub fn register(&self, catalog: &mut Catalog) -> Vec<Error> {
        let mut errors = Vec::new();
        for plugin in &self.plugins {
            errors.extend(plugin.register(catalog));
        }
        errors
    }
}

/// A loaded library: its declaration (alive forever: the library is leaked).
struct Lib {
    decl: &'static Declaration,
    path: String,
    name: String,
    next_call: AtomicU64,
}

/// The file extension of shared libraries on this platform.
pub const LIBRARY_EXTENSION: &str = std::env::consts::DLL_EXTENSION;

/// The directories to search, in order, without duplicates: `--plugins` flags, then
/// `NEXUS_PLUGIN_PATH` (colon-separated), then the orchestration registry's
/// `plugins.dirs` (already resolved against the config directory).
pub fn plugin_dirs(cli: &[PathBuf], env: Option<&OsStr>, registry: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let from_env: Vec<PathBuf> =
        env.map(|v| std::env::split_paths(v).filter(|p| !p.as_os_str().is_empty()).collect()).unwrap_or_default();
    for dir in cli.iter().chain(&from_env).chain(registry) {
        if !dirs.contains(dir) {
            dirs.push(dir.clone());
        }
    }
    dirs
}

/// Loads every library (`*.so` on Linux) of each directory, in file-name order. A
/// directory that does not exist is skipped; one that cannot be read is a refusal.
pub fn load_dirs(dirs: &[PathBuf]) -> PluginSet {
    let mut set = PluginSet { dirs: dirs.to_vec(), ..PluginSet::default() };
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            // A directory that does not exist (yet) holds no plugin: `nexus plugins`
            // shows it as missing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                set.refused.push(Refusal {
                    path: dir.clone(),
                    error: Error::new(
                        ErrorKind::InvalidConfig,
                        format!(
                            "cannot read plugin directory {}: {e}; create it or remove it from the plugin path",
                            dir.display()
                        ),
                    )
                    .with_operation("plugin.load"),
                });
                continue;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension() == Some(OsStr::new(LIBRARY_EXTENSION)))
            .collect();
        files.sort();
        for file in files {
            match load_library(&file) {
                Ok(plugin) => set.plugins.push(plugin),
                Err(error) => set.refused.push(Refusal { path: file, error }),
            }
        }
    }
    set
}

fn refuse(path: &Path, message: String) -> Error {
    Error::new(ErrorKind::InvalidConfig, format!("plugin {}: {message}", path.display()))
        .with_operation("plugin.load")
        .with_context("file", path.display())
}

/// Whether a plugin built with SDK `theirs` can be used by this host (same major
/// version; same `major.minor` while the major is 0).
pub fn sdk_compatible(theirs: &str) -> bool {
    let parts =
        |v: &str| -> Vec<u64> { v.split(['.', '-', '+']).take(2).map(|p| p.parse().unwrap_or(u64::MAX)).collect() };
    let (ours, theirs) = (parts(abi::SDK_VERSION), parts(theirs));
    match (ours.first(), theirs.first()) {
        (Some(0), Some(0)) => ours.get(1) == theirs.get(1),
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn family_of(code: u8) -> Option<Family> {
    match code {
        abi::FAMILY_RUNNER => Some(Family::Runner),
        abi::FAMILY_SERVICE => Some(Family::Service),
        abi::FAMILY_MONITOR => Some(Family::Monitor),
        abi::FAMILY_NOTIFIER => Some(Family::Notifier),
        _ => None,
    }
}

/// Loads and checks one plugin library.
pub fn load_library(path: &Path) -> Result<Plugin> {
    // SAFETY: loading a library runs its initializers. That is the point of a plugin
    // directory: the operator put the file there to run it. Nothing else is trusted
    // before the checks below.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| {
        refuse(path, format!("cannot be loaded ({e}); is it a shared library built for this platform?"))
    })?;
    // Never unloaded: code and data of the library may be referenced until exit.
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: if the symbol exists, the ABI says it is `DeclarationFn`; a library that
    // exports the name with another signature is a broken plugin we cannot detect.
    let symbol = unsafe { library.get::<DeclarationFn>(abi::DECLARATION_SYMBOL.as_bytes()) }.map_err(|_| {
        refuse(
            path,
            format!(
                "is not a Nexus plugin: it exports no `{}`; build the plugin crate as a `cdylib` with `nexus_plugin::export_plugin!(…)`, or remove the file from the plugin directory",
                abi::DECLARATION_SYMBOL
            ),
        )
    })?;
    // SAFETY: calling the declaration function takes no argument; a plugin built with
    // nexus-plugin catches panics while building its declaration.
    let ptr = unsafe { symbol() };
    if ptr.is_null() {
        return Err(refuse(path, "returned no declaration; rebuild it with `nexus_plugin::export_plugin!`".into()));
    }
    // SAFETY: every declaration, of any ABI version, starts with the frozen `Header`.
    let header: Header = unsafe { std::ptr::read(ptr.cast::<Header>()) };
    if header.magic != abi::MAGIC {
        return Err(refuse(
            path,
            format!(
                "its declaration has a bad magic number ({:#018x}, expected {:#018x}): it is not a Nexus plugin, or is corrupt; rebuild it with `nexus_plugin::export_plugin!`",
                header.magic,
                abi::MAGIC
            ),
        ));
    }
    if header.abi_version != abi::ABI_VERSION {
        return Err(refuse(
            path,
            format!(
                "was built for plugin ABI version {}, this nexus speaks ABI version {}; rebuild the plugin against nexus-plugin {} (the version of this nexus), or use a nexus release with ABI version {}",
                header.abi_version,
                abi::ABI_VERSION,
                abi::SDK_VERSION,
                header.abi_version
            ),
        ));
    }
    if (header.size as usize) < std::mem::size_of::<Declaration>() {
        return Err(refuse(
            path,
            format!(
                "declares a size of {} bytes, smaller than the {} of ABI version {}: it is corrupt; rebuild it",
                header.size,
                std::mem::size_of::<Declaration>(),
                abi::ABI_VERSION
            ),
        ));
    }
    // SAFETY: magic, ABI version and size match: the pointer is a `Declaration` of this
    // layout, immutable and alive forever (the library is never unloaded).
    let decl: &'static Declaration = unsafe { &*ptr };
    if decl.panic_unwind != 1 {
        return Err(refuse(
            path,
            "was built with `panic = \"abort\"`: a panic in it would kill nexus instead of failing one call; rebuild it with `panic = \"unwind\"` (remove `panic = \"abort\"` from the `[profile]` of its workspace)".into(),
        ));
    }
    // SAFETY: strings of a declaration are `'static` in the library.
    let (sdk_version, name, version) = unsafe {
        (decl.sdk_version.to_string_lossy(), decl.plugin_name.to_string_lossy(), decl.plugin_version.to_string_lossy())
    };
    if !sdk_compatible(&sdk_version) {
        return Err(refuse(
            path,
            format!(
                "was built with nexus-plugin {sdk_version}, incompatible with the nexus-plugin {} of this nexus (they must share the major version, and the minor one while the major is 0); rebuild `{name}` against nexus-plugin {}",
                abi::SDK_VERSION,
                abi::SDK_VERSION
            ),
        ));
    }
    let lib =
        Arc::new(Lib { decl, path: path.display().to_string(), name: name.clone(), next_call: AtomicU64::new(1) });
    let vtable = HostVTable {
        size: std::mem::size_of::<HostVTable>() as u32,
        ctx: Box::leak(Box::new(name.clone())) as *const String as *const c_void,
        max_level: host_max_level,
        log: host_log,
    };
    // SAFETY: `init` is the declaration's; the vtable is valid for the call (the plugin
    // copies it) and its `ctx` is leaked, so alive forever.
    let init = unsafe { (decl.init)(&vtable) };
    decode(&lib, "init", init).map_err(|e| refuse(path, format!("failed to initialize: {e}")))?;
    let mut loaded = Vec::new();
    for kd in kind_declarations(decl) {
        // SAFETY: declaration strings are `'static` in the library.
        let (kind_name, description) = unsafe { (kd.name.to_string_lossy(), kd.description.to_string_lossy()) };
        let family = family_of(kd.family)
            .ok_or_else(|| refuse(path, format!("declares kind `{kind_name}` of unknown family {}", kd.family)))?;
        let spec = KindSpec::decode(kd, &kind_name).map(Arc::new);
        loaded.push(LoadedKind { decl: kd, info: PluginKind { family, name: kind_name, description }, spec });
    }
    Ok(Plugin {
        path: path.to_path_buf(),
        name,
        version,
        abi_version: header.abi_version,
        sdk_version,
        lib,
        loaded: loaded.into(),
    })
}

fn kind_declarations(decl: &'static Declaration) -> &'static [KindDeclaration] {
    if decl.kinds.is_null() || decl.kinds_len == 0 {
        return &[];
    }
    // SAFETY: the declaration's kind array has `kinds_len` elements and is `'static`.
    unsafe { std::slice::from_raw_parts(decl.kinds, decl.kinds_len) }
}

unsafe extern "C" fn host_max_level(_ctx: *const c_void) -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => abi::LEVEL_ERROR,
        LevelFilter::WARN => abi::LEVEL_WARN,
        LevelFilter::INFO => abi::LEVEL_INFO,
        LevelFilter::DEBUG => abi::LEVEL_DEBUG,
        _ => abi::LEVEL_TRACE,
    }
}

/// Re-emits a plugin's log event under a `plugin{name}` span.
unsafe extern "C" fn host_log(ctx: *const c_void, level: u8, target: Str, message: Str) {
    let _ = catch_unwind(|| {
        // SAFETY: `ctx` is the leaked plugin name given at `init`; the strings are live
        // for this call.
        let (name, target, message) =
            unsafe { (&*ctx.cast::<String>(), target.to_string_lossy(), message.to_string_lossy()) };
        let span = tracing::error_span!("plugin", name = %name);
        let _entered = span.enter();
        match level {
            abi::LEVEL_ERROR => tracing::error!(target: "nexus_plugin::plugin", plugin_target = %target, "{message}"),
            abi::LEVEL_WARN => tracing::warn!(target: "nexus_plugin::plugin", plugin_target = %target, "{message}"),
            abi::LEVEL_INFO => tracing::info!(target: "nexus_plugin::plugin", plugin_target = %target, "{message}"),
            abi::LEVEL_DEBUG => tracing::debug!(target: "nexus_plugin::plugin", plugin_target = %target, "{message}"),
            _ => tracing::trace!(target: "nexus_plugin::plugin", plugin_target = %target, "{message}"),
        }
    });
}

/// Turns a call's result into a value or an error.
fn decode(lib: &Lib, what: &str, r: CallResult) -> Result<Value> {
    match r.status {
        abi::STATUS_OK => serde_json::from_slice(r.payload.as_slice()).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("plugin `{}` ({}) returned malformed JSON from {what}: {e}", lib.name, lib.path),
            )
        }),
        abi::STATUS_ERR => match serde_json::from_slice::<wire::WireError>(r.payload.as_slice()) {
            Ok(w) => Err(wire::error_from_wire(w)),
            Err(e) => Err(Error::new(
                ErrorKind::Internal,
                format!("plugin `{}` ({}) returned a malformed error from {what}: {e}", lib.name, lib.path),
            )),
        },
        abi::STATUS_PANICKED => Err(Error::new(
            ErrorKind::Internal,
            format!(
                "plugin `{}` ({}) panicked in {what}: {}",
                lib.name,
                lib.path,
                String::from_utf8_lossy(r.payload.as_slice())
            ),
        )
        .with_operation("plugin.invoke")
        .with_context("plugin", &lib.name)),
        other => Err(Error::new(
            ErrorKind::Internal,
            format!("plugin `{}` ({}) returned unknown status {other} from {what}", lib.name, lib.path),
        )),
    }
}

/// Polls an `FfiFuture`, turning a panic while polling into a `Panicked` result.
struct Guarded(FfiFuture<CallResult>);

impl Future for Guarded {
    type Output = CallResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CallResult> {
        let fut = Pin::new(&mut self.0);
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(p) => p,
            Err(_) => Poll::Ready(CallResult {
                status: abi::STATUS_PANICKED,
                payload: abi::OwnedBytes::from_vec(b"a panic while polling the plugin's future".to_vec()),
            }),
        }
    }
}

/// The slot through which a plugin's runner writes an attempt's lines to the host's
/// sink. The host empties it (waiting for a line being written) before the borrow of
/// the sink ends.
struct SinkSlot {
    sink: Mutex<Option<*const (dyn LogSink + 'static)>>,
}

// SAFETY: the pointer is to a `LogSink`, which is `Send + Sync`; the mutex serializes
// access to the slot, and the pointer is removed before the sink's borrow ends.
unsafe impl Send for SinkSlot {}
// SAFETY: as above.
unsafe impl Sync for SinkSlot {}

unsafe extern "C" fn slot_log_line(ctx: *const c_void, stream: u8, line: Str) {
    let _ = catch_unwind(|| {
        // SAFETY: `ctx` is an `Arc<SinkSlot>` leaked for the plugin by `SlotGuard::context`
        // and not yet released; `line` is live for this call.
        let (slot, line) = unsafe { (&*ctx.cast::<SinkSlot>(), line.as_bytes()) };
        let stream = if stream == abi::STREAM_STDERR { Stream::Stderr } else { Stream::Stdout };
        let guard = slot.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sink) = *guard {
            // SAFETY: while the pointer is in the slot, the sink is borrowed by the
            // running `ForeignRunner::run` (see `SlotGuard`).
            let sink = unsafe { &*sink };
            sink.line(stream, &String::from_utf8_lossy(line));
        }
    });
}

unsafe extern "C" fn slot_release(ctx: *const c_void) {
    // SAFETY: `ctx` came from `Arc::into_raw` in `SlotGuard::context`; the plugin calls
    // `release` once.
    drop(unsafe { Arc::from_raw(ctx.cast::<SinkSlot>()) });
}

/// Empties the slot when the run ends (or its future is dropped).
struct SlotGuard(Arc<SinkSlot>);

impl SlotGuard {
    fn new(sink: &dyn LogSink) -> Self {
        let ptr: *const (dyn LogSink + '_) = sink;
        // SAFETY: only the lifetime bound of the trait object changes; the guard removes
        // the pointer from the slot before `sink`'s borrow ends (its `Drop` runs when the
        // `run` future that borrows `sink` completes or is dropped).
        let ptr: *const (dyn LogSink + 'static) = unsafe { std::mem::transmute(ptr) };
        SlotGuard(Arc::new(SinkSlot { sink: Mutex::new(Some(ptr)) }))
    }

    fn context(&self) -> CallContext {
        CallContext { ctx: Arc::into_raw(Arc::clone(&self.0)).cast(), log_line: slot_log_line, release: slot_release }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *self.0.sink.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// One instance built by a plugin; destroyed when the last wrapper goes.
struct ForeignInstance {
    lib: Arc<Lib>,
    kind: String,
    instance: *mut c_void,
    poisoned: AtomicBool,
}

// SAFETY: a plugin instance is used only through `invoke`, which the ABI makes
// thread-safe (the instance is `Send + Sync` on the plugin side).
unsafe impl Send for ForeignInstance {}
// SAFETY: as above.
unsafe impl Sync for ForeignInstance {}

impl Drop for ForeignInstance {
    fn drop(&mut self) {
        // SAFETY: the instance came from this library's `create` and is destroyed once.
        unsafe { (self.lib.decl.destroy)(self.instance) }
    }
}

impl ForeignInstance {
    fn start(&self, method: &str, request: &Value, context: Option<CallContext>) -> Result<(u64, Guarded)> {
        let id = self.lib.next_call.fetch_add(1, Ordering::Relaxed);
        self.start_with_id(id, method, request, context)
    }

    fn start_with_id(
        &self,
        id: u64,
        method: &str,
        request: &Value,
        context: Option<CallContext>,
    ) -> Result<(u64, Guarded)> {
        if self.poisoned.load(Ordering::Acquire) {
            if let Some(c) = context {
                // SAFETY: the context was made for this call, which will not happen:
                // release it here, once.
                unsafe { (c.release)(c.ctx) }
            }
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "this `{}` instance of plugin `{}` ({}) panicked earlier and is unusable; a new one is built for the next run",
                    self.kind, self.lib.name, self.lib.path
                ),
            )
            .with_operation("plugin.invoke"));
        }
        let request = serde_json::to_vec(request).unwrap_or_default();
        let context = context.map(Box::new);
        let context_ptr = context.as_deref().map_or(std::ptr::null(), |c| c as *const CallContext);
        // SAFETY: `invoke` is the library's; the instance is alive (we own it); the
        // method and request buffers and the context are live for the call, and the
        // plugin copies what it keeps (it takes over `release` of the context).
        let fut = unsafe {
            (self.lib.decl.invoke)(self.instance, id, Str::new(method.as_bytes()), Str::new(&request), context_ptr)
        };
        Ok((id, Guarded(fut)))
    }

    fn finish(&self, method: &str, r: CallResult) -> Result<Value> {
        if r.status == abi::STATUS_PANICKED {
            self.poisoned.store(true, Ordering::Release);
        }
        decode(&self.lib, &format!("`{}`.{method}", self.kind), r)
    }

    async fn call(&self, method: &str, request: Value) -> Result<Value> {
        let (_, fut) = self.start(method, &request, None)?;
        let r = fut.await;
        self.finish(method, r)
    }

    /// Fires the cancellation token of call `id` in the plugin.
    async fn cancel(&self, id: u64) {
        if let Ok((_, c)) = self.start("$cancel", &json!({"call": id}), None) {
            let _ = c.await;
        }
    }

    /// A call that the token can cancel (through `$cancel`) and that writes lines.
    async fn call_cancellable(
        &self,
        method: &str,
        request: Value,
        logs: &dyn LogSink,
        cancel: CancellationToken,
    ) -> Result<Value> {
        let slot = SlotGuard::new(logs);
        let id = self.lib.next_call.fetch_add(1, Ordering::Relaxed);
        if cancel.is_cancelled() {
            // Cancelled before it starts: the plugin's token is fired before the call runs.
            self.cancel(id).await;
        }
        let (id, fut) = self.start_with_id(id, method, &request, Some(slot.context()))?;
        tokio::pin!(fut);
        let r = tokio::select! {
            biased;
            r = &mut fut => r,
            () = cancel.cancelled() => {
                self.cancel(id).await;
                fut.await
            }
        };
        drop(slot);
        self.finish(method, r)
    }
}

/// A runner provided by a plugin.
struct ForeignRunner(ForeignInstance);

#[async_trait]
impl Runner for ForeignRunner {
    async fn run(&self, task: &Task, logs: &dyn LogSink, cancel: CancellationToken) -> Result<Outcome> {
        let request = wire::task_to_wire(task)?;
        let v = self.0.call_cancellable("run", request, logs, cancel).await?;
        wire::outcome_from_wire(&v)
    }

    async fn cleanup_run(&self, run_id: &str) -> Result<()> {
        self.0.call("cleanup_run", json!({"run_id": run_id})).await.map(|_| ())
    }
}

/// A service adapter provided by a plugin.
struct ForeignService(ForeignInstance);

#[async_trait]
impl ServiceAdapter for ForeignService {
    async fn check(&self) -> Result<Health> {
        wire::health_from_wire(&self.0.call("check", Value::Null).await?)
    }
    async fn metrics(&self) -> Result<Vec<Sample>> {
        wire::samples_from_wire(&self.0.call("metrics", Value::Null).await?)
    }
    async fn invoke(&self, action: &str, args: Value) -> Result<Value> {
        self.0.call("invoke", json!({"action": action, "args": args})).await
    }
}

/// A monitor adapter provided by a plugin.
struct ForeignMonitor(ForeignInstance);

#[async_trait]
impl MonitorAdapter for ForeignMonitor {
    async fn export_event(&self, event: &Event) -> Result<()> {
        self.0.call("export_event", wire::event_to_wire(event)).await.map(|_| ())
    }
    async fn export_metrics(&self, samples: &[Sample]) -> Result<()> {
        self.0.call("export_metrics", wire::samples_to_wire(samples)).await.map(|_| ())
    }
}

/// A notifier provided by a plugin.
struct ForeignNotifier(ForeignInstance);

#[async_trait]
impl Notifier for ForeignNotifier {
    async fn send(&self, notification: &Notification) -> Result<Receipt> {
        wire::receipt_from_wire(&self.0.call("send", wire::notification_to_wire(notification)).await?)
    }
}

/// Everything needed to validate and build one plugin kind.
#[derive(Clone)]
struct KindHandle {
    lib: Arc<Lib>,
    decl: &'static KindDeclaration,
    name: String,
    spec: Arc<KindSpec>,
}

impl KindHandle {
    fn validate(&self, spec: &Value) -> Vec<SpecIssue> {
        let bytes = serde_json::to_vec(spec).unwrap_or_default();
        // SAFETY: `validate` is the kind's; the buffer is live for the call.
        let r = unsafe { (self.decl.validate)(Str::new(&bytes)) };
        match decode(&self.lib, &format!("`{}`.validate", self.name), r) {
            Ok(Value::Array(items)) => items
                .into_iter()
                .map(|i| SpecIssue {
                    path: i["path"]
                        .as_array()
                        .map(|p| p.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                        .unwrap_or_default(),
                    message: i["message"].as_str().unwrap_or_default().to_owned(),
                })
                .collect(),
            Ok(other) => vec![SpecIssue::new(
                &[],
                format!("plugin `{}` returned {other} instead of a list of issues", self.lib.name),
            )],
            Err(e) => vec![SpecIssue::new(&[], e.to_string())],
        }
    }

    fn create(&self, spec: Value) -> Result<ForeignInstance> {
        if let Some(e) = self.spec.validator.iter_errors(&spec).next() {
            let at = e.instance_path().as_str().to_owned();
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("invalid `{}` spec at `{}`: {e}", self.name, if at.is_empty() { "/" } else { &at }),
            )
            .with_operation("plugin.create")
            .with_context("path", if at.is_empty() { "/".to_owned() } else { at }));
        }
        let bytes = serde_json::to_vec(&spec).unwrap_or_default();
        // SAFETY: `create` is the kind's; the buffer is live for the call.
        let r = unsafe { (self.decl.create)(Str::new(&bytes)) };
        let instance = r.instance;
        decode(&self.lib, &format!("`{}`.create", self.name), r.result)?;
        if instance.is_null() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("plugin `{}` created no instance of `{}`", self.lib.name, self.name),
            ));
        }
        Ok(ForeignInstance {
            lib: Arc::clone(&self.lib),
            kind: self.name.clone(),
            instance,
            poisoned: AtomicBool::new(false),
        })
    }
}

fn descriptor<T: ?Sized + 'static>(
    handle: KindHandle,
    description: String,
    wrap: fn(ForeignInstance) -> Arc<T>,
) -> KindDescriptor<T> {
    let validating = handle.clone();
    KindDescriptor::dynamic(
        handle.name.clone(),
        description,
        handle.lib.path.clone(),
        handle.spec.schema.clone(),
        handle.spec.example.clone(),
        handle.spec.actions.clone(),
        move |spec| validating.validate(spec),
        move |spec| handle.create(spec).map(wrap),
    )
}

impl Plugin {
    /// The kinds it provides.
    pub fn kinds(&self) -> impl Iterator<Item = &PluginKind> {
        self.loaded.iter().map(|k| &k.info)
    }

    /// Registers this plugin's kinds into `catalog`; returns an error for each kind that
    /// clashes with one already registered (naming both files).
    pub fn register(&self, catalog: &mut Catalog) -> Vec<Error> {
        self.loaded.iter().filter_map(|kind| self.register_kind(catalog, kind).err()).collect()
    }

    fn register_kind(&self, catalog: &mut Catalog, kind: &LoadedKind) -> Result<()> {
        let spec = kind.spec.as_ref().map_err(|message| refuse(&self.path, message.clone()))?;
        let handle = KindHandle {
            lib: Arc::clone(&self.lib),
            decl: kind.decl,
            name: kind.info.name.clone(),
            spec: Arc::clone(spec),
        };
        let description = kind.info.description.clone();
        match kind.info.family {
            Family::Runner => catalog
                .runners
                .register(descriptor(handle, description, |i| Arc::new(ForeignRunner(i)) as Arc<dyn Runner>)),
            Family::Service => catalog
                .services
                .register(descriptor(handle, description, |i| Arc::new(ForeignService(i)) as Arc<dyn ServiceAdapter>)),
            Family::Monitor => catalog
                .monitors
                .register(descriptor(handle, description, |i| Arc::new(ForeignMonitor(i)) as Arc<dyn MonitorAdapter>)),
            Family::Notifier => catalog
                .notifiers
                .register(descriptor(handle, description, |i| Arc::new(ForeignNotifier(i)) as Arc<dyn Notifier>)),
        }
    }
}
