//! Raw Linux calls, each in one place: the `bpf()` commands aya 0.14 keeps private or does not
//! have (batch reads, a pinned link's attachment, program queries), network namespaces (cookies,
//! threads that enter one), interface addresses and routes, filesystem magic numbers, and the
//! C allocator's arenas.
//! Everything above this module is safe code; every `unsafe` block here says why it is sound.
//!
//! Nothing here knows the agent's maps or programs: callers name the types.

pub mod alloc;
pub mod bpf;
pub mod fs;
pub mod net;
