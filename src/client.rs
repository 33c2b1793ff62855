//! The Rust client (to be built).
