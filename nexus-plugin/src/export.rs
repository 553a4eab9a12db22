//! The plugin side: what [`export_plugin!`](crate::export_plugin) expands to.
//!
//! Inside a plugin library, this module owns the library's tokio runtime (built on first
//! use, multi-threaded, its own threads) and its tracing dispatcher (a global default
//! that forwards every event to the host's log callback). Every exported function
//! catches panics. An async call is polled by the host's executor inside the plugin's
//! runtime context (its timers, I/O and spawned tasks belong to the plugin's runtime);
//! dropping the future the host holds drops the call.

use std::collections::HashMap;
use std::ffi::c_void;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use async_ffi::{FfiFuture, FutureExt as _};
use nexus_core::traits::{LogSink, MonitorAdapter, Notifier, Runner, ServiceAdapter, Stream};
use nexus_core::{ComponentKind, Error, ErrorKind, KindDescriptor, Result};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::abi::{
    self, CallContext, CallResult, CreateResult, Declaration, HostVTable, KindDeclaration, OwnedBytes, Str,
};
use crate::wire;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Value>> + Send>>;

/// What one call gets besides its request.
#[doc(hidden)]
pub struct Call {
    /// Fired by the host's `$cancel`.
    pub cancel: CancellationToken,
    /// The host's per-call services, if it passed any.
    host: Option<HostCall>,
}

/// One built component, behind the ABI's `invoke`.
#[doc(hidden)]
pub trait Handler: Send + Sync {
    fn call(self: Arc<Self>, method: String, request: Value, call: Call) -> BoxFuture;
}

fn unknown_method(family: &str, method: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("this {family} plugin has no method `{method}`; the host and plugin SDK versions disagree"),
    )
    .with_operation("plugin.invoke")
}

struct RunnerHandler(Arc<dyn Runner>);
impl Handler for RunnerHandler {
    fn call(self: Arc<Self>, method: String, request: Value, call: Call) -> BoxFuture {
        Box::pin(async move {
            match method.as_str() {
                "run" => {
                    let task = wire::task_from_wire(&request)?;
                    let sink = PluginSink(call.host);
                    let outcome = self.0.run(&task, &sink, call.cancel).await?;
                    Ok(wire::outcome_to_wire(&outcome))
                }
                "cleanup_run" => {
                    let run_id = request["run_id"].as_str().unwrap_or_default();
                    self.0.cleanup_run(run_id).await.map(|()| Value::Null)
                }
                other => Err(unknown_method("runner", other)),
            }
        })
    }
}

struct ServiceHandler(Arc<dyn ServiceAdapter>);
impl Handler for ServiceHandler {
    fn call(self: Arc<Self>, method: String, request: Value, _call: Call) -> BoxFuture {
        Box::pin(async move {
            match method.as_str() {
                "check" => Ok(wire::health_to_wire(&self.0.check().await?)),
                "metrics" => Ok(wire::samples_to_wire(&self.0.metrics().await?)),
                "invoke" => {
                    let action = request["action"].as_str().unwrap_or_default().to_owned();
                    self.0.invoke(&action, request.get("args").cloned().unwrap_or(Value::Null)).await
                }
                other => Err(unknown_method("service", other)),
            }
        })
    }
}

struct MonitorHandler(Arc<dyn MonitorAdapter>);
impl Handler for MonitorHandler {
    fn call(self: Arc<Self>, method: String, request: Value, _call: Call) -> BoxFuture {
        Box::pin(async move {
            match method.as_str() {
                "export_event" => self.0.export_event(&wire::event_from_wire(&request)?).await.map(|()| Value::Null),
                "export_metrics" => {
                    self.0.export_metrics(&wire::samples_from_wire(&request)?).await.map(|()| Value::Null)
                }
                other => Err(unknown_method("monitor", other)),
            }
        })
    }
}

struct NotifierHandler(Arc<dyn Notifier>);
impl Handler for NotifierHandler {
    fn call(self: Arc<Self>, method: String, request: Value, _call: Call) -> BoxFuture {
        Box::pin(async move {
            match method.as_str() {
                "send" => Ok(wire::receipt_to_wire(&self.0.send(&wire::notification_from_wire(&request)?).await?)),
                other => Err(unknown_method("notifier", other)),
            }
        })
    }
}

/// The host's per-call context, released once when dropped.
struct HostCall(CallContext);

// SAFETY: the host promises (abi::CallContext) that `log_line` may be called from any
// thread until `release`, and `ctx` is only passed back to it.
unsafe impl Send for HostCall {}
// SAFETY: as above.
unsafe impl Sync for HostCall {}

impl Drop for HostCall {
    fn drop(&mut self) {
        // SAFETY: the host gave us this context with the promise that we call `release`
        // exactly once; `HostCall` is not `Clone`, so this drop is the one call.
        unsafe { (self.0.release)(self.0.ctx) }
    }
}

/// A runner's log sink that forwards each line to the host.
struct PluginSink(Option<HostCall>);

impl LogSink for PluginSink {
    fn line(&self, stream: Stream, line: &str) {
        if let Some(host) = &self.0 {
            let stream = if stream == Stream::Stderr { abi::STREAM_STDERR } else { abi::STREAM_STDOUT };
            // SAFETY: the context is alive until `release` (called when `host` drops,
            // after this call returns); `line` outlives the call.
            unsafe { (host.0.log_line)(host.0.ctx, stream, Str::new(line.as_bytes())) }
        }
    }
}

/// An instance: the built component and the cancellation tokens of its running calls.
struct Instance {
    handler: Arc<dyn Handler>,
    calls: Arc<Mutex<HashMap<u64, CancellationToken>>>,
}

/// The plugin library's own tokio runtime.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nexus-plugin")
            .enable_all()
            .build()
            .expect("the plugin's tokio runtime cannot start")
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

fn ok(value: &Value) -> CallResult {
    CallResult { status: abi::STATUS_OK, payload: OwnedBytes::from_vec(serde_json::to_vec(value).unwrap_or_default()) }
}

fn err(e: &Error) -> CallResult {
    CallResult {
        status: abi::STATUS_ERR,
        payload: OwnedBytes::from_vec(serde_json::to_vec(&wire::error_to_wire(e)).unwrap_or_default()),
    }
}

fn panicked(message: String) -> CallResult {
    CallResult { status: abi::STATUS_PANICKED, payload: OwnedBytes::from_vec(message.into_bytes()) }
}

fn result(r: Result<Value>) -> CallResult {
    match r {
        Ok(v) => ok(&v),
        Err(e) => err(&e),
    }
}

/// Runs `f`, turning a panic into a `Panicked` result.
fn guarded(f: impl FnOnce() -> CallResult) -> CallResult {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => panicked(panic_message(&*payload)),
    }
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::new(ErrorKind::Internal, format!("the host sent malformed JSON as the {what}: {e}"))
            .with_operation("plugin.invoke")
    })
}

/// The trait families a plugin kind may build, and how each is served.
#[doc(hidden)]
pub trait ExportFamily: 'static {
    /// `abi::FAMILY_*`.
    const FAMILY: u8;
    /// Wraps a built component.
    fn handler(built: Arc<Self>) -> Arc<dyn Handler>;
}

impl ExportFamily for dyn Runner {
    const FAMILY: u8 = abi::FAMILY_RUNNER;
    fn handler(built: Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(RunnerHandler(built))
    }
}

impl ExportFamily for dyn ServiceAdapter {
    const FAMILY: u8 = abi::FAMILY_SERVICE;
    fn handler(built: Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(ServiceHandler(built))
    }
}

impl ExportFamily for dyn MonitorAdapter {
    const FAMILY: u8 = abi::FAMILY_MONITOR;
    fn handler(built: Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(MonitorHandler(built))
    }
}

impl ExportFamily for dyn Notifier {
    const FAMILY: u8 = abi::FAMILY_NOTIFIER;
    fn handler(built: Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(NotifierHandler(built))
    }
}

/// The descriptor of kind `K`, built on first use and kept: building one generates the
/// spec's JSON Schema, which `validate` and `create` (called once per spec) do not need
/// again.
fn descriptor<K>() -> &'static KindDescriptor<K::Trait>
where
    K: ComponentKind,
    K::Trait: ExportFamily,
{
    use std::any::{Any, TypeId};
    type Descriptors = HashMap<TypeId, &'static (dyn Any + Send + Sync)>;
    static DESCRIPTORS: OnceLock<Mutex<Descriptors>> = OnceLock::new();
    let mut descriptors = DESCRIPTORS.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    let d = *descriptors
        .entry(TypeId::of::<K>())
        .or_insert_with(|| Box::leak(Box::new(KindDescriptor::<K::Trait>::of::<K>())));
    d.downcast_ref().expect("the descriptor stored for `K` is `K`'s")
}

fn leak_str(s: String) -> Str {
    let s: &'static str = Box::leak(s.into_boxed_str());
    Str::new(s.as_bytes())
}

unsafe extern "C" fn validate_kind<K>(spec: Str) -> CallResult
where
    K: ComponentKind,
    K::Trait: ExportFamily,
{
    guarded(|| {
        // SAFETY: the host passes a live buffer for the duration of this call.
        let bytes = unsafe { spec.as_bytes() };
        let value = match parse_json(bytes, "spec") {
            Ok(v) => v,
            Err(e) => return err(&e),
        };
        let issues = descriptor::<K>().validate(&value);
        let issues: Vec<Value> =
            issues.into_iter().map(|i| serde_json::json!({"path": i.path, "message": i.message})).collect();
        ok(&Value::Array(issues))
    })
}

unsafe extern "C" fn create_kind<K>(spec: Str) -> CreateResult
where
    K: ComponentKind,
    K::Trait: ExportFamily,
{
    let mut instance: *mut c_void = std::ptr::null_mut();
    let result = guarded(|| {
        // SAFETY: the host passes a live buffer for the duration of this call.
        let bytes = unsafe { spec.as_bytes() };
        let built = parse_json(bytes, "spec").and_then(|value| {
            // `build` may start tasks (a connection pool, a background flusher): it runs
            // inside the plugin's runtime.
            let _guard = runtime().enter();
            descriptor::<K>().build(value)
        });
        match built {
            Ok(built) => {
                let boxed = Box::new(Instance { handler: K::Trait::handler(built), calls: Arc::default() });
                instance = Box::into_raw(boxed).cast();
                ok(&Value::Null)
            }
            Err(e) => err(&e),
        }
    });
    CreateResult { result, instance }
}

/// The declaration of one kind.
#[doc(hidden)]
pub fn kind<K>() -> KindDeclaration
where
    K: ComponentKind,
    K::Trait: ExportFamily,
{
    let d = descriptor::<K>();
    KindDeclaration {
        family: <K::Trait as ExportFamily>::FAMILY,
        name: leak_str(d.kind.clone()),
        description: leak_str(d.description.clone()),
        spec_schema: leak_str(d.spec_schema.to_string()),
        example: leak_str(d.example.to_string()),
        actions: leak_str(Value::from(d.actions.clone()).to_string()),
        validate: validate_kind::<K>,
        create: create_kind::<K>,
    }
}

/// The host's vtable, given at `init`.
static HOST: OnceLock<HostVTable> = OnceLock::new();

/// Forwards the plugin's tracing events to the host.
struct ForwardLayer;

fn level_number(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => abi::LEVEL_ERROR,
        tracing::Level::WARN => abi::LEVEL_WARN,
        tracing::Level::INFO => abi::LEVEL_INFO,
        tracing::Level::DEBUG => abi::LEVEL_DEBUG,
        _ => abi::LEVEL_TRACE,
    }
}

/// Formats an event's message and fields as `message key=value…`.
#[derive(Default)]
struct Fields(String, String);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            self.1.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        } else {
            self.1.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ForwardLayer {
    fn register_callsite(&self, _: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        // The host's level may change: ask it for every event.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: tracing_subscriber::layer::Context<'_, S>) -> bool {
        let Some(host) = HOST.get() else { return false };
        // SAFETY: the host's `max_level` is thread-safe and its `ctx` lives forever.
        level_number(metadata.level()) <= unsafe { (host.max_level)(host.ctx) }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let Some(host) = HOST.get() else { return };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let message = fields.0 + &fields.1;
        let target = event.metadata().target();
        // SAFETY: the host's `log` is thread-safe and its `ctx` lives forever
        // (abi::HostVTable); both strings outlive the call.
        unsafe {
            (host.log)(
                host.ctx,
                level_number(event.metadata().level()),
                Str::new(target.as_bytes()),
                Str::new(message.as_bytes()),
            )
        }
    }
}

/// `Declaration::init`.
unsafe extern "C" fn init(host: *const HostVTable) -> CallResult {
    guarded(|| {
        if host.is_null() {
            return err(&Error::new(ErrorKind::Internal, "init without a host vtable"));
        }
        // SAFETY: the host passes a valid vtable; it is `Copy` and we keep a copy.
        let vtable = unsafe { *host };
        if (vtable.size as usize) < std::mem::size_of::<HostVTable>() {
            return err(&Error::new(ErrorKind::Internal, "the host's vtable is smaller than this plugin expects"));
        }
        if HOST.set(vtable).is_ok() {
            use tracing_subscriber::layer::SubscriberExt as _;
            let subscriber = tracing_subscriber::registry().with(ForwardLayer);
            // Only this library's copy of `tracing` is affected; a failure means the
            // plugin author installed their own dispatcher, which is theirs to keep.
            let _ = tracing::subscriber::set_global_default(subscriber);
            // A panic is reported to the host as an error event (and comes back as the
            // call's error), instead of being printed on the host's stderr.
            std::panic::set_hook(Box::new(|info| tracing::error!("plugin panicked: {info}")));
        }
        runtime();
        ok(&Value::Null)
    })
}

/// Forgets a call's cancellation token when the call ends or is dropped.
struct CallGuard {
    calls: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    call_id: u64,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.call_id);
    }
}

/// A call's future as the host sees it: each poll runs inside the plugin's runtime
/// context (so `tokio::spawn`, timers and I/O use the plugin's runtime, whose threads
/// drive them) and catches a panic, which ends the call as `Panicked`. Dropping it drops
/// the call's future at once: that is how a host-side timeout cancels the plugin's work.
struct InPlace {
    fut: BoxFuture,
    done: bool,
    _guard: CallGuard,
}

impl Future for InPlace {
    type Output = CallResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<CallResult> {
        if self.done {
            return std::task::Poll::Ready(err(&Error::new(ErrorKind::Internal, "a finished plugin call was polled")));
        }
        let _enter = runtime().enter();
        let polled = catch_unwind(AssertUnwindSafe(|| self.fut.as_mut().poll(cx)));
        let ready = match polled {
            Ok(std::task::Poll::Pending) => return std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(r)) => result(r),
            Err(payload) => panicked(panic_message(&*payload)),
        };
        self.done = true;
        std::task::Poll::Ready(ready)
    }
}

/// `Declaration::invoke`.
unsafe extern "C" fn invoke(
    instance: *const c_void,
    call_id: u64,
    method: Str,
    request: Str,
    context: *const CallContext,
) -> FfiFuture<CallResult> {
    // Take ownership of the host's context first, so it is released whatever happens.
    let host = if context.is_null() {
        None
    } else {
        // SAFETY: a non-null context points to a valid `CallContext` for this call; we
        // copy its fields and take over the duty to call `release` once.
        Some(HostCall(unsafe { std::ptr::read(context) }))
    };
    let started = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` comes from `create` of this library and is not destroyed
        // while the host has calls on it (the host's wrapper owns it).
        let instance = unsafe { &*instance.cast::<Instance>() };
        // SAFETY: the host's buffers are live for this call; both are copied here.
        let (method, request) = unsafe { (method.to_string_lossy(), request.as_bytes()) };
        let request = parse_json(request, "request")?;
        if method == "$cancel" {
            let id = request["call"].as_u64().unwrap_or(u64::MAX);
            // A call cancelled before it starts gets its token already fired.
            instance.calls.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().cancel();
            return Ok(None);
        }
        let token = instance.calls.lock().unwrap_or_else(|e| e.into_inner()).entry(call_id).or_default().clone();
        let handler = Arc::clone(&instance.handler);
        let fut = handler.call(method, request, Call { cancel: token, host });
        Ok(Some((fut, instance)))
    }));
    let (fut, instance) = match started {
        Ok(Ok(Some(started))) => started,
        Ok(Ok(None)) => return std::future::ready(ok(&Value::Null)).into_ffi(),
        Ok(Err(e)) => return std::future::ready(err(&e)).into_ffi(),
        Err(payload) => return std::future::ready(panicked(panic_message(&*payload))).into_ffi(),
    };
    let guard = CallGuard { calls: Arc::clone(&instance.calls), call_id };
    InPlace { fut, done: false, _guard: guard }.into_ffi()
}

/// `Declaration::destroy`.
unsafe extern "C" fn destroy(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` comes from `Box::into_raw` in `create_kind`, and the host
        // destroys each instance once.
        drop(unsafe { Box::from_raw(instance.cast::<Instance>()) });
    }));
}

/// Builds the library's declaration (once; it lives forever). `tamper` exists for the
/// host's tests, which need libraries that lie about their ABI.
#[doc(hidden)]
pub fn declaration(
    cell: &'static OnceLock<Declaration>,
    name: &'static str,
    version: &'static str,
    kinds: fn() -> Vec<KindDeclaration>,
    tamper: Option<fn(&mut Declaration)>,
) -> *const Declaration {
    cell.get_or_init(|| {
        let kinds = catch_unwind(kinds).unwrap_or_default();
        let kinds: &'static [KindDeclaration] = Box::leak(kinds.into_boxed_slice());
        let mut d = Declaration {
            header: abi::Header {
                magic: abi::MAGIC,
                abi_version: abi::ABI_VERSION,
                size: std::mem::size_of::<Declaration>() as u32,
            },
            panic_unwind: u8::from(cfg!(panic = "unwind")),
            sdk_version: Str::new(abi::SDK_VERSION.as_bytes()),
            plugin_name: Str::new(name.as_bytes()),
            plugin_version: Str::new(version.as_bytes()),
            kinds: kinds.as_ptr(),
            kinds_len: kinds.len(),
            init,
            invoke,
            destroy,
        };
        if let Some(tamper) = tamper {
            tamper(&mut d);
        }
        d
    })
}

/// The declaration of a runner kind (`export_plugin!(runner: K)`).
#[doc(hidden)]
pub fn runner<K: ComponentKind<Trait = dyn Runner>>() -> KindDeclaration {
    kind::<K>()
}

/// The declaration of a service adapter kind (`export_plugin!(service: K)`).
#[doc(hidden)]
pub fn service<K: ComponentKind<Trait = dyn ServiceAdapter>>() -> KindDeclaration {
    kind::<K>()
}

/// The declaration of a monitor kind (`export_plugin!(monitor: K)`).
#[doc(hidden)]
pub fn monitor<K: ComponentKind<Trait = dyn MonitorAdapter>>() -> KindDeclaration {
    kind::<K>()
}

/// The declaration of a notifier kind (`export_plugin!(notifier: K)`).
#[doc(hidden)]
pub fn notifier<K: ComponentKind<Trait = dyn Notifier>>() -> KindDeclaration {
    kind::<K>()
}
