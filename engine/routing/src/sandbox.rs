//! The Lua sandbox every script runs in: `routes.lua`, conditions, plugins and their schemas.
//!
//! One VM per shard (and one per load for checking), Lua 5.4 with only the `string`, `table`,
//! `math` and `utf8` libraries and the safe half of the base library: no `io`, `os`, `require`,
//! `load`, `dofile`, `collectgarbage` or `debug`, and no `pcall`, `xpcall` or coroutines, so a
//! script cannot catch the error that ends it when it runs out of instructions or memory. The
//! VM has a memory limit; each call an instruction budget, counted by a hook every
//! [`HOOK_EVERY`] instructions. The collector runs in generational mode: per-call garbage is
//! what a message path makes (DEPENDENCIES.md measured the incremental mode keeping it).

use std::cell::Cell;
use std::rc::Rc;

use mlua::state::{GcGenParams, GcMode};
use mlua::{HookTriggers, Lua, LuaOptions, StdLib, VmState};

/// Instructions between two looks at the budget.
pub const HOOK_EVERY: u32 = 1_000;

/// What a VM and each call into it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes the VM may hold in all.
    pub memory: usize,
    /// Instructions one call may run (rounded up to [`HOOK_EVERY`]).
    pub instructions: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: 32 << 20,
            instructions: 1_000_000,
        }
    }
}

/// The text of the error a call gets when it runs out of instructions.
pub const BUDGET_EXCEEDED: &str = "instruction budget exceeded";

/// A sandboxed VM and the budget of the call running in it.
pub struct Vm {
    pub lua: Lua,
    left: Rc<Cell<u64>>,
    limits: Limits,
}

impl Vm {
    pub fn new(limits: Limits) -> mlua::Result<Vm> {
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::new())?;
        lua.gc_set_mode(GcMode::Generational(GcGenParams::default()));
        let g = lua.globals();
        for name in [
            "dofile",
            "loadfile",
            "load",
            "collectgarbage",
            "pcall",
            "xpcall",
            "print",
            "require",
            "coroutine",
        ] {
            g.raw_set(name, mlua::Value::Nil)?;
        }
        // `string.dump` would hand out bytecode; nothing loads bytecode here, but no need for it.
        if let Ok(string) = g.get::<mlua::Table>("string") {
            string.raw_set("dump", mlua::Value::Nil)?;
        }
        let left = Rc::new(Cell::new(limits.instructions));
        let counter = left.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                let n = counter.get();
                if n <= u64::from(HOOK_EVERY) {
                    // Stays exhausted: a second hook in the same call fails again.
                    counter.set(0);
                    return Err(mlua::Error::RuntimeError(BUDGET_EXCEEDED.into()));
                }
                counter.set(n - u64::from(HOOK_EVERY));
                Ok(VmState::Continue)
            },
        )?;
        lua.set_memory_limit(limits.memory)?;
        Ok(Vm { lua, left, limits })
    }

    /// Gives the next call its whole budget. Call before every entry into Lua.
    // hot path: one store.
    pub fn arm(&self) {
        self.left.set(self.limits.instructions);
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// The bounded label of a Lua failure, for metrics.
pub fn error_code(e: &mlua::Error) -> &'static str {
    match e {
        mlua::Error::MemoryError(_) => "memory",
        mlua::Error::SyntaxError { .. } => "syntax",
        mlua::Error::CallbackError { cause, .. } => error_code(cause),
        mlua::Error::WithContext { cause, .. } => error_code(cause),
        mlua::Error::RuntimeError(m) if m.contains(BUDGET_EXCEEDED) => "budget",
        mlua::Error::RuntimeError(_) => "runtime",
        mlua::Error::FromLuaConversionError { .. } | mlua::Error::BadArgument { .. } => "type",
        mlua::Error::UserDataDestructed | mlua::Error::CallbackDestructed => "stale_handle",
        _ => "other",
    }
}

/// The first line of a Lua error, without mlua's traceback: what an operator reads.
pub fn error_text(e: &mlua::Error) -> String {
    let s = match e {
        mlua::Error::CallbackError { cause, .. } => return error_text(cause),
        mlua::Error::WithContext { cause, .. } => return error_text(cause),
        mlua::Error::RuntimeError(m) | mlua::Error::MemoryError(m) => m.clone(),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        other => other.to_string(),
    };
    s.lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vm: &Vm, src: &str) -> mlua::Result<mlua::Value> {
        vm.arm();
        vm.lua.load(src).eval()
    }

    #[test]
    fn an_endless_loop_runs_out_of_instructions_and_the_vm_goes_on() {
        let vm = Vm::new(Limits {
            memory: 4 << 20,
            instructions: 100_000,
        })
        .expect("vm");
        let e = run(&vm, "while true do end").expect_err("endless");
        assert_eq!(error_code(&e), "budget", "{e}");
        assert_eq!(
            run(&vm, "local n = 0 for i = 1, 1000 do n = n + i end return n").expect("runs"),
            mlua::Value::Integer(500_500)
        );
    }

    #[test]
    fn memory_is_limited_and_the_unsafe_library_is_gone() {
        let vm = Vm::new(Limits {
            memory: 2 << 20,
            instructions: 10_000_000,
        })
        .expect("vm");
        let e = run(&vm, "local t = {} for i = 1, 1e7 do t[i] = i end").expect_err("too big");
        assert_eq!(error_code(&e), "memory", "{e}");
        let e = run(&vm, "return string.rep('x', 1 << 30)").expect_err("too big");
        assert_eq!(error_code(&e), "memory", "{e}");
        for name in [
            "io",
            "os",
            "require",
            "load",
            "dofile",
            "loadfile",
            "pcall",
            "xpcall",
            "debug",
            "coroutine",
            "collectgarbage",
            "print",
        ] {
            let v = run(&vm, &format!("return {name}")).expect("reads a global");
            assert_eq!(v, mlua::Value::Nil, "{name} is reachable");
        }
        assert_eq!(
            run(
                &vm,
                "return string.upper('ok') .. math.floor(2.5) .. #table.concat({'a','b'})"
            )
            .expect("safe libraries")
            .to_string()
            .ok(),
            Some("OK22".to_string())
        );
    }
}
