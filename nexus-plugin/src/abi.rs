//! The C ABI between the `nexus` host and a plugin library (DESIGN.md §5).
//!
//! Only `#[repr(C)]` data and `extern "C"` functions cross. Every payload (config,
//! request, result, error, issues) is JSON in a byte buffer; the side that allocated a
//! buffer frees it (an [`OwnedBytes`] carries its own `free`). [`Header`] is frozen
//! forever: a host of any version can read it from a library of any version and refuse a
//! mismatch before touching anything else.
//!
//! Changing anything in this file (a field, an order, a signature) changes the ABI:
//! bump [`ABI_VERSION`] and update the fingerprint in `tests/abi_guard.rs`.

use std::ffi::c_void;

use async_ffi::FfiFuture;

/// The first 8 bytes of every declaration: `NXPLUGIN` in ASCII.
pub const MAGIC: u64 = u64::from_le_bytes(*b"NXPLUGIN");

/// The version of the layout below [`Header`]. A host loads only libraries declaring
/// exactly this version.
pub const ABI_VERSION: u32 = 1;

/// The version of `nexus-plugin` (the SDK): the JSON shapes that cross (`wire`) and the
/// `nexus-core` traits. Host and plugin must agree on its major version (on
/// `major.minor` while the major is 0).
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The one symbol a plugin library exports: `extern "C" fn() -> *const Declaration`.
pub const DECLARATION_SYMBOL: &str = "nexus_plugin_declaration";

/// The type of [`DECLARATION_SYMBOL`].
pub type DeclarationFn = unsafe extern "C" fn() -> *const Declaration;

/// The frozen start of every declaration, whatever its ABI version.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: u64,
    /// The [`ABI_VERSION`] the library was built with.
    pub abi_version: u32,
    /// `size_of::<Declaration>()` in the library.
    pub size: u32,
}

/// A borrowed UTF-8 string or byte slice; valid for the duration of the call it is
/// passed to (or, inside a [`Declaration`], forever).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Str {
    /// First byte (never null; dangling when `len == 0`).
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl Str {
    /// Borrows `s`.
    pub fn new(s: &[u8]) -> Self {
        Str { ptr: s.as_ptr(), len: s.len() }
    }

    /// The bytes.
    ///
    /// # Safety
    /// `ptr`/`len` must describe live, initialized memory for the lifetime `'a`.
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is live and initialized for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes as a string, replacing invalid UTF-8.
    ///
    /// # Safety
    /// As for [`Str::as_bytes`].
    pub unsafe fn to_string_lossy(&self) -> String {
        // SAFETY: forwarded to the caller.
        String::from_utf8_lossy(unsafe { self.as_bytes() }).into_owned()
    }
}

/// The function that frees an [`OwnedBytes`]: `(ptr, len, capacity)`.
pub type FreeFn = unsafe extern "C" fn(*mut u8, usize, usize);

/// A byte buffer owned by the side that allocated it; dropping it calls that side's
/// `free`.
#[repr(C)]
#[derive(Debug)]
pub struct OwnedBytes {
    /// First byte (may be null when empty).
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
    /// Allocated capacity.
    pub cap: usize,
    /// Frees the buffer, in the allocating library.
    pub free: FreeFn,
}

unsafe extern "C" fn free_vec(ptr: *mut u8, len: usize, cap: usize) {
    if !ptr.is_null() {
        // SAFETY: `ptr`, `len` and `cap` come from `Vec::into_raw_parts`-equivalent code
        // in `OwnedBytes::from_vec` of this same library, and are freed only once.
        drop(unsafe { Vec::from_raw_parts(ptr, len, cap) });
    }
}

impl OwnedBytes {
    /// Takes ownership of `bytes`; its `free` is this library's.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        OwnedBytes { ptr: bytes.as_mut_ptr(), len: bytes.len(), cap: bytes.capacity(), free: free_vec }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: an `OwnedBytes` always describes a live allocation of `len` initialized
        // bytes until it is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for OwnedBytes {
    fn drop(&mut self) {
        // SAFETY: `free` is the function of the allocating side, called once with the
        // values it produced.
        unsafe { (self.free)(self.ptr, self.len, self.cap) }
    }
}

// SAFETY: an `OwnedBytes` is a uniquely owned heap buffer (like a `Vec<u8>`).
unsafe impl Send for OwnedBytes {}
// SAFETY: shared access only reads the buffer.
unsafe impl Sync for OwnedBytes {}

/// [`CallResult::status`]: the payload is the JSON result.
pub const STATUS_OK: u8 = 0;
/// [`CallResult::status`]: the payload is a JSON error (`wire::WireError`).
pub const STATUS_ERR: u8 = 1;
/// [`CallResult::status`]: the plugin panicked; the payload is the panic message (UTF-8).
pub const STATUS_PANICKED: u8 = 2;

/// The result of every call into a plugin.
#[repr(C)]
#[derive(Debug)]
pub struct CallResult {
    /// [`STATUS_OK`], [`STATUS_ERR`] or [`STATUS_PANICKED`].
    pub status: u8,
    /// JSON bytes (or the panic message).
    pub payload: OwnedBytes,
}

/// The result of `create`: a result and, when it is `Ok`, the instance.
#[repr(C)]
#[derive(Debug)]
pub struct CreateResult {
    /// Ok (payload `null`), Err or Panicked.
    pub result: CallResult,
    /// The instance, to pass to `invoke` and finally to `destroy`; null unless Ok.
    pub instance: *mut c_void,
}

/// Log levels of [`HostVTable::log`]: 1 error … 5 trace.
pub const LEVEL_ERROR: u8 = 1;
/// Warn.
pub const LEVEL_WARN: u8 = 2;
/// Info.
pub const LEVEL_INFO: u8 = 3;
/// Debug.
pub const LEVEL_DEBUG: u8 = 4;
/// Trace.
pub const LEVEL_TRACE: u8 = 5;

/// What the host gives the plugin at `init`: where its log events go.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostVTable {
    /// `size_of::<HostVTable>()` in the host.
    pub size: u32,
    /// Passed back to the functions.
    pub ctx: *const c_void,
    /// The most verbose level the host wants now (`LEVEL_*`); 0 for none. Cheap: the
    /// plugin asks before formatting an event.
    pub max_level: unsafe extern "C" fn(ctx: *const c_void) -> u8,
    /// One log event: level, target (module path), message with its fields.
    pub log: unsafe extern "C" fn(ctx: *const c_void, level: u8, target: Str, message: Str),
}

/// [`CallContext::log_line`] stream: stdout.
pub const STREAM_STDOUT: u8 = 1;
/// [`CallContext::log_line`] stream: stderr.
pub const STREAM_STDERR: u8 = 2;

/// Per-call host services (a runner's log sink). The plugin calls `release` exactly once,
/// when it no longer uses `ctx`; `log_line` may be called from any thread until then.
#[repr(C)]
#[derive(Debug)]
pub struct CallContext {
    /// Passed back to the functions.
    pub ctx: *const c_void,
    /// One line of an attempt's output.
    pub log_line: unsafe extern "C" fn(ctx: *const c_void, stream: u8, line: Str),
    /// The plugin is done with `ctx`.
    pub release: unsafe extern "C" fn(ctx: *const c_void),
}

/// [`KindDeclaration::family`]: a runner.
pub const FAMILY_RUNNER: u8 = 1;
/// A service adapter.
pub const FAMILY_SERVICE: u8 = 2;
/// A monitor adapter.
pub const FAMILY_MONITOR: u8 = 3;
/// A notifier.
pub const FAMILY_NOTIFIER: u8 = 4;

/// One component kind the library provides.
#[repr(C)]
#[derive(Debug)]
pub struct KindDeclaration {
    /// `FAMILY_*`.
    pub family: u8,
    /// The kind's name as written in the registries.
    pub name: Str,
    /// One line describing it.
    pub description: Str,
    /// JSON Schema of its spec (JSON).
    pub spec_schema: Str,
    /// A valid example spec (JSON).
    pub example: Str,
    /// Named actions (JSON array of strings).
    pub actions: Str,
    /// The kind's pure validation: spec JSON → Ok payload: JSON array of
    /// `{"path": [..], "message": ".."}`.
    pub validate: unsafe extern "C" fn(spec: Str) -> CallResult,
    /// Builds an instance from a spec that passed the schema and `validate`.
    pub create: unsafe extern "C" fn(spec: Str) -> CreateResult,
}

/// The whole declaration a library returns from [`DECLARATION_SYMBOL`]; immutable and
/// alive as long as the library is loaded (forever).
#[repr(C)]
#[derive(Debug)]
pub struct Declaration {
    /// Frozen: magic, ABI version, size.
    pub header: Header,
    /// 1 when the library was built with `panic = "unwind"` (required), 0 for `abort`.
    pub panic_unwind: u8,
    /// The `nexus-plugin` version the library was built with.
    pub sdk_version: Str,
    /// The plugin crate's name.
    pub plugin_name: Str,
    /// The plugin crate's version.
    pub plugin_version: Str,
    /// The kinds, `kinds_len` of them.
    pub kinds: *const KindDeclaration,
    /// Number of kinds.
    pub kinds_len: usize,
    /// Called once, before anything else but reading this declaration.
    pub init: unsafe extern "C" fn(host: *const HostVTable) -> CallResult,
    /// Calls `method` on an instance. `call_id` is unique per host; the method
    /// `$cancel` with request `{"call": id}` fires the cancellation token of call `id`
    /// (also when sent before call `id` starts: it then starts cancelled).
    /// `context` may be null; when not, the plugin calls its `release` once. Dropping
    /// the returned future cancels the call.
    pub invoke: unsafe extern "C" fn(
        instance: *const c_void,
        call_id: u64,
        method: Str,
        request: Str,
        context: *const CallContext,
    ) -> FfiFuture<CallResult>,
    /// Frees an instance; calls still running keep what they need alive.
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
}

// SAFETY: a declaration is immutable after it is built, and everything it points to is
// `'static` and immutable (leaked strings, a leaked kind array, functions).
unsafe impl Sync for Declaration {}
// SAFETY: as above.
unsafe impl Send for Declaration {}
// SAFETY: as above.
unsafe impl Sync for KindDeclaration {}
// SAFETY: as above.
unsafe impl Send for KindDeclaration {}
// SAFETY: `CallResult` owns its buffer (see `OwnedBytes`).
unsafe impl Send for CreateResult {}
// SAFETY: the host vtable's `ctx` is immutable host data and `log` is thread-safe.
unsafe impl Send for HostVTable {}
// SAFETY: as above.
unsafe impl Sync for HostVTable {}

/// A line describing every type and constant of this ABI, for the ABI guard test.
pub fn describe() -> String {
    use std::mem::{align_of, offset_of, size_of};
    let mut d = format!("magic={MAGIC:#x} abi={ABI_VERSION};");
    d += &format!("Header size={} align={} ", size_of::<Header>(), align_of::<Header>());
    d += &format!("[{} {} {}];", offset_of!(Header, magic), offset_of!(Header, abi_version), offset_of!(Header, size));
    d += &format!("Str {} [{} {}];", size_of::<Str>(), offset_of!(Str, ptr), offset_of!(Str, len));
    d += &format!(
        "OwnedBytes {};CallResult {};CreateResult {};",
        size_of::<OwnedBytes>(),
        size_of::<CallResult>(),
        size_of::<CreateResult>()
    );
    d += &format!(
        "HostVTable {} [{} {} {}];",
        size_of::<HostVTable>(),
        offset_of!(HostVTable, ctx),
        offset_of!(HostVTable, max_level),
        offset_of!(HostVTable, log)
    );
    d += &format!(
        "CallContext {};KindDeclaration {};Declaration {};",
        size_of::<CallContext>(),
        size_of::<KindDeclaration>(),
        size_of::<Declaration>()
    );
    d += &format!(
        "status={STATUS_OK},{STATUS_ERR},{STATUS_PANICKED} family={FAMILY_RUNNER},{FAMILY_SERVICE},{FAMILY_MONITOR},{FAMILY_NOTIFIER} stream={STREAM_STDOUT},{STREAM_STDERR} levels={LEVEL_ERROR}..{LEVEL_TRACE}"
    );
    d
}
