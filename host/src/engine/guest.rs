//! The guest's `handle` export, called with a message borrowed from the NATS
//! client rather than an owned copy of it.
//!
//! The generated bindings (`HandlerPre`, `Handler`) take the WIT `message`
//! as an owned record: its subject a `String`, its payload a `Vec<u8>`. Built
//! for every message, that was two allocations and two copies of what
//! wasmtime then copies into the guest anyway, about 4 % of the host's CPU in
//! core-sub-reuse (BENCHMARKS.md). Here the same export is called with
//! [`MessageView`], which lowers into the guest straight from the client's
//! buffers. The bindings still check the component against the world when it
//! is compiled; this module only calls the one export differently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use wasmtime::component::{ComponentExportIndex, Func, InstancePre, TypedFunc};
use wasmtime::Store;

use super::StoreData;
use crate::bindings::{HandlerError, HandlerPre, Reply};
use crate::wire::MessageView;

/// What `handle` returns.
pub(crate) type HandleResult = Result<Option<Reply>, HandlerError>;

/// A component checked against the `handler` world, ready to instantiate.
#[derive(Clone)]
pub(crate) struct GuestPre {
    pre: InstancePre<StoreData>,
    /// Where `handle` is among the component's exports, looked up once.
    handle: ComponentExportIndex,
    /// Set once an instance's `handle` passed the type check. Every
    /// instance of one component has the same export types, so the check
    /// is made once per component rather than once per instance, where
    /// it was about a twentieth of instantiating `mirror` (BENCHMARKS.md).
    checked: Arc<AtomicBool>,
}

impl GuestPre {
    /// Checks `pre`'s component against the `handler` world (its imports
    /// were resolved when `pre` was made; this checks its exports).
    pub(crate) fn new(pre: InstancePre<StoreData>) -> wasmtime::Result<GuestPre> {
        HandlerPre::new(pre.clone())?;
        let handle = pre
            .component()
            .get_export_index(None, "handle")
            .ok_or_else(|| wasmtime::format_err!("the component exports no `handle` function"))?;
        Ok(GuestPre { pre, handle, checked: Arc::default() })
    }

    /// A new instance in `store`.
    pub(crate) async fn instantiate(&self, store: &mut Store<StoreData>) -> wasmtime::Result<Guest> {
        let instance = self.pre.instantiate_async(&mut *store).await?;
        // The first instance checks the export's type against
        // `MessageView`, as the generated bindings would for every one;
        // `Guest::handle` relies on it.
        if self.checked.load(Ordering::Acquire) {
            let handle = instance
                .get_func(&mut *store, self.handle)
                .ok_or_else(|| wasmtime::format_err!("the instance has no `handle` function"))?;
            return Ok(Guest { handle });
        }
        let typed = instance.get_typed_func::<(MessageView<'static>,), (HandleResult,)>(&mut *store, &self.handle)?;
        self.checked.store(true, Ordering::Release);
        Ok(Guest { handle: *typed.func() })
    }
}

/// One instance's `handle` export.
pub(crate) struct Guest {
    /// Type-checked against `(MessageView,) -> (HandleResult,)`, in this
    /// instance or in an earlier instance of the same component.
    handle: Func,
}

impl Guest {
    /// Calls `handle` with `msg`.
    pub(crate) async fn handle(
        &self,
        store: &mut Store<StoreData>,
        msg: MessageView<'_>,
    ) -> wasmtime::Result<HandleResult> {
        // SAFETY: `GuestPre::instantiate` checked this function's type
        // against exactly these parameter and result types, in this
        // instance or in one of the same component (whose exports have the
        // same types, being the same component's). The borrow's
        // lifetime is not part of a component type, so the check made with
        // `'static` holds for any.
        let typed = unsafe { TypedFunc::<(MessageView<'_>,), (HandleResult,)>::new_unchecked(self.handle) };
        let (result,) = typed.call_async(&mut *store, (msg,)).await?;
        Ok(result)
    }
}
